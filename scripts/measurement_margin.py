"""How far a graded measurement may sit from its threshold before its grade is in doubt: the review margins.

On the *selection* patients of spider_seg, chu_t2, spineweb_vb and ivd_t2 (the validation part chooses
nothing), the committed segmentation model segments each case's three central evaluated slices (the product
measures on the mid-sagittal key slice), and the product's measurement code derives, from the predicted and
from the reference masks, the values the flags are graded on
(:mod:`spinepath.evaluation.measurement_agreement`): Genant height loss, wedge ratio, disc narrowing ratio,
canal AP diameter (lumbar levels, where it is graded), listhesis offset. Each kind's margin is the 90th
percentile of ``|predicted - reference|``: a reported finding whose value is closer than that to one of its
grade boundaries may have another grade or none, and the review flags it (``configs/review.json`` ->
``measurement_margin``; reason ``measurement_near_threshold``). spineweb_vb's lowest reference body is named
S1, whose body the product does not measure (v0.5.13). Prints JSON per kind: pairs, MAE, the margin,
the reported findings and how many of them the margin flags, the pairs that the two masks grade differently
(reported among them, flagged among them), and the share of all pairs flagged. ``--write`` stores the margins.

Usage: python scripts/measurement_margin.py [--model bundle/models/segmentation.pt] [--write] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import SHARED_EXAMPLES, resolve_segmentation_path  # noqa: E402
from spinepath.core.thresholds import GRADE, NARROWING_LEVELS, POSITIVE  # noqa: E402
from spinepath.data.datasets import dataset_kind, load_volume_index  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.evaluation.measurement_agreement import DERIVED, slice_derived_pairs  # noqa: E402
from spinepath.evaluation.segmentation import evaluation_slices  # noqa: E402
from spinepath.measurements.spine import STENOSIS_LEVELS  # noqa: E402
from spinepath.review import REVIEW_RULES, uncertain_call  # noqa: E402
from spinepath.segmentation.inference import class_offsets, classes_on_pixels, load_segmenter  # noqa: E402
from spinepath.segmentation.network import predict_probabilities  # noqa: E402

QUANTILE = 90
SOURCES = ("spider_seg", "chu_t2", "spineweb_vb", "ivd_t2")


def sacral_masks(keep: set[tuple[str, str, int]]) -> dict[tuple[str, str, int], np.ndarray]:
    """The reference S1 of each kept volume slice whose source labels it (spineweb_vb: the lowest body is S1).

    The product does not measure S1's body (v0.5.13): the pairs name it S1 (``slice_derived_pairs``).
    """
    out = {}
    for src, case in sorted({(k[0], k[1]) for k in keep}):
        root = SHARED_EXAMPLES.parent / src
        if dataset_kind(root) != "volumes":
            continue
        vc = next(v for v in load_volume_index(root) if v.case == case)
        names = vc.inferred_levels()
        if "S1" not in names:
            continue
        mask = vc.load()[1]
        out |= {k: mask[:, :, k[2]] == names.index("S1") + 1 for k in keep if k[:2] == (src, case)}
    return out


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--central", type=int, default=3, help="central slices per case (0: all)")
    ap.add_argument("--quantile", type=float, default=QUANTILE, help="percentile of |error| taken as the margin")
    ap.add_argument("--write", action="store_true", help="store the margins in configs/review.json")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    model = load_segmenter(resolve_segmentation_path(args.model))
    offsets = class_offsets(model)
    slices = []
    for src in SOURCES:
        root = SHARED_EXAMPLES.parent / src
        slices += evaluation_slices(root, split_cases(root, "selection"))
    by_case: dict[tuple[str, str], list[int]] = {}
    for s in slices:
        by_case.setdefault((s.source, s.case), []).append(s.index)
    keep = set()
    for case, idx in by_case.items():
        idx = sorted(idx)
        lo = max(0, len(idx) // 2 - args.central // 2) if args.central else 0
        keep |= {(*case, i) for i in idx[lo:lo + args.central or None]}
    pairs: dict[str, list[tuple[str, float, float]]] = {k: [] for k in DERIVED}
    sacral = sacral_masks(keep)
    for s in tqdm([s for s in slices if (s.source, s.case, s.index) in keep], desc="slices", disable=args.quiet):
        with torch.no_grad():
            probs = predict_probabilities(model, torch.from_numpy(s.image)[None, None])
        classes = classes_on_pixels(probs, s.native.shape, offsets)[0]
        for k, v in slice_derived_pairs(replace(s, target=s.native, native=None), classes, s.spacing_mm,
                                        sacral.get((s.source, s.case, s.index))).items():
            # the canal and the narrowing are graded at the lumbar levels only (as in the product)
            graded = {"canal_ap_mm": STENOSIS_LEVELS, "narrowing_ratio": NARROWING_LEVELS}.get(k)
            pairs[k] += [x for x in v if graded is None or x[0] in graded]
    out: dict = {"cases": len(by_case), "slices": len(keep), "quantile": args.quantile, "kinds": {}}
    margins = {}
    for k, v in pairs.items():
        if not v:
            continue
        ref, pred = np.array([x[1:] for x in v]).T
        err = np.abs(pred - ref)
        margin = float(np.percentile(err, args.quantile))
        margins[k] = round(margin, 3 if k in ("height_loss", "wedge_ratio", "narrowing_ratio") else 2)
        flips = [i for i in range(len(v)) if GRADE[k](float(ref[i])) != GRADE[k](float(pred[i]))]
        flagged = [uncertain_call(k, float(p), margins[k]) is not None for p in pred]
        positive = [POSITIVE[k](float(p)) for p in pred]
        out["kinds"][k] = {"pairs": len(v), "mae": round(float(err.mean()), 4), "margin": margins[k],
                           "reported": int(sum(positive)), "reported_flagged": int(sum(flagged)),
                           "grade_differs": len(flips), "grade_differs_reported": int(sum(positive[i] for i in flips)),
                           "grade_differs_flagged": int(sum(flagged[i] for i in flips)),
                           "flagged_fraction": round(float(np.mean(flagged)), 3)}
    out["measurement_margin"] = margins
    print(json.dumps(out, indent=1))
    if args.write:
        rules = json.loads(Path(REVIEW_RULES).read_text())
        rules["measurement_margin"] = margins
        Path(REVIEW_RULES).write_text(json.dumps(rules, indent=1) + "\n")


if __name__ == "__main__":
    main()
