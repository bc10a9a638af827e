"""Choose the segmentation network's per-class log-probability offsets on the selection split (issue 14).

Why: on the selection patients the arg-max of the probabilities leaves boundaries off by a systematic part
of a pixel (canal 0.8 mm too narrow, discs 0.4 mm too tall against the bodies: the partial-label sources
disagree on where a body ends). An offset per class added to the log-probabilities before the arg-max moves
each boundary; a grid search over the body, disc and canal offsets picks the one with the best mean of the
contract's Dice values (each source's annotated classes, on the sources' own pixels) over the selection
patients of spider_seg, chu_t2, spineweb_vb and ivd_t2. The validation split chooses nothing.

Usage: python scripts/segmentation_offsets.py [--model bundle/models/segmentation.pt] [--dry-run] [-q]
Writes ``spinepath/configs/segmentation_offsets.json`` (tied to the weights' SHA-256).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.config import config_file  # noqa: E402
from spinepath.core.exported import file_digest  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES, resolve_segmentation_path  # noqa: E402
from spinepath.evaluation.segmentation_selection import GRID, search_offsets, selection_probabilities  # noqa: E402
from spinepath.segmentation.inference import OFFSETS_CONFIG, load_segmenter  # noqa: E402


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the choice, write nothing")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    path = resolve_segmentation_path(args.model)
    slices = selection_probabilities(load_segmenter(path, offsets=False), SHARED_EXAMPLES.parent, not args.quiet)
    results = search_offsets(slices, GRID, not args.quiet)
    base = next(r for r in results if not any(r.offsets.values()))
    best = results[0]
    cfg = {"description": __doc__.split("\n\n")[1].replace("\n", " "),
           "weights": path.name, "weights_sha256": file_digest(path),
           "log_offsets": best.offsets, "grid": GRID,
           "selection_mean_dice": {"without": round(base.score, 5), "with": round(best.score, 5)},
           "selection_dice": {"without": base.per_source(), "with": best.per_source()},
           "command": "python scripts/segmentation_offsets.py"}
    print(json.dumps({k: cfg[k] for k in ("log_offsets", "selection_mean_dice", "selection_dice")}, indent=1))
    if not args.dry_run:
        config_file(OFFSETS_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")


if __name__ == "__main__":
    main()
