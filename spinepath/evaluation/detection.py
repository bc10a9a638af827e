"""Evaluation of detection and level naming against the shared-data references (CLI contract)."""

from __future__ import annotations

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
from spinepath.evaluation.matching import match_slice
from spinepath.evaluation.spacing import seg_case_with_spacing
from spinepath.stages import detect_series


def _box_summary(n_cases: int, n_vertebrae: int, ious: list[float], tp: int, fp: int, level_ok: int,
                 level_n: int) -> dict:
    """The contract's JSON of a per-slice box evaluation (``level_accuracy`` None where no name is known)."""
    return {
        "task": "detection",
        "n_cases": n_cases,
        "n_vertebrae": n_vertebrae,
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "recall_at_iou50": tp / max(len(ious), 1),
        "precision_at_iou50": tp / max(tp + fp, 1),
        "level_accuracy": (level_ok / level_n) if level_n else None,
    }


def evaluate_volumes(root: str | Path, model, cases: list[str] | None = None, progress: bool = True) -> dict:
    """Detection metrics on a 3D mask folder (chu_t2 / spineweb_vb format); see the CLI contract.

    Each case is evaluated as a clinical 4 mm series (every 4th lateral slice from (n % 4) // 2) through the
    full pipeline (detection, 3D grouping, naming). Reference boxes are bodies whose cross-section on the slice
    is >= 50% of their largest; smaller ones are ignored.
    """
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
        vol = series_from_slices([s.image for s in slices], slices[0].spacing, 4.0)
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
    return _box_summary(len(all_cases), n_vert, ious, tp, fp, level_ok, level_n)


def evaluate_spark(root: str | Path, model, cases: list[str] | None = None, progress: bool = True) -> dict:
    """Detection metrics on spark_midsag (labelled centres); see the CLI contract.

    Each image runs through the pipeline as a single-slice series whose pixel spacing is estimated from the
    field of view (no labels used). A reference vertebra centre is found when exactly one predicted box
    contains it; ``level_accuracy`` is the fraction of reference centres whose containing box has the right
    name; ``false_positives_per_image`` counts predicted boxes containing no reference vertebra centre whose
    centre lies inside the labelled span (between the highest and lowest labelled disc), since vertebrae
    outside it (T11 and above, S1) are unlabelled in this dataset.
    """
    all_cases = load_spark(root)
    if cases is not None:
        all_cases = [c for c in all_cases if c.case in cases]
    found = named = n_ref = fps = 0
    for c in tqdm(all_cases, desc="images", disable=not progress):
        img = c.load_image()
        sp = spark_fov_spacing(img.shape)
        res = detect_series(series_from_slices([img], (sp, sp), 4.0), model)
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


def evaluate_spider_seg(root: str | Path, model, cases: list[str] | None = None, progress: bool = True) -> dict:
    """Detection metrics on a spider_seg-format folder (2D slices with semantic masks).

    Each patient's slices run through the pipeline as one series (slice distance: twice the slice thickness,
    every 2nd slice is kept in the folder). Reference boxes are the bodies anterior to the canal
    (:mod:`spinepath.data.spider`); the derived S1 box is not scored for IoU, but its name is: ``level_accuracy``
    is over every reference body including S1 (names counted from the lumbosacral disc), the majority name of
    the boxes matched to it at IoU >= 0.5 (>= 0.3 for the derived S1 box). ``s1_found`` is the fraction of
    patients whose vertebra named S1 lies on the derived S1 box. A case whose folder gives no pixel spacing runs
    at the spacing estimated from its anatomy (:mod:`spinepath.evaluation.spacing`).
    """
    all_cases = load_spider_seg(root, require_spacing=False)
    if cases is not None:
        all_cases = [c for c in all_cases if c.patient in cases]
    ious: list[float] = []
    tp = fp = 0
    level_ok = level_n = s1_ok = 0
    for case in tqdm(all_cases, desc="patients", disable=not progress):
        slices = spider_seg_slices(seg_case_with_spacing(case, model))
        res = detect_series(series_from_slices([s.image for s in slices], slices[0].spacing, 2 * case.thickness), model)
        names: dict[str, list[str]] = {}
        s1_hit = False
        for k, s in enumerate(slices):
            pred = [(t.box_on(k), t.level) for t in res.vertebrae if t.box_on(k) is not None]
            pboxes = np.array([p[0] for p in pred]).reshape(-1, 4)
            derived = s.derived if s.derived is not None else np.zeros(len(s.boxes), bool)
            m = match_slice(pboxes, s.boxes, derived)
            ious += m["ious"]
            tp += m["tp"]
            fp += m["fp"]
            for p, r, v in m["pairs"]:
                if v >= (0.3 if derived[r] else 0.5):
                    names.setdefault(s.levels[r], []).append(pred[p][1])
                    s1_hit |= bool(derived[r] and pred[p][1] == "S1")
        ref_levels = {lv for s in slices for lv in s.levels}
        for lv in ref_levels:
            level_n += 1
            got = names.get(lv, [])
            level_ok += int(bool(got) and max(set(got), key=got.count) == lv)
        s1_ok += int(s1_hit)
    return {**_box_summary(len(all_cases), level_n, ious, tp, fp, level_ok, level_n),
            "s1_found": s1_ok / max(len(all_cases), 1)}


def evaluate_detection(root: str | Path, model, cases: list[str] | None = None, progress: bool = True) -> dict:
    """Dispatch on the dataset format (3D masks, spark_midsag centres or spider_seg slices)."""
    kind = dataset_kind(root)
    if kind == "spider_midsag":
        raise ValueError(f"{root}: spider_midsag has no locations to score detection on; use a spider_seg folder")
    fn = {"spark": evaluate_spark, "spider_seg": evaluate_spider_seg}.get(kind, evaluate_volumes)
    return fn(root, model, cases, progress)


# ------------------------------------------------------------------------------------------------ grading


def spark_detection(case, detector):
    """Run detection and naming on one spark_midsag image as a single-slice series (no labels used)."""
    img = case.load_image()
    sp = spark_fov_spacing(img.shape)
    return detect_series(series_from_slices([img], (sp, sp), 4.0), detector)


