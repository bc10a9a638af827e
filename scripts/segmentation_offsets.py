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
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.config import config_file  # noqa: E402
from spinepath.core.exported import file_digest  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES, resolve_segmentation_path  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.evaluation.segmentation import evaluation_slices  # noqa: E402
from spinepath.segmentation.inference import (  # noqa: E402
    OFFSETS_CONFIG,
    decide,
    load_segmenter,
    probabilities_on_pixels,
)
from spinepath.segmentation.metrics import case_dice  # noqa: E402
from spinepath.segmentation.network import predict_probabilities  # noqa: E402
from spinepath.segmentation.partial import CLASSES  # noqa: E402

SOURCES = ("spider_seg", "chu_t2", "spineweb_vb", "ivd_t2")
#: The searched offsets (log-probability units); background and posterior elements stay at 0.
GRID = {"vertebral_body": (0.0, 0.5, 1.0, 1.5, 2.0), "disc": (0.0, -0.5, -1.0, -1.5, -2.0),
        "spinal_canal": (0.0, 0.75, 1.5, 2.25)}


def native_probabilities(model: torch.nn.Module, root: Path, cases: list[str], progress: bool) -> list[tuple]:
    """(slice on its own pixels, probabilities there) of the contract's slices of ``cases``."""
    out = []
    for s in tqdm(evaluation_slices(root, cases), desc=root.name, disable=not progress):
        with torch.no_grad():
            p = probabilities_on_pixels(predict_probabilities(model, torch.from_numpy(s.image)[None, None]),
                                        s.native.shape)
        out.append((replace(s, target=s.native, native=None), p))
    return out


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the choice, write nothing")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    path = resolve_segmentation_path(args.model)
    model = load_segmenter(path, offsets=False)
    data = SHARED_EXAMPLES.parent
    slices = {src: native_probabilities(model, data / src, cases, not args.quiet)
              for src in SOURCES if (cases := split_cases(data / src, "selection"))}

    def score(offsets: list[float]) -> tuple[float, dict]:
        per = {src: case_dice([(s, decide(p, offsets)[0].numpy()) for s, p in items]) for src, items in slices.items()}
        return float(np.mean([v for d in per.values() for v in d.values()])), per

    results = []
    combos = list(itertools.product(*GRID.values()))
    for combo in tqdm(combos, desc="offsets", disable=args.quiet):
        off = dict(zip(GRID, combo))
        mean, per = score([off.get(c, 0.0) for c in CLASSES])
        # ties (a plateau) go to the smaller total offset
        results.append((round(mean, 5), -sum(abs(x) for x in combo), off, per))
    results.sort(key=lambda r: (r[0], r[1]), reverse=True)
    base = next(r for r in results if not any(r[2].values()))
    best = results[0]
    cfg = {"description": __doc__.split("\n\n")[1].replace("\n", " "),
           "weights": path.name, "weights_sha256": file_digest(path),
           "log_offsets": best[2], "grid": GRID,
           "selection_mean_dice": {"without": base[0], "with": best[0]},
           "selection_dice": {"without": base[3], "with": best[3]},
           "command": "python scripts/segmentation_offsets.py"}
    print(json.dumps({k: cfg[k] for k in ("log_offsets", "selection_mean_dice", "selection_dice")}, indent=1))
    if not args.dry_run:
        config_file(OFFSETS_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")


if __name__ == "__main__":
    main()
