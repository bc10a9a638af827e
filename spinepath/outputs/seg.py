"""DICOM Segmentation (binary SEG, highdicom) of the named structures: one segment per structure.

Once segmented (:mod:`spinepath.segmentation.inference`): one segment per vertebral body level, per disc level
and the spinal canal, the network's masks on the segmented slices. Without a segmentation: one segment per
vertebra, its detected box filled on every source slice where it was detected. Frames
reference their source slice (same matrix and geometry as the sagittal series); empty frames are omitted.
"""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from spinepath import __version__
from spinepath.core.boxes import box_slices
from spinepath.core.labels import label_colors
from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS, level_index, structure_rank
from spinepath.core.results import CANAL, DetectionResult
from spinepath.outputs.coding import ANATOMICAL_STRUCTURE, SPINAL_CANAL, disc_code, vertebra_code
from spinepath.outputs.common import no_identifying_warnings, write_dataset

__all__ = [
    "SEG_SERIES_DESCRIPTION",
    "SEG_SERIES_NUMBER",
    "box_mask",
    "build_level_seg",
    "build_vertebra_seg",
    "seg_masks",
    "structure_masks",
    "vertebra_code",
    "write_seg",
]

SEG_SERIES_NUMBER = 901
SEG_SERIES_DESCRIPTION = "spinepath vertebrae (NOT FOR DIAGNOSTIC USE)"
#: Type 2 attributes highdicom reads from the first source header (absent ones are written empty).
_TYPE2_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def box_mask(box, shape: tuple[int, int]) -> np.ndarray:
    """Filled box ``[r0, c0, r1, c1]`` (pixel edge coordinates) as a boolean mask of ``shape``.

    A pixel is inside when its centre (``i + 0.5`` in edge coordinates) lies in ``[r0, r1)`` x ``[c0, c1)``.
    """
    m = np.zeros(shape, dtype=bool)
    m[box_slices(box, shape)] = True
    return m


def seg_masks(result: DetectionResult) -> tuple[np.ndarray, list[str]]:
    """Per-level masks of the named vertebrae of a detection result.

    Args:
        result: A :class:`spinepath.core.results.DetectionResult`.

    Returns:
        ``(masks, levels)``: boolean ``(n_levels, n_slices, rows, cols)`` masks indexed like
        ``result.volume.pixels`` and the level names, top-down; unnamed (``"?"``) vertebrae are left out and
        two tracks with the same name are merged.

    """
    shape = result.volume.pixels.shape
    levels = sorted({t.level for t in result.vertebrae if t.level in VERTEBRA_LEVELS}, key=level_index)
    masks = np.zeros((len(levels), *shape), dtype=bool)
    for t in result.vertebrae:
        if t.level not in levels:
            continue
        i = levels.index(t.level)
        for k, b in zip(t.slices, t.boxes):
            masks[i, k] |= box_mask(b, shape[1:])
    return masks, levels


def _source_headers(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source headers with the type 2 study/patient attributes highdicom needs present (copies)."""
    first = datasets[0]
    missing = [k for k in _TYPE2_SOURCE if k not in first]
    if not missing:
        return list(datasets)
    first = copy.deepcopy(first)  # Dataset.copy() is shallow: it shares the elements with the original
    for k in missing:
        setattr(first, k, "")
    return [first, *datasets[1:]]


def build_vertebra_seg(
    result, series_number: int = SEG_SERIES_NUMBER, manufacturer: str = "spinepath"
) -> hd.seg.Segmentation:
    """Build the binary DICOM Segmentation of the named structures, a new series in the source study.

    Args:
        result: A :class:`spinepath.core.results.DetectionResult` of a DICOM series (``result.volume.datasets``
            holds the source headers; pixel data is not needed).
        series_number: Series Number of the new series.
        manufacturer: Manufacturer of the new series.

    Returns:
        A :class:`highdicom.seg.Segmentation` (a ``pydicom.Dataset``): segment ``i + 1`` is ``names[i]`` of
        :func:`structure_masks` once segmented (else ``levels[i]`` of :func:`seg_masks`), labelled e.g.
        ``"L3 vertebral body"``, ``"L3-L4 intervertebral disc"``, ``"spinal canal"``, with the name as Segment
        Description.

    Raises:
        ValueError: If the volume has no source headers or no vertebra is named.

    """
    if result.segmentation is not None:
        masks, names = structure_masks(result)
        if names:
            return build_level_seg(result.volume, masks, names, series_number=series_number,
                                   manufacturer=manufacturer, content="Bodies, discs, canal (network)")
    masks, levels = seg_masks(result)
    return build_level_seg(result.volume, masks, levels, series_number=series_number, manufacturer=manufacturer)


def structure_masks(result: DetectionResult) -> tuple[np.ndarray, list[str]]:
    """The segmented structures of a result: bodies by level, discs by level, the canal.

    Returns:
        ``(masks, names)``: boolean ``(n, n_slices, rows, cols)`` masks indexed like ``result.volume.pixels``
        (filled on the segmented slices) and their names (``"L3"``, ``"L3-L4"``, ``"spinal canal"``), top-down.

    """
    seg = result.segmentation
    found: dict[str, dict[int, np.ndarray]] = {}
    for j in seg.instances:
        for name, m in seg.structures(j).items():
            found.setdefault(name, {})[j] = m
    names = sorted(found, key=structure_rank)
    masks = np.zeros((len(names), *result.volume.pixels.shape), dtype=bool)
    for i, name in enumerate(names):
        for j, m in found[name].items():
            masks[i, j] = m
    return masks, names


def build_level_seg(
    volume,
    masks: np.ndarray,
    levels: list[str],
    manual: bool = False,
    series_number: int = SEG_SERIES_NUMBER,
    manufacturer: str = "spinepath",
    series_description: str = SEG_SERIES_DESCRIPTION,
    content: str | None = None,
) -> hd.seg.Segmentation:
    """Binary DICOM Segmentation with one segment per structure (colours of ``configs/labels.json``).

    Args:
        volume: The source :class:`spinepath.core.geometry.SeriesVolume` with its headers (``datasets``).
        masks: Boolean ``(n_levels, n_slices, rows, cols)`` indexed like ``volume.pixels``.
        levels: Name per mask: a vertebral level (its body), a disc (``"L4-L5"``) or ``"spinal canal"``.
        manual: Segments drawn or corrected by an annotator (algorithm type MANUAL) instead of AUTOMATIC.
        series_number: Series Number of the new series.
        manufacturer: Manufacturer of the new series.
        series_description: Series Description of the new series.
        content: Content Description (what the masks are); by default the detected boxes or the annotator's.

    Raises:
        ValueError: If the volume has no source headers, no level is given or a name is not a level.

    """
    v = volume
    if not v.datasets or len(v.datasets) != v.pixels.shape[0]:
        raise ValueError("the series volume carries no source DICOM header per slice: cannot reference it")
    if not levels:
        raise ValueError("no named vertebra to segment")
    colours = label_colors()
    algo = None if manual else hd.AlgorithmIdentificationSequence(
        name="spinepath", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    new_highdicom = hasattr(hd.color, "CIELabColor") and hasattr(hd.color.CIELabColor, "from_rgb")
    for i, lv in enumerate(levels, start=1):
        colour = {"display_color": hd.color.CIELabColor.from_rgb(*colours[lv])} if new_highdicom and lv in colours \
            else {}
        label, prop = ((CANAL, SPINAL_CANAL) if lv == CANAL else
                       (f"{lv} intervertebral disc", disc_code(lv)) if lv in DISC_LEVELS else
                       (f"{lv} vertebral body", vertebra_code(lv)))
        d = hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=label,
            segmented_property_category=ANATOMICAL_STRUCTURE,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL if manual
            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            **colour,
        )
        if not new_highdicom and lv in colours:  # highdicom 0.22 (pydicom 2.4): set the attribute directly
            d.RecommendedDisplayCIELabValue = dicom_lab(colours[lv])
        d.SegmentDescription = lv
        descriptions.append(d)
    # frame i <-> source slice i (source frame for a multi-frame source), in the stored pixel order
    with no_identifying_warnings():
        content = content or ("Vertebral bodies corrected by an annotator" if manual
                              else "Vertebral bodies (detected boxes)")
        return _segmentation(v, masks, descriptions, series_number, manufacturer, series_description,
                             f"{content}, research use only")


def source_frames(v, masks: np.ndarray) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """The source headers and the masks as their frames: ``(frames, rows, cols, segments)`` in stored pixels.

    ``masks`` (``(segments, slices, rows, cols)``, canonical display) are mapped back to the stored pixel
    order; a multi-frame source gets one frame per source frame, in its frame order.
    """
    stored = np.moveaxis(v.inplane.to_source(masks), 0, -1)  # (slices, rows, cols, segments)
    if not v.frame_numbers:
        return _source_headers(v.datasets), np.ascontiguousarray(stored)
    n_frames = int(v.datasets[0].NumberOfFrames)
    frames = np.zeros((n_frames, *stored.shape[1:]), dtype=stored.dtype)
    frames[np.asarray(v.frame_numbers) - 1] = stored
    return _source_headers(v.datasets[:1]), frames


def _segmentation(v, masks: np.ndarray, descriptions: list, series_number: int, manufacturer: str,
                  series_description: str, content_description: str):
    sources, frames = source_frames(v, masks)
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="spinepath",
        software_versions=__version__,
        device_serial_number="0",
        content_label="VERTEBRAE",
        content_description=content_description,
        series_description=series_description,
        omit_empty_frames=True,
    )


def dicom_lab(rgb: tuple[int, int, int]) -> list[int]:
    """DICOM-encoded CIE L*a*b* (0-65535 each) of an 8-bit sRGB colour: sRGB -> linear -> XYZ (D65) -> L*a*b*.

    Used with highdicom 0.22 (pydicom 2.4, the MONAI Label environment), which cannot convert colours itself.
    """
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = m @ lin / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return [round(lab[0] * 65535 / 100), round((lab[1] + 128) * 65535 / 255), round((lab[2] + 128) * 65535 / 255)]


def write_seg(result: DetectionResult, path: str | Path, **kwargs) -> Path:
    """Build the vertebra SEG and write it atomically (temporary file in the same folder, then rename).

    Args:
        result: A :class:`spinepath.core.results.DetectionResult` of a DICOM series.
        path: Output file.
        **kwargs: Passed to :func:`build_vertebra_seg`.

    Returns:
        The written path.

    """
    return write_dataset(build_vertebra_seg(result, **kwargs), path)
