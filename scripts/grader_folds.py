"""Write a committed SPIDER grader's fold networks back into its training runs' folders.

The out-of-fold table (``oof.npz``) that the decisions are fitted on (``fit_listhesis_decision.py``,
``fit_vertebra_decision.py``, ``degeneration_margin.py``) is recomputed by ``spinepath train spider`` in a run folder
that already holds its ``fold<k>.pt`` checkpoints (no training, a few minutes). A new checkout has no ``runs/``: this
script takes the networks from ``bundle/models/spider_grader.pt`` (run after run, fold after fold, as
``combine_runs`` stores them) and saves them as ``<run>/fold<k>.pt`` for the runs named in the grader's metadata.
The committed weights are fp16, so the recomputed table matches the original runs' to fp16 rounding.

Usage: python scripts/grader_folds.py [--grader bundle/models/spider_grader.pt] [--folds 5]
  then: spinepath train spider --out-dir <run> for each run, and
        spinepath train spider --combine <runs...> --out-dir runs/spider_combined
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.grading.spider import SpiderGrader  # noqa: E402


def main() -> None:
    """Save each run's fold networks."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grader", default=str(REPO / "bundle" / "models" / "spider_grader.pt"))
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    g = SpiderGrader.load(args.grader, exported=False)
    runs = g.meta.get("combined") or [g.meta.get("run", "runs/spider_run")]
    if len(g.models) != args.folds * len(runs):
        sys.exit(f"{args.grader}: {len(g.models)} networks, not {args.folds} folds x {len(runs)} runs")
    for r, run in enumerate(runs):
        out = REPO / run
        out.mkdir(parents=True, exist_ok=True)
        for k in range(args.folds):
            torch.save(g.models[r * args.folds + k].state_dict(), out / f"fold{k}.pt")
        print(f"{run}: {args.folds} fold networks")


if __name__ == "__main__":
    main()
