"""Linking per-slice boxes into 3D vertebrae (the spinal chain); naming is :mod:`spinepath.detection.naming`."""

from __future__ import annotations

import numpy as np

try:  # the solver alone: with :mod:`spinepath.core.lean`'s deferral, not every solver of scipy.optimize
    from scipy.optimize._lsap import linear_sum_assignment
except ImportError:  # another SciPy layout
    from scipy.optimize import linear_sum_assignment

from spinepath.core.boxes import box_iou
from spinepath.core.results import LevelNaming, Vertebra
from spinepath.detection.naming import load_naming_rules, name_chain
from spinepath.detection.predictor import SliceDetections


def link_slices(dets: list[SliceDetections], min_iou: float = 0.3, max_gap: int = 1) -> list[Vertebra]:
    """Link detections on neighbouring slices into vertebrae (greedy IoU tracking, Hungarian per slice)."""
    tracks: list[Vertebra] = []
    for k, d in enumerate(dets):
        active = [t for t in tracks if k - t.slices[-1] <= max_gap + 1]
        used = set()
        if active and len(d.boxes):
            iou = box_iou(d.boxes, np.array([t.boxes[-1] for t in active]))
            di, ti = linear_sum_assignment(-iou)
            for i, j in zip(di, ti):
                if iou[i, j] >= min_iou:
                    active[j].add(k, d.boxes[i], d.scores[i], d.s1_scores[i])
                    used.add(i)
        for i in range(len(d.boxes)):
            if i not in used:
                t = Vertebra()
                t.add(k, d.boxes[i], d.scores[i], d.s1_scores[i])
                tracks.append(t)
    return tracks


def _merge_same_level(tracks: list[Vertebra]) -> list[Vertebra]:
    """Merge tracks that never share a slice and overlap strongly where they meet (one body split in two)."""
    tracks = sorted(tracks, key=lambda t: -len(t.slices))
    out: list[Vertebra] = []
    for t in tracks:
        for o in out:
            if set(t.slices) & set(o.slices):
                continue
            a = np.median(np.array(t.boxes), axis=0)
            b = np.median(np.array(o.boxes), axis=0)
            if box_iou(a[None], b[None])[0, 0] > 0.5:
                for k, bx, s, s1 in zip(t.slices, t.boxes, t.scores, t.s1_scores):
                    o.add(k, bx, s, s1)
                order = np.argsort(o.slices)
                o.slices = [o.slices[i] for i in order]
                o.boxes = [o.boxes[i] for i in order]
                o.scores = [o.scores[i] for i in order]
                o.s1_scores = [o.s1_scores[i] for i in order]
                break
        else:
            out.append(t)
    return out


def spine_chain(tracks: list[Vertebra]) -> list[Vertebra]:
    """Keep the vertebrae that form the spinal column: a top-down chain of neighbours.

    Starting from the surest vertebra (score times extent, the extent capped at the median track's), the chain
    grows up and down to the best-scoring vertebra whose centre lies 0.6-1.8 body heights away along the rows
    and within one body width along the columns (curvature allowed). Detections off the column (soft tissue,
    bowel) are dropped.
    """
    if len(tracks) <= 1:
        return tracks
    cen = {id(t): t.centre for t in tracks}
    hts = np.array([np.median([b[2] - b[0] for b in t.boxes]) for t in tracks])
    wds = np.array([np.median([b[3] - b[1] for b in t.boxes]) for t in tracks])
    h, w = float(np.median(hts)), float(np.median(wds))
    # the seed is the surest body: its score times its extent, the extent capped at the median track's, so
    # a wide sacrum seen on every lateral slice does not outrank the lumbar bodies
    cap = float(np.median([len(t.slices) for t in tracks]))
    seed = max(tracks, key=lambda t: t.score * min(len(t.slices), cap))
    chain = [seed]
    for direction in (-1, 1):
        cur = seed
        while True:
            c = cen[id(cur)]
            cands = []
            for t in tracks:
                if t in chain:
                    continue
                d = cen[id(t)] - c
                if direction * d[0] > 0.6 * h and direction * d[0] < 1.8 * h and abs(d[1]) < 1.0 * w:
                    cands.append(t)
            if not cands:
                break
            nxt = min(cands, key=lambda t: abs(cen[id(t)][0] - c[0]) - 0.5 * h * t.score)
            chain.append(nxt)
            cur = nxt
    chain.sort(key=lambda t: cen[id(t)][0])
    return chain


def group_and_name(
    dets: list[SliceDetections],
    image_shape: tuple[int, int],
    min_slices: int = 2,
    min_score: float = 0.5,
    s1_threshold: float | None = None,
) -> list[Vertebra]:
    """The named vertebrae of :func:`group_and_name_with_evidence` (without the naming record)."""
    return group_and_name_with_evidence(dets, image_shape, min_slices, min_score, s1_threshold)[0]


def group_and_name_with_evidence(
    dets: list[SliceDetections],
    image_shape: tuple[int, int],
    min_slices: int = 2,
    min_score: float = 0.5,
    s1_threshold: float | None = None,
    rules: dict | None = None,
) -> tuple[list[Vertebra], LevelNaming | None]:
    """Group per-slice detections into vertebrae and name them from the bottom up.

    Tracks seen on fewer than ``min_slices`` slices (1 for a single-slice input) or scoring below
    ``min_score`` are dropped, unless their S1-class score reaches the S1 threshold; the spinal chain is named
    by :func:`spinepath.detection.naming.name_chain`.

    Args:
        dets: Detections per slice, in slice order.
        image_shape: ``(rows, cols)`` of the slices.
        min_slices: Minimum slices for a vertebra.
        min_score: Minimum vertebra score.
        s1_threshold: S1 decision threshold (default: ``configs/naming.json``).
        rules: Naming rules (default: ``configs/naming.json``).

    Returns:
        Vertebrae sorted top-down with ``level`` and ``name_confidence`` set, and how they were named.

    """
    rules = rules or load_naming_rules()
    s1_threshold = float(rules["s1_threshold"] if s1_threshold is None else s1_threshold)
    tracks = _merge_same_level(link_slices(dets))
    need = 1 if len(dets) == 1 else min_slices
    # an S1 candidate is kept at a lower detection score: the sacrum's box scores below the lumbar bodies'
    tracks = [t for t in tracks if len(t.slices) >= need
              and (t.score >= min_score or float(np.mean(t.s1_scores)) >= s1_threshold)]
    # strict 3D suppression: two vertebrae cannot occupy the same rows on a shared slice
    tracks.sort(key=lambda t: -t.score * len(t.slices))
    kept: list[Vertebra] = []
    for t in tracks:
        clash = False
        for o in kept:
            for k in set(t.slices) & set(o.slices):
                if box_iou(t.box_on(k)[None], o.box_on(k)[None])[0, 0] > 0.3:
                    clash = True
                    break
            if clash:
                break
        if not clash:
            kept.append(t)
    return name_chain(spine_chain(kept), image_shape, s1_threshold, rules)
