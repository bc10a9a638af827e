"""How much of the contract's Dice gap lies beyond the reference's annotated extent (issue 14, where the error is).

chu_t2 labels the bodies T11-L5 and ivd_t2 the discs L1-L2 to L5-S1, so a body above T11 or a disc above L1-L2
that the network segments (and the product must segment) is a false positive for the contract's Dice, though
the dataset does not say what it is. Per case of a source's split part, with the committed segmentation
network and its class offsets, on the contract's slices and the dataset's own pixels, this reports the
contract's Dice of the source's class, the same Dice with the predicted components that lie wholly beyond the
case's annotated rows left out (above the highest or below the lowest row any evaluated slice of the case
annotates: a conservative bound, a component reaching into those rows still counts), and the false-positive
pixels split into those components, components touching no reference structure within the extent, and the
rest (the boundary of a structure the reference has). Nothing is chosen on it; the contract is unchanged.

Usage: python scripts/segmentation_extent.py [--part selection|validation] [--out FILE] [-q]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath import stages  # noqa: E402
from spinepath.core.files import print_json  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.evaluation.segmentation import evaluation_slices  # noqa: E402
from spinepath.segmentation.inference import (  # noqa: E402
    class_offsets,
    classes_on_pixels,
    grid_slice_probabilities,
)
from spinepath.segmentation.network import CLASSES  # noqa: E402

#: Per source: the annotation scored, compared with the network's class of the same name.
SOURCES = {"chu_t2": "vertebral_body", "spineweb_vb": "vertebral_body", "ivd_t2": "disc", "spider_seg": "disc"}


def case_extent(root: Path, case: str, annotation: str, model, offsets) -> dict:
    """One case's Dice with and without the components beyond its annotated rows, and its false positives."""
    from scipy import ndimage as ndi

    slices = evaluation_slices(root, [case])
    group = slices[0].annotated.index(annotation) + 1
    rows = np.flatnonzero(np.any([(s.native == group).any(1) for s in slices], axis=0))
    top, bottom = int(rows.min()), int(rows.max())
    cls = CLASSES.index(annotation)
    n = {"tp": 0, "fp": 0, "fn": 0, "fp_beyond_extent": 0, "fp_apart_within_extent": 0}
    for s in slices:
        pred = classes_on_pixels(grid_slice_probabilities(model, s), s.native.shape, offsets)[0] == cls
        ref = s.native == group
        n["tp"] += int((pred & ref).sum())
        n["fp"] += int((pred & ~ref).sum())
        n["fn"] += int((ref & ~pred).sum())
        lab, k = ndi.label(pred)
        for i in range(1, k + 1):
            comp = lab == i
            if (comp & ref).any():
                continue
            r = np.flatnonzero(comp.any(1))
            n["fp_beyond_extent" if r.max() < top or r.min() > bottom else "fp_apart_within_extent"] += int(comp.sum())
    dice = 2 * n["tp"] / max(2 * n["tp"] + n["fp"] + n["fn"], 1)
    within = 2 * n["tp"] / max(2 * n["tp"] + n["fp"] - n["fp_beyond_extent"] + n["fn"], 1)
    return {"case": case, "slices": len(slices), "dice": round(dice, 4), "dice_within_extent": round(within, 4), **n}


def main() -> None:
    """Entry point."""
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--part", default="selection", choices=("selection", "validation"))
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    model = stages.load_segmenter()
    offsets = class_offsets(model)
    out: dict = {"task": "segmentation_extent", "part": args.part, "sources": {}}
    for name, annotation in SOURCES.items():
        root = Path(args.data) / name
        cases = split_cases(root, args.part)
        rows = [case_extent(root, c, annotation, model, offsets)
                for c in tqdm(cases, desc=name, disable=args.quiet)]
        if rows:
            out["sources"][name] = {
                "annotation": annotation,
                "dice": round(float(np.mean([r["dice"] for r in rows])), 4),
                "dice_within_extent": round(float(np.mean([r["dice_within_extent"] for r in rows])), 4),
                "cases": rows}
    print_json(out, args.out)


if __name__ == "__main__":
    main()
