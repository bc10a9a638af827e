"""Does a body mask that disagrees with the detector's box measure worse? (issue 14: per-structure checks).

The detector and the segmentation network are separate models: where a named body's mask and the detector's
box on the same slice disagree, one of them is wrong, and the body's heights may be. This runs the product's
chain (detection, naming, segmentation, :func:`spinepath.segmentation.instances.level_instances`) on the
selection cases of spider_seg (each patient one series), chu_t2 and spineweb_vb (every 4th lateral slice, a
clinical 4 mm series), and on every slice pairs each named body with its reference body (nearest centroids,
within 10 mm): its heights' mean absolute error against the same code on the reference (the contract's
measurement), against the agreement of the mask with the detector's box (IoU of the mask's bounding box with
the box). Prints JSON: the pooled pairs' AUC of the agreement for a large error (> 2 mm), the error by
agreement band, and per candidate threshold the bodies flagged and the errors caught; ``key_slice``: the
bodies on the slice the product measures (its body-height error end to end, detection and naming included).
``measured``: the bodies the product measures (the key slice, not cut by the field of view, not S1);
``--part validation`` reports that error on the validation cases; nothing is chosen on it.

Usage: python scripts/segmentation_box_agreement.py [--part selection|validation] [--out runs/box_agreement.json] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.boxes import box_iou  # noqa: E402
from spinepath.core.geometry import series_from_slices  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.data.datasets import clinical_slice_indices, load_volume_index  # noqa: E402
from spinepath.data.spider import load_spider_seg  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.evaluation.segmentation import MIN_AREA_MM2, _match, reference_bodies  # noqa: E402
from spinepath.measurements.shape import heights  # noqa: E402
from spinepath.measurements.spine import SACRAL_BODIES  # noqa: E402
from spinepath.segmentation.inference import segment_study, slice_boxes, touches_edge  # noqa: E402
from spinepath.segmentation.instances import largest_component  # noqa: E402
from spinepath.stages import detect_series, load_models, load_segmenter  # noqa: E402

LARGE_MM = 2.0


def box_agreement(mask: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """IoU of a mask's bounding box (pixel edges) with a box ``(r0, c0, r1, c1)`` on the same grid; 0 when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return 0.0
    return float(box_iou(np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]), np.asarray(box))[0, 0])


def _height_error(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, float]) -> float | None:
    hr, hp = heights(ref, spacing), heights(pred, spacing)
    e = [abs(hr[k].mm - hp[k].mm) for k in hr if hr[k] is not None and hp[k] is not None]
    return float(np.mean(e)) if e else None


def case_rows(vol, refs: list[list[np.ndarray]], detector, segmenter, source: str, case: str) -> list[dict]:
    """Per named body on every slice: agreement with the detector's box and height error against the reference."""
    res = detect_series(vol, detector)
    if not res.vertebrae:
        return []
    seg = segment_study(res, segmenter, neighbours=len(refs))
    sp = (float(vol.spacing[0]), float(vol.spacing[1]))
    cut = {t.level for t in res.vertebrae if t.truncated}  # as segment_study: not measured
    rows = []
    for k, inst in seg.instances.items():
        boxes = slice_boxes(res, k)
        bodies = [(lv, m) for lv, m in inst["bodies"].items() if lv in boxes]
        ref = refs[k]
        if not bodies or not ref:
            continue
        level_of = {id(m): lv for lv, m in bodies}
        for r, m in _match(ref, [m for _, m in bodies], sp):  # the contract's pairing
            lv = level_of[id(m)]
            err = _height_error(r, m, sp)
            if err is None:
                continue
            on_slice = any(k in t.slices and t.level == lv for t in res.vertebrae)
            key = k == seg.key_slice
            measured = key and lv not in cut and lv not in SACRAL_BODIES and not touches_edge(m)
            rows.append({"source": source, "case": case, "slice": int(k), "level": lv, "key": key, "measured": measured,
                         "box_on_slice": on_slice, "agreement": round(box_agreement(m, boxes[lv]), 4),
                         "error_mm": round(err, 3)})
    return rows


def spider_cases(data: Path, part: str = "selection") -> list[tuple]:
    """(series, per-slice reference bodies, source, case) of the spider_seg patients of a split part."""
    out = []
    keep = set(split_cases(data / "spider_seg", part))
    for c in load_spider_seg(data / "spider_seg"):
        if c.patient not in keep:
            continue
        vert, canal = c.value_of("vertebra"), c.value_of("spinal_canal")
        loaded = [c.load(i) for i in range(len(c.slices))]
        refs = []
        for _, m in loaded:
            px = max(int(round(MIN_AREA_MM2 / (c.spacing[0] * c.spacing[1]))), 4)
            cn = largest_component(m == canal, px) if canal is not None else None
            refs.append(reference_bodies(m == vert, cn, px))
        vol = series_from_slices([img for img, _ in loaded], c.spacing, 2 * c.thickness)
        out.append((vol, refs, "spider_seg", c.patient))
    return out


def volume_cases(data: Path, source: str, part: str = "selection") -> list[tuple]:
    """(series, per-slice reference bodies, source, case) of a volume folder's cases of a split part."""
    out = []
    keep = set(split_cases(data / source, part))
    for v in load_volume_index(data / source):
        if v.case not in keep:
            continue
        image, mask, spacing = v.load()
        idx = clinical_slice_indices(image.shape[2])
        refs = [[mask[:, :, k] == lab for lab in np.unique(mask[:, :, k]) if lab > 0] for k in idx]
        vol = series_from_slices([image[:, :, k] for k in idx], (spacing[0], spacing[1]), 4.0)
        out.append((vol, refs, source, v.case))
    return out


def summary(rows: list[dict]) -> dict:
    """AUC of disagreement for a large error, errors by agreement band, flagged fraction per threshold."""
    a = np.array([r["agreement"] for r in rows])
    e = np.array([r["error_mm"] for r in rows])
    big = e > LARGE_MM
    out = {"n_bodies": len(rows), "n_large": int(big.sum()), "mae_mm": round(float(e.mean()), 3),
           "auc_disagreement_for_large_error": round(float(roc_auc_score(big, -a)), 3) if 0 < big.sum() < len(e)
           else None}
    bands = [(0.0, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]
    out["by_band"] = [{"agreement": [lo, min(hi, 1.0)], "n": int(((a >= lo) & (a < hi)).sum()),
                       "mae_mm": round(float(e[(a >= lo) & (a < hi)].mean()), 3) if ((a >= lo) & (a < hi)).any()
                       else None} for lo, hi in bands]
    out["thresholds"] = [{"below": t, "flagged": int((a < t).sum()),
                          "large_caught": int((big & (a < t)).sum()),
                          "mae_unflagged_mm": round(float(e[a >= t].mean()), 3) if (a >= t).any() else None}
                         for t in (0.5, 0.6, 0.65, 0.7, 0.75, 0.8)]
    return out


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--part", default="selection", choices=("selection", "validation"),
                    help="validation: to report the product's key-slice error once, never to choose on")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    data = args.data or SHARED_EXAMPLES.parent
    detector, _ = load_models()
    segmenter = load_segmenter()
    cases = [*spider_cases(data, args.part), *volume_cases(data, "chu_t2", args.part),
             *volume_cases(data, "spineweb_vb", args.part)]
    rows = []
    for vol, refs, src, case in tqdm(cases, desc="cases", disable=args.quiet):
        rows += case_rows(vol, refs, detector, segmenter, src, case)
    sources = sorted({r["source"] for r in rows})
    out = {"all": summary(rows), "key_slice": summary([r for r in rows if r["key"]]),
           "measured": summary([r for r in rows if r["measured"]]),
           "measured_by_source": {s: summary([r for r in rows if r["measured"] and r["source"] == s]) for s in sources},
           "by_source": {s: summary([r for r in rows if r["source"] == s]) for s in sources}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**out, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
