"""Agreement of the graded measurements: the values behind the measurement flags, predicted vs reference.

The contract's measurement errors (``spinepath evaluate segmentation``) are heights and diameters. The flags a
radiologist reads (Genant height loss, wedge, disc narrowing, canal stenosis, listhesis) are graded from
derived values: a height against the neighbours' heights, a ratio of two heights, a slip between two bodies.
Here both sets of masks of a slice go through the product's own code
(:func:`spinepath.measurements.spine.measure_spine`): the reference's bodies (the vertebra mask in front of the
canal, where the canal covers it), discs and canal are named in order from the bottom, each predicted structure
takes the name of the reference structure it is paired with, and every derived value measured on both is a
(reference, predicted) pair; the names are positions counted from the bottom. The spread of these errors is
how far a value may sit from a grade boundary before its grade is in doubt (``configs/review.json`` ->
``measurement_margin``; ``scripts/measurement_margin.py``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from spinepath.core.levels import VERTEBRA_LEVELS
from spinepath.core.results import narrowing_ratios
from spinepath.core.thresholds import graded_slip
from spinepath.evaluation.matching import greedy_match
from spinepath.evaluation.segmentation import MATCH_MM, MIN_AREA_MM2, _mm, reference_bodies
from spinepath.measurements.spine import measure_spine
from spinepath.segmentation.data import SegSlice
from spinepath.segmentation.instances import components, largest_component
from spinepath.segmentation.partial import CLASSES

#: The derived values compared (the thresholds they are graded against live with the flags).
DERIVED = ("height_loss", "wedge_ratio", "narrowing_ratio", "canal_ap_mm", "listhesis_mm")


def name_from_bottom(bodies: list[np.ndarray], discs: list[np.ndarray], lowest: str = "L5") -> tuple[dict, dict]:
    """Bodies and discs of one slice named in order from the bottom of the image (names stand for positions).

    The lowest body is called ``lowest`` (L5; S1 where the reference labels the sacrum) and the names go up; a
    disc takes the names of the bodies around it. Two discs with no body between them (a body the reference
    cannot give) leave that body's name out, so neighbours stay neighbours. Only the order matters: the names
    are not the anatomical levels (but S1's body is not measured, as in the product).

    Returns:
        ``({level: body mask}, {disc level: disc mask})``.

    """
    items = sorted([(ndi.center_of_mass(m)[0], "body", m) for m in bodies]
                   + [(ndi.center_of_mass(m)[0], "disc", m) for m in discs], key=lambda t: -t[0])
    below, last = VERTEBRA_LEVELS.index(lowest) + 1, None
    named_bodies: dict[str, np.ndarray] = {}
    named_discs: dict[str, np.ndarray] = {}
    for _, kind, m in items:
        if kind == "disc":
            if last == "disc":
                below -= 1  # a body missing between two discs
            if below < 1:
                break
            named_discs[f"{VERTEBRA_LEVELS[below - 1]}-{VERTEBRA_LEVELS[below]}"] = m
        else:
            if below < 1:
                break
            below -= 1
            named_bodies[VERTEBRA_LEVELS[below]] = m
        last = kind
    return named_bodies, named_discs


def _paired(ref: dict[str, np.ndarray], pred: list[np.ndarray], spacing: tuple[float, float]
            ) -> dict[str, np.ndarray]:
    """Each predicted structure paired with a named reference one (nearest centroids first) under its name."""
    names = list(ref)
    if not names or not pred:
        return {}
    rc = np.array([_mm(ndi.center_of_mass(ref[n]), spacing) for n in names])
    pc = np.array([_mm(ndi.center_of_mass(p), spacing) for p in pred])
    pairs = greedy_match(np.linalg.norm(rc[:, None] - pc[None], axis=-1), np.full(len(names), MATCH_MM))
    return {names[r]: pred[p] for r, p in pairs.items()}


def derived_values(m: dict) -> dict[str, dict[str, float]]:
    """The derived values of one slice's :func:`measure_spine` output: ``{kind: {level: value}}``."""
    out: dict[str, dict[str, float]] = {k: {} for k in DERIVED}
    for lv, e in m["vertebrae"].items():
        for key in ("height_loss", "wedge_ratio"):
            if e.get(key) is not None:
                out[key][lv] = float(e[key])
        if e.get("canal_ap_mid_body"):
            out["canal_ap_mm"][lv] = float(e["canal_ap_mid_body"]["mm"])
    for lv, e in m["discs"].items():
        if e.get("canal_ap"):
            out["canal_ap_mm"][lv] = float(e["canal_ap"]["mm"])
    out["narrowing_ratio"] = narrowing_ratios(m["discs"])
    for lv, e in m["listhesis"].items():
        if graded_slip(e):
            out["listhesis_mm"][lv] = abs(float(e["offset_mm"]))  # graded by its size, as in the product
    return out


def slice_derived_pairs(s: SegSlice, classes: np.ndarray, spacing: tuple[float, float],
                        sacral: np.ndarray | None = None) -> dict[str, list[tuple[str, float, float]]]:
    """(reference, predicted) derived values of one slice (its ``target`` on the same pixels).

    Only what the slice's source annotates is compared: spider_seg every kind; chu_t2 / spineweb_vb (bodies)
    the height loss and the wedge ratio (and a slip between two bodies); ivd_t2 (discs) the narrowing ratio.

    Args:
        s: An evaluation slice.
        classes: Predicted class indices on the slice's pixels.
        spacing: Those pixels' spacing (mm).
        sacral: The reference's S1 on the same pixels, where the source labels it (spineweb_vb): when the lowest
            reference body lies mostly inside it, it is named S1, so that its body is not measured, as in the
            product (:data:`spinepath.measurements.spine.SACRAL_BODIES`; its wall still takes the L5-S1 slip).

    Returns:
        ``{kind: [(level, reference, predicted), ...]}`` for :data:`DERIVED` (empty where the slice lacks a
        structure); the levels are positions named from the bottom (:func:`name_from_bottom`).

    """
    out: dict[str, list[tuple[str, float, float]]] = {k: [] for k in DERIVED}
    names = ["background", *s.annotated]
    min_pixels = max(int(round(MIN_AREA_MM2 / (spacing[0] * spacing[1]))), 4)

    def ref_components(name: str) -> list[np.ndarray]:
        return components(s.target == names.index(name), min_pixels) if name in names else []

    ref_canal = largest_component(s.target == names.index("spinal_canal"), min_pixels) if (
        "spinal_canal" in names) else None
    if "vertebral_body" in names:
        bodies = ref_components("vertebral_body")
    else:  # SPIDER: the vertebra in front of the canal
        bodies = reference_bodies(s.target == names.index("vertebra"), ref_canal, min_pixels) if (
            "vertebra" in names) else []
    discs = ref_components("disc")
    lowest = "L5"
    if sacral is not None and bodies:
        low = max(bodies, key=lambda b: ndi.center_of_mass(b)[0])
        if (low & sacral).sum() > 0.5 * low.sum() and not any(
                ndi.center_of_mass(d)[0] > ndi.center_of_mass(low)[0] for d in discs):
            lowest = "S1"
    ref_bodies, ref_discs = name_from_bottom(bodies, discs, lowest)
    pred_bodies = _paired(ref_bodies, components(classes == CLASSES.index("vertebral_body"), min_pixels), spacing)
    pred_discs = _paired(ref_discs, components(classes == CLASSES.index("disc"), min_pixels), spacing)
    pred_canal = largest_component(classes == CLASSES.index("spinal_canal"), min_pixels) if (
        ref_canal is not None) else None
    ref = derived_values(measure_spine(ref_bodies, ref_discs, ref_canal, spacing))
    pred = derived_values(measure_spine(pred_bodies, pred_discs, pred_canal, spacing))
    for k in DERIVED:
        out[k] = [(lv, ref[k][lv], pred[k][lv]) for lv in ref[k] if lv in pred[k]]
    return out
