"""The degenerative grading stage of the product: SPIDER-trained grades per disc from the T2 and the T1.

The grader was trained on one mid-sagittal slice per sequence, so the product grades one slice per
sequence too: the T2's key slice (the mid-sagittal slice of the detected spine) with the T2's named chain,
and, when the study has a sagittal T1, the T1 slice nearest that slice in patient space, on which the
detector runs once more (the two series are separate acquisitions: their boxes are not shared). A T1 chain is
used only when it is anchored on S1 like the T2's (its disc indices then count from the same vertebra);
otherwise the T2 alone is graded and the finding says so. The fused grades attach to the disc levels of the
T2's names (``index_from_bottom`` 1 = L5-S1).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from spinepath.core.config import config_file
from spinepath.core.geometry import SeriesVolume
from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS, disc_index_from_bottom, disc_level_from_bottom
from spinepath.core.results import DegenerationFinding, DetectionResult, Findings, key_slice
from spinepath.core.thresholds import graded_slip
from spinepath.detection.grouping import group_and_name_with_evidence
from spinepath.detection.predictor import VertebraDetector
from spinepath.grading.calibration import logit, sigmoid
from spinepath.grading.spider import (
    BINARY,
    DiscSample,
    SpiderGrader,
    chain_discs,
    vertebra_parts,
    vertebra_probability,
)
from spinepath.transforms import intensity_range, normalise_image


def _slice_samples(img: np.ndarray, intensity_from: np.ndarray, spacing_mm: float, vertebrae, box_slice: int,
                   sequence: str) -> tuple[dict[str, np.ndarray], list[DiscSample]]:
    """One slice, normalised by the intensity range of ``intensity_from``, and the discs of its chain.

    ``box_slice`` is the index of the vertebrae's boxes on that slice; the image key is the sequence name.
    """
    images = {sequence: normalise_image(img, intensity_range(intensity_from, (1.0, 99.5)))}
    discs = chain_discs(vertebrae, sequence, spacing_mm, slice_index=box_slice, image_rows=img.shape[0])
    return images, [DiscSample("study", sequence, i, s, ctx) for i, s, ctx in discs]


def nearest_slice(volume: SeriesVolume, point: np.ndarray) -> int:
    """The slice of ``volume`` nearest a patient-space point along its slice normal."""
    d = (volume.positions - point) @ volume.normal
    return int(np.argmin(np.abs(d)))


def t1_samples(t2: DetectionResult, t1: SeriesVolume, detector: VertebraDetector
               ) -> tuple[dict[str, np.ndarray], list[DiscSample], str]:
    """Detect and name the vertebrae on the T1 slice nearest the T2's key slice; its discs as samples.

    Returns:
        ``(images, samples, anchor)``; no samples when the T1 chain is not anchored on S1.

    """
    k2 = key_slice(t2)
    k1 = nearest_slice(t1, t2.volume.positions[k2])
    dets = detector.predict([t1.pixels[k1]], t1.spacing)
    verts, naming = group_and_name_with_evidence(dets, t1.pixels.shape[1:])
    anchor = naming.anchor if naming is not None else "none"
    if anchor != "S1":
        return {}, [], anchor
    # the detections are of this one slice: their boxes are on slice 0
    images, samples = _slice_samples(t1.pixels[k1], t1.pixels[k1], float(t1.spacing[0]), verts, 0, "t1")
    return images, samples, anchor


def grade_degeneration(result: DetectionResult, grader: SpiderGrader, detector: VertebraDetector | None = None,
                       t1: SeriesVolume | None = None) -> tuple[list[DegenerationFinding], dict]:
    """Grade every disc of the T2's named chain (and of the T1 when given and anchored), fused by level.

    Args:
        result: The T2 detection result (named).
        grader: The SPIDER grader.
        detector: Runs on the T1 slice (needed with ``t1``).
        t1: The study's sagittal T1, or None.

    Returns:
        ``(findings top-down, model summary with the sequences used and the seconds taken)``.

    """
    t0 = time.perf_counter()
    summary: dict = {"sequences": [], "t1": "none in the study" if t1 is None else ""}
    if not result.vertebrae or result.naming is None:
        return [], summary
    k = key_slice(result)
    vol = result.volume
    images, samples = _slice_samples(vol.pixels[k], vol.pixels, float(vol.spacing[0]), result.vertebrae, k, "t2")
    summary["sequences"].append("t2")
    summary["t2_slice"] = k
    if t1 is not None and detector is not None:
        if result.naming.anchor != "S1":  # T1 indices could not be matched: not worth a detector pass
            summary["t1"] = "not used: the T2 names have no sacral anchor"
        else:
            im1, s1, anchor = t1_samples(result, t1, detector)
            if not s1:
                summary["t1"] = f"not used: its vertebrae were not anchored on S1 (anchor {anchor})"
            else:
                images.update(im1)
                samples += s1
                summary["sequences"].append("t1")
                summary["t1"] = "used"
    graded = grader.grade(images, samples)
    out = []
    for idx in sorted(graded, reverse=True):
        g = graded[idx]
        if not 1 <= idx <= DISC_LEVELS.index("L5-S1") + 1:
            continue
        out.append(DegenerationFinding(
            level=disc_level_from_bottom(idx), index_from_bottom=idx, pfirrmann=int(g["pfirrmann"]["grade"]),
            pfirrmann_probabilities=[float(p) for p in g["pfirrmann"]["probabilities"]],
            modic_type=int(g["modic"]["type"]), modic_probabilities=[float(p) for p in g["modic"]["probabilities"]],
            modic_any=float(g["modic_any"]), binary={k: float(g[k]) for k in BINARY},
            thresholds=dict(grader.fusion.thresholds), sequences=list(g["sequences"])))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["pfirrmann_rule"] = grader.fusion.pfirrmann_rule
    summary.update({k: v for k, v in grader.meta.items() if k in ("version", "trained")})
    return out, summary


def endplate_marrow(findings: Findings, grader: SpiderGrader) -> dict[str, dict]:
    """Per vertebra level above a graded disc: the SPIDER endplate / marrow probability and its parts.

    The SPIDER reference of issue 13: a vertebra's own endplates (the lower-endplate change of the disc above,
    the upper-endplate change of the disc below) and Modic at either disc; Platt-calibrated noisy-or with its
    out-of-fold threshold.
    """
    fused = {g.index_from_bottom: {"lower_endplate_change": g.binary["lower_endplate_change"],
                                   "upper_endplate_change": g.binary["upper_endplate_change"],
                                   "modic_any": g.modic_any} for g in findings.degeneration}
    platt = grader.fusion.vertebra
    thr = float(platt.get("threshold", 0.5))
    out = {}
    for lv in VERTEBRA_LEVELS[:-1]:
        below = f"{lv}-{VERTEBRA_LEVELS[VERTEBRA_LEVELS.index(lv) + 1]}"
        parts = vertebra_parts(fused, disc_index_from_bottom(below))
        if parts is None:
            continue
        p = vertebra_probability(parts, platt)
        out[lv] = {"probability": round(p, 4), "threshold": round(thr, 4), "positive": p >= thr,
                   "parts": {k: (round(v, 4) if v is not None else None) for k, v in parts.items()}}
    return out


@lru_cache(maxsize=2)
def load_vertebra_decision(path: str | None = None) -> dict:
    """The per-vertebra decision of ``configs/vertebra_decision.json`` (``scripts/fit_vertebra_decision.py``)."""
    return json.loads(Path(path or config_file("vertebra_decision.json")).read_text())


def combined_probability(endplate_marrow_p: float, spark_p: float, decision: dict | None = None) -> float:
    """P(pathological vertebra) from its endplate / marrow evidence and its spark score (logistic on log-odds)."""
    d = decision or load_vertebra_decision()
    z = (d["intercept"] + d["coef_endplate_marrow"] * float(logit(endplate_marrow_p))
         + d["coef_spark_degenerative"] * float(logit(spark_p)))
    return float(sigmoid(z))


def attach_vertebra_evidence(findings: Findings, grader: SpiderGrader) -> None:
    """Decide each vertebra's pathology from its named evidence (issue 13, item 4), keeping every part.

    ``evidence["spark_degenerative"]``: the spark-trained fused probability (the decision when no degenerative
    grades exist). ``evidence["endplate_marrow"]``: :func:`endplate_marrow`. Where both exist the vertebra's
    ``probability`` / ``threshold`` / ``label`` become :func:`combined_probability` and the out-of-fold threshold
    of ``configs/vertebra_decision.json`` (``evidence["decision"]`` says which rule decided).
    """
    em = endplate_marrow(findings, grader)
    decision = load_vertebra_decision()
    for f in findings.vertebrae:
        f.evidence["spark_degenerative"] = {"probability": round(f.probability, 4), "threshold": round(f.threshold, 4),
                                            "positive": f.probability >= f.threshold}
        if f.level not in em:
            f.evidence["decision"] = {"rule": "spark_degenerative"}
            continue
        f.evidence["endplate_marrow"] = em[f.level]
        f.probability = combined_probability(em[f.level]["probability"], f.probability, decision)
        f.threshold = float(decision["threshold"])
        f.label = "pathological" if f.probability >= f.threshold else "healthy"
        f.evidence["decision"] = {"rule": "combined", "probability": round(f.probability, 4),
                                  "threshold": round(f.threshold, 4),
                                  "weights": {"endplate_marrow": round(decision["coef_endplate_marrow"], 4),
                                              "spark_degenerative": round(decision["coef_spark_degenerative"], 4)}}


@lru_cache(maxsize=2)
def load_listhesis_decision(path: str | None = None) -> dict | None:
    """The spondylolisthesis decision of ``configs/listhesis_decision.json``, or None where there is none.

    Fitted by ``scripts/fit_listhesis_decision.py`` out of fold (image probability and measured slip).
    """
    p = Path(path) if path else config_file("listhesis_decision.json")
    return json.loads(p.read_text()) if p.is_file() else None


#: The slip feature of the spondylolisthesis decision: log(min(|slip|, SLIP_CAP) + SLIP_FLOOR), slip as a fraction
#: of the lower body's superior endplate. Measured slips beyond half the endplate (Meyerding III and more) were
#: mostly misread bodies on spider_midsag (as many among the unlabelled discs as among the labelled ones): capped,
#: they count as a large slip without outweighing everything; the floor is Meyerding's 1% (no slip).
SLIP_CAP, SLIP_FLOOR = 0.5, 0.01


def slip_feature(slip_percent: float) -> float:
    """The decision's feature of a measured slip (% of the endplate, either direction); see :data:`SLIP_CAP`."""
    return float(np.log(min(abs(float(slip_percent)) / 100.0, SLIP_CAP) + SLIP_FLOOR))


def listhesis_probability(image_p: float, slip_percent: float, decision: dict) -> float:
    """P(spondylolisthesis at a disc) from the grader's image probability and the measured slip there.

    A logistic regression on the image probability's log-odds and :func:`slip_feature` of the slip (% of the
    lower body's superior endplate; forward or backward: SPIDER's label counts both).
    """
    z = (decision["intercept"] + decision["coef_image"] * float(logit(image_p))
         + decision["coef_slip"] * slip_feature(slip_percent))
    return float(sigmoid(z))


def attach_listhesis_evidence(findings: Findings | None, listhesis: dict[str, dict],
                              decision: dict | None = None) -> None:
    """Decide spondylolisthesis per disc from the image and the slip measured at that disc (issue 14, item 4).

    ``listhesis``: the measurements' slips by disc level (``measurements["listhesis"]``). Each disc finding keeps
    its parts in ``evidence["spondylolisthesis"]``: ``image`` (the grader's fused probability and threshold),
    ``measured_slip`` (offset in mm and %, what it was measured against; None where nothing was measured) and
    ``rule``: ``combined`` (:func:`listhesis_probability` with its out-of-fold threshold; the finding's
    probability, threshold and label are then the combination's, and ``oof_ppv`` the out-of-fold share of its
    calls that were confirmed, for the review) or ``image`` (no graded slip:
    :func:`~spinepath.core.thresholds.graded_slip`; or no decision fitted).
    """
    decision = decision if decision is not None else load_listhesis_decision()
    for g in findings.degeneration if findings is not None else []:
        key = "spondylolisthesis"
        if g.evidence.get(key, {}).get("rule") == "combined":
            continue  # decided already (a stage run twice)
        slip = listhesis.get(g.level)
        p_img, thr_img = g.binary[key], g.thresholds.get(key, 0.5)
        ev = {"image": {"probability": round(p_img, 4), "threshold": round(thr_img, 4)},
              "measured_slip": None if slip is None else {"offset_mm": slip["offset_mm"], "percent": slip["percent"],
                                                          "against": slip.get("against", "body")},
              "rule": "image"}
        if graded_slip(slip) and decision is not None:
            g.binary[key] = listhesis_probability(p_img, slip["percent"], decision)
            g.thresholds[key] = float(decision["threshold"])
            ev.update(rule="combined", weights={"image": round(decision["coef_image"], 4),
                                                 "slip": round(decision["coef_slip"], 4)},
                      oof_ppv=decision.get("out_of_fold", {}).get("ppv_combined"))
        g.evidence[key] = ev
