"""Label volumes saved by annotators -> per-slice reference boxes and level names for detector training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinepath.core.boxes import boxes_from_mask_slice
from spinepath.core.errors import StudyError
from spinepath.core.geometry import SeriesVolume
from spinepath.core.labels import Label, load_label_map
from spinepath.data.datasets import Slice2D
from spinepath.io.volumes import image_id, labels_on_volume, load_image_volume, read_image


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
    labels = labels_on_volume(read_image(label_path, "label"), volume)
    return slices_from_labels(volume, labels, case or image_id(image_path), label_map)

