"""Training of the grading classifiers and the fusion model on spark_midsag.

1. Cross-validation on the training studies (``folds`` folds by study): per fold, a vertebra and a disc
   ConvNeXt are trained on the other folds (crops at the labelled centres, augmented) and then run end to end
   on the held-out fold's images (detection -> naming -> crops of the detected structures, ``views``
   pseudo-slices each). These out-of-fold scores are the fusion model's training data.
2. Fusion: LightGBM on the out-of-fold features; its threshold is chosen on its own cross-validated
   predictions (see :func:`spinepath.grading.fusion.fit_fusion`). Calibration (:mod:`spinepath.grading.calibration`):
   Platt scaling of those cross-validated vertebra probabilities, a temperature for the out-of-fold disc
   probabilities. The disc decision rule (argmax / ordinal) is chosen on the calibrated out-of-fold disc
   probabilities.
3. Final classifiers: one per task trained on all training studies (``ensemble="final"``), or those plus
   the cross-validation fold models as an averaged ensemble (``"folds+final"``); they, the fusion model and
   the rule are saved together (``grader.pt``). Validation studies of ``configs/split.json`` are only used for
   reporting.

spark_midsag has one slice per study, so the fusion model sees pseudo-slices (geometric jitters of the one
slice) in training, and its slice-offset feature is constant there; see the model card.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from spinepath.core.paths import resolve_model_path
from spinepath.data.datasets import load_spark
from spinepath.data.split import is_validation
from spinepath.detection.predictor import VertebraDetector
from spinepath.evaluation.grading import grade_spark_case
from spinepath.grading.calibration import disc_grade, fit_calibration, fit_platt
from spinepath.grading.classifier import train_classifier
from spinepath.grading.crops import spark_structures
from spinepath.grading.fusion import fit_disc_fusion, fit_fusion
from spinepath.grading.grader import Grader
from spinepath.grading.search import PARAMS_FILE, load_params
from spinepath.transforms import normalise_image

log = logging.getLogger(__name__)


@dataclass
class GradingTrainConfig:
    """Options of ``spinepath train grading``."""

    data_root: str = "../shared/data"
    out_dir: str = "runs/grading"
    params_file: str = ""
    detector: str = ""
    folds: int = 5
    views: int = 5
    max_train_cases: int = 0
    epochs: int = 0
    num_threads: int = 0
    seed: int = 0
    ensemble: str = "final"
    init: str = ""
    quiet: bool = False


def _labelled(results: list[dict]):
    """Flatten per-study results into arrays of labelled pairs (unpaired references are skipped)."""
    X, y, g = [], [], []
    for r in results:
        for t, p, x in r["vertebrae"]:
            if p is not None and t >= 0:
                X.append(x)
                y.append(t)
                g.append(r["case"])
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=int), np.asarray(g)


def train_grading(cfg: GradingTrainConfig) -> dict:
    """Run the whole training; returns the summary written to ``<out_dir>/summary.json``."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = not cfg.quiet
    cases = load_spark(Path(cfg.data_root) / "spark_midsag")
    train_cases = [c for c in cases if not is_validation("spark_midsag", c.case)]
    if cfg.max_train_cases:
        train_cases = train_cases[: cfg.max_train_cases]
    images = {c.case: normalise_image(c.load_image()) for c in train_cases}
    structs = {c.case: spark_structures(c) for c in train_cases}
    params = {t: load_params(t, cfg.params_file or PARAMS_FILE) for t in ("vertebra", "disc")}
    for p in params.values():
        p.seed = cfg.seed
        if cfg.init:
            p.init = cfg.init
        if cfg.epochs:
            p.epochs = cfg.epochs
    detector = VertebraDetector.load(resolve_model_path(cfg.detector or None))

    def fit(task: str, ids: set[str]):
        tr = [s for c in ids for s in structs[c] if s.kind == task and s.grade >= 0]
        return train_classifier(params[task], images, tr, progress=progress)

    ids = [c.case for c in train_cases]
    fold_of = {c: i % cfg.folds for i, c in enumerate(ids)}
    if cfg.ensemble not in ("final", "folds+final"):
        raise ValueError(f"unknown ensemble {cfg.ensemble!r}: use 'final' or 'folds+final'")
    oof: list[dict] = []
    fold_models: dict[str, list] = {"vertebra": [], "disc": []}
    histories: dict[str, list] = {"vertebra": [], "disc": []}
    for f in tqdm(range(cfg.folds), desc="folds", disable=not progress):
        tr_ids = {c for c in ids if fold_of[c] != f}
        models = {}
        for task in ("vertebra", "disc"):
            m, h = fit(task, tr_ids)
            models[task] = [m]
            fold_models[task].append(m)
            histories[task].append(h)
        grader = Grader(dict(params), models)
        for c in train_cases:
            if fold_of[c.case] == f:
                r = grade_spark_case(c, grader, detector, views=cfg.views)
                r["case"] = c.case
                oof.append(r)
    X, y, groups = _labelled(oof)
    fusion, cv_prob = fit_fusion(X, y, groups, n_folds=min(5, len(set(groups.tolist()))))
    # discs: a fusion model kept only if it measures better on its cross-validated predictions
    from sklearn.metrics import cohen_kappa_score

    drows = [(t, p, x, r["case"]) for r in oof for t, p, x in r["discs"] if p is not None and t >= 0]
    dt = np.array([d[0] for d in drows])
    dp = np.stack([d[1] for d in drows])
    Xd = np.stack([d[2] for d in drows])
    dg = np.array([d[3] for d in drows])
    disc_fusion, disc_cv = fit_disc_fusion(Xd, dt, dg, n_folds=min(5, len(set(dg.tolist()))))
    # calibration on the out-of-fold predictions (vertebra: the fusion's cross-validated probabilities), then the
    # disc rule on the calibrated disc probabilities, with and without the disc fusion model
    raw_cal = fit_calibration(y, cv_prob, dt, dp, "out-of-fold training predictions (spark_midsag)")
    fused_cal = fit_calibration(y, cv_prob, dt, disc_cv, "out-of-fold training predictions (spark_midsag)")

    def kappa(p: np.ndarray, r: str) -> float:
        return float(cohen_kappa_score(dt, disc_grade(p, r), weights="quadratic", labels=list(range(5))))

    kappas = {r: kappa(raw_cal.disc_probabilities(dp), r) for r in ("argmax", "ordinal")}
    rule = max(kappas, key=kappas.get)
    fused_kappa = kappa(fused_cal.disc_probabilities(disc_cv), disc_fusion.decision)
    calibration = raw_cal
    if fused_kappa <= kappas[rule]:
        disc_fusion = None
    else:
        calibration = fused_cal
    final = {}
    final_hist = {}
    for task in ("vertebra", "disc"):
        m, h = fit(task, set(ids))
        final[task] = [m] + (fold_models[task] if cfg.ensemble == "folds+final" else [])
        final_hist[task] = h
    meta = {
        "version": "grading-1",
        "trained": "spark_midsag training split",
        "n_train_studies": len(ids),
        "folds": cfg.folds,
        "views": cfg.views,
        "ensemble": cfg.ensemble,
        "oof_disc_kappa": kappas,
    }
    meta["disc_fusion_cv_kappa"] = fused_kappa
    meta["disc_fusion_used"] = disc_fusion is not None
    grader = Grader(dict(params), final, fusion, rule, meta, disc_fusion, calibration)
    grader.save(out / "grader.pt")
    oof_auc = _auc(y, X[:, 0]), _auc(y, cv_prob)
    summary = {
        "params": {t: asdict(p) for t, p in params.items()},
        "n_oof_vertebrae": int(len(y)),
        "oof_auc_mid_slice": oof_auc[0],
        "oof_auc_fused": oof_auc[1],
        "fusion_threshold": fusion.threshold,
        "disc_rule": rule,
        "oof_disc_kappa": kappas,
        "oof_disc_fusion_kappa": fused_kappa,
        "disc_fusion_used": disc_fusion is not None,
        "calibration": calibration.to_dict(),
        "histories": {"folds": histories, "final": final_hist},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    np.savez(out / "oof.npz", X=X, y=y, groups=groups, cv_prob=cv_prob, Xd=Xd, dt=dt, dg=dg, dp=dp, disc_cv=disc_cv)
    return summary


def refit_fusion(train_dir: str | Path, grader_path: str | Path | None = None) -> dict:
    """Refit the vertebra fusion model from a training run's saved out-of-fold features.

    Reads ``oof.npz`` of ``train_dir`` and stores the new fusion model in the run's grader (the classifiers
    are unchanged).
    """
    d = Path(train_dir)
    oof = np.load(d / "oof.npz", allow_pickle=True)
    X, y, groups = oof["X"], oof["y"], oof["groups"]
    fusion, cv_prob = fit_fusion(X, y, groups, n_folds=min(5, len(set(groups.tolist()))))
    gp = Path(grader_path or d / "grader.pt")
    grader = Grader.load(gp)
    grader.fusion = fusion
    if grader.calibration is not None:  # the vertebra map follows the new fusion's cross-validated predictions
        grader.calibration.vertebra = fit_platt(y, cv_prob)
    grader.save(gp)
    summary = json.loads((d / "summary.json").read_text())
    summary.update({"oof_auc_fused": _auc(y, cv_prob), "fusion_threshold": fusion.threshold})
    (d / "summary.json").write_text(json.dumps(summary, indent=1))
    np.savez(d / "oof.npz", **{k: oof[k] for k in oof.files if k != "cv_prob"}, cv_prob=cv_prob)
    return {k: summary[k] for k in ("oof_auc_mid_slice", "oof_auc_fused", "fusion_threshold")}


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(y.tolist())) > 1 else None
