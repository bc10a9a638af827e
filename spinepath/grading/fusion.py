"""LightGBM fusion of per-slice classifier scores into one calibrated decision per vertebra.

Inputs per vertebra: its per-slice P(pathological) (every slice where it is detected), plus context: level,
neighbours' and the whole study's scores, adjacent discs' P(abnormal), box size and shape in mm, detection
score and the offset of its central slice from the series' mid-sagittal slice. The decision threshold is
chosen on cross-validated predictions (maximal balanced accuracy) and stored with the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS
from spinepath.grading.calibration import disc_grade

FEATURES = (
    "p_mid", "p_mean", "p_max", "p_min", "p_std", "n_slices",
    "level_index", "p_above", "p_below", "study_mean_other", "study_max_other", "n_vertebrae",
    "disc_above_abnormal", "disc_below_abnormal", "study_disc_abnormal",
    "box_height_mm", "box_width_mm", "box_aspect", "detection_score", "mid_offset_mm",
)  # fmt: skip

#: Features the vertebra fusion model uses, chosen on the out-of-fold training data (grouped 5-fold CV AUC):
#: with all of :data:`FEATURES` LightGBM overfit (CV AUC 0.74 vs 0.79 for max pooling alone); this subset,
#: with monotone-increasing constraints, matches max pooling in ranking and adds calibration and context.
FUSION_INPUTS = ("p_max", "p_mean", "study_mean_other", "disc_below_abnormal")

#: LightGBM settings: stumps-to-small trees, strong regularisation (a few hundred training vertebrae).
LGB_PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 3,
    "max_depth": 2,
    "min_data_in_leaf": 50,
    "feature_fraction": 1.0,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "verbose": -1,
    "seed": 0,
    "num_threads": 2,
}
N_ROUNDS = 60
#: Disc fusion: multi-class, all disc features, no monotonicity.
DISC_LGB_PARAMS = dict(LGB_PARAMS, objective="multiclass", num_class=5, num_leaves=7, max_depth=3, min_data_in_leaf=20,
                       feature_fraction=0.8)
DISC_ROUNDS = 150

_GRADES = ("v1", "v2", "v3", "v4", "v5")
#: Disc fusion features: the disc's own grade probabilities, its neighbours' and the study's, its level and
#: the adjacent vertebrae's P(pathological).
DISC_FEATURES = (
    *(f"p_{g}" for g in _GRADES),
    *(f"above_p_{g}" for g in _GRADES),
    *(f"below_p_{g}" for g in _GRADES),
    *(f"study_p_{g}" for g in _GRADES),
    "disc_index", "vertebra_above_p", "vertebra_below_p", "n_views",
)  # fmt: skip


@dataclass
class VertebraScores:
    """What fusion knows about one vertebra of one study.

    Attributes:
        level: Anatomical level name.
        probs: P(pathological) per slice where the vertebra is detected (or per pseudo-slice view).
        mid: Index into ``probs`` of the vertebra's central slice.
        box_mm: ``(height, width)`` of its box on the central slice, mm.
        detection_score: Detector score (mean over slices).
        mid_offset_mm: Distance of its central slice from the series' mid-sagittal slice, mm.
        grade: 1 pathological, 0 healthy, -1 unknown (training label).

    """

    level: str
    probs: list[float]
    mid: int = 0
    box_mm: tuple[float, float] = (float("nan"), float("nan"))
    detection_score: float = float("nan")
    mid_offset_mm: float = 0.0
    grade: int = -1


def _disc_levels(level: str) -> tuple[str | None, str | None]:
    if level not in VERTEBRA_LEVELS:
        return None, None
    i = VERTEBRA_LEVELS.index(level)
    above = f"{VERTEBRA_LEVELS[i - 1]}-{level}" if i > 0 else None
    below = f"{level}-{VERTEBRA_LEVELS[i + 1]}" if i + 1 < len(VERTEBRA_LEVELS) else None
    return above, below


def study_features(vertebrae: list[VertebraScores], disc_abnormal: dict[str, float]) -> np.ndarray:
    """Feature matrix ``(n_vertebrae, len(FEATURES))`` of one study (NaN where a value does not exist).

    Args:
        vertebrae: The study's vertebrae, top-down.
        disc_abnormal: P(disc grade >= v2) per disc level name.

    """
    mids = np.array([v.probs[v.mid] if v.probs else np.nan for v in vertebrae], dtype=np.float64)
    dvals = np.array(list(disc_abnormal.values()), dtype=np.float64)
    rows = []
    for i, v in enumerate(vertebrae):
        p = np.asarray(v.probs, dtype=np.float64)
        others = np.delete(mids, i)
        above, below = _disc_levels(v.level)
        h, w = v.box_mm
        rows.append([
            mids[i], p.mean(), p.max(), p.min(), p.std(), len(p),
            VERTEBRA_LEVELS.index(v.level) if v.level in VERTEBRA_LEVELS else np.nan,
            mids[i - 1] if i > 0 else np.nan, mids[i + 1] if i + 1 < len(mids) else np.nan,
            np.nanmean(others) if len(others) else np.nan, np.nanmax(others) if len(others) else np.nan,
            len(vertebrae),
            disc_abnormal.get(above, np.nan), disc_abnormal.get(below, np.nan),
            dvals.mean() if len(dvals) else np.nan,
            h, w, h / w if w and np.isfinite(w) and w > 0 else np.nan, v.detection_score, v.mid_offset_mm,
        ])  # fmt: skip
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES))


def disc_features(disc_probs: dict[str, np.ndarray], vertebra_p: dict[str, float]) -> tuple[list[str], np.ndarray]:
    """Disc fusion features of one study.

    Args:
        disc_probs: Per disc level, ``(n, 5)`` grade probabilities over its slices / views.
        vertebra_p: P(pathological) of the vertebrae by level (central slice).

    Returns:
        ``(levels top-down, matrix (n_discs, len(DISC_FEATURES)))``.

    """
    levels = sorted(disc_probs, key=lambda lv: DISC_LEVELS.index(lv) if lv in DISC_LEVELS else 99)
    means = {lv: np.asarray(disc_probs[lv], dtype=np.float64).reshape(-1, 5).mean(0) for lv in levels}
    study = np.mean([means[lv] for lv in levels], 0) if levels else np.full(5, np.nan)
    nan5 = np.full(5, np.nan)
    rows = []
    for lv in levels:
        i = DISC_LEVELS.index(lv) if lv in DISC_LEVELS else -1
        up = DISC_LEVELS[i - 1] if i > 0 else None
        down = DISC_LEVELS[i + 1] if 0 <= i < len(DISC_LEVELS) - 1 else None
        a, b = lv.split("-") if "-" in lv else (None, None)
        rows.append([*means[lv], *means.get(up, nan5), *means.get(down, nan5), *study, i,
                     vertebra_p.get(a, np.nan), vertebra_p.get(b, np.nan), len(disc_probs[lv])])
    return levels, np.asarray(rows, dtype=np.float64).reshape(-1, len(DISC_FEATURES))


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold maximising balanced accuracy (Youden's J) on ``(y, p)``."""
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    i = int(np.argmax(j))
    return float(min(max(thr[i], 0.0), 1.0))


def oof_logistic(X: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float = 1.0, max_iter: int = 100,
                 n_splits: int = 5) -> np.ndarray:
    """Out-of-fold probabilities of a logistic regression on ``X`` (``n_splits`` folds that never split a group).

    The decisions fitted by the scripts (``fit_vertebra_decision``, ``fit_listhesis_decision``,
    ``fit_lumbar_type``, ``measurement_evidence``) choose their thresholds and report their AUCs on these.
    """
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    oof = np.zeros(len(y))
    for tr, te in GroupKFold(n_splits=n_splits).split(X, y, groups):
        oof[te] = LogisticRegression(C=c, max_iter=max_iter).fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
    return oof


def quadratic_kappa(y: np.ndarray, grades: np.ndarray) -> float:
    """Quadratic-weighted Cohen κ of ordinal grades (a :func:`paired_gain` metric)."""
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(y, grades, weights="quadratic"))


def paired_gain(metric, y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray, n: int = 1000,
                seed: int = 0) -> dict:
    """``metric(y, b) - metric(y, a)`` on the same rows, with a paired bootstrap 95% interval by group (patient).

    How the scripts decide whether a feature or a variant measures better out of fold: adopted only where the
    interval lies above 0. A resample with one class only (``metric`` raising ``ValueError``) is skipped.

    Returns:
        ``{"a", "b", "gain", "ci95": [low, high]}`` rounded to 4 decimals.

    """
    y, a, b, groups = (np.asarray(v) for v in (y, a, b, groups))
    ids = np.unique(groups)
    rows = {g: np.flatnonzero(groups == g) for g in ids}
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(n):
        r = np.concatenate([rows[g] for g in rng.choice(ids, len(ids), replace=True)])
        try:
            gains.append(metric(y[r], b[r]) - metric(y[r], a[r]))
        except ValueError:
            continue
    ma, mb = float(metric(y, a)), float(metric(y, b))
    return {"a": round(ma, 4), "b": round(mb, 4), "gain": round(mb - ma, 4),
            "ci95": [round(float(q), 4) for q in np.percentile(gains, [2.5, 97.5])]}


@dataclass
class FusionModel:
    """A trained LightGBM fusion model.

    Per vertebra (binary, with its decision threshold) or per disc (5 grades, with its decision rule).
    """

    booster_text: str
    threshold: float
    features: tuple[str, ...] = FEATURES
    info: dict = field(default_factory=dict)
    kind: str = "vertebra"
    decision: str = "argmax"
    inputs: tuple[str, ...] | None = None  # the columns of ``features`` the booster reads (None: all)
    _booster: object = field(default=None, repr=False, compare=False)

    @property
    def booster(self):
        """The LightGBM booster (parsed once)."""
        if self._booster is None:
            # LightGBM is imported only where a fusion model is fitted or run
            import lightgbm as lgb

            self._booster = lgb.Booster(model_str=self.booster_text)
        return self._booster

    def predict(self, X: np.ndarray) -> np.ndarray:
        """P(pathological) per row (vertebra), or ``(N, 5)`` grade probabilities (disc)."""
        X = np.asarray(X, dtype=np.float64).reshape(-1, len(self.features))
        if len(X) == 0:
            return np.zeros(0) if self.kind == "vertebra" else np.zeros((0, 5))
        if self.inputs is not None:
            X = X[:, [self.features.index(f) for f in self.inputs]]
        return np.asarray(self.booster.predict(X), dtype=np.float64)

    def to_dict(self) -> dict:
        """JSON-ready form (the booster as LightGBM's text format)."""
        return {"booster": self.booster_text, "threshold": self.threshold, "features": list(self.features),
                "info": self.info, "kind": self.kind, "decision": self.decision,
                "inputs": list(self.inputs) if self.inputs is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> FusionModel:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: If the stored feature list differs from this version's.

        """
        feats = tuple(d["features"])
        kind = d.get("kind", "vertebra")
        want = FEATURES if kind == "vertebra" else DISC_FEATURES
        if feats != want:
            raise ValueError(f"{kind} fusion model features {feats} do not match this version's {want}")
        inputs = tuple(d["inputs"]) if d.get("inputs") else None
        return cls(d["booster"], float(d["threshold"]), feats, d.get("info", {}), kind, d.get("decision", "argmax"),
                   inputs)

    def save_json(self, path) -> None:
        """Write :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()))


def _fit_booster(X: np.ndarray, y: np.ndarray, multiclass: bool = False):
    """Vertebra booster on the :data:`FUSION_INPUTS` columns of ``X`` (monotone), or the disc booster."""
    # LightGBM is imported only where a fusion model is fitted or run
    import lightgbm as lgb

    if multiclass:
        ds = lgb.Dataset(X, label=y, feature_name=list(DISC_FEATURES), free_raw_data=False)
        return lgb.train(DISC_LGB_PARAMS, ds, num_boost_round=DISC_ROUNDS)
    cols = [FEATURES.index(f) for f in FUSION_INPUTS]
    params = dict(LGB_PARAMS, monotone_constraints=[1] * len(cols))
    ds = lgb.Dataset(X[:, cols], label=y, feature_name=list(FUSION_INPUTS), free_raw_data=False)
    return lgb.train(params, ds, num_boost_round=N_ROUNDS)


def _predict_inputs(booster, X: np.ndarray) -> np.ndarray:
    return booster.predict(X[:, [FEATURES.index(f) for f in FUSION_INPUTS]])


def fit_fusion(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_folds: int = 5) -> tuple[FusionModel, np.ndarray]:
    """Fit the fusion model and choose its threshold on cross-validated predictions.

    Args:
        X: Features ``(N, len(FEATURES))`` (built from out-of-fold classifier scores).
        y: 1 pathological, 0 healthy.
        groups: Study id per row; folds never split a study.
        n_folds: Folds for the threshold's cross-validated predictions.

    Returns:
        ``(model fitted on all rows, cross-validated probabilities)``.

    """
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.model_selection import GroupKFold

    y = np.asarray(y, dtype=int)
    cv = np.zeros(len(y))
    for tr, te in GroupKFold(n_splits=n_folds).split(X, y, groups):
        cv[te] = _predict_inputs(_fit_booster(X[tr], y[tr]), X[te])
    thr = best_threshold(y, cv)
    booster = _fit_booster(X, y)
    info = {"n_train": int(len(y)), "n_positive": int(y.sum())}
    return FusionModel(booster.model_to_string(), thr, FEATURES, info, "vertebra", "threshold", FUSION_INPUTS), cv


def fit_disc_fusion(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_folds: int = 5
) -> tuple[FusionModel, np.ndarray]:
    """Fit the disc fusion model (5 grades); the decision rule is chosen on cross-validated predictions.

    Args:
        X: Features ``(N, len(DISC_FEATURES))`` from out-of-fold classifier scores.
        y: 0-based grades.
        groups: Study id per row.
        n_folds: Folds of the cross-validated predictions.

    Returns:
        ``(model fitted on all rows, cross-validated probabilities (N, 5))``.

    """
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import cohen_kappa_score
    from sklearn.model_selection import GroupKFold


    y = np.asarray(y, dtype=int)
    cv = np.zeros((len(y), 5))
    for tr, te in GroupKFold(n_splits=n_folds).split(X, y, groups):
        cv[te] = _fit_booster(X[tr], y[tr], multiclass=True).predict(X[te])
    kappa = {r: float(cohen_kappa_score(y, disc_grade(cv, r), weights="quadratic", labels=list(range(5))))
             for r in ("argmax", "ordinal")}
    rule = max(kappa, key=kappa.get)
    booster = _fit_booster(X, y, multiclass=True)
    info = {"n_train": int(len(y)), "cv_quadratic_kappa": kappa}
    return FusionModel(booster.model_to_string(), 0.0, DISC_FEATURES, info, "disc", rule), cv
