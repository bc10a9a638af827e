"""Vertebra label maps shared by the Deploy app and the MONAI Label app.

One label map (``configs/labels.json``: level name -> value, colour) names the vertebrae everywhere. This
module turns a detection result into a label volume (one filled box per vertebra per slice, value = level),
and an annotator's DICOM SEG (as OHIF exports it) into a label volume by segment name; the corrections module
turns a label volume into per-slice boxes + level names for detector training.

Volumes other than DICOM series (NIfTI/NRRD from MONAI Label's datastores) are read with SimpleITK and
reoriented to the sagittal display the detector expects: columns toward posterior, rows toward inferior,
slices along the left-right axis (``"PIR"``); label volumes are written back on the input's own grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from spinepath import DISCLAIMER, __version__, stages
from spinepath.core.boxes import box_slices
from spinepath.core.errors import StudyError
from spinepath.core.geometry import SeriesVolume
from spinepath.core.labels import Label, load_label_map
from spinepath.core.results import DetectionResult
from spinepath.io.volumes import load_image_volume, write_label_like


# ------------------------------------------------------------------------------------ detections -> labels
def render_labels(result: DetectionResult, label_map: dict[str, Label] | None = None) -> tuple[np.ndarray, list[str]]:
    """Label volume of a detection result: each named vertebra's box filled on every slice where it is found.

    Args:
        result: A :class:`spinepath.core.results.DetectionResult`.
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
#: Suffixes of the segment labels spinepath's own SEGs write (``"L3 vertebral body"``, ``"L4-L5 intervertebral
#: disc"``; :func:`spinepath.outputs.seg.build_level_seg`); OHIF writes the bare names (``"L3"``, ``"L4-L5"``).
SEGMENT_SUFFIXES = (" vertebral body", " intervertebral disc", " disc")


def segment_level(segment, names: Iterable[str] = ()) -> str:
    """The label-map name a DICOM SEG segment stands for, else its label upper-cased (an unknown name).

    The SegmentLabel (as OHIF writes it) is tried first, then the SegmentDescription (spinepath's SEGs keep the
    bare name there); each with and without the suffixes of :data:`SEGMENT_SUFFIXES`, case-insensitively
    against ``names`` (``"SPINAL CANAL"`` is ``"spinal canal"``).
    """
    by_upper = {n.upper(): n for n in names}
    texts = [str(segment.get(k) or "").strip() for k in ("SegmentLabel", "SegmentDescription")]
    for text in texts:
        up = text.upper()
        for cand in (up, *(up[: -len(x)] for x in SEGMENT_SUFFIXES if up.endswith(x.upper()))):
            if cand in by_upper:
                return by_upper[cand]
    return next((t.upper() for t in texts if t), "")


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
    import highdicom as hd  # only the MONAI Label datastore reads SEGs: keeps the infer task's start-up light

    label_map = label_map or load_label_map()
    try:
        doc = hd.seg.Segmentation.from_dataset(seg, copy=False)
    except (AttributeError, ValueError, KeyError) as exc:
        raise StudyError(f"not a readable DICOM SEG: {exc}") from exc
    segments = {int(s.SegmentNumber): segment_level(s, label_map) for s in doc.SegmentSequence}
    unknown = sorted({name or "(unnamed)" for name in segments.values() if name not in label_map})
    if unknown:
        raise StudyError(f"SEG segments {', '.join(unknown)} are not levels of the label map "
                         f"({', '.join(label_map)}): rename them to a level")
    if not segments:
        raise StudyError("the SEG has no segments")
    numbers = sorted(segments)
    try:
        if volume.frame_numbers:  # a multi-frame source: frames by source frame number
            masks = doc.get_pixels_by_source_frame(
                source_sop_instance_uid=volume.sop_instance_uids[0], source_frame_numbers=list(volume.frame_numbers),
                segment_numbers=numbers, ignore_spatial_locations=True, assert_missing_frames_are_empty=False)
        else:
            masks = doc.get_pixels_by_source_instance(
                source_sop_instance_uids=list(volume.sop_instance_uids), segment_numbers=numbers,
                ignore_spatial_locations=True, assert_missing_frames_are_empty=False)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise StudyError(f"the SEG does not reference the instances of this series: {exc}") from exc
    stored = tuple(volume.inplane.source_shape or volume.pixels.shape[1:])
    if masks.shape[1:3] != stored:
        raise StudyError(f"SEG frames {masks.shape[1:3]} do not match the image {stored}")
    masks = volume.inplane.to_canonical(np.moveaxis(masks, -1, 0))  # (segments, slices, rows, cols)
    labels = np.zeros(volume.pixels.shape, np.int64)
    for i, number in enumerate(numbers):
        labels[masks[i] > 0] = label_map[segments[number]].value
    return labels


# ----------------------------------------------------------------------------------------- label a study


def label_study(image_path: str | Path, detector, out_path: str | Path, grader=None,
                label_map: dict[str, Label] | None = None, compress: bool = True, spider_grader=None) -> dict:
    """Detect, name (and grade, with ``grader``) the vertebrae of a study; write its label volume.

    Args:
        image_path: DICOM series folder or volume file.
        detector: A :class:`spinepath.detection.predictor.VertebraDetector`.
        out_path: Label volume to write (on the input's grid; values from the label map; uint8). Its suffix
            picks the format (``.nii.gz``, ``.nrrd``, ...).
        grader: Optional :class:`spinepath.grading.grader.Grader`: adds pathology per level and disc grades.
        label_map: Defaults to :func:`load_label_map`.
        compress: Compress the label file (OHIF's MONAI Label panel asks for raw NRRD).
        spider_grader: Optional :class:`spinepath.grading.spider.SpiderGrader`: adds the degenerative grades per
            disc (Pfirrmann, Modic, endplates, listhesis, herniation, narrowing, bulging), as in the JSON output.

    Returns:
        JSON-ready summary: ``label_names`` (name -> value), ``levels`` drawn, ``level_naming``, the study's
        ``needs_review`` / ``review_reasons``, per vertebra level, value, name confidence, score, slice range,
        pathology (when graded) and its review flag, ``discs`` (when graded, with theirs: the spark grade and
        the degenerative grades per disc level, as :meth:`spinepath.core.results.Findings.disc_dicts`),
        ``degeneration_model`` (when graded for degeneration), the disclaimer.

    """
    label_map = label_map or load_label_map()
    volume, reference = load_image_volume(image_path)
    result = stages.analyse(volume, detector, grader, spider_grader)
    labels, drawn = render_labels(result, label_map)
    write_label_like(labels, volume, reference, out_path, compress)
    graded = {f.level: f.to_dict() for f in result.findings.vertebrae} if result.findings is not None else {}
    rev = result.review
    return {
        "disclaimer": DISCLAIMER,
        "software": {"name": "spinepath", "version": __version__},
        "label_names": {lab.name: lab.value for lab in label_map.values()},
        "levels": drawn,
        "level_naming": result.naming.to_dict() if result.naming is not None else None,
        "needs_review": rev.study.needs_review,
        "review_reasons": list(rev.study.reasons),
        "vertebrae": [
            {"level": t.level, "value": label_map[t.level].value if t.level in label_map else None,
             "name_confidence": round(t.name_confidence, 4), "score": round(t.score, 4),
             "slice_range": [int(min(t.slices)), int(max(t.slices))], "pathology": graded.get(t.level),
             **rev.vertebrae[i].to_dict()}
            for i, t in enumerate(result.vertebrae)
        ],
        "discs": [{**d, **rev.discs[d["level"]].to_dict()} for d in result.findings.disc_dicts()]
        if result.findings is not None else [],
        "degeneration_model": result.findings.degeneration_model if result.findings is not None else {},
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
    }
