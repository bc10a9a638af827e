"""Vertebra label maps shared by the Deploy app and the MONAI Label app.

One label map (``configs/labels.json``: level name -> value, colour) names the vertebrae everywhere. This
module turns a detection result into a label volume (one filled box per vertebra per slice, value = level),
and a label volume corrected by an annotator back into per-slice boxes + level names for detector training.

Volumes other than DICOM series (NIfTI/NRRD from MONAI Label's datastores) are read with SimpleITK and
reoriented to the sagittal display the detector expects: columns toward posterior, rows toward inferior,
slices along the left-right axis (``"PIR"``); label volumes are written back on the input's own grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinepath.data import Slice2D, boxes_from_mask_slice
from spinepath.dicom_io import SeriesVolume, StudyError
from spinepath.files import atomic_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LABELS_FILE = CONFIGS / "labels.json"
#: Display orientation of a sagittal series (SimpleITK/DICOM "toward" letters: column, row, slice axes).
SAGITTAL_ORIENTATION = "PIR"
#: Volume file suffixes, longest first (stripped to get an image id; DICOM UIDs contain dots).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: A volume whose slice axis is this much coarser than in-plane is a 2D acquisition in that plane.
MAX_REFORMAT_ANISOTROPY = 1.5


@dataclass(frozen=True)
class Label:
    """One entry of the label map."""

    name: str
    value: int
    color: tuple[int, int, int]


def load_label_map(path: str | Path = LABELS_FILE) -> dict[str, Label]:
    """Level name -> :class:`Label` from ``configs/labels.json`` (top-down order).

    Raises:
        ValueError: If two levels share a value or a value is outside 1..255.

    """
    raw = json.loads(Path(path).read_text())["labels"]
    labels = {k: Label(k, int(v["value"]), tuple(int(c) for c in v["color"])) for k, v in raw.items()}
    values = [lab.value for lab in labels.values()]
    if len(set(values)) != len(values) or not all(0 < x < 256 for x in values):
        raise ValueError(f"{path}: label values must be distinct and in 1..255")
    return labels


def label_colors() -> dict[str, tuple[int, int, int]]:
    """Level name -> RGB colour of the label map (key image, SEG, MONAI Label)."""
    return {k: lab.color for k, lab in load_label_map().items()}


def box_slices(box, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns covered by a box ``[r0, c0, r1, c1]`` (pixel edge coordinates) on a ``shape`` image.

    A pixel is inside when its centre (``i + 0.5`` in edge coordinates) lies in ``[r0, r1)`` x ``[c0, c1)``;
    read back as a bounding box, a rendered box moves by less than half a pixel.
    """
    r0, c0, r1, c1 = (float(x) for x in box)
    i0, i1 = (int(np.clip(np.ceil(v - 0.5), 0, shape[0])) for v in (r0, r1))
    j0, j1 = (int(np.clip(np.ceil(v - 0.5), 0, shape[1])) for v in (c0, c1))
    return slice(i0, i1), slice(j0, j1)


def image_id(path: str | Path) -> str:
    """The image id of a volume file: its name without the volume suffix (``1.2.3.nii.gz`` -> ``1.2.3``)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------- image <-> volume
def image_from_volume(volume: SeriesVolume, pixels: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image with the series geometry (axes: column, row, slice), holding ``pixels`` or the series'."""
    arr = volume.pixels if pixels is None else pixels
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing((float(volume.spacing[1]), float(volume.spacing[0]), float(volume.slice_spacing)))
    img.SetOrigin(tuple(float(x) for x in volume.positions[0]))
    d = np.stack([volume.orientation[:3], volume.orientation[3:], volume.normal], axis=1)
    img.SetDirection(tuple(float(x) for x in d.ravel()))
    return img


def volume_from_image(image: sitk.Image, description: str = "") -> SeriesVolume:
    """A :class:`SeriesVolume` of a 3D image, reoriented to the sagittal display.

    Raises:
        StudyError: If the image is not 3D or was acquired in another plane (slice axis much coarser than
            in-plane and not left-right).

    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise StudyError("expected a 3D single-channel image")
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    sp = np.asarray(image.GetSpacing())
    lr_axis = int(np.argmax(np.abs(d[0])))  # image axis closest to patient x (left-right)
    coarse = int(np.argmax(sp))
    if coarse != lr_axis and sp[coarse] > MAX_REFORMAT_ANISOTROPY * np.delete(sp, coarse).max():
        raise StudyError("not a sagittal acquisition: the slice axis is not left-right")
    img = sitk.DICOMOrient(image, SAGITTAL_ORIENTATION)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    n = img.GetSize()[2]
    positions = np.array([img.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(n)], dtype=np.float64)
    return SeriesVolume(
        pixels=sitk.GetArrayFromImage(img).astype(np.float32),
        spacing=(float(img.GetSpacing()[1]), float(img.GetSpacing()[0])),
        orientation=np.concatenate([d[:, 0], d[:, 1]]),
        positions=positions,
        sop_instance_uids=[""] * n,
        series_uid="",
        study_uid="",
        frame_of_reference_uid="",
        description=description,
        slice_thickness=float(img.GetSpacing()[2]),
    )


def _read_image(path: str | Path, what: str = "image") -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise StudyError(f"cannot read {what} {Path(path).name}: not a readable volume") from exc


def read_volume(path: str | Path) -> SeriesVolume:
    """Read a NIfTI/NRRD/MHA volume as a sagittal :class:`SeriesVolume`.

    Raises:
        StudyError: If the file cannot be read or is not a sagittal 3D image.

    """
    return volume_from_image(_read_image(path), Path(path).name)


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write an image atomically (temporary file in the same folder, then rename); the suffix picks the format."""
    path = Path(path)
    with atomic_file(path, "".join(path.suffixes) or ".nii.gz") as tmp:
        sitk.WriteImage(image, tmp, compress)
    return path


def write_label_like(labels: np.ndarray, volume: SeriesVolume, reference: sitk.Image, path: str | Path,
                     compress: bool = True) -> Path:
    """Write a label volume given on ``volume``'s (sagittal display) grid on the ``reference`` image's grid."""
    lab = image_from_volume(volume, labels.astype(np.uint8))
    out = sitk.Resample(lab, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return write_image(out, path, compress)


def labels_on_volume(label: sitk.Image, volume: SeriesVolume) -> np.ndarray:
    """A label image (any orientation, same physical grid) as an array indexed like ``volume.pixels``.

    Raises:
        StudyError: If the label image does not cover the volume's grid.

    """
    if label.GetSize()[0] * label.GetSize()[1] * label.GetSize()[2] != volume.pixels.size:
        raise StudyError(f"label size {label.GetSize()} does not match the image {volume.pixels.shape[::-1]}")
    ref = image_from_volume(volume, np.zeros(volume.pixels.shape, np.uint8))
    out = sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return sitk.GetArrayFromImage(out).astype(np.int64)


# ------------------------------------------------------------------------------------ detections -> labels
def render_labels(result, label_map: dict[str, Label] | None = None) -> tuple[np.ndarray, list[str]]:
    """Label volume of a detection result: each named vertebra's box filled on every slice where it is found.

    Args:
        result: A :class:`spinepath.pipeline.DetectionResult`.
        label_map: Defaults to :func:`load_label_map`.

    Returns:
        ``(labels (n_slices, rows, cols) uint8, levels drawn)``; vertebrae whose name is not in the label map
        (e.g. ``"?"`` above T1) are left out. Where boxes of neighbours overlap, the lower vertebra wins.

    """
    label_map = label_map or load_label_map()
    shape = result.volume.pixels.shape
    out = np.zeros(shape, dtype=np.uint8)
    drawn = []
    for t in result.vertebrae:
        lab = label_map.get(t.level)
        if lab is None:
            continue
        drawn.append(t.level)
        for k, b in zip(t.slices, t.boxes):
            out[(k, *box_slices(b, shape[1:]))] = lab.value
    return out, drawn


# ----------------------------------------------------------------------------------------- DICOM SEG -> labels
def segment_level(segment) -> str:
    """The level a DICOM SEG segment names: its SegmentLabel (as OHIF writes it), else its SegmentDescription."""
    return str(segment.get("SegmentLabel") or segment.get("SegmentDescription") or "").strip().upper()


def labels_from_seg(seg, volume: SeriesVolume, label_map: dict[str, Label] | None = None) -> np.ndarray:
    """A DICOM SEG of ``volume``'s series as a label volume on its grid, values from the label map.

    Segments are matched to levels by name (:func:`segment_level`), never by segment number: OHIF numbers the
    segments of an edited label map in its own (alphabetical) order. Frames are placed by the source instance
    they reference (highdicom), so any SEG writer's frame order works.

    Args:
        seg: The SEG (``pydicom.Dataset``).
        volume: The series it references.
        label_map: Defaults to :func:`load_label_map`.

    Returns:
        ``(n_slices, rows, cols)`` integer labels indexed like ``volume.pixels``.

    Raises:
        StudyError: If the SEG does not reference this series' instances, has no segments, or names a segment
            that is not a level of the label map.

    """
    import highdicom as hd  # only the MONAI Label datastore reads SEGs: keep the pipeline's start-up light

    label_map = label_map or load_label_map()
    try:
        doc = hd.seg.Segmentation.from_dataset(seg, copy=False)
    except (AttributeError, ValueError, KeyError) as exc:
        raise StudyError(f"not a readable DICOM SEG: {exc}") from exc
    segments = {int(s.SegmentNumber): segment_level(s) for s in doc.SegmentSequence}
    unknown = sorted({name or "(unnamed)" for name in segments.values() if name not in label_map})
    if unknown:
        raise StudyError(f"SEG segments {', '.join(unknown)} are not levels of the label map "
                         f"({', '.join(label_map)}): rename them to a level")
    if not segments:
        raise StudyError("the SEG has no segments")
    numbers = sorted(segments)
    try:
        masks = doc.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.sop_instance_uids), segment_numbers=numbers,
            ignore_spatial_locations=True, assert_missing_frames_are_empty=False)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise StudyError(f"the SEG does not reference the instances of this series: {exc}") from exc
    if masks.shape[1:3] != volume.pixels.shape[1:]:
        raise StudyError(f"SEG frames {masks.shape[1:3]} do not match the image {volume.pixels.shape[1:]}")
    labels = np.zeros(volume.pixels.shape, np.int64)
    for i, number in enumerate(numbers):
        labels[masks[..., i] > 0] = label_map[segments[number]].value
    return labels


# ------------------------------------------------------------------------------- labels -> training boxes
@dataclass
class CorrectionSummary:
    """What one saved label volume contributes to training."""

    image: str
    slices: int
    boxes: int
    levels: list[str]
    unknown_values: list[int]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"image": self.image, "slices": self.slices, "boxes": self.boxes, "levels": self.levels,
                "unknown_values": self.unknown_values}


def slices_from_labels(volume: SeriesVolume, labels: np.ndarray, case: str,
                       label_map: dict[str, Label] | None = None) -> tuple[list[Slice2D], CorrectionSummary]:
    """Per-slice reference boxes and level names from a label volume on ``volume``'s grid.

    Every slice is returned (slices without labels are negatives: the annotator saw them). A label value's box
    on a slice is the bounding box of its pixels there; all boxes count fully (``area_fraction`` 1) since an
    annotator confirmed them. Values not in the label map are ignored and reported.

    Raises:
        StudyError: If the label volume's shape differs from the image's.

    """
    if labels.shape != volume.pixels.shape:
        raise StudyError(f"label shape {labels.shape} does not match the image {volume.pixels.shape}")
    label_map = label_map or load_label_map()
    by_value = {lab.value: lab.name for lab in label_map.values()}
    present = [int(v) for v in np.unique(labels) if v != 0]
    known = [v for v in present if v in by_value]
    rows = np.nonzero(np.isin(labels, known).any(axis=(0, 2)))[0]
    span = (float(rows.min()), float(rows.max() + 1)) if rows.size else None
    out, n_boxes = [], 0
    for k in range(labels.shape[0]):
        boxes, vals, _ = boxes_from_mask_slice(labels[k], known, {})
        n_boxes += len(vals)
        out.append(Slice2D(
            image=volume.pixels[k], spacing=volume.spacing, boxes=boxes, levels=[by_value[v] for v in vals],
            area_fraction=np.ones(len(vals), np.float32), case=case, dataset="corrections", index=k, span=span,
        ))
    order = sorted(known, key=lambda v: [lab.value for lab in label_map.values()].index(v))
    summary = CorrectionSummary(case, len(out), n_boxes, [by_value[v] for v in order],
                                sorted(set(present) - set(known)))
    return out, summary


def slices_from_label_file(image_path: str | Path, label_path: str | Path, case: str | None = None,
                           label_map: dict[str, Label] | None = None) -> tuple[list[Slice2D], CorrectionSummary]:
    """:func:`slices_from_labels` for an image file and its label file (same grid, any orientation).

    Raises:
        StudyError: If either file is unreadable or the grids differ.

    """
    volume, _ = load_image_volume(image_path)
    labels = labels_on_volume(_read_image(label_path, "label"), volume)
    return slices_from_labels(volume, labels, case or image_id(image_path), label_map)


# ----------------------------------------------------------------------------------------- label a study
def load_image_volume(path: str | Path) -> tuple[SeriesVolume, sitk.Image]:
    """A DICOM series folder (spinepath's reader) or a volume file, with an image of its grid for writing labels.

    Raises:
        StudyError: If it cannot be read or is not a sagittal series.

    """
    from spinepath.dicom_io import load_study

    path = Path(path)
    if path.is_dir():
        volume = load_study(path)
        return volume, image_from_volume(volume, np.zeros(volume.pixels.shape, np.uint8))
    image = _read_image(path)
    return volume_from_image(image, path.name), image


def label_study(image_path: str | Path, detector, out_path: str | Path, grader=None,
                label_map: dict[str, Label] | None = None, compress: bool = True) -> dict:
    """Detect, name (and grade, with ``grader``) the vertebrae of a study; write its label volume.

    Args:
        image_path: DICOM series folder or volume file.
        detector: A :class:`spinepath.detection.VertebraDetector`.
        out_path: Label volume to write (on the input's grid; values from the label map; uint8). Its suffix
            picks the format (``.nii.gz``, ``.nrrd``, ...).
        grader: Optional :class:`spinepath.grading.Grader`: adds pathology per level and disc grades.
        label_map: Defaults to :func:`load_label_map`.
        compress: Compress the label file (OHIF's MONAI Label panel asks for raw NRRD).

    Returns:
        JSON-ready summary: ``label_names`` (name -> value), ``levels`` drawn, per vertebra level, value, name
        confidence, score, slice range and pathology (when graded), ``discs`` (when graded), the disclaimer.

    """
    from spinepath import DISCLAIMER, __version__
    from spinepath.pipeline import detect_series

    label_map = label_map or load_label_map()
    volume, reference = load_image_volume(image_path)
    result = detect_series(volume, detector)
    if grader is not None:
        from spinepath.findings import grade_detections

        result.findings = grade_detections(result, grader)
    labels, drawn = render_labels(result, label_map)
    write_label_like(labels, volume, reference, out_path, compress)
    graded = {f.level: f.to_dict() for f in result.findings.vertebrae} if result.findings is not None else {}
    return {
        "disclaimer": DISCLAIMER,
        "software": {"name": "spinepath", "version": __version__},
        "label_names": {lab.name: lab.value for lab in label_map.values()},
        "levels": drawn,
        "vertebrae": [
            {"level": t.level, "value": label_map[t.level].value if t.level in label_map else None,
             "name_confidence": round(t.name_confidence, 4), "score": round(t.score, 4),
             "slice_range": [int(min(t.slices)), int(max(t.slices))], "pathology": graded.get(t.level)}
            for t in result.vertebrae
        ],
        "discs": [d.to_dict() for d in result.findings.discs] if result.findings is not None else [],
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
    }
