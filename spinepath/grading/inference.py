"""Classification and fusion over detected vertebrae: the findings per vertebra and per disc.

Per slice where vertebrae are detected, each vertebra and each disc (midway between two neighbouring named
vertebrae on that slice) is cropped and classified; the per-slice vertebra scores are fused by the LightGBM
model into one probability per vertebra; disc grade probabilities are averaged over slices.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np

from spinepath.core.geometry import spacing_from_gap
from spinepath.core.levels import DISC_GRADES, VERTEBRA_LEVELS
from spinepath.core.results import DetectionResult, DiscFinding, Findings, SliceScores, VertebraFinding, key_slice
from spinepath.grading.calibration import Calibration, disc_grade
from spinepath.grading.crops import Structure, chain_structures, random_jitter
from spinepath.grading.fusion import FEATURES, VertebraScores, disc_features, study_features
from spinepath.grading.grader import Grader
from spinepath.transforms import intensity_range, normalise_image

#: Geometric jitter strength of the pseudo-slice views of 2D inputs (see :func:`grade_slices`).
VIEW_JITTER = 0.5
#: Half-width (mm) of the slab around each vertebra's central slice that is classified. The classifiers
#: learned from mid-sagittal slices only; lateral slices through pedicles and partial-volume body edges are
#: outside their training distribution and inflated the max-pooled scores.
CENTRAL_SLAB_MM = 6.0


@dataclass
class SliceChain:
    """The named vertebrae seen on one slice: centres (row, col) top-down."""

    key: int
    levels: list[str]
    centres: np.ndarray


def grade_slices(
    grader: Grader,
    images: dict[int, np.ndarray],
    chains: list[SliceChain],
    spacing_mm: float | None,
    views: int = 1,
    seed: int = 0,
) -> tuple[dict[tuple[int, str], list[float]], dict[tuple[int, str], np.ndarray]]:
    """Classify every vertebra and disc of every slice chain.

    Args:
        grader: The classifiers.
        images: Normalised slices by key.
        chains: Named vertebrae per slice.
        spacing_mm: Pixel size; None when unknown (2D images): estimated per slice from the vertebra gap.
        views: Crops per structure; views after the first are geometric jitters (pseudo-slices for 2D input).
        seed: Seed of the jitters.

    Returns:
        ``(vertebra P(pathological) list per (key, level), disc probabilities (views, 5) per (key, level))``.

    """
    structs: list[Structure] = []
    for ch in chains:
        sp = spacing_mm
        if sp is None:
            gaps = np.linalg.norm(np.diff(ch.centres, axis=0), axis=1) if len(ch.centres) > 1 else np.array([])
            sp = spacing_from_gap(float(np.median(gaps)) if len(gaps) else float("nan"))
        structs += chain_structures(ch.key, ch.centres, ch.levels, sp)
    vprob: dict[tuple[int, str], list[float]] = {}
    dprob: dict[tuple[int, str], list[np.ndarray]] = {}
    for task, acc in (("vertebra", vprob), ("disc", dprob)):
        ss = [s for s in structs if s.kind == task]
        for s, ps in zip(ss, view_probs(grader, task, images, ss, views, seed)):
            acc.setdefault((s.image_key, s.level), []).extend(ps)
    return vprob, {k: np.stack(v) for k, v in dprob.items()}


def view_probs(
    grader: Grader, task: str, images: dict, structs: list[Structure], views: int = 1, seed: int = 0
) -> list[list]:
    """Per structure, the probabilities of ``views`` crops: the plain crop, then geometric jitters."""
    rng = random.Random(seed)
    jitters = [None] + [random_jitter(rng, VIEW_JITTER) for _ in range(views - 1)]
    out: list[list] = [[] for _ in structs]
    if not structs:
        return out
    for jit in jitters:
        if jit is not None:
            jit.flip_vertical = False  # the flip is already part of the test-time augmentation
        for o, p in zip(out, grader.predict(task, images, structs, jit)):
            o.append(p if task == "disc" else float(p))
    return out


def fuse(
    grader: Grader,
    vertebrae: list[VertebraScores],
    disc_probs: dict[str, np.ndarray],
) -> tuple[list[VertebraFinding], list[DiscFinding], np.ndarray]:
    """Fuse per-slice scores into findings.

    Args:
        grader: Holds the fusion models (without a vertebra fusion model, the central-slice score with
            threshold 0.5 is used; without a disc fusion model, the mean probabilities and
            ``grader.disc_decision``) and the calibration the reported probabilities go through.
        vertebrae: Per-vertebra scores, top-down.
        disc_probs: Per disc level, ``(n, 5)`` probabilities over its slices / views.

    Returns:
        ``(vertebra findings, disc findings top-down, vertebra feature matrix)``.

    """
    dmean = {lv: p.mean(0) for lv, p in disc_probs.items()}
    X = study_features(vertebrae, {lv: float(1 - p[0]) for lv, p in dmean.items()})
    raw = grader.fusion.predict(X) if grader.fusion is not None else X[:, 0]
    cal = grader.calibration or Calibration()
    prob, thr = cal.vertebra_probability(raw), grader.vertebra_threshold  # strictly increasing: same decisions
    vf = [
        VertebraFinding(v.level, float(p), "pathological" if p >= thr else "healthy", float(thr), {},
                        dict(zip(FEATURES, map(float, x))))
        for v, p, x in zip(vertebrae, prob, X)
    ]
    levels, Xd = disc_features(disc_probs, {v.level: float(x[0]) for v, x in zip(vertebrae, X)})
    if grader.disc_fusion is not None and len(levels):
        dp = grader.disc_fusion.predict(Xd)
    else:
        dp = np.array([dmean[lv] for lv in levels]).reshape(-1, 5)
    dp = cal.disc_probabilities(dp)  # the disc rule was chosen on calibrated out-of-fold probabilities
    grades = disc_grade(dp, grader.disc_rule) if len(levels) else []
    df = [DiscFinding(lv, DISC_GRADES[int(g)], p, [], x) for lv, g, p, x in zip(levels, grades, dp, Xd)]
    return vf, df, X


def series_chains(result: DetectionResult, slab_mm: float | None = None) -> list[SliceChain]:
    """Per slice, the named vertebrae of a :class:`spinepath.core.results.DetectionResult` (top-down).

    Args:
        result: The detection result.
        slab_mm: Keep a vertebra on a slice only within this distance of its central slice (score-weighted
            mean of its slices); None keeps every slice where it is detected.

    """
    spacing = float(result.volume.slice_spacing) if result.volume.pixels.shape[0] > 1 else 0.0
    centre = {id(t): t.central_slice for t in result.vertebrae}
    chains = []
    for k in range(result.volume.pixels.shape[0]):
        on = [(t.level, t.box_on(k)) for t in result.vertebrae
              if t.box_on(k) is not None and t.level in VERTEBRA_LEVELS
              and (slab_mm is None or abs(k - centre[id(t)]) * spacing <= slab_mm + 1e-6)]
        if not on:
            continue
        on.sort(key=lambda lb: VERTEBRA_LEVELS.index(lb[0]))
        boxes = np.array([b for _, b in on], dtype=np.float64)
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        chains.append(SliceChain(k, [lv for lv, _ in on], centres))
    return chains


def classify_detections(
    result: DetectionResult, grader: Grader, spacing_known: bool = True, views: int = 1
) -> SliceScores:
    """Classification stage: crop and classify every detected vertebra and disc on every slice.

    Args:
        result: A :class:`spinepath.core.results.DetectionResult`.
        grader: The grading models.
        spacing_known: False for 2D images whose pixel spacing is a guess: the crop scale is then taken
            from the detected vertebra gap, as in training on spark_midsag.
        views: Pseudo-slice views per structure (see :func:`grade_slices`); 1 for real series.

    """
    t0 = time.perf_counter()
    vol = result.volume
    chains = series_chains(result, CENTRAL_SLAB_MM)
    lo_hi = intensity_range(vol.pixels, (1.0, 99.5))
    images = {ch.key: normalise_image(vol.pixels[ch.key], lo_hi) for ch in chains}
    vprob, dprob = grade_slices(grader, images, chains, float(vol.spacing[0]) if spacing_known else None, views)
    return SliceScores(vprob, dprob, time.perf_counter() - t0)


def fuse_detections(result: DetectionResult, scores: SliceScores, grader: Grader) -> Findings:
    """Fusion stage: one decision per vertebra (LightGBM) and one grade per disc, from the slice scores."""
    t1 = time.perf_counter()
    vol = result.volume
    vprob, dprob = scores.vertebra, scores.disc
    mid_k = key_slice(result)
    sp_row, sp_col = float(vol.spacing[0]), float(vol.spacing[1])
    inputs, per_slice = [], []
    for t in result.vertebrae:
        ks = [k for k in t.slices if (k, t.level) in vprob]
        if not ks:
            continue
        centre_k = t.central_slice
        ps = [p for k in ks for p in vprob[(k, t.level)]]
        kmid = min(ks, key=lambda k: abs(k - centre_k))
        mid = sum(len(vprob[(k, t.level)]) for k in ks[: ks.index(kmid)])
        b = t.box_on(kmid)
        box_mm = (float(b[2] - b[0]) * sp_row, float(b[3] - b[1]) * sp_col)
        inputs.append(VertebraScores(t.level, ps, mid, box_mm, float(np.mean(t.scores)),
                                     abs(centre_k - mid_k) * float(vol.slice_spacing)))
        per_slice.append({k: float(np.mean(vprob[(k, t.level)])) for k in ks})
    disc_by_level: dict[str, list[np.ndarray]] = {}
    disc_slices: dict[str, list[int]] = {}
    for (k, lv), p in dprob.items():
        disc_by_level.setdefault(lv, []).append(p)
        disc_slices.setdefault(lv, []).append(int(k))
    vf, df, _ = fuse(grader, inputs, {lv: np.concatenate(p) for lv, p in disc_by_level.items()})
    for f, ps in zip(vf, per_slice):
        f.per_slice = ps
    for d in df:
        d.slices = sorted(disc_slices[d.level])
    model = {"fusion": grader.fusion is not None, "disc_fusion": grader.disc_fusion is not None,
             "disc_decision": grader.disc_rule,
             **{k: v for k, v in grader.meta.items() if k in ("version", "trained")}}
    timings = {"classification": scores.seconds, "fusion": time.perf_counter() - t1}
    return Findings(vf, df, timings, model)


def grade_detections(result: DetectionResult, grader: Grader, spacing_known: bool = True, views: int = 1) -> Findings:
    """Classification + fusion for the vertebrae of a detection result (see the two stages)."""
    return fuse_detections(result, classify_detections(result, grader, spacing_known, views), grader)
