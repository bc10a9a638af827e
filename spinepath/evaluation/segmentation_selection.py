"""Choosing and comparing segmentation models on the selection split (issue 14).

The contract's score of a model on the selection patients: each source's annotated classes scored by the
``spinepath evaluate segmentation`` Dice (per case over its slices, on the dataset's own pixels, then the mean
over cases), and the mean of those values over spider_seg, chu_t2, spineweb_vb and ivd_t2. A model is scored
with its own per-class log-probability offsets, searched on a grid (``scripts/segmentation_offsets.py``), and
two models are compared by the paired gain of that score with a bootstrap interval that resamples cases within
each source (``scripts/segmentation_compare.py``). The validation split is never read here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from spinepath.data.split import split_cases
from spinepath.evaluation.segmentation import evaluation_slices
from spinepath.segmentation.data import SegSlice
from spinepath.segmentation.inference import decide, grid_slice_probabilities, probabilities_on_pixels
from spinepath.segmentation.metrics import per_case_dice
from spinepath.segmentation.partial import CLASSES

SOURCES = ("spider_seg", "chu_t2", "spineweb_vb", "ivd_t2")
#: The searched offsets (log-probability units); background and posterior elements stay at 0.
GRID: dict[str, tuple[float, ...]] = {
    "vertebral_body": (0.0, 0.5, 1.0, 1.5, 2.0),
    "disc": (0.0, -0.5, -1.0, -1.5, -2.0),
    "spinal_canal": (0.0, 0.75, 1.5, 2.25),
}

#: ``{(source, case): {annotation name: Dice}}``
CaseDice = dict[tuple[str, str], dict[str, float]]


@dataclass(frozen=True)
class OffsetChoice:
    """One grid point's score on the selection split."""

    offsets: dict[str, float]
    score: float
    per_case: CaseDice

    def per_source(self) -> dict[str, dict[str, float]]:
        """``{source: {name: mean Dice over cases}}`` (the contract's figures), rounded to 4 decimals."""
        acc: dict[str, dict[str, list[float]]] = {}
        for (src, _), d in self.per_case.items():
            for name, v in d.items():
                acc.setdefault(src, {}).setdefault(name, []).append(v)
        return {s: {n: round(float(np.mean(v)), 4) for n, v in d.items()} for s, d in acc.items()}


def selection_score(per_case: CaseDice) -> float:
    """The mean over (source, class) of the mean Dice over that source's cases."""
    acc: dict[tuple[str, str], list[float]] = {}
    for (src, _), d in per_case.items():
        for name, v in d.items():
            acc.setdefault((src, name), []).append(v)
    return float(np.mean([np.mean(v) for v in acc.values()]))


def selection_probabilities(model: torch.nn.Module, data: Path, progress: bool = True,
                            sources: tuple[str, ...] = SOURCES, max_cases: int | None = None
                            ) -> list[tuple[SegSlice, torch.Tensor]]:
    """(slice on its own pixels, class probabilities there) of the contract's slices of every selection case.

    Slices without signal get the product's empty answer (:func:`grid_slice_probabilities`), as in the contract.

    Args:
        model: A segmenter loaded without offsets.
        data: The folder holding the sources (``../shared/data``).
        progress: Show a bar per source.
        sources: Which sources to read (those without selection cases are skipped).
        max_cases: Read at most this many selection cases per source (tests).

    """
    out = []
    for src in sources:
        cases = split_cases(data / src, "selection")[:max_cases]
        for s in tqdm(evaluation_slices(data / src, cases), desc=src, disable=not progress):
            with torch.no_grad():
                p = probabilities_on_pixels(grid_slice_probabilities(model, s), s.native.shape)
            out.append((replace(s, target=s.native, native=None), p))
    return out


def search_offsets(slices: list[tuple[SegSlice, torch.Tensor]], grid: Mapping[str, tuple[float, ...]] = GRID,
                   progress: bool = True) -> list[OffsetChoice]:
    """Every grid point's selection score, best first (ties go to the smaller total offset).

    Args:
        slices: From :func:`selection_probabilities`.
        grid: Offsets tried per class name; the classes not named stay at 0.
        progress: Show a bar.

    """
    scored = []
    for combo in tqdm(list(itertools.product(*grid.values())), desc="offsets", disable=not progress):
        off = dict(zip(grid, combo))
        per_case = per_case_dice((s, decide(p, [off.get(c, 0.0) for c in CLASSES])[0].numpy()) for s, p in slices)
        value = selection_score(per_case)
        scored.append((round(value, 5), -sum(abs(x) for x in combo), OffsetChoice(off, value, per_case)))
    scored.sort(key=lambda r: (r[0], r[1]), reverse=True)
    return [r[2] for r in scored]


def paired_case_gain(a: CaseDice, b: CaseDice, n: int = 1000, seed: int = 0,
                     score: Callable[[CaseDice], float] = selection_score) -> dict:
    """``score(b) - score(a)`` over the cases both scored, with a paired bootstrap 95% interval.

    Each draw resamples the cases with replacement within each source (every source keeps its number of cases,
    so the mean over sources keeps its weights) and scores both models on the same draw.

    Returns:
        ``{"a", "b", "gain", "ci95": [low, high], "n_cases", "cases_better"}`` (rounded to 4 decimals);
        ``cases_better``: cases whose mean Dice over their classes rose.

    Raises:
        ValueError: If the models share no case, or score different classes on a shared case (a class that one
            model never predicted and the reference lacks there: the two scores would not be comparable).

    """
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("the two models share no scored case")
    differ = [k for k in keys if set(a[k]) != set(b[k])]
    if differ:
        # a class scored by one model only would weigh in one score and not in the other
        raise ValueError(f"the two models score different classes on {len(differ)} case(s), e.g. {differ[0]}: "
                         f"{sorted(a[differ[0]])} against {sorted(b[differ[0]])}")
    by_source: dict[str, list[tuple[str, str]]] = {}
    for k in keys:
        by_source.setdefault(k[0], []).append(k)
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(n):
        ra: CaseDice = {}
        rb: CaseDice = {}
        for src, ks in by_source.items():
            for i, j in enumerate(rng.integers(0, len(ks), len(ks))):
                # a drawn case gets a name of its own, so that it counts as often as it was drawn
                ra[(src, f"{ks[j][1]}#{i}")], rb[(src, f"{ks[j][1]}#{i}")] = a[ks[j]], b[ks[j]]
        gains.append(score(rb) - score(ra))
    sa, sb = score({k: a[k] for k in keys}), score({k: b[k] for k in keys})
    better = sum(np.mean(list(b[k].values())) > np.mean(list(a[k].values())) for k in keys)
    return {"a": round(sa, 4), "b": round(sb, 4), "gain": round(sb - sa, 4),
            "ci95": [round(float(q), 4) for q in np.percentile(gains, [2.5, 97.5])],
            "n_cases": len(keys), "cases_better": int(better)}
