"""Dice of a predicted class map against a partial-label mask, per annotated class (issue 14, item 6)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from spinepath.segmentation.data import SegSlice


def group_dice(pred: np.ndarray, target: np.ndarray, groups: np.ndarray, annotated: list[str],
               totals: bool = False) -> dict[str, float | None | np.ndarray]:
    """Dice of each annotated group: the predicted classes merged as the mask merges them.

    Args:
        pred: ``(H, W)`` predicted class indices.
        target: ``(H, W)`` group indices of the mask (0 = unlabelled group; -1 = unknown: not scored).
        groups: ``(G, C)`` 0/1 (each class in one group).
        annotated: Names of groups 1..G-1.
        totals: Return ``[intersection, |pred| + |target|]`` per name instead (to pool slices of a case).

    Returns:
        ``{name: Dice}`` (None where neither has the class) or the totals.

    """
    cls2group = np.argmax(groups[: len(annotated) + 1], axis=0)
    pg = cls2group[pred]
    out: dict[str, float | None | np.ndarray] = {}
    for g, name in enumerate(annotated, start=1):
        a, b = (pg == g) & (target >= 0), target == g
        inter, denom = float((a & b).sum()), float(a.sum() + b.sum())
        out[name] = np.array([inter, denom]) if totals else (2 * inter / denom if denom else None)
    return out


def per_case_dice(items: Iterable[tuple[SegSlice, np.ndarray]]) -> dict[tuple[str, str], dict[str, float]]:
    """Dice per case ``(source, case)`` and annotation name, pooled over the case's slices.

    Args:
        items: ``(slice, predicted class map on its grid)`` pairs.

    """
    per_case: dict[tuple[str, str], dict[str, list]] = {}
    for s, pred in items:
        acc = per_case.setdefault((s.source, s.case), {})
        for name, v in group_dice(pred, s.target, s.groups, s.annotated, totals=True).items():
            acc.setdefault(name, []).append(v)
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key, acc in per_case.items():
        for name, parts in acc.items():
            tot = np.sum(parts, axis=0)
            if tot[1] > 0:
                out.setdefault(key, {})[name] = float(2 * tot[0] / tot[1])
    return out


def case_dice(items: Iterable[tuple[SegSlice, np.ndarray]]) -> dict[str, float]:
    """Dice per annotation name: each case's over all its slices (pooled), then the mean over cases.

    Args:
        items: ``(slice, predicted class map on its grid)`` pairs.

    """
    dice: dict[str, list[float]] = {}
    for case in per_case_dice(items).values():
        for name, v in case.items():
            dice.setdefault(name, []).append(v)
    return {k: round(float(np.mean(v)), 4) for k, v in dice.items()}
