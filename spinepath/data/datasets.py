"""Loaders for the shared spine MRI data and per-slice vertebral-body boxes.

Conventions used everywhere in spinepath:

* A sagittal slice is a 2D array ``(rows, cols)`` with rows running superior -> inferior and columns
  anterior -> posterior, exactly as a sagittal DICOM image with ImageOrientationPatient ``0\\1\\0\\0\\0\\-1``
  is displayed, and as the shared NIfTI volumes store it (voxel axes i = S->I, j = A->P, k = lateral).
* A box is ``[row_min, col_min, row_max, col_max]`` in pixel *edge* coordinates (a body that covers rows
  10..19 has ``row_min=10, row_max=20``). This is MONAI's ``xyxy`` mode with x = first array axis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spinepath.core.boxes import boxes_from_mask_slice
from spinepath.core.geometry import BODY_HEIGHT_PER_GAP, BODY_WIDTH_PER_GAP, spacing_from_gap
from spinepath.core.levels import VERTEBRA_LEVELS

#: Detector classes.
CLASS_BODY, CLASS_S1 = 0, 1
#: A body's cross-section on a slice must be this fraction of its largest to be a reference box.
REFERENCE_AREA_FRACTION = 0.5


@dataclass
class Slice2D:
    """One sagittal slice with its reference vertebral bodies.

    Attributes:
        image: ``(rows, cols)`` float32 intensities.
        spacing: Pixel spacing in mm ``(row, col)``.
        boxes: ``(N, 4)`` reference boxes (see module docstring).
        levels: Level name per box, ``None`` where unknown.
        area_fraction: Per box, cross-section area over the body's largest cross-section (1 for 2D data).
        case: Case identifier.
        dataset: Dataset folder name.
        index: Lateral slice index in the source volume (0 for 2D data).
        centres: Optional ``(N, 2)`` reference centres (row, col), used by spark_midsag.
        span: ``(row_min, row_max)`` of the labelled anatomy; outside it anatomy is unlabelled.
        spacing_known: False when the spacing is an estimate.
        derived: Per box, True where the box is derived rather than drawn from a mask (e.g. the unlabelled S1
            of spider_seg): a training target, never scored. None: none is.

    """

    image: np.ndarray
    spacing: tuple[float, float]
    boxes: np.ndarray
    levels: list[str | None]
    area_fraction: np.ndarray
    case: str
    dataset: str
    index: int = 0
    centres: np.ndarray | None = None
    span: tuple[float, float] | None = None
    spacing_known: bool = True
    derived: np.ndarray | None = None

    @property
    def classes(self) -> np.ndarray:
        """Detector class per box (S1 or other vertebral body)."""
        return np.array([CLASS_S1 if lv == "S1" else CLASS_BODY for lv in self.levels], dtype=np.int64)


def dataset_kind(root: str | Path) -> str:
    """Tell which shared-data format a folder holds.

    ``"spark"`` (2D centres, spark_midsag), ``"spider_midsag"`` (2D T1/T2 with disc grades, no locations),
    ``"volumes"`` (3D masks) or ``"spider_seg"`` (2D slices with semantic masks).

    Raises:
        FileNotFoundError: If the folder has neither ``labels.json`` nor ``index.json``.

    """
    root = Path(root)
    for name, kinds in (("labels.json", ("spark", "spider_midsag")), ("index.json", ("volumes", "spider_seg"))):
        if (root / name).is_file():
            first = next(iter(json.loads((root / name).read_text()).values()), {})
            return kinds[1] if ("images" in first or "slices" in first) else kinds[0]
    raise FileNotFoundError(f"{root} is not a dataset folder: it has neither labels.json nor index.json")


# --------------------------------------------------------------------------------------------- 3D volumes
@dataclass
class VolumeCase:
    """A labelled 3D sagittal volume (image + mask) from chu_t2, spineweb_vb or ivd_t2."""

    case: str
    dataset: str
    image_path: Path
    mask_path: Path
    structure: str
    patient: str
    n_labels: int
    levels_top_down: list[str] | None

    def load(self) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """Return ``(image, mask, spacing_mm)`` with axes (S->I, A->P, lateral)."""
        import nibabel as nib  # only where a volume is read: an inference process never imports it

        img = nib.load(str(self.image_path))
        msk = nib.load(str(self.mask_path))
        image = np.asarray(img.dataobj, dtype=np.float32)
        mask = np.asarray(msk.dataobj).astype(np.int16)
        if image.shape != mask.shape:
            raise ValueError(f"{self.dataset}/{self.case}: image {image.shape} and mask {mask.shape} differ")
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        return image, mask, zooms  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        """Number of lateral slices (read from the NIfTI header only)."""
        import nibabel as nib  # only where a volume is read: an inference process never imports it

        return int(nib.load(str(self.image_path)).shape[2])

    def level_names(self) -> list[str | None]:
        """Level name of each mask label (1..N, top-down).

        chu_t2 and ivd_t2 give names. spineweb_vb gives none; there the lowest labelled body is S1 in every
        case (checked visually on the mid-sagittal slices), which is kept in ``inferred_levels`` but not
        reported as a known level.
        """
        if self.levels_top_down:
            return list(self.levels_top_down)
        return [None] * self.n_labels

    def inferred_levels(self) -> list[str | None]:
        """Level names including the bottom-up inference for spineweb_vb (lowest body = S1)."""
        if self.levels_top_down:
            return list(self.levels_top_down)
        if self.structure != "vertebral_body":
            return [None] * self.n_labels
        b = VERTEBRA_LEVELS.index("S1")
        return [VERTEBRA_LEVELS[b - (self.n_labels - 1 - i)] for i in range(self.n_labels)]


def load_volume_index(root: str | Path) -> list[VolumeCase]:
    """Read a 3D dataset folder's ``index.json``.

    Raises:
        FileNotFoundError: If index.json or a listed file is missing.

    """
    root = Path(root)
    index = json.loads((root / "index.json").read_text())
    cases = []
    for case, e in sorted(index.items()):
        ip, mp = root / e["image"], root / e["mask"]
        for p in (ip, mp):
            if not p.is_file():
                raise FileNotFoundError(f"{root.name}/{case}: missing file {p.name}")
        cases.append(
            VolumeCase(
                case=case,
                dataset=root.name,
                image_path=ip,
                mask_path=mp,
                structure=e.get("structure", "vertebral_body"),
                patient=str(e.get("patient", case)),
                n_labels=int(e["labels_top_down"]),
                levels_top_down=e.get("levels_top_down"),
            )
        )
    return cases


def clinical_slice_indices(n: int, step: int = 4) -> list[int]:
    """Lateral slices of a 1 mm volume kept in a clinical 4 mm series: every ``step``-th from (n % step)//2."""
    return list(range((n % step) // 2, n, step))


def iter_volume_slices(
    case: VolumeCase, indices: list[int] | None = None, min_fraction: float = 0.0, inferred: bool = False
) -> Iterator[Slice2D]:
    """Yield the sagittal slices of a 3D case with their reference boxes.

    Args:
        case: The case.
        indices: Lateral slice indices; all slices when None.
        min_fraction: Drop boxes whose cross-section is below this fraction of the body's largest.
        inferred: Use inferred level names (spineweb: lowest = S1) instead of only the known ones.

    """
    image, mask, spacing = case.load()
    labels = list(range(1, case.n_labels + 1))
    names = case.inferred_levels() if inferred else case.level_names()
    max_areas = {lab: int((mask == lab).sum(axis=(0, 1)).max()) for lab in labels}
    # labelled span (rows) over the whole volume, used to blank unlabelled anatomy in training
    rows = np.nonzero((mask > 0).any(axis=(1, 2)))[0]
    span = (float(rows.min()), float(rows.max() + 1)) if rows.size else None
    if span is not None and names and names[-1] == "S1":
        # the lowest labelled body is S1: below it lie the sacral segments and the pelvis, never a vertebral
        # body of either class, so they are taught as background (not blanked)
        span = (span[0], float(image.shape[0]))
    for k in indices if indices is not None else range(image.shape[2]):
        boxes, present, frac = boxes_from_mask_slice(mask[:, :, k], labels, max_areas)
        keep = frac >= min_fraction
        yield Slice2D(
            image=image[:, :, k],
            spacing=(spacing[0], spacing[1]),
            boxes=boxes[keep],
            levels=[names[lab - 1] for lab, kk in zip(present, keep) if kk],
            area_fraction=frac[keep],
            case=case.case,
            dataset=case.dataset,
            index=k,
            span=span,
        )


# ------------------------------------------------------------------------------------------ spark_midsag
@dataclass
class SparkCase:
    """One spark_midsag study: a mid-sagittal T2 slice with level centres and grades."""

    case: str
    image_path: Path
    size_hw: tuple[int, int]
    points: list[dict]

    def load_image(self) -> np.ndarray:
        """Return the slice as float32 ``(rows, cols)``."""
        with Image.open(self.image_path) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float32)
        if arr.shape != tuple(self.size_hw):
            raise ValueError(f"spark_midsag/{self.case}: image is {arr.shape}, labels say {self.size_hw}")
        return arr

    def vertebrae(self) -> list[dict]:
        """Vertebra points sorted top-down."""
        pts = [p for p in self.points if p["kind"] == "vertebra"]
        return sorted(pts, key=lambda p: VERTEBRA_LEVELS.index(p["level"]))

    def discs(self) -> list[dict]:
        """Disc points sorted top-down."""
        pts = [p for p in self.points if p["kind"] == "disc"]
        return sorted(pts, key=lambda p: p["xy"][1])

    def level_gap_px(self) -> float:
        """Median distance (pixels) between neighbouring vertebra centres; NaN with fewer than two."""
        v = np.array([p["xy"] for p in self.vertebrae()], dtype=float)
        if len(v) < 2:
            return float("nan")
        return float(np.median(np.linalg.norm(np.diff(v, axis=0), axis=1)))


def load_spark(root: str | Path) -> list[SparkCase]:
    """Read spark_midsag ``labels.json``.

    Raises:
        FileNotFoundError: If labels.json or an image is missing.

    """
    root = Path(root)
    labels = json.loads((root / "labels.json").read_text())
    out = []
    for cid, e in sorted(labels.items()):
        p = root / e["image"]
        if not p.is_file():
            raise FileNotFoundError(f"spark_midsag/{cid}: missing image {e['image']}")
        out.append(SparkCase(case=cid, image_path=p, size_hw=tuple(e["size_hw"]), points=e["points"]))
    return out


def spark_boxes(case: SparkCase) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Derive vertebral-body boxes from the labelled centres.

    The box is centred on the centre point; its height and width are the chu_t2 ratios of body size to the
    centre-to-centre gap (``BODY_HEIGHT_PER_GAP``, ``BODY_WIDTH_PER_GAP``) times this image's local gap.

    Returns:
        ``(boxes, levels, centres)`` with centres as (row, col).

    """
    verts = case.vertebrae()
    c = np.array([[p["xy"][1], p["xy"][0]] for p in verts], dtype=np.float32).reshape(-1, 2)
    gaps = np.linalg.norm(np.diff(c, axis=0), axis=1) if len(c) > 1 else np.array([40.0])
    boxes = []
    for i in range(len(c)):
        near = [gaps[j] for j in (i - 1, i) if 0 <= j < len(gaps)]
        g = float(np.mean(near))
        h, w = BODY_HEIGHT_PER_GAP * g, BODY_WIDTH_PER_GAP * g
        # centre +- half size by hand: MONAI's convert_box_mode differs under NumPy 1.x (see spinepath.core.boxes)
        boxes.append([c[i, 0] - h / 2, c[i, 1] - w / 2, c[i, 0] + h / 2, c[i, 1] + w / 2])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), [p["level"] for p in verts], c


def spark_s1_box(case: SparkCase) -> np.ndarray | None:
    """Approximate S1 body box: L5's box mirrored through the L5-S1 disc centre (None without both points).

    S1 is not labelled in spark_midsag; this derived box lets the detector learn the S1 class (used for
    naming) on these images. It is used for training only, never for evaluation.
    """
    boxes, levels, centres = spark_boxes(case)
    disc = [p for p in case.points if p["kind"] == "disc" and p["level"] == "L5-S1"]
    if "L5" not in levels or not disc:
        return None
    i = levels.index("L5")
    d = np.array([disc[0]["xy"][1], disc[0]["xy"][0]], dtype=np.float32)
    c = d + 1.05 * (d - centres[i])
    h, w = boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]
    return np.array([c[0] - h / 2, c[1] - w / 2, c[0] + h / 2, c[1] + w / 2], dtype=np.float32)


def spark_slice(case: SparkCase, spacing_mm: float | None = None, with_s1: bool = False) -> Slice2D:
    """A spark case as a :class:`Slice2D`.

    Args:
        case: The case.
        spacing_mm: Pixel spacing to assume. By default it is estimated from the labelled level gap
            (training only: at inference the labels are not used, see :func:`spark_fov_spacing`).
        with_s1: Add the derived S1 box (:func:`spark_s1_box`; training only).

    """
    boxes, levels, centres = spark_boxes(case)
    s1 = spark_s1_box(case) if with_s1 else None
    if s1 is not None:
        boxes = np.vstack([boxes, s1[None]])
        levels = [*levels, "S1"]
        centres = np.vstack([centres, [[(s1[0] + s1[2]) / 2, (s1[1] + s1[3]) / 2]]])
    if spacing_mm is None:
        spacing_mm = spacing_from_gap(case.level_gap_px())
    discs = case.discs()
    top = min([b[0] for b in boxes] + [d["xy"][1] for d in discs])
    bottom = max([b[2] for b in boxes] + [d["xy"][1] for d in discs])
    return Slice2D(
        image=case.load_image(),
        spacing=(spacing_mm, spacing_mm),
        boxes=boxes,
        levels=list(levels),
        area_fraction=np.ones(len(boxes), dtype=np.float32),
        case=case.case,
        dataset="spark_midsag",
        centres=centres,
        span=(float(top), float(bottom)),
        spacing_known=False,
    )


# ------------------------------------------------------------------------------------------------ split


