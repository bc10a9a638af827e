"""``spinepath evaluate segmentation``: the segmentation contract of issue 14 (item 6), from the images.

Folders: the spider_seg format (2D slices with semantic masks; each case's ``labels`` name the classes) and the
3D mask folders (chu_t2 / spineweb_vb: vertebral body; ivd_t2: disc; every 4th lateral slice starting at
``(n % 4) // 2``, as in the detection contract). Everything is scored on the dataset's own pixels, as the
product delivers its masks: the network runs on the 0.8 mm grid and its probabilities are brought back to the
slice's pixels before the arg-max (:func:`spinepath.segmentation.inference.classes_on_pixels`, with the class
offsets chosen for the weights); the reference masks are not resampled. Dice per case over all its evaluated
slices, averaged over cases; a class the folder does not annotate is ``null``; ``vertebra`` compares the
predicted body and posterior elements together with SPIDER's whole-vertebra mask. A volume's slice without
signal (:func:`spinepath.segmentation.data.empty_slices`: outside the body) is predicted empty, as the product
leaves it.

Measurements compare, on the same slice, each measurement of the predicted masks with the same code applied
to the reference masks (:mod:`spinepath.measurements.shape`), structures matched by position (one to one,
nearest centroids first, within :data:`MATCH_MM`): vertebral body heights (the
reference body: SPIDER's vertebra component anterior to its canal's front wall, where the canal is annotated
over the body's rows), disc heights, and the canal's AP diameter through each reference disc (along the disc's
axis; the canal is its largest component in the reference and in the prediction, as in the product: a stray
speck is not the canal). Errors in mm from the folder's pixel spacing, pooled over anterior / middle /
posterior; ``null`` where the reference gives none. A spider_seg case whose folder gives no pixel spacing is
segmented at a spacing estimated from its anatomy and scored for Dice only (:mod:`spinepath.evaluation.spacing`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from spinepath.data.datasets import dataset_kind, load_volume_index
from spinepath.data.spider import load_spider_seg
from spinepath.detection.predictor import VertebraDetector
from spinepath.evaluation.matching import greedy_match
from spinepath.evaluation.spacing import DetectorSource, seg_case_with_spacing
from spinepath.measurements.shape import canal_ap, heights, structure_axes
from spinepath.segmentation.data import GRID_MM, SegSlice, spider_seg_slices, volume_seg_slices
from spinepath.segmentation.inference import class_offsets, classes_on_pixels, decide, grid_slice_probabilities
from spinepath.segmentation.instances import components, largest_component
from spinepath.segmentation.metrics import case_dice, per_case_dice
from spinepath.segmentation.partial import CLASSES

#: The contract's Dice names.
DICE_NAMES = ("vertebra", "vertebral_body", "disc", "spinal_canal")
#: A predicted structure matches a reference one when their centroids are this close (mm).
MATCH_MM = 10.0
#: Components smaller than this (mm^2: 30 pixels of the 0.8 mm grid) are fragments.
MIN_AREA_MM2 = 30 * GRID_MM**2


def _mm(p: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    return np.asarray(p, float) * np.asarray(spacing, float)


def _match(ref: list[np.ndarray], pred: list[np.ndarray], spacing: tuple[float, float]
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(reference, predicted) structures paired one to one, nearest centroids first, within :data:`MATCH_MM`.

    One to one: a predicted component that spans two reference bodies (or a reference sliver beside a body)
    is the partner of the nearer one only.
    """
    if not ref or not pred:
        return []
    rc = np.array([_mm(ndi.center_of_mass(r), spacing) for r in ref])
    pc = np.array([_mm(ndi.center_of_mass(p), spacing) for p in pred])
    dist = np.linalg.norm(rc[:, None] - pc[None], axis=-1)
    pairs = greedy_match(dist, np.full(len(ref), MATCH_MM))
    return [(ref[r], pred[p]) for r, p in sorted(pairs.items())]


def _front_cut(vertebra: np.ndarray, canal: np.ndarray) -> np.ndarray | None:
    """A whole-vertebra component cut at the canal's anterior wall (row by row): its body.

    None where the reference cannot give the body: the canal is not annotated over all the rows of the cut
    (SPIDER's canal masks often stop above L5 or the sacrum; a wall extrapolated from above would cut such a
    vertebra anywhere, through its pedicles or across its body). Gaps inside the canal's rows are interpolated.
    """
    has = canal.any(1)
    if not has.any():
        return None
    front = np.where(has, canal.argmax(1), -1).astype(float)
    rows = np.flatnonzero(has)
    front = np.interp(np.arange(len(front)), rows, front[rows])
    cols = np.arange(vertebra.shape[1])[None]
    body = vertebra & (cols < front[:, None])
    body_rows = np.flatnonzero(body.any(1))
    if not len(body_rows) or body_rows[0] < rows[0] or body_rows[-1] > rows[-1]:
        return None
    return body


def reference_bodies(vertebra: np.ndarray, canal: np.ndarray | None, min_pixels: int) -> list[np.ndarray]:
    """SPIDER's vertebral bodies on one slice: each whole-vertebra component in front of the canal.

    Each component of ``vertebra`` (at least ``min_pixels``) is cut at the canal's anterior wall (:func:`_front_cut`);
    the bodies the reference can give and that keep ``min_pixels``; none without a canal.
    """
    if canal is None:
        return []
    return [b for b in (_front_cut(v, canal) for v in components(vertebra, min_pixels))
            if b is not None and b.sum() >= min_pixels]


def _height_pairs(ref: list[np.ndarray], pred: list[np.ndarray], spacing: tuple[float, float]
                  ) -> tuple[list[tuple[float, float]], int]:
    """(reference, predicted) heights of matched structures (pooled positions) and how many matched."""
    out, pairs = [], _match(ref, pred, spacing)
    for r, p in pairs:
        hr, hp = heights(r, spacing), heights(p, spacing)
        out += [(hr[k].mm, hp[k].mm) for k in hr if hr[k] is not None and hp[k] is not None]
    return out, len(pairs)


def slice_measurement_pairs(s: SegSlice, classes: np.ndarray, spacing: tuple[float, float] = (GRID_MM, GRID_MM)
                            ) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """(reference, predicted) body heights, disc heights and canal AP diameters (mm) on one slice.

    Args:
        s: The slice; its ``target`` is the reference.
        classes: Predicted class indices on the same pixels as ``s.target``.
        spacing: Those pixels' spacing (mm): the grid's by default.

    Returns:
        ``({"body", "disc", "canal"}: pairs, number of matched levels: bodies and discs)``.

    """
    min_pixels = max(int(round(MIN_AREA_MM2 / (spacing[0] * spacing[1]))), 4)
    names = ["background", *s.annotated]
    ref = {n: s.target == i for i, n in enumerate(names) if i}
    # the canal is one structure, as in the product (its largest component): specks elsewhere are not it
    canal_ref = largest_component(ref.get("spinal_canal"), min_pixels)
    body_pred = components(classes == CLASSES.index("vertebral_body"), min_pixels)
    disc_pred = components(classes == CLASSES.index("disc"), min_pixels)
    out: dict[str, list[tuple[float, float]]] = {"body": [], "disc": [], "canal": []}
    n = 0
    if "vertebral_body" in ref:
        out["body"], k = _height_pairs(components(ref["vertebral_body"], min_pixels), body_pred, spacing)
        n += k
    elif "vertebra" in ref and canal_ref is not None:
        out["body"], k = _height_pairs(reference_bodies(ref["vertebra"], canal_ref, min_pixels), body_pred, spacing)
        n += k
    if "disc" in ref:
        rd = components(ref["disc"], min_pixels)
        out["disc"], k = _height_pairs(rd, disc_pred, spacing)
        n += k
        canal_pred = largest_component(classes == CLASSES.index("spinal_canal"), min_pixels)
        if canal_ref is not None and canal_pred is not None:
            for r in rd:
                ax = structure_axes(r, spacing)
                a, b = canal_ap(canal_ref, spacing, ax), canal_ap(canal_pred, spacing, ax)
                if a is not None and b is not None:
                    out["canal"].append((a.mm, b.mm))
    return out, n


def evaluation_slices(root: str | Path, cases: list[str] | None = None,
                      detector: VertebraDetector | None = None) -> list[SegSlice]:
    """The contract's slices of a folder: every spider_seg slice, or every 4th lateral slice of the volumes.

    A spider_seg case without a pixel spacing is resampled at the spacing estimated from its anatomy
    (:mod:`spinepath.evaluation.spacing`; ``detector``, by default the bundle's, loaded only then).
    """
    root = Path(root)
    kind = dataset_kind(root)
    if kind == "spider_seg":
        source = DetectorSource(detector)
        return [s for c in load_spider_seg(root, require_spacing=False) if cases is None or c.patient in cases
                for s in spider_seg_slices(seg_case_with_spacing(c, source), keep_native=True)]
    if kind == "volumes":
        return [s for v in load_volume_index(root) if cases is None or v.case in cases
                for s in volume_seg_slices(v, step=4, keep_native=True)]
    raise ValueError(f"{root}: segmentation needs a spider_seg or 3D mask folder, not {kind}")


def evaluate_segmentation(root: str | Path, model: torch.nn.Module, cases: list[str] | None = None,
                          progress: bool = True, details: dict | None = None,
                          detector: VertebraDetector | None = None) -> dict:
    """The contract JSON (see the module docstring).

    ``details``: a dict filled (for the model card) with ``per_case`` Dice, the measurement ``pairs``
    (reference, predicted, case, slice index) per kind and ``slices`` (each slice, its class map and its mean Dice).
    ``detector``: estimates the spacing of a case whose folder does not give it (:func:`evaluation_slices`).
    """
    slices = evaluation_slices(root, cases, detector)
    offsets = class_offsets(model)
    meas: dict[str, list[tuple[float, float, str, int]]] = {"body": [], "disc": [], "canal": []}
    levels = 0
    pairs, native = [], []
    for s in tqdm(slices, desc="segmentation", disable=not progress):
        probs = grid_slice_probabilities(model, s)  # empty slices: background, as the product leaves them
        pairs.append((s, decide(probs, offsets)[0].numpy()))
        # scored on the dataset's own pixels, as the product delivers its masks (classes_on_pixels)
        classes = classes_on_pixels(probs, s.native.shape, offsets)[0]
        ns = replace(s, target=s.native, native=None)
        native.append((ns, classes))
        if not s.spacing_known:  # millimetres of an estimated scale are no measurement
            continue
        e, n = slice_measurement_pairs(ns, classes, s.spacing_mm)
        for k in meas:
            meas[k] += [(r, p, s.case, s.index) for r, p in e[k]]
        levels += n
    dice = case_dice(native)
    if details is not None:
        details.update(per_case=per_case_dice(native), pairs=meas, slices=pairs,
                       grid_dice=case_dice(pairs))

    def mae(v: list[tuple[float, float, str, int]]) -> float | None:
        return round(float(np.mean([abs(x[0] - x[1]) for x in v])), 3) if v else None

    return {"task": "segmentation", "n_cases": len({(s.source, s.case) for s in slices}), "n_slices": len(slices),
            "dice": {n: dice.get(n) for n in DICE_NAMES},
            "measurements": {"n_levels": levels, "vertebral_body_height_mae_mm": mae(meas["body"]),
                             "disc_height_mae_mm": mae(meas["disc"]), "canal_ap_mae_mm": mae(meas["canal"])}}
