"""Fit the per-vertebra pathology decision of issue 13, item 4: endplate / marrow evidence with the spark score.

Rows: every vertebra between two labelled discs of the spider_midsag *training + selection* patients whose T2 is
anchored on S1 and whose level the spark heads grade (L1-L5); the validation part is never read. Each row has

* the SPIDER reference (``vertebra_reference``: its own endplates changed or Modic at either disc),
* ``endplate_marrow``: the out-of-fold Platt-calibrated noisy-or of the SPIDER grader's nested cross-validated
  fused findings (``runs/<spider run>/oof.npz``, as the committed grader's training wrote it),
* ``spark_degenerative``: the committed spark grader's fused probability on that T2 image (trained on
  spark_midsag only, so out of sample on SPIDER).

A logistic regression on the two log-odds is cross-validated by patient (5 folds); the threshold maximises
balanced accuracy on those out-of-fold probabilities. Prints the out-of-fold AUC of each part alone and of the
combination, and writes ``spinepath/configs/vertebra_decision.json`` (coefficients, threshold, figures) with
``--write``.

Usage: python scripts/fit_vertebra_decision.py [--oof runs/spider_r18/oof.npz] [--write] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.config import config_file  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.data.split import spider_fitting_studies  # noqa: E402
from spinepath.evaluation.spider import spark_probabilities  # noqa: E402
from spinepath.grading.calibration import logit  # noqa: E402
from spinepath.grading.fusion import best_threshold, oof_logistic  # noqa: E402
from spinepath.grading.spider import (  # noqa: E402
    oof_fused_by_patient,
    vertebra_parts,
    vertebra_probability,
    vertebra_reference,
)
from spinepath.stages import load_models, load_spider_grader  # noqa: E402


def main() -> None:
    """Fit, report and (with ``--write``) save the decision."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oof", default=str(REPO / "runs" / "spider_r18" / "oof.npz"))
    ap.add_argument("--write", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    detector, spark = load_models()
    spider = load_spider_grader()
    fused = oof_fused_by_patient(args.oof)
    studies = spider_fitting_studies(SHARED_EXAMPLES.parent / "spider_midsag")
    rows = []
    for p in tqdm(sorted(fused), desc="spark grading", disable=args.quiet):
        if p not in studies:
            continue
        sp = spark_probabilities(studies[p], detector, spark)
        for i, y in vertebra_reference(studies[p].discs_by_index).items():
            parts = vertebra_parts(fused[p], i)
            if parts is None or i not in sp:
                continue
            rows.append((p, i, y, vertebra_probability(parts, spider.fusion.vertebra), sp[i]))
    groups = np.array([r[0] for r in rows])
    y = np.array([r[2] for r in rows])
    X = np.stack([logit(np.array([r[3] for r in rows])), logit(np.array([r[4] for r in rows]))], axis=1)
    oof = oof_logistic(X, y, groups)
    thr = best_threshold(y, oof)
    lr = LogisticRegression(C=1.0).fit(X, y)
    out = {
        "description": "Per-vertebra pathology of issue 13 item 4 (L1-L5): sigmoid(intercept + coef_em * "
                       "logit(endplate_marrow) + coef_spark * logit(spark_degenerative)); threshold maximising "
                       "balanced accuracy on out-of-fold probabilities (5 folds by patient). Fitted by "
                       "scripts/fit_vertebra_decision.py on the spider_midsag training + selection patients "
                       "(anchored T2, vertebrae between two labelled discs; reference: own endplates changed or "
                       "Modic at either disc). Validation patients never read.",
        "intercept": float(lr.intercept_[0]), "coef_endplate_marrow": float(lr.coef_[0, 0]),
        "coef_spark_degenerative": float(lr.coef_[0, 1]), "threshold": float(thr),
        "fitted_on": {"patients": int(len(set(groups))), "vertebrae": int(len(y)), "positive": int(y.sum()),
                      "oof": Path(args.oof).name},
        "out_of_fold": {
            "auc_endplate_marrow": round(float(roc_auc_score(y, X[:, 0])), 4),
            "auc_spark_degenerative": round(float(roc_auc_score(y, X[:, 1])), 4),
            "auc_combined": round(float(roc_auc_score(y, oof)), 4),
            "balanced_accuracy_combined": round(float(balanced_accuracy_score(y, oof >= thr)), 4),
        },
    }
    print(json.dumps(out, indent=1))
    if args.write:
        config_file("vertebra_decision.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
