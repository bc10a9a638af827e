"""Naming the vertebrae of the spinal chain from the bottom up, anchored on the S1 class, with the evidence.

Rules and the name-confidence calibration live in ``spinepath/configs/naming.json``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from spinepath.core.config import config_file
from spinepath.core.levels import names_from_bottom
from spinepath.core.results import LevelNaming, Vertebra
from spinepath.grading.calibration import sigmoid

NAMING_RULES = config_file("naming.json")
#: Every name confidence without a sacral anchor stays below this.
UNANCHORED_CAP = 0.49


@lru_cache(maxsize=4)
def load_naming_rules(path: str | Path = NAMING_RULES) -> dict:
    """The rules of ``naming.json`` (cached)."""
    return json.loads(Path(path).read_text())


def raw_name_confidence(anchor_conf: float, steps: int, score: float) -> float:
    """The uncalibrated name confidence: anchor evidence, 5% less per level away from it, times the box score."""
    return float(np.clip(anchor_conf * (0.95**steps) * min(1.0, score / 0.5), 0, 1))


#: The names of :func:`junction_features`, in order.
JUNCTION_FEATURES = ("height_ratio", "depth_ratio", "pitch_ratio", "lower_height_ratio")


def junction_features(upper: Vertebra, lower: Vertebra, below: Vertebra) -> np.ndarray:
    """Shape of the junction between two neighbouring vertebrae, relative to the pair below it.

    Body height ratio and anteroposterior depth ratio of ``upper`` to ``lower`` (median box over their
    slices), the ratio of the centre-to-centre distance ``upper``-``lower`` to ``lower``-``below``, and the
    body height ratio of ``lower`` to ``below``. At the
    thoracolumbar junction the upper body is shorter (T12 / L1 about 0.89 against L1 / L2 about 0.98 on the
    SPIDER training images); all three are ratios, so the pixel size does not enter.
    """
    def size(t: Vertebra) -> tuple[float, float]:
        b = np.asarray(t.boxes, dtype=float)
        return float(np.median(b[:, 2] - b[:, 0])), float(np.median(b[:, 3] - b[:, 1]))

    (hu, wu), (hl, wl), (hb, _) = size(upper), size(lower), size(below)
    p1 = float(np.linalg.norm(lower.centre - upper.centre))
    p2 = float(np.linalg.norm(below.centre - lower.centre))
    return np.array([hu / max(hl, 1e-6), wu / max(wl, 1e-6), p1 / max(p2, 1e-6), hl / max(hb, 1e-6)])


def lumbar_junction_probability(features: np.ndarray, model: dict) -> float:
    """P(the junction is lumbar-lumbar rather than thoracolumbar): logistic regression on log-ratios.

    ``model`` is ``naming.json``'s ``lumbar_type`` (``coef``, ``intercept``), fitted by
    ``scripts/fit_lumbar_type.py``.
    """
    z = float(np.dot(model["coef"], np.log(np.clip(features, 1e-3, None))) + model["intercept"])
    return float(sigmoid(z))


def calibrate(raw: float, anchored: bool, rules: dict | None = None) -> float:
    """Map a raw name confidence to the fraction of names correct at it (isotonic fit, ``calibration``).

    Anchored and unanchored names have their own maps; without a fitted map the raw value is returned.
    """
    cal = (rules or load_naming_rules()).get("calibration") or {}
    m = cal.get("anchored" if anchored else "unanchored")
    if not m:
        return raw
    return float(np.interp(raw, m["raw"], m["correct"]))


def name_chain(kept: list[Vertebra], image_shape: tuple[int, int], s1_threshold: float | None = None,
               rules: dict | None = None) -> tuple[list[Vertebra], LevelNaming | None]:
    """Name a top-down chain of vertebrae from the bottom up; sets ``level``, ``name_confidence``, ``truncated``.

    Among the three lowest vertebrae, the highest whose S1-class score (mean over its slices) is at least
    ``s1_threshold`` is S1 (the sacral segments below it look alike); without one the levels are counted
    without an anchor, the lowest taken as L5, and every name confidence stays below 0.5. Bodies below a
    named S1 are dropped (sacral segments). The vertebra above the anchor with an S1 score of at least
    ``transitional_ratio`` of the anchor's sets ``transitional_suspected`` (a sacralised L5, or S1 taken for
    S2: four lumbar-type vertebrae). So does a T12-L1 junction shaped like a lumbar one
    (:func:`lumbar_junction_probability` at least ``lumbar_type.threshold``, T12 not cut by the field of view:
    six lumbar-type vertebrae). Either is reported; the names are kept. Name confidences are
    :func:`raw_name_confidence` through the isotonic :func:`calibrate` maps (anchored / unanchored, fitted on
    the selection split), halved when transitional, capped below 0.5 without anchor.

    Args:
        kept: The spinal chain, top-down.
        image_shape: ``(rows, cols)`` of the slices (a body touching the top or bottom row is truncated).
        s1_threshold: S1 decision threshold (default: the rules').
        rules: Default :func:`load_naming_rules`.

    Returns:
        The named vertebrae, top-down, and the :class:`LevelNaming` (None for an empty chain).

    """
    rules = rules or load_naming_rules()
    if not kept:
        return [], None
    thr = float(rules["s1_threshold"] if s1_threshold is None else s1_threshold)
    s1p = [float(np.mean(t.s1_scores)) for t in kept]
    low = list(range(max(0, len(kept) - 3), len(kept)))
    # the sacral segments below S1 look like S1 too: the highest of the lowest three that passes is S1
    passing = [i for i in low if s1p[i] >= thr]
    best = passing[0] if passing else max(low, key=lambda i: s1p[i])
    evidence = {"s1_probability_of_lowest": [round(s1p[i], 4) for i in low], "s1_threshold": thr}
    transitional, n_lumbar = False, 5
    if s1p[best] >= thr:
        anchor, anchor_conf = "S1", s1p[best]
        above = s1p[best - 1] if best > 0 else 0.0
        ratio = float(rules["transitional_ratio"])
        if above >= ratio * anchor_conf:  # an S1-like vertebra above S1: a sacralised L5, or S1 taken for S2
            transitional, n_lumbar = True, 4
            evidence["rule"] = (f"S1 evidence split: the vertebra above the anchor scores {above:.2f} "
                                f"(>= {ratio:g} x {anchor_conf:.2f})")
        else:
            evidence["rule"] = f"S1 class {anchor_conf:.2f} >= {thr:g}: the highest such of the three lowest"
        kept = kept[: best + 1]
        names = names_from_bottom(len(kept), "S1")
        if not transitional:
            n_lumbar = min(5, len(kept) - 1)
            transitional = _six_lumbar(kept, names, image_shape[0], rules, evidence)
            n_lumbar = 6 if transitional else n_lumbar
    else:
        anchor, anchor_conf = "none", s1p[best]
        evidence["rule"] = (f"no S1 among the three lowest vertebrae (best S1 class {anchor_conf:.2f} < {thr:g}): "
                            "counted from the lowest vertebra in view, taken as L5")
        names = names_from_bottom(len(kept), "L5")
        n_lumbar = sum(n.startswith("L") for n in names)
    rows = image_shape[0]
    for j, (t, n) in enumerate(zip(kept, names)):
        t.level = n
        steps = len(kept) - 1 - j
        if anchor == "S1":
            conf = calibrate(raw_name_confidence(anchor_conf, steps, t.score), True, rules)
            t.name_confidence = conf * (0.5 if transitional else 1.0)
        else:  # no anchor: never trusted above chance, whatever the counting
            raw = UNANCHORED_CAP * raw_name_confidence(1.0 - anchor_conf, steps, t.score)
            t.name_confidence = min(UNANCHORED_CAP, calibrate(raw, False, rules))
        b = np.array(t.boxes)
        t.truncated = bool(b[:, 0].min() <= 1 or b[:, 2].max() >= rows - 1)
    naming = LevelNaming(anchor=anchor, anchor_confidence=anchor_conf, n_lumbar=int(n_lumbar),
                         transitional_suspected=transitional, confidence=kept[-1].name_confidence, evidence=evidence)
    return kept, naming



def _six_lumbar(kept: list[Vertebra], names: list[str], rows: int, rules: dict, evidence: dict) -> bool:
    """Whether the vertebra named T12 looks lumbar (its junction with L1 shaped like L1-L2); notes the evidence."""
    model = rules.get("lumbar_type")
    if not model or not all(n in names for n in ("T12", "L1", "L2")):
        return False
    t12, l1, l2 = (kept[names.index(n)] for n in ("T12", "L1", "L2"))
    b = np.asarray(t12.boxes)
    if b[:, 0].min() <= 1 or b[:, 2].max() >= rows - 1:  # a cut T12 has no measurable height
        return False
    p = lumbar_junction_probability(junction_features(t12, l1, l2), model)
    evidence["lumbar_type_probability_T12"] = round(p, 4)
    if p < float(model["threshold"]):
        return False
    evidence["rule"] = (f"six lumbar-type vertebrae suspected: the T12-L1 junction is shaped like a lumbar one "
                        f"(P = {p:.2f} >= {float(model['threshold']):.2f}); names counted from S1")
    return True
