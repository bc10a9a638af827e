"""Segmentation slices of the four annotated sources, on one millimetre grid, with their partial labels.

Every source becomes :class:`SegSlice`: the sagittal slice resampled to :data:`GRID_MM` pixels (intensities
bilinear and scaled to [0, 1] by the slice's robust range; masks nearest), and the mask as *group indices*
(:func:`spinepath.segmentation.partial.label_groups`): spider_seg annotates the whole vertebra, the disc and the
canal; chu_t2 and spineweb_vb the vertebral bodies; ivd_t2 the discs. The 3D sets give every ``step``-th
lateral slice (the evaluation contract takes every 4th, starting at ``(n % 4) // 2``, as the detection one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from spinepath.core.files import read_npz_xz, write_npz_xz
from spinepath.data.datasets import VolumeCase
from spinepath.data.spider import SpiderSegCase
from spinepath.segmentation.partial import ANNOTATION_CLASSES, label_groups
from spinepath.transforms import normalise_image

log = logging.getLogger(__name__)

#: Pixel size of the segmentation grid (mm).
GRID_MM = 0.75


@dataclass
class SegSlice:
    """One sagittal slice on the segmentation grid with its partial labels.

    Attributes:
        image: ``(rows, cols)`` float32 in [0, 1] on the grid.
        target: ``(rows, cols)`` int64 group index (0 = what the mask leaves unlabelled).
        groups: ``(G, C)`` 0/1 matrix of the source's label groups.
        annotated: The annotation names of groups 1..G-1.
        source: Dataset folder name.
        case: Case id.
        patient: Patient id (the split is by patient).
        index: Slice index in the source (lateral index for 3D sets, position in the case for spider_seg).
        spacing_mm: The source pixel spacing ``(row, col)``.
        native: The mask's group indices on the source's own pixels (kept for evaluation), else None.
        empty: The slice holds no signal (:func:`empty_slices`): the product does not segment it.
        spacing_known: False where the source gave no spacing and ``spacing_mm`` is an estimate (no millimetres
            are scored on it).

    """

    image: np.ndarray
    target: np.ndarray
    groups: np.ndarray
    annotated: list[str]
    source: str
    case: str
    patient: str
    index: int
    spacing_mm: tuple[float, float]
    native: np.ndarray | None = None
    empty: bool = False
    spacing_known: bool = True


#: A slice whose 99th intensity percentile is below this share of the median over its series' slices holds no
#: signal: outside the body (the zero edge slices of the chu_t2 volumes). On the training + selection volumes
#: such slices read 0.17-0.28 and every slice with an annotated structure 0.76 or more. Normalised to its own
#: range, such a slice stretches noise to full contrast and the network draws structures along its edges.
EMPTY_SIGNAL_SHARE = 0.5


def empty_slices(pixels: np.ndarray) -> np.ndarray:
    """Per slice of a series ``(n, rows, cols)``: True where it holds no signal (:data:`EMPTY_SIGNAL_SHARE`)."""
    p99 = np.percentile(np.asarray(pixels, np.float32).reshape(len(pixels), -1), 99, axis=1)
    return p99 < EMPTY_SIGNAL_SHARE * float(np.median(p99))


def grid_image(image: np.ndarray, spacing: tuple[float, float], grid_mm: float = GRID_MM) -> np.ndarray:
    """A slice normalised to [0, 1] and resampled (bilinear, corner pixels aligned) to ``grid_mm`` pixels."""
    zoom = (float(spacing[0]) / grid_mm, float(spacing[1]) / grid_mm)
    return np.clip(ndi.zoom(normalise_image(image), zoom, order=1, mode="nearest"), 0, 1).astype(np.float32)


def to_grid(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float], grid_mm: float = GRID_MM
            ) -> tuple[np.ndarray, np.ndarray]:
    """Resample a slice (:func:`grid_image`) and its mask (nearest) to ``grid_mm`` pixels."""
    zoom = (float(spacing[0]) / grid_mm, float(spacing[1]) / grid_mm)
    msk = ndi.zoom(mask.astype(np.int16), zoom, order=0, mode="nearest")
    return grid_image(image, spacing, grid_mm), msk.astype(np.int64)


def spider_seg_slices(case: SpiderSegCase, indices: list[int] | None = None,
                      grid_mm: float = GRID_MM, keep_native: bool = False) -> Iterator[SegSlice]:
    """The slices of a spider_seg case; the case's ``labels`` name the mask values (the authority).

    ``keep_native``: also keep each mask on its own pixels (``SegSlice.native``). A class the network does not
    know (not in :data:`~spinepath.segmentation.partial.ANNOTATION_CLASSES`, e.g. a ``sacrum`` label) is left
    out: its pixels are unknown (-1), neither taught nor scored, and a warning names it.

    Raises:
        ValueError: If the case has no spacing (estimate it first: :mod:`spinepath.evaluation.spacing`).

    """
    spacing = case.known_spacing
    unknown = sorted(v for v, n in case.labels.items() if n not in ANNOTATION_CLASSES)
    if unknown:
        log.warning("spider_seg/%s: %s not scored (no such class in the network)", case.patient,
                    ", ".join(repr(case.labels[v]) for v in unknown))
    values = sorted(v for v in case.labels if v not in unknown)
    annotated = [case.labels[v] for v in values]
    groups = label_groups(annotated)
    lut = np.zeros(max(case.labels) + 1, np.int64)
    lut[unknown] = -1
    for g, v in enumerate(values, start=1):
        lut[v] = g
    for i in indices if indices is not None else range(len(case.slices)):
        img, msk = case.load(i)
        msk = np.where((msk >= 0) & (msk < len(lut)), msk, 0)
        gi, gm = to_grid(img, lut[msk], spacing, grid_mm)
        yield SegSlice(gi, gm, groups, annotated, "spider_seg", case.patient, case.patient, i, spacing,
                       lut[msk] if keep_native else None, spacing_known=not case.spacing_estimated)


def volume_seg_slices(case: VolumeCase, step: int = 4, grid_mm: float = GRID_MM,
                      keep_native: bool = False) -> Iterator[SegSlice]:
    """Every ``step``-th lateral slice of a chu_t2 / spineweb_vb / ivd_t2 volume (from ``(n % step) // 2``).

    The mask's instances (1..N top-down) become one group: the volume's ``structure``. ``keep_native``: also
    keep each mask on its own pixels (``SegSlice.native``).
    """
    image, mask, spacing = case.load()
    groups = label_groups([case.structure])
    n = image.shape[2]
    empty = empty_slices(np.moveaxis(image, 2, 0))  # as the product sees the series: lateral slices first
    for k in range((n % step) // 2, n, step):
        native = (mask[:, :, k] > 0).astype(np.int64)
        gi, gm = to_grid(image[:, :, k], native, spacing[:2], grid_mm)
        yield SegSlice(gi, gm, groups, [case.structure], case.dataset, case.case, case.patient, k,
                       (float(spacing[0]), float(spacing[1])), native if keep_native else None, bool(empty[k]))


#: Sources whose masks stop above the sacrum though it is a vertebral body there: SPIDER's ``vertebra`` masks
#: end at L5 (the sacrum is left at 0, background) and chu_t2 labels T11-L5.
SACRUM_UNLABELLED = frozenset(("spider_seg", "chu_t2"))
#: Annotations whose lowest pixel in a column bounds the spine there (the canal runs on into the sacrum).
SPINE_ANNOTATIONS = frozenset(("vertebra", "vertebral_body", "disc"))


def sacrum_unknown(s: SegSlice) -> SegSlice:
    """The slice with its unlabelled pixels below the labelled spine made unknown (-1) in each column.

    In the sources of :data:`SACRUM_UNLABELLED` the sacrum is unlabelled, so their group 0 (for SPIDER:
    background only; for chu_t2: anything but a body) teaches the network that S1 is no vertebral body, and the
    product then rarely segments it (S1 a body mask in 14 of 118 spider_midsag T2), so the L5-S1 slip cannot be
    measured against it. Below the lowest pixel of :data:`SPINE_ANNOTATIONS` in each column those pixels are
    left out of the loss instead (the loss ignores -1), so that the sources that label S1 (spineweb_vb) are
    not contradicted. Other sources, and pixels that carry a label (the canal), are returned unchanged.
    """
    if s.source not in SACRUM_UNLABELLED:
        return s
    spine = np.isin(s.target, [g for g, name in enumerate(s.annotated, start=1) if name in SPINE_ANNOTATIONS])
    rows = np.arange(s.target.shape[0])[:, None]
    has = spine.any(0)
    lowest = np.where(has, s.target.shape[0] - 1 - np.argmax(spine[::-1], axis=0), s.target.shape[0])
    below = (rows > lowest[None]) & (s.target == 0)
    return replace(s, target=np.where(below, -1, s.target))


def save_slice_pack(path: str | Path, parts: dict[str, list[SegSlice]]) -> None:
    """Write slices of the grid to one xz-compressed ``.npz`` (images as 8-bit, masks as group indices).

    For a machine without the shared data (a lent GPU): :func:`load_slice_pack` reads it back; training from
    a pack sees the same slices as from the data folder, up to 8-bit quantisation of the [0, 1] images.

    Args:
        path: The pack file (``.npz.xz`` by convention).
        parts: Slices by part name (``train``, ``selection``).

    """
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, list[dict]] = {}
    for part, slices in parts.items():
        meta[part] = []
        for j, s in enumerate(slices):
            if s.target.min() < 0 or s.target.max() > 255:
                raise ValueError(f"{s.source} {s.case}: group indices outside 0-255 cannot be packed")
            arrays[f"{part}_{j}_image"] = np.round(np.clip(s.image, 0, 1) * 255).astype(np.uint8)
            arrays[f"{part}_{j}_target"] = s.target.astype(np.uint8)
            meta[part].append({"annotated": s.annotated, "source": s.source, "case": s.case, "patient": s.patient,
                               "index": int(s.index), "spacing_mm": [float(v) for v in s.spacing_mm]})
    write_npz_xz(path, arrays, meta)


def load_slice_pack(path: str | Path) -> dict[str, list[SegSlice]]:
    """The slices of a :func:`save_slice_pack` file, by part."""
    z, meta = read_npz_xz(path)
    out: dict[str, list[SegSlice]] = {}
    for part, rows in meta.items():
        out[part] = [SegSlice(z[f"{part}_{j}_image"].astype(np.float32) / 255,
                              z[f"{part}_{j}_target"].astype(np.int64), label_groups(r["annotated"]),
                              r["annotated"], r["source"], r["case"], r["patient"], r["index"],
                              tuple(r["spacing_mm"])) for j, r in enumerate(rows)]
    return out
