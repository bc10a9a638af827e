"""Compare two SPIDER training runs out of fold: each finding's fused figure and the gain with its interval.

Both runs (``spinepath train spider --out-dir RUN``) grade the same discs of the training + selection patients
(the same detector finds them), so their level tables (``RUN/oof.npz``) have the same rows. The level fusion is
refitted on each with nested cross-validation by patient, as the training does; for the Pfirrmann quadratic κ
(rounded expected grade), the any-Modic AUC and every binary AUC the script prints both runs' figures and the
second run's gain with a paired bootstrap 95% interval by patient (:func:`spinepath.grading.fusion.paired_gain`).
A variant is adopted only where the gains' intervals lie above 0. The validation patients are never read.

Usage: python scripts/compare_spider_runs.py RUN_A RUN_B [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.grading.fusion import paired_gain, quadratic_kappa  # noqa: E402
from spinepath.grading.spider import BINARY, TARGETS, fit_level_fusion, pfirrmann_grade  # noqa: E402


def fused(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(patient, disc index, labels, nested cross-validated fused predictions)`` of one run's rows."""
    z = np.load(run / "oof.npz")
    _, cv = fit_level_fusion(z["X"], z["Y"], z["groups"])
    return z["groups"], z["X"][:, -1], z["Y"], cv


def main() -> None:
    """Refit both fusions, compare, print JSON."""
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    groups, idx, y, a = fused(args.run_a)
    groups_b, idx_b, y_b, b = fused(args.run_b)
    if not (np.array_equal(groups, groups_b) and np.array_equal(idx, idx_b) and np.array_equal(y, y_b)):
        sys.exit("the two runs graded different discs: their level tables cannot be compared row by row")

    def within_one(t: np.ndarray, g: np.ndarray) -> float:
        return float(np.mean(np.abs(t - g) <= 1))

    out: dict = {"run_a": str(args.run_a), "run_b": str(args.run_b), "levels": len(y)}
    j = TARGETS.index("pfirrmann")
    m = y[:, j] >= 0
    ga, gb = (pfirrmann_grade(p["pfirrmann"][m], "expected") for p in (a, b))
    out["pfirrmann_kappa"] = paired_gain(quadratic_kappa, y[m, j], ga, gb, groups[m], args.bootstrap)
    out["pfirrmann_within_one"] = paired_gain(within_one, y[m, j], ga, gb, groups[m], args.bootstrap)
    j = TARGETS.index("modic")
    m = y[:, j] >= 0
    out["modic_any_auc"] = paired_gain(roc_auc_score, (y[m, j] > 0).astype(int), 1 - a["modic"][m, 0],
                                       1 - b["modic"][m, 0], groups[m], args.bootstrap)
    for k in BINARY:
        j = TARGETS.index(k)
        m = y[:, j] >= 0
        out[f"{k}_auc"] = paired_gain(roc_auc_score, y[m, j], a[k][m], b[k][m], groups[m], args.bootstrap)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
