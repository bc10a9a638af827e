"""Compare two segmentation models' slips as spondylolisthesis evidence, paired on the same discs.

Reads two ``scripts/fit_listhesis_decision.py --rows`` files (the same grader's out-of-fold image probabilities,
the slips each segmentation model measured), keeps the discs both measured, and reports for each the
out-of-fold AUC of the slip alone and of the decision (image log-odds + slip feature, 5 folds by patient), with
the difference B - A and its paired bootstrap 95% interval resampling patients. Only training + selection
patients are in the rows: the validation split is never read.

Usage: python scripts/listhesis_compare.py A.npz B.npz [--bootstrap 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.grading.calibration import logit  # noqa: E402
from spinepath.grading.fusion import oof_logistic, paired_gain  # noqa: E402
from spinepath.grading.spider_inference import slip_feature  # noqa: E402


def _aligned(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patients, labels, image probabilities and both slips on the discs both files hold."""
    key_a = {(str(p), int(i)): k for k, (p, i) in enumerate(zip(a["patient"], a["index"]))}
    pairs = [(key_a[(str(p), int(i))], k) for k, (p, i) in enumerate(zip(b["patient"], b["index"]))
             if (str(p), int(i)) in key_a]
    ia, ib = (np.array(x) for x in zip(*pairs))
    return a["patient"][ia], a["y"][ia], a["image"][ia], a["slip_percent"][ia], b["slip_percent"][ib]


def main() -> None:
    """Entry point."""
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pat, y, img, slip_a, slip_b = _aligned(dict(np.load(args.a)), dict(np.load(args.b)))
    scores = {}
    for name, slip in (("a", slip_a), ("b", slip_b)):
        x = np.stack([logit(img), [slip_feature(s) for s in slip]], axis=1)
        scores[name] = {"slip": np.abs(slip), "combined": oof_logistic(x, y, pat)}
    out: dict = {"discs": int(len(y)), "positive": int(y.sum()), "patients": int(len(set(pat)))}
    for kind in ("slip", "combined"):
        r = paired_gain(roc_auc_score, y, scores["a"][kind], scores["b"][kind], pat, n=args.bootstrap, seed=args.seed)
        out[kind] = {"auc_a": r["a"], "auc_b": r["b"], "difference": r["gain"], "ci95": r["ci95"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
