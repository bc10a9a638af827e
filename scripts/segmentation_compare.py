"""Compare segmentation models on the selection split: each with its own offsets, the paired gain by case.

Each model is scored as ``scripts/segmentation_offsets.py`` scores it (the contract's Dice of each source's
annotated classes on the selection patients of spider_seg, chu_t2, spineweb_vb and ivd_t2, the mean over
sources and classes, with the best per-class offsets of the grid). Every further model is compared with the
first: the gain of the score with a paired bootstrap 95% interval that resamples cases within each source
(:func:`spinepath.evaluation.segmentation_selection.paired_case_gain`). A model is adopted only where the
interval lies above 0. The validation split is never read. The offsets are chosen and scored on the same
cases, for every model alike: each score is slightly optimistic, the interval does not count that choice.

Usage: python scripts/segmentation_compare.py BASE.pt OTHER.pt [MORE.pt ...] [--bootstrap 1000] [-q]
Prints JSON: each model's offsets and per-source Dice, and each other model's gain over BASE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.exported import file_digest  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.evaluation.segmentation_selection import (  # noqa: E402
    OffsetChoice,
    paired_case_gain,
    search_offsets,
    selection_probabilities,
)
from spinepath.segmentation.inference import load_segmenter  # noqa: E402


def best_choice(path: Path, quiet: bool, max_cases: int | None = None) -> OffsetChoice:
    """The model's best grid offsets on the selection split and its per-case Dice there."""
    slices = selection_probabilities(load_segmenter(path, offsets=False), SHARED_EXAMPLES.parent, not quiet,
                                     max_cases=max_cases)
    return search_offsets(slices, progress=not quiet)[0]


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="BASE first, then the models compared with it")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--max-cases", type=int, default=None, help="selection cases per source (a quick look)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    if len(args.models) < 2:
        ap.error("give a base model and at least one model to compare with it")
    missing = [str(p) for p in args.models if not p.is_file()]
    if missing:
        ap.error(f"no such model file: {', '.join(missing)}")
    choices = [best_choice(p, args.quiet, args.max_cases) for p in args.models]
    out = {"base": str(args.models[0]), "models": [
        {"path": str(p), "sha256": file_digest(p), "log_offsets": c.offsets, "selection_mean_dice": round(c.score, 5),
         "selection_dice": c.per_source()} for p, c in zip(args.models, choices)]}
    out["gains"] = [{"model": str(p), **paired_case_gain(choices[0].per_case, c.per_case, args.bootstrap)}
                    for p, c in zip(args.models[1:], choices[1:])]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
