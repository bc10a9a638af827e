"""What the Spark-scheme disc grade says on SPIDER's graded discs, beside the SPIDER grader (which disc finding leads).

The product grades each disc twice: the spark grader (issue 3; v1 normal, v2 bulge, v3 protrusion, v4 extrusion,
v5 Schmorl's node; trained on spark_midsag) and the SPIDER grader (issue 13). This runs the product's chain
(detection, S1-anchored names, the spark grader) on the anchored T2 of the spider_midsag training + selection
patients (the validation split is never read), pairs every graded disc with its SPIDER labels by index from the
bottom, and reports, as JSON:

- per Spark call, how many discs and the share SPIDER labels herniated / bulging / with an endplate change;
- the AUC of the Spark probabilities for SPIDER's herniation (P(v3) + P(v4)), bulging (P(abnormal)) and endplate
  change (P(v5)) against the SPIDER grader's out-of-fold fused probability on the same discs (from a
  ``spinepath train spider`` run's ``oof.npz`` and ``summary.json``), with the paired bootstrap 95% interval of
  the difference by patient. The Spark grader never saw a SPIDER image, so its figures are out of sample too.

Usage: python scripts/spark_disc_agreement.py [--run runs/spider_combined] [--out FILE] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath import stages  # noqa: E402
from spinepath.core.files import print_json  # noqa: E402
from spinepath.core.levels import DISC_GRADES, disc_index_from_bottom  # noqa: E402
from spinepath.data.spider import load_spider_midsag  # noqa: E402
from spinepath.data.split import split_part  # noqa: E402
from spinepath.evaluation.spider import anchored_t2  # noqa: E402
from spinepath.grading.fusion import paired_gain  # noqa: E402
from spinepath.grading.spider import FUSION_FEATURES, sequence_prior  # noqa: E402


def main() -> None:
    """Entry point."""
    from sklearn.metrics import roc_auc_score
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "spider_midsag"))
    ap.add_argument("--run", default="runs/spider_combined", help="a SPIDER training run (oof.npz, summary.json)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()

    oof = np.load(Path(args.run) / "oof.npz", allow_pickle=True)
    settings = json.loads((Path(args.run) / "summary.json").read_text())["fusion_settings"]
    index = oof["X"][:, FUSION_FEATURES.index("index_from_bottom")].astype(int)
    row_of = {(str(p), int(i)): k for k, (p, i) in enumerate(zip(oof["groups"], index))}
    spider_p = {t: sequence_prior(oof["X"], t, settings[t]["t2_weight"])
                for t in ("herniation", "bulging", "upper_endplate_change", "lower_endplate_change")}

    detector, grader = stages.load_models()
    studies = [s for s in load_spider_midsag(args.data)
               if split_part("spider_midsag", s.patient, s.patient) != "validation"]
    rows = []  # patient, spark probabilities (5), labels, SPIDER out-of-fold probabilities
    for s in tqdm(studies, disable=args.quiet, desc="spider_midsag T2"):
        res = anchored_t2(s, detector)
        if res is None:
            continue
        stages.grade(res, grader)
        labels = s.discs_by_index
        for d in res.findings.discs:
            i = disc_index_from_bottom(d.level)
            k = row_of.get((s.patient, i))
            lab = labels.get(i, {})
            if k is None or any(lab.get(f) is None for f in ("herniation", "bulging", "upper_endplate_change",
                                                              "lower_endplate_change")):
                continue
            endplate = int(bool(lab["upper_endplate_change"]) or bool(lab["lower_endplate_change"]))
            ep = 1 - (1 - spider_p["upper_endplate_change"][k]) * (1 - spider_p["lower_endplate_change"][k])
            rows.append((s.patient, np.asarray(d.probabilities, float), int(bool(lab["herniation"])),
                         int(bool(lab["bulging"])), endplate, spider_p["herniation"][k], spider_p["bulging"][k], ep))
    patients = np.array([r[0] for r in rows])
    spark = np.stack([r[1] for r in rows])
    her, bul, end = (np.array([r[j] for r in rows]) for j in (2, 3, 4))
    s_her, s_bul, s_end = (np.array([r[j] for r in rows], float) for j in (5, 6, 7))
    calls = spark.argmax(1)
    out = {
        "task": "spark_disc_agreement",
        "n_patients": int(len(np.unique(patients))),
        "n_discs": len(rows),
        "by_spark_call": {g: {"n": int((calls == j).sum()),
                              "herniation_rate": round(float(her[calls == j].mean()), 3),
                              "bulging_rate": round(float(bul[calls == j].mean()), 3),
                              "endplate_change_rate": round(float(end[calls == j].mean()), 3)}
                          for j, g in enumerate(DISC_GRADES) if (calls == j).any()},
        "rates_over_all_discs": {"herniation": round(float(her.mean()), 3), "bulging": round(float(bul.mean()), 3),
                                 "endplate_change": round(float(end.mean()), 3)},
        # a = the Spark probability, b = the SPIDER grader's: gain > 0 where SPIDER ranks better
        "auc_spark_vs_spider": {
            "herniation (spark P(v3)+P(v4))": paired_gain(roc_auc_score, her, spark[:, 2] + spark[:, 3], s_her,
                                                          patients),
            "bulging (spark P(abnormal))": paired_gain(roc_auc_score, bul, 1 - spark[:, 0], s_bul, patients),
            "endplate_change (spark P(v5))": paired_gain(roc_auc_score, end, spark[:, 4], s_end, patients),
        },
    }
    print_json(out, args.out)


if __name__ == "__main__":
    main()
