"""Level-name outcomes and their calibration: (a name of confidence c right a fraction c of the time).

Each predicted vertebra matched to a reference vertebra gives one outcome (its name confidence, raw and as
reported, and whether its name is right): spark_midsag by the labelled centre its box contains, chu_t2 /
spineweb_vb (lowest labelled body = S1) and spider_seg (bodies named from the lumbosacral disc, the derived S1 box
matched at IoU >= 0.3) by per-slice IoU >= 0.5 (the majority over its slices).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spinepath.core.geometry import series_from_slices, spark_fov_spacing
from spinepath.data.datasets import (
    REFERENCE_AREA_FRACTION,
    clinical_slice_indices,
    dataset_kind,
    iter_volume_slices,
    load_spark,
    load_volume_index,
)
from spinepath.data.spider import load_spider_seg, spider_seg_slices
from spinepath.detection.grouping import group_and_name_with_evidence
from spinepath.detection.naming import load_naming_rules
from spinepath.evaluation.calibration import reliability
from spinepath.evaluation.matching import match_slice
from spinepath.evaluation.spacing import seg_case_with_spacing


@dataclass
class Outcome:
    """One named vertebra matched to a reference."""

    dataset: str
    case: str
    level: str
    reference: str
    confidence: float
    anchored: bool

    @property
    def correct(self) -> bool:
        """Whether the name is the reference's."""
        return self.level == self.reference


def _detect(slices: list[np.ndarray], spacing: tuple[float, float], model, rules: dict, slice_mm: float = 4.0):
    vol = series_from_slices(slices, spacing, slice_mm)
    dets = model.predict(list(vol.pixels), vol.spacing)
    return group_and_name_with_evidence(dets, vol.pixels.shape[1:], rules=rules)


def naming_outcomes(root: str | Path, model, cases: list[str] | None = None, rules: dict | None = None,
                    progress: bool = True) -> list[Outcome]:
    """Outcomes of every matched vertebra of a dataset (spark_midsag, chu_t2 / spineweb_vb or spider_seg format).

    Args:
        root: Dataset folder.
        model: A :class:`spinepath.detection.predictor.VertebraDetector`.
        cases: Case ids (default all).
        rules: Naming rules (e.g. without calibration, for fitting it); default ``configs/naming.json``.
        progress: Show a progress bar.

    """
    root = Path(root)
    rules = rules or load_naming_rules()
    out: list[Outcome] = []
    if dataset_kind(root) == "spark":
        for c in tqdm([c for c in load_spark(root) if cases is None or c.case in cases], desc="images",
                      disable=not progress):
            img = c.load_image()
            sp = spark_fov_spacing(img.shape)
            verts, naming = _detect([img], (sp, sp), model, rules)
            for v in c.vertebrae():
                col, row = v["xy"]
                inside = [t for t in verts
                          if t.boxes[0][0] <= row <= t.boxes[0][2] and t.boxes[0][1] <= col <= t.boxes[0][3]]
                if len(inside) == 1:
                    t = inside[0]
                    out.append(Outcome(root.name, c.case, t.level, v["level"], t.name_confidence,
                                       naming is not None and naming.anchor == "S1"))
        return out
    if dataset_kind(root) == "spider_seg":
        for sc in tqdm([c for c in load_spider_seg(root, require_spacing=False) if cases is None or c.patient in cases],
                       desc="patients", disable=not progress):
            slices = spider_seg_slices(seg_case_with_spacing(sc, model))
            verts, naming = _detect([s.image for s in slices], slices[0].spacing, model, rules, 2 * sc.thickness)
            out += _volume_outcomes(root.name, sc.patient, slices, verts, naming)
        return out
    for case in tqdm([c for c in load_volume_index(root) if cases is None or c.case in cases], desc="cases",
                     disable=not progress):
        if case.structure != "vertebral_body":
            continue
        slices = list(iter_volume_slices(case, clinical_slice_indices(case.n_slices), inferred=True))
        verts, naming = _detect([s.image for s in slices], slices[0].spacing, model, rules)
        out += _volume_outcomes(root.name, case.case, slices, verts, naming)
    return out


def _volume_outcomes(dataset: str, case: str, slices: list, verts: list, naming) -> list[Outcome]:
    """Outcomes of a series' named vertebrae: each takes the majority reference name of the boxes it matched.

    A match is IoU >= 0.5 with a scored reference (cross-section >= 50 % of the body's largest), or >= 0.3
    with a derived one (spider_seg's unlabelled S1, whose box is an estimate).
    """
    votes: dict[int, list[str]] = {}
    for k, s in enumerate(slices):
        pred = [t for t in verts if t.box_on(k) is not None]
        boxes = np.array([t.box_on(k) for t in pred]).reshape(-1, 4)
        derived = s.derived if s.derived is not None else np.zeros(len(s.boxes), bool)
        scored = (s.area_fraction >= REFERENCE_AREA_FRACTION) & ~derived
        m = match_slice(boxes, s.boxes, ~scored)
        for p, r, iou in m["pairs"]:
            if s.levels[r] and ((scored[r] and iou >= 0.5) or (derived[r] and iou >= 0.3)):
                votes.setdefault(id(pred[p]), []).append(s.levels[r])
    anchored = naming is not None and naming.anchor == "S1"
    return [Outcome(dataset, case, t.level, max(set(v), key=v.count), t.name_confidence, anchored)
            for t in verts if (v := votes.get(id(t)))]


def calibration_report(outcomes: list[Outcome], n_bins: int = 10) -> dict:
    """Reliability of name confidences: accuracy, ECE, reliability bins and the "at least c above c" check.

    ``min_margin`` is the smallest (accuracy among names with confidence >= c) - c over the confidences c
    that occur; the calibration contract holds when it is >= 0.
    """
    if not outcomes:
        return {"n": 0}
    conf = np.array([o.confidence for o in outcomes])
    ok = np.array([o.correct for o in outcomes], float)
    rel = reliability(conf, ok, n_bins)
    margins = [(float(ok[conf >= c].mean()) - float(c), float(c)) for c in np.unique(conf)]
    worst = min(margins)
    return {"n": len(outcomes), "accuracy": round(float(ok.mean()), 4), "ece": rel["ece"],
            "min_margin": round(worst[0], 4), "min_margin_at": round(worst[1], 4),
            "anchored_fraction": round(float(np.mean([o.anchored for o in outcomes])), 4), "bins": rel["bins"]}
