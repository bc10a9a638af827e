"""How much does choosing the SPIDER level fusion's setting cost? The choice cross-validated (issue 13).

The level fusion chooses, per finding, the T2's weight in its prior (and, searched here, the LightGBM rounds
boosted from it) on cross-validated predictions; scored on those same predictions, the chosen setting looks
better than it is. Here each outer fold's setting is chosen on the other folds only (an inner 5-fold split by
patient, :func:`spinepath.grading.spider.nested_predictions`), fitted there and scored on the outer fold.
Out of fold on a training run's ``oof.npz`` (training + selection patients; the validation split is never
read), per finding: the booster fitted from nothing (v0.5.2-v0.5.6), the choice among the prior's weights and
the rounds 0-120, and the choice among the weights alone (the committed fusion), with the last one's gain over
the first (paired bootstrap 95% interval by patient). Prints JSON.

Usage: python scripts/nested_fusion_choice.py [--oof runs/spider_r18/oof.npz]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.grading.fusion import paired_gain  # noqa: E402
from spinepath.grading.spider import (  # noqa: E402
    BOOST_ROUNDS,
    FUSION_ROUNDS,
    PLAIN,
    TARGETS,
    _n_classes,
    fit_predict,
    fusion_settings,
    nested_predictions,
    target_score,
)


def chosen_in_inner_folds(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, target: str,
                          settings: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """Outer out-of-fold predictions of ``target`` with each fold's setting chosen on the other folds."""
    from sklearn.model_selection import GroupKFold

    j = TARGETS.index(target)
    m = Y[:, j] >= 0
    Xk, yk, gk, nc = X[m], Y[m, j], groups[m], _n_classes(target)
    out = np.zeros((len(yk), nc)) if nc > 2 else np.zeros(len(yk))
    chosen = []
    for tr, te in GroupKFold(n_splits=5).split(Xk, yk, gk):
        inner = np.full((len(tr), len(TARGETS)), -1)
        inner[:, j] = yk[tr]
        _, _, s = nested_predictions(Xk[tr], inner, gk[tr], target, settings=settings)
        out[te] = fit_predict(Xk, yk, tr, te, target, s)
        chosen.append({"t2_weight": s["t2_weight"], "rounds": s["rounds"]})
    return out, chosen


def main() -> None:
    """Compare, print JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oof", default=str(REPO / "runs" / "spider_r18" / "oof.npz"))
    args = ap.parse_args()
    z = np.load(args.oof)
    X, Y, groups = z["X"], z["Y"], z["groups"]
    out: dict = {}
    for t in TARGETS:
        m = Y[:, TARGETS.index(t)] >= 0
        y, g = Y[m, TARGETS.index(t)], groups[m]
        plain, _, _ = nested_predictions(X, Y, groups, t, settings=[PLAIN])
        boosted, _ = chosen_in_inner_folds(X, Y, groups, t, fusion_settings(BOOST_ROUNDS))
        weighted, chosen = chosen_in_inner_folds(X, Y, groups, t, fusion_settings(FUSION_ROUNDS))
        r = paired_gain(partial(target_score, t), y, plain, weighted, g)
        out[t] = {"booster_from_nothing": r["a"], "weight_and_rounds_chosen": round(target_score(t, y, boosted), 4),
                  "weight_chosen": r["b"], "gain": r["gain"], "ci95": r["ci95"], "inner_choices": chosen}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
