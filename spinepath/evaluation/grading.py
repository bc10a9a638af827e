"""Evaluation of vertebra pathology and disc grades against spark_midsag (CLI contract)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spinepath import stages
from spinepath.core.geometry import BODY_HEIGHT_PER_GAP, BODY_WIDTH_PER_GAP
from spinepath.data.datasets import load_spark
from spinepath.evaluation.detection import spark_detection
from spinepath.evaluation.matching import greedy_match
from spinepath.grading.calibration import disc_grade
from spinepath.grading.crops import spark_structures
from spinepath.grading.fusion import VertebraScores
from spinepath.grading.inference import fuse, view_probs
from spinepath.transforms import normalise_image


def grading_metrics(
    v_true: np.ndarray, v_prob: np.ndarray, threshold: float, d_true: np.ndarray, d_pred: np.ndarray
) -> dict:
    """Grading metrics of the CLI contract.

    Args:
        v_true: Vertebra labels, 1 = ``v2`` (positive), 0 = ``v1``.
        v_prob: P(``v2``) per vertebra.
        threshold: Decision threshold (positive when ``prob >= threshold``).
        d_true: True disc grades 1..5 (``v1``..``v5``).
        d_pred: Predicted disc grades 1..5.

    Returns:
        ``{"vertebra": {auc, balanced_accuracy, accuracy, precision, recall, f1, threshold},
        "disc": {accuracy, macro_f1, within_one_accuracy, quadratic_kappa}}``, see :func:`vertebra_metrics`
        and :func:`disc_metrics`.

    """
    return {"vertebra": vertebra_metrics(v_true, v_prob, threshold), "disc": disc_metrics(d_true, d_pred)}


def vertebra_metrics(v_true: np.ndarray, v_prob: np.ndarray, threshold: float) -> dict:
    """Vertebra metrics of the CLI contract (positive = ``v2``; AUC and balanced accuracy need both classes).

    Args:
        v_true: Labels, 1 = ``v2``, 0 = ``v1``.
        v_prob: P(``v2``).
        threshold: Positive when ``prob >= threshold``.

    Returns:
        ``{auc, balanced_accuracy, accuracy, precision, recall, f1, threshold}``.

    """
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    vt = np.asarray(v_true, dtype=int)
    vp = np.asarray(v_prob, dtype=float)
    vy = (vp >= threshold).astype(int)
    both = len(set(vt.tolist())) > 1
    return {
        "auc": float(roc_auc_score(vt, vp)) if both else None,
        "balanced_accuracy": float(balanced_accuracy_score(vt, vy)) if both else None,
        "accuracy": float(accuracy_score(vt, vy)) if len(vt) else None,
        "precision": float(precision_score(vt, vy, zero_division=0)),
        "recall": float(recall_score(vt, vy, zero_division=0)),
        "f1": float(f1_score(vt, vy, zero_division=0)),
        "threshold": float(threshold),
    }


def disc_metrics(d_true: np.ndarray, d_pred: np.ndarray) -> dict:
    """Disc metrics of the CLI contract.

    ``within_one_accuracy`` counts ``|pred - true| <= 1`` on the ordinal grades v1-v4; a true v5 needs an exact
    v5 and a v5 predicted for a v1-v4 disc is a miss. The kappa treats v1-v5 as 1-5 with quadratic weights.

    Args:
        d_true: True grades 1..5 (``v1``..``v5``).
        d_pred: Predicted grades 1..5.

    Returns:
        ``{accuracy, macro_f1, within_one_accuracy, quadratic_kappa}`` (None where there are no discs).

    """
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

    dt = np.asarray(d_true, dtype=int)
    dp = np.asarray(d_pred, dtype=int)
    if not len(dt):
        return {"accuracy": None, "macro_f1": None, "within_one_accuracy": None, "quadratic_kappa": None}
    ordinal = (dt <= 4) & (dp <= 4) & (np.abs(dp - dt) <= 1)
    within = np.where(dt == 5, dp == 5, ordinal)
    grades = [1, 2, 3, 4, 5]
    return {
        "accuracy": float(accuracy_score(dt, dp)),
        "macro_f1": float(f1_score(dt, dp, labels=grades, average="macro", zero_division=0)),
        "within_one_accuracy": float(within.mean()),
        "quadratic_kappa": float(cohen_kappa_score(dt, dp, labels=grades, weights="quadratic")),
    }


def bootstrap_intervals(
    v_true, v_prob, threshold, d_true, d_pred, groups_v, groups_d, n: int = 1000, seed: int = 0
) -> dict:
    """95% percentile intervals of :func:`grading_metrics`, resampling whole images (studies)."""
    rng = np.random.default_rng(seed)
    ids = sorted(set(groups_v) | set(groups_d))
    gv, gd = np.asarray(groups_v), np.asarray(groups_d)
    iv = {g: np.flatnonzero(gv == g) for g in ids}
    idd = {g: np.flatnonzero(gd == g) for g in ids}
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        pick = rng.choice(len(ids), len(ids), replace=True)
        a = np.concatenate([iv[ids[i]] for i in pick]).astype(int)
        b = np.concatenate([idd[ids[i]] for i in pick]).astype(int)
        m = grading_metrics(np.asarray(v_true)[a], np.asarray(v_prob)[a], threshold,
                            np.asarray(d_true)[b], np.asarray(d_pred)[b])
        for part in ("vertebra", "disc"):
            for k, v in m[part].items():
                if v is not None and k != "threshold":
                    samples.setdefault(f"{part}.{k}", []).append(v)
    return {k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            for k, v in samples.items()}


def grade_spark_case(case, grader, detector=None, views: int = 5) -> dict:
    """Grade one spark_midsag study and pair predictions with the reference grades.

    End to end (``detector`` given): detection + naming, then the classifiers on the detected structures
    (discs midway between neighbouring detected vertebrae). A reference vertebra is paired with the
    detected body whose box contains its centre (nearest first); a reference disc with the nearest
    predicted disc within half a level gap. Unpaired references get no prediction (``None``).
    Without a detector the crops are taken at the reference centres.

    Returns:
        ``{"vertebrae": [(true 0/1, prob or None, features or None)],
        "discs": [(true 0-4, probs or None, features or None)]}``.

    """
    refs = spark_structures(case)
    rv = sorted([s for s in refs if s.kind == "vertebra"], key=lambda s: s.centre[0])
    rd = [s for s in refs if s.kind == "disc"]
    if detector is None:
        images = {case.case: normalise_image(case.load_image())}
        gap_mm = case.level_gap_px() * rv[0].spacing_mm if rv else float("nan")
        box_mm = (BODY_HEIGHT_PER_GAP * gap_mm, BODY_WIDTH_PER_GAP * gap_mm)  # as the reference boxes
        vp = view_probs(grader, "vertebra", images, rv, views)
        dp = view_probs(grader, "disc", images, rd, views)
        scores = [VertebraScores(s.level, p, 0, box_mm, float("nan"), 0.0) for s, p in zip(rv, vp)]
        vf, df, X = fuse(grader, scores, {s.level: np.stack(p) for s, p in zip(rd, dp)})
        dby = {d.level: d for d in df}
        return {
            "vertebrae": [(s.grade, f.probability, x) for s, f, x in zip(rv, vf, X)],
            "discs": [(s.grade, *((dby[s.level].probabilities, dby[s.level].features) if s.level in dby
                                  else (None, None))) for s in rd],
        }
    res = spark_detection(case, detector)
    f = stages.grade(res, grader, spacing_known=False, views=views).findings
    tracks = [t for t in res.vertebrae if t.box_on(0) is not None]
    found = {t.level: t.box_on(0) for t in tracks}
    vf = [v for v in f.vertebrae if v.level in found]
    pb = np.array([found[v.level] for v in vf], dtype=float).reshape(-1, 4)
    pc = np.stack([(pb[:, 0] + pb[:, 2]) / 2, (pb[:, 1] + pb[:, 3]) / 2], 1) if len(pb) else np.zeros((0, 2))
    rc = np.array([s.centre for s in rv], dtype=float).reshape(-1, 2)
    dist = np.linalg.norm(rc[:, None] - pc[None], axis=2) if len(pc) and len(rc) else np.zeros((len(rc), 0))
    inside = np.array([[b[0] <= c[0] <= b[2] and b[1] <= c[1] <= b[3] for b in pb] for c in rc]).reshape(dist.shape)
    dist = np.where(inside, dist, np.inf)
    mv = greedy_match(dist, np.full(len(rc), np.inf))
    gap = case.level_gap_px()
    dcent = {}
    for d in f.discs:
        a, b = d.level.split("-")
        if a in found and b in found:
            ba, bb = found[a], found[b]
            dcent[d.level] = ((ba[0] + ba[2] + bb[0] + bb[2]) / 4, (ba[1] + ba[3] + bb[1] + bb[3]) / 4)
    dl = [d for d in f.discs if d.level in dcent]
    dc = np.array([dcent[d.level] for d in dl], dtype=float).reshape(-1, 2)
    rdc = np.array([s.centre for s in rd], dtype=float).reshape(-1, 2)
    ddist = np.linalg.norm(rdc[:, None] - dc[None], axis=2) if len(dc) and len(rdc) else np.zeros((len(rdc), 0))
    md = greedy_match(ddist, np.full(len(rdc), 0.5 * gap if np.isfinite(gap) else 20.0))
    feats = [np.array([v.features[k] for k in v.features]) for v in vf]
    return {
        "vertebrae": [(s.grade, vf[mv[i]].probability if i in mv else None, feats[mv[i]] if i in mv else None)
                      for i, s in enumerate(rv)],
        "discs": [(s.grade, *((dl[md[i]].probabilities, dl[md[i]].features) if i in md else (None, None)))
                  for i, s in enumerate(rd)],
    }


def collect_grading(
    root: str | Path,
    grader,
    detector=None,
    cases: list[str] | None = None,
    views: int = 5,
    progress: bool = True,
) -> dict:
    """Grade every study of a spark_midsag-format folder and pair predictions with references.

    A reference structure without a paired prediction counts as predicted healthy (P = 0) / normal (v1).

    Returns:
        ``{"n_images", "v_true", "v_prob", "d_true" (1-5), "d_prob" (N, 5), "d_pred" (1-5), "v_group",
        "d_group", "v_features"}``.

    """
    all_cases = load_spark(root)
    if cases is not None:
        all_cases = [c for c in all_cases if c.case in cases]
    vt, vp, vg, vx, dt, dpr, dg = [], [], [], [], [], [], []
    for c in tqdm(all_cases, desc="images", disable=not progress):
        r = grade_spark_case(c, grader, detector, views=views)
        for t, p, x in r["vertebrae"]:
            if t < 0:
                continue
            vt.append(t)
            vp.append(0.0 if p is None else p)
            vx.append(x)
            vg.append(c.case)
        for t, p, _ in r["discs"]:
            if t < 0:
                continue
            dt.append(t + 1)
            dpr.append(np.eye(5)[0] if p is None else np.asarray(p))
            dg.append(c.case)
    d_prob = np.asarray(dpr, dtype=np.float64).reshape(-1, 5)
    return {
        "n_images": len(all_cases),
        "v_true": np.asarray(vt, dtype=int),
        "v_prob": np.asarray(vp, dtype=float),
        "v_group": vg,
        "v_features": vx,
        "d_true": np.asarray(dt, dtype=int),
        "d_prob": d_prob,
        "d_pred": disc_grade(d_prob, grader.disc_rule) + 1 if len(d_prob) else np.zeros(0, int),
        "d_group": dg,
    }


def evaluate_grading(
    root: str | Path,
    grader,
    detector=None,
    cases: list[str] | None = None,
    views: int = 5,
    progress: bool = True,
) -> dict:
    """The ``spinepath evaluate grading`` JSON (see :func:`grading_metrics`).

    End to end when a detector is given, else at the reference centres.
    """
    r = collect_grading(root, grader, detector, cases, views, progress)
    thr = grader.vertebra_threshold
    m = grading_metrics(r["v_true"], r["v_prob"], thr, r["d_true"], r["d_pred"])
    return {"task": "grading", "n_images": r["n_images"], **m}

