"""Naming the vertebrae of the spinal chain from the bottom up, anchored on the S1 class."""

from __future__ import annotations

import numpy as np

from spinepath.core.levels import names_from_bottom
from spinepath.core.results import Vertebra


def name_vertebrae(kept: list[Vertebra], image_shape: tuple[int, int], s1_threshold: float = 0.5) -> list[Vertebra]:
    """Name a top-down chain of vertebrae from the bottom up; sets ``level``, ``name_confidence``, ``truncated``.

    Among the three lowest vertebrae, the one with the highest S1-class score (mean over its slices) is S1 if
    that score is at least ``s1_threshold``; otherwise the lowest is L5; names go upward from it. Bodies below a
    named S1 are dropped (sacral segments). The name confidence is the S1 decision's confidence times the
    vertebra's score, decreasing by 5% per level away from the anchor.

    Args:
        kept: The spinal chain, top-down.
        image_shape: ``(rows, cols)`` of the slices (a body touching the top or bottom row is truncated).
        s1_threshold: S1 decision threshold.

    Returns:
        The named vertebrae, top-down.

    """
    if not kept:
        return []
    # name from the bottom: find S1 among the three lowest vertebrae
    s1p = [float(np.mean(t.s1_scores)) for t in kept]
    low = range(max(0, len(kept) - 3), len(kept))
    best = max(low, key=lambda i: s1p[i])
    s1_idx = best if s1p[best] >= s1_threshold else None
    if s1_idx is not None:
        kept = kept[: s1_idx + 1]
        anchor_conf = s1p[s1_idx]
        names = names_from_bottom(len(kept), "S1")
    else:
        anchor_conf = 1.0 - max(s1p[-1], 0.0)
        names = names_from_bottom(len(kept), "L5")
    rows = image_shape[0]
    for j, (t, n) in enumerate(zip(kept, names)):
        t.level = n
        steps = len(kept) - 1 - j
        t.name_confidence = float(np.clip(anchor_conf * (0.95**steps) * min(1.0, t.score / 0.5), 0, 1))
        b = np.array(t.boxes)
        t.truncated = bool(b[:, 0].min() <= 1 or b[:, 2].max() >= rows - 1)
    return kept
