"""MONAI Label task ``spine_structures`` (issue 14, item 5): the segmentation as a label volume, and back.

Infer: detection, naming and the segmentation stage on every slice of the study; the label volume holds each
vertebral body under its level's value, each disc under its disc value and the canal under its value
(``configs/labels.json`` with its ``structures``). Train: an annotator's corrected label volume becomes
segmentation slices with partial labels (bodies, discs and canal annotated; the posterior elements are not, so
they share the unlabelled group with the background), for
:func:`spinepath.labeling.rounds.run_segmentation_round`. One final label per study serves both tasks: the
bodies of a structure label give the detector its boxes (task ``vertebrae``), while a vertebra-box label (no
disc, no canal) is not a segmentation reference and is skipped here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spinepath import DISCLAIMER, __version__, stages
from spinepath.core.errors import StudyError
from spinepath.core.geometry import SeriesVolume
from spinepath.core.labels import Label, load_label_map
from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS
from spinepath.core.results import CANAL, DetectionResult
from spinepath.io.volumes import image_id, labels_on_volume, load_image_volume, read_image, write_label_like
from spinepath.segmentation.data import SegSlice, to_grid
from spinepath.segmentation.inference import segment_study
from spinepath.segmentation.partial import label_groups

#: What a corrected structure label volume annotates (its group order).
ANNOTATED = ["vertebral_body", "disc", "spinal_canal"]


def structure_label_map() -> dict[str, Label]:
    """Bodies by level, discs by level and the canal (:func:`spinepath.core.labels.load_label_map`)."""
    return load_label_map(structures=True)


def render_structures(result: DetectionResult, label_map: dict[str, Label] | None = None) -> np.ndarray:
    """The segmented slices' named structures as one ``uint8`` label volume on the result's volume."""
    label_map = label_map or structure_label_map()
    out = np.zeros(result.volume.pixels.shape, np.uint8)
    seg = result.segmentation
    for k in seg.instances:
        for name, mask in seg.structures(k).items():
            if name in label_map:
                out[k][mask] = label_map[name].value
    return out


def label_structures(image_path: str | Path, detector, segmenter, out_path: str | Path,
                     label_map: dict[str, Label] | None = None, compress: bool = True) -> dict:
    """Detect and name the vertebrae, segment every slice, write the structure label volume.

    Returns:
        JSON-ready summary: ``label_names``, the ``structures`` found on the key slice, the key slice's
        ``measurements`` (as in the JSON output, with their ``review``) and the disclaimer.

    Raises:
        StudyError: If the image cannot be read or no vertebra is named.

    """
    label_map = label_map or structure_label_map()
    volume, reference = load_image_volume(image_path)
    result = stages.detect_series(volume, detector)
    if not any(t.level in VERTEBRA_LEVELS for t in result.vertebrae):
        raise StudyError("no vertebra was found and named: nothing to segment by level")
    seg = segment_study(result, segmenter, neighbours=volume.pixels.shape[0])
    rev = stages.review(result)
    write_label_like(render_structures(result, label_map), volume, reference, out_path, compress)
    return {
        "disclaimer": DISCLAIMER,
        "software": {"name": "spinepath", "version": __version__},
        "label_names": {lab.name: lab.value for lab in label_map.values()},
        "segmentation": seg.to_dict(volume),
        "measurements": {**seg.measurements_dict(volume), "review": rev.measurement_dicts()},
    }


def seg_slices_from_labels(volume: SeriesVolume, labels: np.ndarray, case: str,
                           label_map: dict[str, Label] | None = None) -> list[SegSlice]:
    """Training slices (on the segmentation grid) of every slice an annotator labelled.

    Raises:
        StudyError: If the label volume's shape differs from the image's.

    """
    if labels.shape != volume.pixels.shape:
        raise StudyError(f"label shape {labels.shape} does not match the image {volume.pixels.shape}")
    label_map = label_map or structure_label_map()
    lut = np.zeros(256, np.int64)  # label value -> group (1 body, 2 disc, 3 canal; unknown values: 0)
    for name, lab in label_map.items():
        lut[lab.value] = 1 if name in VERTEBRA_LEVELS else 2 if name in DISC_LEVELS else 3 if name == CANAL else 0
    if not np.isin(lut[np.unique(labels).astype(np.int64)], (2, 3)).any():
        raise StudyError("the label holds no disc and no canal: a vertebra-box label (task vertebrae), "
                         "not a structure label")
    groups = label_groups(ANNOTATED)
    sp = (float(volume.spacing[0]), float(volume.spacing[1]))
    out = []
    for k in range(labels.shape[0]):
        target = lut[labels[k].astype(np.int64)]
        if not target.any():  # a slice the annotator did not label: no evidence either way
            continue
        img, tgt = to_grid(volume.pixels[k], target, sp)
        out.append(SegSlice(img, tgt, groups, list(ANNOTATED), "corrections", case, case, k, sp))
    return out


def seg_slices_from_label_file(image_path: str | Path, label_path: str | Path, case: str | None = None,
                               label_map: dict[str, Label] | None = None) -> list[SegSlice]:
    """:func:`seg_slices_from_labels` for an image file and its label file (same grid, any orientation).

    Raises:
        StudyError: If either file is unreadable or the grids differ.

    """
    volume, _ = load_image_volume(image_path)
    labels = labels_on_volume(read_image(label_path, "label"), volume)
    return seg_slices_from_labels(volume, labels, case or image_id(image_path), label_map)
