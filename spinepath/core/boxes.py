"""Boxes ``[r0, c0, r1, c1]`` in pixel edge coordinates (MONAI's ``xyxy`` mode): IoU, mask <-> boxes.

``monai.data.box_utils`` was measured against this code on the shared data and is not used where it gives
other numbers: its IoU is computed in float32 (up to 2e-7 off, which moves the evaluation figures), and its
``convert_box_mode`` (centre/size -> corners) computes in float32 where NumPy 1.x (the MONAI Label
environment) promotes the same arithmetic to float64 (92 of 146 spark_midsag studies got other boxes there).
"""

from __future__ import annotations

import numpy as np


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of ``(N, 4)`` boxes, in their own dtype."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection areas ``(N, M)`` of ``(N, 4)`` and ``(M, 4)`` boxes, in their own dtype."""
    r0 = np.maximum(a[:, None, 0], b[None, :, 0])
    c0 = np.maximum(a[:, None, 1], b[None, :, 1])
    r1 = np.minimum(a[:, None, 2], b[None, :, 2])
    c1 = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(r1 - r0, 0, None) * np.clip(c1 - c0, 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes in ``[r0, c0, r1, c1]`` edge coordinates (float64).

    Not ``monai.data.box_utils.box_iou``: MONAI computes in float32 with an epsilon added to the union, which
    moves IoUs by up to 2e-7 on this project's boxes (measured on the shared data) and so the reported
    evaluation figures; the trained models' thresholds and the metrics were fixed with this float64 form.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    inter = box_intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def box_slices(box, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns covered by a box ``[r0, c0, r1, c1]`` (pixel edge coordinates) on a ``shape`` image.

    A pixel is inside when its centre (``i + 0.5`` in edge coordinates) lies in ``[r0, r1)`` x ``[c0, c1)``;
    read back as a bounding box, a rendered box moves by less than half a pixel.
    """
    r0, c0, r1, c1 = (float(x) for x in box)
    i0, i1 = (int(np.clip(np.ceil(v - 0.5), 0, shape[0])) for v in (r0, r1))
    j0, j1 = (int(np.clip(np.ceil(v - 0.5), 0, shape[1])) for v in (c0, c1))
    return slice(i0, i1), slice(j0, j1)


def boxes_from_mask_slice(
    mask2d: np.ndarray, labels: list[int], max_areas: dict[int, int]
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Bounding boxes of the labelled structures on one slice.

    Args:
        mask2d: ``(rows, cols)`` integer label image.
        labels: Labels to consider.
        max_areas: Largest cross-section (pixels) of each label over the volume.

    Returns:
        ``(boxes, labels_present, area_fraction)``.

    """
    boxes, present, frac = [], [], []
    for lab in labels:
        rr, cc = np.nonzero(mask2d == lab)
        if rr.size == 0:
            continue
        boxes.append([rr.min(), cc.min(), rr.max() + 1, cc.max() + 1])
        present.append(lab)
        frac.append(rr.size / max(max_areas.get(lab, rr.size), 1))
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        present,
        np.asarray(frac, dtype=np.float32),
    )

