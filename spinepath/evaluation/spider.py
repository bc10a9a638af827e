"""Locating the graded discs of spider_midsag: which labelled discs the product finds, counted as it counts.

spider_midsag gives no locations, only grades per disc numbered from the bottom (``index_from_bottom``,
1 = the lumbosacral disc). The product names its discs between neighbouring named vertebrae; a disc named
``X-Y`` is ``index_from_bottom`` = its distance from ``L5-S1`` (:func:`spinepath.core.levels.disc_index_from_bottom`),
so a missed sacrum (the lowest vertebra taken as L5) shifts every index, exactly as it would shift
the grades. A labelled disc is *located* when the product names a disc at its index (the disc above the
highest vertebra found included, when in view: see :func:`spinepath.grading.spider.chain_discs`).

:func:`evaluate_spider` is ``spinepath evaluate spider``: the SPIDER grading contract, end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, roc_auc_score
from tqdm.auto import tqdm

from spinepath.core.geometry import series_from_slices
from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS, disc_index_from_bottom
from spinepath.core.results import DetectionResult
from spinepath.core.thresholds import graded_slip
from spinepath.data.spider import SpiderStudy, load_spider_midsag
from spinepath.evaluation.spacing import study_with_spacing
from spinepath.grading.spider import SpiderGrader, chain_discs, vertebra_parts, vertebra_probability, vertebra_reference
from spinepath.grading.spider_inference import (
    combined_probability,
    listhesis_probability,
    load_listhesis_decision,
    load_vertebra_decision,
)
from spinepath.grading.spider_training import study_samples
from spinepath.stages import detect_series, grade, segment

__all__ = ["LocatedDiscs", "disc_index_from_bottom", "evaluate_spider", "locate_discs", "located_fraction"]


@dataclass
class LocatedDiscs:
    """The product's discs on one spider_midsag image."""

    patient: str
    sequence: str
    anchor: str | None
    found: dict[int, tuple[float, float]]  # index_from_bottom -> disc centre (row, col), midway between bodies
    labelled: list[int]

    @property
    def located(self) -> list[int]:
        """Labelled disc indices the product found."""
        return [i for i in self.labelled if i in self.found]


def locate_discs(study: SpiderStudy, sequence: str, detector) -> LocatedDiscs:
    """Detect and name the vertebrae of one sequence's image and list the discs the grading would crop.

    The image is one slice with its DICOM pixel spacing (a single-slice series, as the product reads a 2D
    input); the discs are :func:`spinepath.grading.spider.chain_discs`' (edge disc included).
    """
    img = study.load_image(sequence)
    spacing = study.spacing.get(sequence) or (1.0, 1.0)
    res = detect_series(series_from_slices([img], spacing, 4.0), detector)
    found = {i: s.centre for i, s, _ in chain_discs(res.vertebrae, "", float(spacing[0]), image_rows=img.shape[0])}
    return LocatedDiscs(study.patient, sequence, res.naming.anchor if res.naming else None, found,
                        [int(d["index_from_bottom"]) for d in study.discs])


def located_fraction(root: str | Path, detector, cases: list[str] | None = None,
                     sequences: tuple[str, ...] = ("t1", "t2"), progress: bool = True) -> dict:
    """Per sequence: located labelled discs / labelled discs, and the fraction of images anchored on S1.

    Returns:
        ``{sequence: {"n_images", "n_discs", "located_fraction", "anchored_fraction"}, "per_image": [...]}``.

    """
    studies = [study_with_spacing(s, detector, sequences) for s in load_spider_midsag(root)
               if cases is None or s.patient in cases]
    out: dict = {"per_image": []}
    for seq in sequences:
        rows = [locate_discs(s, seq, detector) for s in tqdm(studies, desc=seq, disable=not progress)
                if seq in s.sequences]
        n = sum(len(r.labelled) for r in rows)
        out[seq] = {"n_images": len(rows), "n_discs": n,
                    "located_fraction": sum(len(r.located) for r in rows) / max(n, 1),
                    "anchored_fraction": sum(r.anchor == "S1" for r in rows) / max(len(rows), 1)}
        out["per_image"] += [{"patient": r.patient, "sequence": seq, "anchor": r.anchor,
                              "labelled": len(r.labelled), "located": len(r.located)} for r in rows]
    return out


# ------------------------------------------------------------------------------- the grading contract
#: Binary findings of the contract and the label columns they pool.
CONTRACT_BINARY = {"endplate_change": ("upper_endplate_change", "lower_endplate_change"),
                   "spondylolisthesis": ("spondylolisthesis",), "herniation": ("herniation",),
                   "narrowing": ("narrowing",), "bulging": ("bulging",)}


@dataclass
class GradedDisc:
    """One labelled disc of the evaluation with the product's fused finding (None when not located)."""

    patient: str
    index: int
    labels: dict
    finding: dict | None


def product_samples(samples: list, anchors: dict[str, str]) -> list:
    """The disc samples the product would fuse: a T1 beside a T2 only when both are anchored on S1.

    As :func:`spinepath.grading.spider_inference.grade_degeneration` does: otherwise the two chains' indices
    need not count from the same vertebra, and fusing them by index would mix different discs. A T1 without a
    T2 is graded on its own.
    """
    if "t1" in anchors and "t2" in anchors and not anchors["t1"] == anchors["t2"] == "S1":
        return [s for s in samples if s.sequence != "t1"]
    return samples


def grade_studies(studies: list[SpiderStudy], detector, grader: SpiderGrader,
                  sequences: tuple[str, ...] = ("t1", "t2"), progress: bool = True
                  ) -> tuple[list[GradedDisc], dict[str, dict[int, dict]], dict[str, list[str]]]:
    """Run the product end to end on each patient's images and pair its discs with the labels by index.

    Returns:
        ``(labelled discs with findings, fused findings per patient by index, anchors per sequence)``.

    """
    graded: list[GradedDisc] = []
    fused: dict[str, dict[int, dict]] = {}
    anchors: dict[str, list[str]] = {s: [] for s in sequences}
    for st in tqdm(studies, desc="spider grading", disable=not progress):
        images, samples, anch = study_samples(st, detector, sequences)
        for seq, a in anch.items():
            anchors[seq].append(a)
        found = grader.grade(images, product_samples(samples, anch))
        fused[st.patient] = found
        graded += [GradedDisc(st.patient, int(d["index_from_bottom"]), d, found.get(int(d["index_from_bottom"])))
                   for d in st.discs]
    return graded, fused, anchors


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    return round(float(roc_auc_score(y, p)), 4) if len(set(np.asarray(y).tolist())) > 1 else None


def spider_metrics(graded: list[GradedDisc], vertebrae: list[tuple[str, int, float, float]]) -> dict:
    """The contract's metrics over labelled discs (a disc not located: Pfirrmann 1, probability 0 everywhere).

    Args:
        graded: Labelled discs with their findings.
        vertebrae: ``(patient, reference 0/1, P(pathology), its decision threshold)`` per reference vertebra.

    """
    pf_true = np.array([int(g.labels["pfirrmann"]) for g in graded if g.labels.get("pfirrmann") is not None])
    pf_pred = np.array([(g.finding["pfirrmann"]["grade"] if g.finding else 1) for g in graded
                        if g.labels.get("pfirrmann") is not None])
    out: dict = {"pfirrmann": {
        "quadratic_kappa": round(float(cohen_kappa_score(pf_true, pf_pred, weights="quadratic")), 4)
        if len(pf_true) else None,
        "within_one_accuracy": round(float(np.mean(np.abs(pf_true - pf_pred) <= 1)), 4) if len(pf_true) else None,
        "balanced_accuracy": round(float(balanced_accuracy_score(pf_true, pf_pred)), 4) if len(pf_true) else None,
        "accuracy": round(float(np.mean(pf_true == pf_pred)), 4) if len(pf_true) else None}}
    m = [g for g in graded if g.labels.get("modic") is not None]
    out["modic"] = {"auc": _auc(np.array([int(g.labels["modic"]) > 0 for g in m]),
                                np.array([g.finding["modic_any"] if g.finding else 0.0 for g in m]))}
    for name, cols in CONTRACT_BINARY.items():
        y, p = [], []
        for c in cols:
            for g in graded:
                if g.labels.get(c) is not None:
                    y.append(int(g.labels[c]))
                    p.append(g.finding[c] if g.finding else 0.0)
        out[name] = {"auc": _auc(np.array(y), np.array(p))}
    yv = np.array([v[1] for v in vertebrae])
    pv = np.array([v[2] for v in vertebrae])
    decided = np.array([v[2] >= v[3] for v in vertebrae])
    out["vertebra"] = {"auc": _auc(yv, pv),
                       "balanced_accuracy": round(float(balanced_accuracy_score(yv, decided)), 4)
                       if len(set(yv.tolist())) > 1 else None}
    return out


def anchored_t2(study: SpiderStudy, detector) -> DetectionResult | None:
    """The product's detection and names on a patient's T2; None without a T2 or a sacral anchor."""
    if "t2" not in study.sequences:
        return None
    res = detect_series(series_from_slices([study.load_image("t2")], study.spacing.get("t2") or (1.0, 1.0), 4.0),
                        detector)
    return res if res.naming is not None and res.naming.anchor == "S1" else None


def t2_evidence(study: SpiderStudy, detector, spark_grader=None, segmenter=None
                ) -> tuple[dict[int, float], dict[int, dict]]:
    """What the product reads on a patient's anchored T2 beside the SPIDER grader, from one detection.

    Returns ``(spark, slips)``: with ``spark_grader``, the spark grader's fused P(pathological) per vertebra by
    the index of the disc below it (the spark heads grade L1-L5); with ``segmenter``, the slips the
    segmentation measures (issue 14) by the index of their disc from the bottom. Either is empty when not asked
    for, and both when the image has no T2 or its names no sacral anchor (its indices would not count from S1).
    """
    res = anchored_t2(study, detector)
    if res is None:
        return {}, {}
    spark: dict[int, float] = {}
    slips: dict[int, dict] = {}
    if spark_grader is not None:
        grade(res, spark_grader)
        below = {lv: disc_index_from_bottom(f"{lv}-{VERTEBRA_LEVELS[VERTEBRA_LEVELS.index(lv) + 1]}")
                 for lv in VERTEBRA_LEVELS[:-1]}
        spark = {below[f.level]: f.probability for f in res.findings.vertebrae if f.level in below}
    if segmenter is not None:
        segment(res, segmenter)
        measured = res.segmentation.measurements["listhesis"] if res.segmentation is not None else {}
        slips = {disc_index_from_bottom(lv): e for lv, e in measured.items() if lv in DISC_LEVELS}
    return spark, slips


def spark_probabilities(study: SpiderStudy, detector, grader) -> dict[int, float]:
    """The spark grader's fused P(pathological) per vertebra of an anchored T2 (:func:`t2_evidence`)."""
    return t2_evidence(study, detector, spark_grader=grader)[0]


def measured_slips(study: SpiderStudy, detector, segmenter) -> dict[int, dict]:
    """The slips the product measures on a patient's anchored T2, by disc index (:func:`t2_evidence`)."""
    return t2_evidence(study, detector, segmenter=segmenter)[1]


def vertebra_rows(studies: list[SpiderStudy], fused: dict[str, dict[int, dict]], platt: dict,
                  spark: dict[str, dict[int, float]] | None = None, decision: dict | None = None
                  ) -> list[tuple[str, int, float, float]]:
    """``(patient, reference, P, threshold)`` for each vertebra between two labelled discs (item 4's reference).

    P is the product's per-vertebra decision: :func:`combined_probability` of the endplate / marrow evidence
    and the spark score where the spark heads graded that vertebra (``spark``, with ``decision``), else the
    endplate / marrow probability alone; 0 where no neighbouring disc was graded.
    """
    rows = []
    thr_em = float(platt.get("threshold", 0.5))
    for st in studies:
        ref = vertebra_reference(st.discs_by_index)
        f = fused.get(st.patient, {})
        sp = (spark or {}).get(st.patient, {})
        for i, y in sorted(ref.items()):
            parts = vertebra_parts(f, i)
            if parts is None:
                rows.append((st.patient, y, 0.0, thr_em))
                continue
            p = vertebra_probability(parts, platt)
            if i in sp and decision is not None:
                rows.append((st.patient, y, combined_probability(p, sp[i], decision), float(decision["threshold"])))
            else:
                rows.append((st.patient, y, p, thr_em))
    return rows


def apply_listhesis_decision(fused: dict[str, dict[int, dict]], slips: dict[str, dict[int, dict]],
                             decision: dict) -> int:
    """The product's spondylolisthesis decision on the fused findings: image and measured slip, in place.

    ``slips``: :func:`measured_slips` per patient. Each located disc with a measured slip that
    :func:`~spinepath.core.thresholds.graded_slip` gets :func:`listhesis_probability`; the others keep the
    image probability (as in the product).

    Returns:
        How many discs were decided with a measured slip.

    """
    n = 0
    for patient, found in fused.items():
        for i, e in slips.get(patient, {}).items():
            if i in found and graded_slip(e):
                found[i]["spondylolisthesis"] = listhesis_probability(found[i]["spondylolisthesis"], e["percent"],
                                                                      decision)
                n += 1
    return n


def evaluate_spider(root: str | Path, detector, grader: SpiderGrader, cases: list[str] | None = None,
                    sequences: tuple[str, ...] = ("t1", "t2"), bootstrap: int = 0, progress: bool = True,
                    spark_grader=None, segmenter=None) -> dict:
    """``spinepath evaluate spider``: the contract JSON, end to end from the images.

    Labelled discs are matched by ``index_from_bottom`` as the product counts them; ``located_fraction`` =
    located labelled discs / labelled discs. With ``bootstrap`` > 0, 95% intervals by patient resampling
    (``intervals``). ``on_located`` repeats the metrics over the located discs only. With ``spark_grader`` the
    vertebra figures are the product's combined decision where the spark heads grade (L1-L5 of an anchored T2;
    ``configs/vertebra_decision.json``), the endplate / marrow evidence alone elsewhere (``vertebra_decision``).
    With ``segmenter`` (and the T2 among ``sequences``) spondylolisthesis is the product's decision of the image
    and the slip measured on the T2 where the segmentation measured it (``configs/listhesis_decision.json``).
    An image whose folder gives no pixel spacing runs at the spacing estimated from its anatomy
    (:mod:`spinepath.evaluation.spacing`).
    """
    studies = [s for s in load_spider_midsag(root) if cases is None or s.patient in cases]
    studies = [study_with_spacing(s, detector, sequences) for s in studies if any(q in s.sequences for q in sequences)]
    graded, fused, anchors = grade_studies(studies, detector, grader, sequences, progress)
    listhesis = load_listhesis_decision() if segmenter is not None and "t2" in sequences else None
    with_spark = spark_grader is not None and "t2" in sequences
    evidence: dict[str, tuple[dict, dict]] = {}
    if listhesis or with_spark:  # one detection per T2 serves the spark scores and the slips
        evidence = {st.patient: t2_evidence(st, detector, spark_grader if with_spark else None,
                                            segmenter if listhesis else None)
                    for st in tqdm(studies, desc="T2 evidence", disable=not progress)}
    n_slips = apply_listhesis_decision(fused, {p: e[1] for p, e in evidence.items()}, listhesis) if listhesis else 0
    platt = grader.fusion.vertebra
    thr = float(platt.get("threshold", 0.5))
    spark, decision = None, None
    if with_spark:
        decision = load_vertebra_decision()
        spark = {p: e[0] for p, e in evidence.items()}
    vrows = vertebra_rows(studies, fused, platt, spark, decision)
    res = {"task": "spider_grading", "n_patients": len(studies), "n_discs": len(graded),
           "located_fraction": round(sum(g.finding is not None for g in graded) / max(len(graded), 1), 4),
           **spider_metrics(graded, vrows),
           "sequences": list(sequences),
           "anchored_fraction": {s: round(sum(a == "S1" for a in v) / max(len(v), 1), 4) for s, v in anchors.items()},
           "vertebra_threshold": round(thr, 4), "n_vertebrae": len(vrows),
           "vertebra_decision": "combined with the spark score on L1-L5, endplate/marrow elsewhere" if spark
           else "endplate/marrow",
           "spondylolisthesis_decision": f"image and measured slip on {n_slips} discs, image elsewhere" if listhesis
           else "image",
           "on_located": spider_metrics([g for g in graded if g.finding is not None],
                                        [v for v in vrows if v[2] > 0])}
    if bootstrap:
        res["intervals"] = bootstrap_spider(graded, vrows, bootstrap)
    return res


def bootstrap_spider(graded: list[GradedDisc], vrows: list, n: int, seed: int = 0) -> dict:
    """95% percentile intervals of :func:`spider_metrics`, resampling whole patients."""
    rng = np.random.default_rng(seed)
    patients = sorted({g.patient for g in graded})
    by_d = {p: [g for g in graded if g.patient == p] for p in patients}
    by_v = {p: [v for v in vrows if v[0] == p] for p in patients}
    acc: dict[str, list[float]] = {}
    for _ in range(n):
        pick = rng.choice(len(patients), len(patients), replace=True)
        m = spider_metrics([g for i in pick for g in by_d[patients[i]]], [v for i in pick for v in by_v[patients[i]]])
        for part, d in m.items():
            for k, v in d.items():
                if v is not None:
                    acc.setdefault(f"{part}.{k}", []).append(v)
    return {k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            for k, v in acc.items()}
