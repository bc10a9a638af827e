"""Evaluation of detection and level naming against the shared-data references (CLI contract)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from spinepath.detection import box_iou


def match_slice(pred: np.ndarray, ref: np.ndarray, ignore: np.ndarray) -> dict:
    """One-to-one (Hungarian) IoU matching of predicted to reference boxes on one slice.

    Args:
        pred: ``(P, 4)`` predicted boxes.
        ref: ``(R, 4)`` reference boxes.
        ignore: ``(R,)`` True for references that are not scored (a prediction matched to one is neither
            right nor wrong).

    Returns:
        ``{"ious": IoU per scored reference (0 if unmatched), "tp", "fp", "pairs": [(pred, ref, iou)]}``.

    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1, 4)
    ignore = np.asarray(ignore, dtype=bool).reshape(-1)
    ious = np.zeros(len(ref))
    pairs: list[tuple[int, int, float]] = []
    matched_pred = np.zeros(len(pred), dtype=bool)
    matched_ignored = np.zeros(len(pred), dtype=bool)
    if len(pred) and len(ref):
        iou = box_iou(pred, ref)
        pi, ri = linear_sum_assignment(-iou)
        for p, r in zip(pi, ri):
            if iou[p, r] <= 0:
                continue
            pairs.append((int(p), int(r), float(iou[p, r])))
            ious[r] = iou[p, r]
            if ignore[r]:
                matched_ignored[p] = True
            else:
                matched_pred[p] = iou[p, r] >= 0.5
    scored = ~ignore
    tp = int(sum(1 for p, r, v in pairs if not ignore[r] and v >= 0.5))
    fp = int(len(pred) - tp - matched_ignored.sum())
    return {"ious": [float(v) for v in ious[scored]], "tp": tp, "fp": fp, "pairs": pairs}


def _series_from_slices(slices: list[np.ndarray], spacing: tuple[float, float], slice_mm: float):
    """A minimal SeriesVolume (sagittal, IOP 0\\1\\0\\0\\0\\-1) around stacked slices, for evaluation."""
    from spinepath.dicom_io import SeriesVolume

    n = len(slices)
    return SeriesVolume(
        pixels=np.stack(slices).astype(np.float32),
        spacing=spacing,
        orientation=np.array([0.0, 1, 0, 0, 0, -1]),
        positions=np.array([[k * slice_mm, 0.0, 0.0] for k in range(n)]),
        sop_instance_uids=[f"eval.{k}" for k in range(n)],
        series_uid="eval",
        study_uid="eval",
        frame_of_reference_uid="eval",
        description="evaluation",
    )


def evaluate_volumes(root: str | Path, model, cases: list[str] | None = None, progress: bool = True) -> dict:
    """Detection metrics on a 3D mask folder (chu_t2 / spineweb_vb format); see the CLI contract.

    Each case is evaluated as a clinical 4 mm series (every 4th lateral slice from (n % 4) // 2) through the
    full pipeline (detection, 3D grouping, naming). Reference boxes are bodies whose cross-section on the slice
    is >= 50% of their largest; smaller ones are ignored.
    """
    from tqdm.auto import tqdm

    from spinepath.data import REFERENCE_AREA_FRACTION, clinical_slice_indices, iter_volume_slices, load_volume_index
    from spinepath.pipeline import detect_series

    all_cases = load_volume_index(root)
    if cases is not None:
        all_cases = [c for c in all_cases if c.case in cases]
    ious: list[float] = []
    tp = fp = 0
    level_ok = level_n = 0
    n_vert = 0
    for case in tqdm(all_cases, desc="cases", disable=not progress):
        if case.structure != "vertebral_body":
            raise ValueError(f"{case.dataset}/{case.case}: structure {case.structure!r} has no vertebral bodies")
        slices = list(iter_volume_slices(case, clinical_slice_indices(case.n_slices)))
        vol = _series_from_slices([s.image for s in slices], slices[0].spacing, 4.0)
        res = detect_series(vol, model)
        names_known = case.levels_top_down is not None
        # per reference vertebra (by level/label): which predicted names were matched to it
        matched_names: dict[int, list[str]] = {}
        seen_refs: set[int] = set()
        for k, s in enumerate(slices):
            pred = [(t.box_on(k), t.level) for t in res.vertebrae if t.box_on(k) is not None]
            pboxes = np.array([p[0] for p in pred]).reshape(-1, 4)
            ignore = s.area_fraction < REFERENCE_AREA_FRACTION
            m = match_slice(pboxes, s.boxes, ignore)
            ious += m["ious"]
            tp += m["tp"]
            fp += m["fp"]
            ref_ids = [case.level_names().index(lv) if lv else i for i, lv in enumerate(s.levels)]
            for r in np.nonzero(~ignore)[0]:
                seen_refs.add(ref_ids[r])
            for p, r, v in m["pairs"]:
                if not ignore[r] and v >= 0.5:
                    matched_names.setdefault(ref_ids[r], []).append(pred[p][1])
        n_vert += len(seen_refs)
        if names_known:
            for rid in seen_refs:
                level_n += 1
                names = matched_names.get(rid, [])
                if names and max(set(names), key=names.count) == case.level_names()[rid]:
                    level_ok += 1
    return {
        "task": "detection",
        "n_cases": len(all_cases),
        "n_vertebrae": n_vert,
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "recall_at_iou50": tp / max(len(ious), 1),
        "precision_at_iou50": tp / max(tp + fp, 1),
        "level_accuracy": (level_ok / level_n) if level_n else None,
    }


def evaluate_spark(root: str | Path, model, cases: list[str] | None = None, progress: bool = True) -> dict:
    """Detection metrics on spark_midsag (labelled centres); see the CLI contract.

    Each image runs through the pipeline as a single-slice series whose pixel spacing is estimated from the
    field of view (no labels used). A reference vertebra centre is found when exactly one predicted box
    contains it; ``level_accuracy`` is the fraction of reference centres whose containing box has the right
    name; ``false_positives_per_image`` counts predicted boxes containing no reference vertebra centre whose
    centre lies inside the labelled span (between the highest and lowest labelled disc), since vertebrae
    outside it (T11 and above, S1) are unlabelled in this dataset.
    """
    from tqdm.auto import tqdm

    from spinepath.data import load_spark, spark_fov_spacing
    from spinepath.pipeline import detect_series

    all_cases = load_spark(root)
    if cases is not None:
        all_cases = [c for c in all_cases if c.case in cases]
    found = named = n_ref = fps = 0
    for c in tqdm(all_cases, desc="images", disable=not progress):
        img = c.load_image()
        sp = spark_fov_spacing(img.shape)
        res = detect_series(_series_from_slices([img], (sp, sp), 4.0), model)
        boxes = [(t.boxes[0], t.level) for t in res.vertebrae]
        verts = c.vertebrae()
        discs = c.discs()
        top = min(d["xy"][1] for d in discs) if discs else -np.inf
        bot = max(d["xy"][1] for d in discs) if discs else np.inf
        hit = np.zeros(len(boxes), bool)
        for v in verts:
            n_ref += 1
            col, row = v["xy"]
            inside = [i for i, (b, _) in enumerate(boxes) if b[0] <= row <= b[2] and b[1] <= col <= b[3]]
            for i in inside:
                hit[i] = True
            if len(inside) == 1:
                found += 1
                named += int(boxes[inside[0]][1] == v["level"])
        for (b, _), h in zip(boxes, hit):
            if not h and top <= (b[0] + b[2]) / 2 <= bot:
                fps += 1
    return {
        "task": "detection",
        "n_images": len(all_cases),
        "n_vertebrae": n_ref,
        "centre_recall": found / max(n_ref, 1),
        "level_accuracy": named / max(n_ref, 1),
        "false_positives_per_image": fps / max(len(all_cases), 1),
    }


def evaluate_detection(root: str | Path, model, cases: list[str] | None = None, progress: bool = True) -> dict:
    """Dispatch on the dataset format (3D masks or spark_midsag centres)."""
    from spinepath.data import dataset_kind

    kind = dataset_kind(root)
    return (evaluate_spark if kind == "spark" else evaluate_volumes)(root, model, cases, progress)


# ------------------------------------------------------------------------------------------------ grading
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


def spark_detection(case, detector):
    """Run detection and naming on one spark_midsag image as a single-slice series (no labels used)."""
    from spinepath.data import spark_fov_spacing
    from spinepath.pipeline import detect_series

    img = case.load_image()
    sp = spark_fov_spacing(img.shape)
    return detect_series(_series_from_slices([img], (sp, sp), 4.0), detector)


def _greedy_match(dist: np.ndarray, limit: np.ndarray) -> dict[int, int]:
    """Reference -> prediction, one-to-one, nearest first, within a per-reference distance limit."""
    out: dict[int, int] = {}
    used: set[int] = set()
    if dist.size == 0:
        return out
    for r, p in sorted(np.ndindex(*dist.shape), key=lambda rp: dist[rp]):
        if r in out or p in used or dist[r, p] > limit[r]:
            continue
        out[r] = p
        used.add(p)
    return out


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
    from spinepath.data import BODY_HEIGHT_PER_GAP, BODY_WIDTH_PER_GAP
    from spinepath.findings import fuse, grade_detections, view_probs
    from spinepath.fusion import VertebraScores
    from spinepath.grading import normalise_image, spark_structures

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
    f = grade_detections(res, grader, spacing_known=False, views=views)
    tracks = [t for t in res.vertebrae if t.box_on(0) is not None]
    found = {t.level: t.box_on(0) for t in tracks}
    vf = [v for v in f.vertebrae if v.level in found]
    pb = np.array([found[v.level] for v in vf], dtype=float).reshape(-1, 4)
    pc = np.stack([(pb[:, 0] + pb[:, 2]) / 2, (pb[:, 1] + pb[:, 3]) / 2], 1) if len(pb) else np.zeros((0, 2))
    rc = np.array([s.centre for s in rv], dtype=float).reshape(-1, 2)
    dist = np.linalg.norm(rc[:, None] - pc[None], axis=2) if len(pc) and len(rc) else np.zeros((len(rc), 0))
    inside = np.array([[b[0] <= c[0] <= b[2] and b[1] <= c[1] <= b[3] for b in pb] for c in rc]).reshape(dist.shape)
    dist = np.where(inside, dist, np.inf)
    mv = _greedy_match(dist, np.full(len(rc), np.inf))
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
    md = _greedy_match(ddist, np.full(len(rdc), 0.5 * gap if np.isfinite(gap) else 20.0))
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
    from tqdm.auto import tqdm

    from spinepath.data import load_spark
    from spinepath.grading import disc_grade

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
    thr = grader.fusion.threshold if grader.fusion is not None else 0.5
    m = grading_metrics(r["v_true"], r["v_prob"], thr, r["d_true"], r["d_pred"])
    return {"task": "grading", "n_images": r["n_images"], **m}
