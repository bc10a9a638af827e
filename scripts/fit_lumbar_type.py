"""Fit the six-lumbar check of the naming stage (is the junction named T12-L1 shaped like a lumbar one).

A spine with six lumbar-type vertebrae, named from S1, has its vertebra L1 named T12: the junction the
product calls T12-L1 is then anatomically L1-L2. The check compares the shape of that junction
(:func:`spinepath.detection.naming.junction_features`) with the two populations on the spider_midsag images
(T2 and T1) that the detector anchors on S1: thoracolumbar junctions (named T12-L1) against lumbar ones
(named L1-L2). A logistic regression on the log-ratios is fitted on the training and selection patients; the
threshold is the lowest that flags at most ``--false-alarm`` of their thoracolumbar junctions in 5-fold
out-of-fold predictions (folds by patient); the validation patients (which choose nothing) give the
false-alarm rate and, as a surrogate sensitivity, the fraction of lumbar junctions it would call lumbar.
SPIDER gives no transitional labels: a spine with six (or four) lumbar vertebrae in these populations is
counted as five, which is label noise of a few percent.

Writes ``lumbar_type`` into ``configs/naming.json`` (``--write``) and prints JSON; the report goes to
``bundle/docs/lumbar_type.json``.

Usage: python scripts/fit_lumbar_type.py [--model PATH] [--false-alarm 0.05] [--write] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from spinepath.core.geometry import series_from_slices  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES, resolve_model_path  # noqa: E402
from spinepath.data.spider import load_spider_midsag  # noqa: E402
from spinepath.data.split import split_part  # noqa: E402
from spinepath.detection.naming import (  # noqa: E402
    JUNCTION_FEATURES,
    NAMING_RULES,
    junction_features,
    lumbar_junction_probability,
)
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.grading.fusion import oof_logistic  # noqa: E402
from spinepath.stages import detect_series  # noqa: E402

#: (upper, lower, below, label): 0 = thoracolumbar junction, 1 = lumbar junction.
JUNCTIONS = (("T12", "L1", "L2", 0), ("L1", "L2", "L3", 1))


def junctions(root: Path, model: VertebraDetector, quiet: bool) -> list[dict]:
    """Junction features of every anchored spider_midsag image, with the patient's split part."""
    rows = []
    for s in tqdm(load_spider_midsag(root / "spider_midsag"), desc="spider_midsag", disable=quiet):
        part = split_part("spider_midsag", s.patient, s.patient)
        for seq in s.sequences:
            img = s.load_image(seq)
            res = detect_series(series_from_slices([img], s.spacing[seq], 4.0), model)
            if res.naming is None or res.naming.anchor != "S1":
                continue
            by = {t.level: t for t in res.vertebrae}
            for up, lo, below, label in JUNCTIONS:
                if all(n in by for n in (up, lo, below)) and not by[up].truncated:
                    rows.append({"patient": s.patient, "sequence": seq, "part": part, "label": label,
                                 "x": junction_features(by[up], by[lo], by[below]).tolist()})
    return rows


def main() -> None:
    """Fit, report, and write with ``--write``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="detector weights (default: the bundle's)")
    ap.add_argument("--data-root", default=str(SHARED_EXAMPLES.parent))
    ap.add_argument("--false-alarm", type=float, default=0.05,
                    help="largest fraction of selection thoracolumbar junctions flagged")
    ap.add_argument("--write", action="store_true", help="write lumbar_type into configs/naming.json")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    model = VertebraDetector.load(resolve_model_path(args.model))
    rows = junctions(Path(args.data_root), model, args.quiet)

    def part(p: str) -> tuple[np.ndarray, np.ndarray]:
        sel = [r for r in rows if r["part"] == p]
        return np.log([r["x"] for r in sel]), np.array([r["label"] for r in sel])

    (xt, yt), (xs, ys), (xv, yv) = part("train"), part("selection"), part("validation")
    # the threshold: out-of-fold probabilities over the training and selection patients (5 folds by patient)
    x_fit, y_fit = np.concatenate([xt, xs]), np.concatenate([yt, ys])
    g_fit = np.array([r["patient"] for r in rows if r["part"] in ("train", "selection")])
    oof = oof_logistic(x_fit, y_fit, g_fit, c=100.0)
    neg = np.sort(oof[y_fit == 0])[::-1]
    k = int(np.floor(args.false_alarm * len(neg)))
    thr = float(neg[k]) + 1e-4 if k < len(neg) else 0.5
    lr = LogisticRegression(C=100.0).fit(x_fit, y_fit)  # log-ratios are small: weak regularisation
    lumbar_type = {"features": list(JUNCTION_FEATURES), "coef": [round(float(c), 4) for c in lr.coef_[0]],
                   "intercept": round(float(lr.intercept_[0]), 4), "threshold": round(thr, 4)}

    def prob(x: np.ndarray) -> np.ndarray:
        return np.array([lumbar_junction_probability(np.exp(v), lumbar_type) for v in x])

    pv = prob(xv)
    report = {
        "model": str(resolve_model_path(args.model)), "features": list(JUNCTION_FEATURES),
        "n_junctions": {p: {"thoracolumbar": int((y == 0).sum()), "lumbar": int((y == 1).sum())}
                        for p, y in (("train", yt), ("selection", ys), ("validation", yv))},
        "lumbar_type": lumbar_type,
        "train_and_selection_out_of_fold": {
            "auc": round(float(roc_auc_score(y_fit, oof)), 4),
            "false_alarm": round(float((oof[y_fit == 0] >= thr).mean()), 4),
            "lumbar_called_lumbar": round(float((oof[y_fit == 1] >= thr).mean()), 4)},
        "validation": {"auc": round(float(roc_auc_score(yv, pv)), 4),
                       "false_alarm": round(float((pv[yv == 0] >= thr).mean()), 4),
                       "lumbar_called_lumbar": round(float((pv[yv == 1] >= thr).mean()), 4)},
    }
    (REPO / "bundle" / "docs" / "lumbar_type.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.write:
        rules = json.loads(Path(NAMING_RULES).read_text())
        rules["lumbar_type"] = lumbar_type
        Path(NAMING_RULES).write_text(json.dumps(rules, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
