"""Matching predictions to references: one-to-one IoU matching of boxes, greedy nearest-first pairing."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from spinepath.core.boxes import box_iou


def match_slice(pred: np.ndarray, ref: np.ndarray, ignore: np.ndarray) -> dict:
    """One-to-one (Hungarian) IoU matching of predicted to reference boxes on one slice.

    Args:
        pred: ``(P, 4)`` predicted boxes.
        ref: ``(R, 4)`` reference boxes.
        ignore: ``(R,)`` True for references that are not scored (a prediction matched to one is neither
            right nor wrong).

    Returns:
        ``{"ious": IoU per scored reference (0 if unmatched), "tp", "fp", "pairs": [(pred, ref, iou)]}``.

    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1, 4)
    ignore = np.asarray(ignore, dtype=bool).reshape(-1)
    ious = np.zeros(len(ref))
    pairs: list[tuple[int, int, float]] = []
    matched_pred = np.zeros(len(pred), dtype=bool)
    matched_ignored = np.zeros(len(pred), dtype=bool)
    if len(pred) and len(ref):
        iou = box_iou(pred, ref)
        pi, ri = linear_sum_assignment(-iou)
        for p, r in zip(pi, ri):
            if iou[p, r] <= 0:
                continue
            pairs.append((int(p), int(r), float(iou[p, r])))
            ious[r] = iou[p, r]
            if ignore[r]:
                matched_ignored[p] = True
            else:
                matched_pred[p] = iou[p, r] >= 0.5
    scored = ~ignore
    tp = int(sum(1 for p, r, v in pairs if not ignore[r] and v >= 0.5))
    fp = int(len(pred) - tp - matched_ignored.sum())
    return {"ious": [float(v) for v in ious[scored]], "tp": tp, "fp": fp, "pairs": pairs}


def greedy_match(dist: np.ndarray, limit: np.ndarray) -> dict[int, int]:
    """Reference -> prediction, one-to-one, nearest first, within a per-reference distance limit."""
    out: dict[int, int] = {}
    used: set[int] = set()
    if dist.size == 0:
        return out
    for r, p in sorted(np.ndindex(*dist.shape), key=lambda rp: dist[rp]):
        if r in out or p in used or dist[r, p] > limit[r]:
            continue
        out[r] = p
        used.add(p)
    return out

