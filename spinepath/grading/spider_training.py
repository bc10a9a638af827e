"""Training of the SPIDER disc grader (``spinepath train spider``).

1. The discs of every spider_midsag image of the training and selection patients are found as the product
   finds them (detector -> naming -> discs between named neighbours, numbered from the bottom) and matched to
   the labels by ``index_from_bottom``; images named without a sacral anchor are left out (their indices
   are a guess); the validation patients are never read.
2. Cross-validation by patient (``folds``): per fold, one multi-task network is trained on the other folds'
   discs (T1 and T2 crops together) and predicts the held-out fold: the out-of-fold head probabilities.
3. Level fusion: per disc, both sequences' out-of-fold probabilities and context through one LightGBM model
   per finding; decisions (thresholds, the Pfirrmann rule) and the per-vertebra Platt map and threshold are
   chosen on nested cross-validated predictions.
4. The fold networks are kept as the ensemble; with the fusion they are saved as ``spider_grader.pt``.
Each fold's network is checkpointed, so an interrupted run resumes at the next fold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from spinepath.core.config import config_file
from spinepath.core.geometry import series_from_slices
from spinepath.core.paths import resolve_model_path
from spinepath.data.datasets import load_spark
from spinepath.data.spider import SpiderStudy, load_spider_midsag, load_spider_seg
from spinepath.data.split import is_validation, split_part
from spinepath.detection.predictor import VertebraDetector
from spinepath.grading.crops import spark_structures
from spinepath.grading.search import optuna_storage
from spinepath.grading.spider import (
    BINARY,
    N_OUTPUTS,
    PROB_COLUMNS,
    SPARK_TARGETS,
    TARGETS,
    DiscSample,
    SpiderConfig,
    SpiderGrader,
    chain_discs,
    disc_targets,
    fit_level_fusion,
    fit_vertebra_decision,
    fused_findings,
    level_table,
    pfirrmann_grade,
    predict_samples,
    train_network,
    vertebra_parts,
    vertebra_reference,
)
from spinepath.stages import detect_series
from spinepath.transforms import normalise_image

log = logging.getLogger(__name__)

SPIDER_PARAMS = config_file("spider_params.json")
#: Architectures ``spinepath search spider`` chooses among by default.
SEARCH_MODELS = ("resnet10_narrow", "resnet18_narrow", "convnext_zepto", "convnext_atto")


@dataclass
class SpiderTrainConfig:
    """Options of ``spinepath train spider``."""

    data_root: str = "../shared/data"
    out_dir: str = "runs/spider"
    detector: str = ""
    params_file: str = ""
    folds: int = 5
    epochs: int = 0
    max_patients: int = 0
    num_threads: int = 0
    quiet: bool = False
    device: str = "cpu"  # where the fold networks train (the grader is saved from the CPU)
    workers: int = 0  # data-loader processes for the crops (0: reproducible)
    init: str = ""  # self-supervised backbone the fold networks start from (overrides the params file's)
    distill: list[str] = field(default_factory=list)  # teacher runs: each fold network also learns theirs
    distill_weight: float = 0.5  # the teachers' share of the loss (the labels': the rest)


def load_spider_params(path: str | Path = SPIDER_PARAMS) -> SpiderConfig:
    """The stored (searched) network hyper-parameters; defaults where the file has none."""
    p = Path(path)
    d = json.loads(p.read_text()) if p.is_file() else {}
    return SpiderConfig.from_dict(d.get("params", d))


def training_studies(data_root: str | Path, max_patients: int = 0) -> list[SpiderStudy]:
    """The spider_midsag patients outside the validation split (training + selection).

    ``max_patients``: the first N of them (0: all; quick runs).
    """
    studies = [s for s in load_spider_midsag(Path(data_root) / "spider_midsag")
               if split_part("spider_midsag", s.patient, s.patient) != "validation"]
    return studies[:max_patients] if max_patients else studies


def study_samples(study: SpiderStudy, detector: VertebraDetector, sequences: tuple[str, ...] = ("t1", "t2"),
                  labelled_only: bool = False, anchored_only: bool = False
                  ) -> tuple[dict[str, np.ndarray], list[DiscSample], dict[str, str]]:
    """The discs the product finds on one patient's images, with the labels of the same index where known.

    ``labelled_only`` keeps the discs with a label; ``anchored_only`` drops the images whose names have no
    sacral anchor (their indices are a guess: training labels would be shifted).

    Returns:
        ``(normalised images by key, disc samples, anchor per sequence)``.

    """
    labels = study.discs_by_index
    images, samples, anchors = {}, [], {}
    for seq in sequences:
        if seq not in study.sequences:
            continue
        img = study.load_image(seq)
        sp = study.spacing.get(seq) or (1.0, 1.0)
        res = detect_series(series_from_slices([img], sp, 4.0), detector)
        anchors[seq] = res.naming.anchor if res.naming else "none"
        if anchored_only and anchors[seq] != "S1":
            continue
        key = f"{study.patient}_{seq}"
        images[key] = normalise_image(img)
        for idx, s, ctx in chain_discs(res.vertebrae, key, float(sp[0]), image_rows=img.shape[0]):
            if labelled_only and idx not in labels:
                continue
            t = disc_targets(labels[idx]) if idx in labels else np.full(len(TARGETS), -1, np.int64)
            samples.append(DiscSample(study.patient, seq, idx, s, ctx, t))
    return images, samples, anchors


def collect(studies: list[SpiderStudy], detector: VertebraDetector, progress: bool = True, **kw
            ) -> tuple[dict[str, np.ndarray], list[DiscSample]]:
    """:func:`study_samples` over many patients."""
    images: dict[str, np.ndarray] = {}
    samples: list[DiscSample] = []
    for st in tqdm(studies, desc="spider discs", disable=not progress):
        im, sm, _ = study_samples(st, detector, **kw)
        images.update(im)
        samples += sm
    return images, samples


def spark_samples(data_root: str | Path) -> tuple[dict[str, np.ndarray], list[DiscSample]]:
    """The graded spark_midsag training studies (validation excluded) as samples of the spark heads only.

    Disc and vertebra crops at their labelled centres, cropped as the SPIDER discs are; targets are -1 in
    :data:`TARGETS` and the disc grade / vertebra label in the spark heads (:data:`SPARK_TARGETS`).
    """
    images: dict[str, np.ndarray] = {}
    out: list[DiscSample] = []
    for case in load_spark(Path(data_root) / "spark_midsag"):
        if is_validation("spark_midsag", case.case):
            continue
        key = f"spark_{case.case}"
        images[key] = normalise_image(case.load_image())
        for st in spark_structures(case):
            if st.grade < 0:
                continue
            t = np.full(len(SPARK_TARGETS), -1, np.int64)
            t[SPARK_TARGETS.index("spark_disc" if st.kind == "disc" else "spark_vertebra")] = st.grade
            out.append(DiscSample(key, "t2", 0, replace(st, image_key=key), {}, t))
    return images, out


#: How many spider_seg slices per patient :func:`parasagittal_samples` reads (the central ones, 1.8 mm apart).
PARASAGITTAL_SLICES = 5


def parasagittal_samples(data_root: str | Path, studies: list[SpiderStudy], detector: VertebraDetector,
                         progress: bool = True) -> tuple[dict[str, np.ndarray], list[DiscSample]]:
    """More T2 crops of the same graded discs: the spider_seg slices of these spider_midsag patients.

    spider_seg holds consecutive central sagittal T2 slices (every 2nd of 0.9 mm) of 31 SPIDER patients. Each
    slice is detected and named as the product does; where the names are anchored on S1, every disc with a
    label at its index from the bottom becomes a sample with that label (a disc's grade holds across its
    central slices). Only the :data:`PARASAGITTAL_SLICES` slices nearest the middle of each case's stack are
    read (±3.6 mm: the disc, not the foramen), and only the patients of ``studies``; the caller keeps a held-out
    fold's patients out of its training set.
    """
    by_patient = {st.patient: st for st in studies}
    images: dict[str, np.ndarray] = {}
    out: list[DiscSample] = []
    cases = [c for c in load_spider_seg(Path(data_root) / "spider_seg") if c.patient in by_patient]
    for case in tqdm(cases, desc="parasagittal slices", disable=not progress):
        labels = by_patient[case.patient].discs_by_index
        mid, half = len(case.slices) // 2, PARASAGITTAL_SLICES // 2
        for i in range(max(mid - half, 0), min(mid + half + 1, len(case.slices))):
            name, img = case.slices[i], case.load(i)[0]
            res = detect_series(series_from_slices([img], case.spacing, case.thickness), detector)
            if res.naming is None or res.naming.anchor != "S1":
                continue
            key = f"{case.patient}_seg_{Path(name).stem}"
            images[key] = normalise_image(img)
            for idx, st, ctx in chain_discs(res.vertebrae, key, float(case.spacing[0]), image_rows=img.shape[0]):
                if idx in labels:
                    out.append(DiscSample(case.patient, "t2", idx, st, ctx, disc_targets(labels[idx])))
    return images, out


def fold_training_set(k: int, fold_of: dict[str, int], samples: list[DiscSample], shared: list[DiscSample]
                      ) -> list[DiscSample]:
    """The samples fold ``k``'s network trains on.

    Every SPIDER sample (mid-sagittal or parasagittal) of a patient outside fold ``k``, and the ``shared``
    samples (the spark heads' crops: other patients, no SPIDER label).

    Raises:
        KeyError: If a sample's patient has no fold (it could leak into a held-out fold).

    """
    return [s for s in samples if fold_of[s.patient] != k] + list(shared)


def patient_folds(patients: list[str], k: int) -> dict[str, int]:
    """Patient -> fold, every k-th patient in numeric order (deterministic)."""
    order = sorted(set(patients), key=lambda p: (len(p), p))
    return {p: i % k for i, p in enumerate(order)}


#: Settings that decide a crop: a teacher (:func:`fold_teachers`) must see the student's crops.
CROP_SETTINGS = ("crop_mm", "crop_px", "crop_aspect", "crop_norm")


def fold_teachers(runs: list[str], cfg: SpiderConfig, folds: int) -> list[list[nn.Module]]:
    """Per fold, the teacher runs' network of that fold (trained without the fold's patients).

    Raises:
        ValueError: If a run has another number of fold networks or crops otherwise than ``cfg``.

    """
    graders = [SpiderGrader.load(Path(r) / "spider_grader.pt", exported=False) for r in runs]
    for r, g in zip(runs, graders):
        if len(g.models) != folds:
            raise ValueError(f"{r} holds {len(g.models)} networks, not one per fold ({folds}): not a training run")
        diff = [k for k in CROP_SETTINGS if getattr(g.cfg, k) != getattr(cfg, k)]
        if diff:
            raise ValueError(f"{r} crops otherwise than the student ({', '.join(diff)})")
    return [[g.models[k] for g in graders] for k in range(folds)]


def train_spider(tc: SpiderTrainConfig) -> dict:
    """Run the whole training; returns the summary written to ``<out_dir>/summary.json``."""
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_spider_params(tc.params_file or SPIDER_PARAMS)
    if tc.epochs:
        cfg.epochs = tc.epochs
    if tc.init:
        cfg.init = tc.init
    det_path = resolve_model_path(tc.detector or None)
    detector = VertebraDetector.load(det_path)
    studies = training_studies(tc.data_root, tc.max_patients)
    images, samples = collect(studies, detector, progress=not tc.quiet, labelled_only=True, anchored_only=True)
    extra: list[DiscSample] = []
    if cfg.spark_heads:  # every fold also trains the spark heads on the spark_midsag training crops
        spark_images, extra = spark_samples(tc.data_root)
        images.update(spark_images)
        log.info("spark heads: %d spark_midsag crops", len(extra))
    fold_of = patient_folds([s.patient for s in samples], tc.folds)
    log.info("SPIDER discs: %d samples of %d patients", len(samples), len(fold_of))
    para: list[DiscSample] = []
    if cfg.parasagittal:  # a fold trains on the parasagittal crops of its own training patients only
        para_images, para = parasagittal_samples(tc.data_root, [s for s in studies if s.patient in fold_of],
                                                 detector, progress=not tc.quiet)
        images.update(para_images)
        log.info("parasagittal: %d spider_seg crops", len(para))
    teachers = fold_teachers(tc.distill, cfg, tc.folds) if tc.distill else None
    oof = np.full((len(samples), N_OUTPUTS), np.nan, np.float32)
    models = []
    for k in tqdm(range(tc.folds), desc="folds", disable=tc.quiet):
        ck = out / f"fold{k}.pt"
        tr = fold_training_set(k, fold_of, samples + para, extra)
        te = [i for i, s in enumerate(samples) if fold_of[s.patient] == k]
        if ck.is_file():
            m = cfg.network()
            m.load_state_dict(torch.load(ck, map_location="cpu"))
            m.eval()
        else:
            m = train_network(cfg, images, tr, progress=not tc.quiet, device=tc.device, workers=tc.workers,
                              teachers=teachers[k] if teachers else None, distill_weight=tc.distill_weight).cpu()
            torch.save(m.state_dict(), ck)
        models.append(m)
        oof[te] = predict_samples([m], cfg, images, [samples[i] for i in te])
    table = level_table(samples, oof)
    keys = sorted(table)
    labels = {(s.patient, s.index): s.target for s in samples}
    X = np.stack([table[k] for k in keys])
    Y = np.stack([labels[k] for k in keys])
    groups = np.array([k[0] for k in keys])
    meta = {"detector": str(det_path), "patients": len(fold_of), "discs": len(samples), "levels": len(keys),
            "folds": tc.folds, "cfg": asdict(cfg)}
    if tc.distill:
        meta["distilled_from"] = {"runs": list(tc.distill), "weight": tc.distill_weight}
    return fit_and_save_grader(out, cfg, models, X, Y, groups, {s.patient: s for s in studies}, meta,
                               n_folds=tc.folds, extra={"samples": len(samples)})


def fit_and_save_grader(out: Path, cfg: SpiderConfig, models: list, X: np.ndarray, Y: np.ndarray,
                        groups: np.ndarray, studies: dict[str, SpiderStudy], meta: dict, n_folds: int = 5,
                        extra: dict | None = None) -> dict:
    """Fit the level fusion and the vertebra decision on a level table; save grader, table and summary in ``out``.

    ``X`` / ``Y`` / ``groups``: the out-of-fold level table (rows sorted by patient and disc index, the last
    column of ``X`` the index), as :func:`train_spider` builds it; ``studies``: the patients' labels (the
    per-vertebra reference). Returns the summary written to ``out/summary.json``.
    """
    fusion, cv = fit_level_fusion(X, Y, groups, n_folds=n_folds)
    # the vertebra decision on the nested cross-validated fused probabilities
    by_patient: dict[str, dict[int, dict]] = {}
    for i, (p, idx) in enumerate(zip(groups, X[:, -1].astype(int))):
        by_patient.setdefault(str(p), {})[int(idx)] = fused_findings(cv, i)
    parts, yv = [], []
    for p, fused in by_patient.items():
        ref = vertebra_reference(studies[p].discs_by_index)
        for i, y in ref.items():
            q = vertebra_parts(fused, i)
            if q is not None:
                parts.append(q)
                yv.append(y)
    fusion.vertebra = fit_vertebra_decision(parts, np.array(yv))
    grader = SpiderGrader(cfg, models, fusion, meta)
    grader.save(out / "spider_grader.pt")
    summary = {"spider_grader": str(out / "spider_grader.pt"), "patients": meta.get("patients"), **(extra or {}),
               "levels": len(X), "fusion": fusion.info, "fusion_settings": fusion.settings,
               "thresholds": fusion.thresholds,
               "pfirrmann_rule": fusion.pfirrmann_rule, "vertebra": fusion.vertebra,
               "oof": oof_metrics(Y, cv)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    np.savez_compressed(out / "oof.npz", X=X, Y=Y, groups=groups)
    return summary


def combine_runs(runs: list[str | Path], out_dir: str | Path, data_root: str | Path = "../shared/data") -> dict:
    """One grader from several training runs of the same discs: all their fold networks, one fusion.

    The runs' level tables (``oof.npz``) must hold the same rows and labels; their probability columns are
    averaged (each held-out disc's prediction is then the mean of one fold network per run, as the product's
    is the mean of all), and the fusion and the vertebra decision are fitted on that table as
    :func:`train_spider` fits them. The networks must share every setting but ``init`` (one ``cfg`` crops for
    all of them).

    Raises:
        ValueError: If the runs graded different discs or their networks differ.

    """
    runs = [Path(r) for r in runs]
    tables = [np.load(r / "oof.npz") for r in runs]
    graders = [SpiderGrader.load(r / "spider_grader.pt", exported=False) for r in runs]
    for r, t, g in zip(runs[1:], tables[1:], graders[1:]):
        if not (np.array_equal(t["groups"], tables[0]["groups"]) and np.array_equal(t["Y"], tables[0]["Y"])
                and np.array_equal(t["X"][:, -1], tables[0]["X"][:, -1])):
            raise ValueError(f"{r} graded other discs than {runs[0]}: its level table has other rows")
        if replace(g.cfg, init="") != replace(graders[0].cfg, init=""):
            raise ValueError(f"{r}'s networks differ from {runs[0]}'s: {g.cfg} vs {graders[0].cfg}")
    X = np.mean([t["X"] for t in tables], axis=0)
    studies = {s.patient: s for s in training_studies(data_root)}
    models = [m for g in graders for m in g.models]
    meta = {**graders[0].meta, "combined": [str(r) for r in runs], "networks": len(models)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return fit_and_save_grader(out, replace(graders[0].cfg, init=""), models, X, tables[0]["Y"],
                               tables[0]["groups"], studies, meta, extra={"combined": meta["combined"]})


def target_metrics(Y: np.ndarray, pfirrmann: np.ndarray, modic_none: np.ndarray, binary: dict[str, np.ndarray]
                   ) -> dict[str, float]:
    """Pfirrmann quadratic κ (argmax and expected grade), any-Modic AUC and the binary AUCs over labelled rows.

    Args:
        Y: ``(N, len(TARGETS))`` labels (-1 unknown: skipped per target).
        pfirrmann: ``(N, 5)`` grade probabilities.
        modic_none: ``(N,)`` P(no Modic change).
        binary: ``(N,)`` P(finding) per :data:`BINARY` name (a finding with one class only is left out).

    """
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    out = {}
    j = TARGETS.index("pfirrmann")
    m = Y[:, j] >= 0
    for rule in ("argmax", "expected"):
        out[f"pfirrmann_kappa_{rule}"] = float(cohen_kappa_score(Y[m, j], pfirrmann_grade(pfirrmann[m], rule),
                                                                 weights="quadratic"))
    j = TARGETS.index("modic")
    m = Y[:, j] >= 0
    # a tiny held-out set may hold one class only: no AUC there (the search then counts 0.5)
    out["modic_any_auc"] = (float(roc_auc_score(Y[m, j] > 0, 1 - modic_none[m])) if len(set((Y[m, j] > 0).tolist())) > 1
                            else 0.5)
    for k in BINARY:
        j = TARGETS.index(k)
        m = Y[:, j] >= 0
        if len(set(Y[m, j].tolist())) > 1:
            out[f"{k}_auc"] = float(roc_auc_score(Y[m, j], binary[k][m]))
    return out


def oof_metrics(Y: np.ndarray, cv: dict[str, np.ndarray]) -> dict:
    """Located-disc metrics of the nested cross-validated fused predictions (for the summary)."""
    m = target_metrics(Y, cv["pfirrmann"], cv["modic"][:, 0], {k: cv[k] for k in BINARY})
    return {k: round(v, 4) for k, v in m.items()}


def network_score(samples: list[DiscSample], probs: np.ndarray) -> dict[str, float]:
    """Per-crop quality of the network alone (no fusion), what the search maximises.

    Pfirrmann quadratic kappa of the expected grade, any-Modic AUC, mean AUC of the binary findings, and
    their mean (``score``).
    """
    Y = np.stack([s.target for s in samples])
    col = {c: i for i, c in enumerate(PROB_COLUMNS)}
    m = target_metrics(Y, probs[:, :5], probs[:, col["modic_0"]], {k: probs[:, col[k]] for k in BINARY})
    kappa, modic = m["pfirrmann_kappa_expected"], m["modic_any_auc"]
    aucs = [m[f"{k}_auc"] for k in BINARY if f"{k}_auc" in m]
    binary = float(np.mean(aucs)) if aucs else 0.5
    return {"pfirrmann_kappa": kappa, "modic_auc": modic, "binary_auc": binary, "score": (kappa + modic + binary) / 3}


def _suggest(trial, name: str, d) -> object:
    """``trial.suggest_*`` of one Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, IntDistribution  # only where a search runs

    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(name, list(d.choices))
    if isinstance(d, IntDistribution):
        return trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)


def _within(d, value: object) -> bool:
    """Whether ``value`` is one of an Optuna distribution's choices or within its bounds."""
    from optuna.distributions import CategoricalDistribution  # only where a search runs

    if value is None:
        return False
    if isinstance(d, CategoricalDistribution):
        return value in d.choices
    return d.low <= value <= d.high


def run_spider_search(n_trials: int, storage: str | None = None, study_name: str = "spider",
                      data_root: str = "../shared/data", detector: str = "", max_patients: int = 0,
                      save: bool = True, params_file: str | Path = SPIDER_PARAMS, seed: int | None = None,
                      progress: bool = True, num_threads: int = 0, models: tuple[str, ...] = SEARCH_MODELS,
                      max_epochs: int = 40, scored_folds: int = 1, enqueue: list[dict] | None = None,
                      device: str = "cpu", workers: int = 0) -> dict:
    """Optuna search of the multi-task network's hyper-parameters (``spinepath search spider``).

    A trial trains on four of the five cross-validation folds of the training and selection patients and is
    scored on the fifth (:func:`network_score`); with ``scored_folds`` > 1 it does so for the first
    ``scored_folds`` folds and scores the mean (one fold has misled the choice before; a GPU affords five),
    reporting each fold's running mean to the median pruner. The validation patients are never read. Storage
    as for the grading search: SQLite by default, a PostgreSQL URL for several workers. ``models``: the
    architectures the search chooses among (:func:`~spinepath.grading.classifier.build_classifier` names);
    ``max_epochs`` bounds the epochs dimension (10 to 40 by 5 by default; tests run tiny trials);
    ``enqueue``: parameter sets tried first, e.g. variants of the stored best: a parameter a set does not name
    keeps its stored value where that lies in the search space (else it is sampled). ``device`` / ``workers``:
    where the networks train and how many loader processes make their crops (a lent GPU).
    """
    if not 1 <= scored_folds <= 5:
        raise ValueError(f"scored_folds must be 1 to 5, not {scored_folds}")
    # Optuna is imported only where a search runs
    import optuna

    if storage is None:
        Path("runs/search").mkdir(parents=True, exist_ok=True)
        storage = "sqlite:///runs/search/spider.db"
    if num_threads:
        torch.set_num_threads(num_threads)
    det = VertebraDetector.load(resolve_model_path(detector or None))
    studies = training_studies(data_root, max_patients)
    images, samples = collect(studies, det, progress=progress, labelled_only=True, anchored_only=True)
    fold_of = patient_folds([s.patient for s in samples], 5)
    # (training, held-out) samples of each scored fold, the same for every trial
    splits = [([s for s in samples if fold_of[s.patient] != k], [s for s in samples if fold_of[s.patient] == k])
              for k in range(scored_folds)]
    base = load_spider_params(params_file)
    epoch_step = max(1, min(5, max_epochs // 8))

    dist = optuna.distributions
    space = {"model": dist.CategoricalDistribution(list(models)),
             "lr": dist.FloatDistribution(3e-4, 3e-3, log=True),
             "weight_decay": dist.FloatDistribution(1e-3, 0.2, log=True),
             "crop_mm": dist.IntDistribution(48, 96, step=8),
             "aug_strength": dist.FloatDistribution(0.3, 1.5),
             "epochs": dist.IntDistribution(min(10, max_epochs), max_epochs, step=epoch_step),
             "ordinal_weight": dist.FloatDistribution(0.0, 1.0),
             "crop_norm": dist.CategoricalDistribution(["image", "crop"]),
             # pixels of the crop: 64 mm over 96 px is 0.67 mm, nearer the images' 0.3-0.9 mm than 1 mm
             "crop_px": dist.CategoricalDistribution([64, 96])}

    def objective(trial) -> float:
        cfg = SpiderConfig.from_dict({**asdict(base), **{k: _suggest(trial, k, d) for k, d in space.items()}})
        scores = []
        for k, (train, held) in enumerate(splits):
            m = train_network(cfg, images, train, progress=False, device=device, workers=workers)
            scores.append(network_score(held, predict_samples([m], cfg, images, held)))
            trial.report(float(np.mean([x["score"] for x in scores])), k)
            if k + 1 < scored_folds and trial.should_prune():
                raise optuna.TrialPruned()
        sc = {name: round(float(np.mean([x[name] for x in scores])), 4) for name in scores[0]}
        trial.set_user_attr("metrics", {**sc, "folds": scored_folds})
        trial.set_user_attr("fold_scores", [x["score"] for x in scores])
        return sc["score"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=optuna_storage(storage), direction="maximize",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4))
    # an enqueued variant keeps the stored value of every parameter it does not name (where the space has it)
    stored = {k: getattr(base, k) for k, d in space.items() if _within(d, getattr(base, k, None))}
    for params in enqueue or []:
        study.enqueue_trial({**stored, **params}, skip_if_exists=True)
    study.optimize(objective, n_trials=n_trials, show_progress_bar=progress, gc_after_trial=True)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    out = {"study": study_name, "storage": storage.split("@")[-1], "n_trials": len(study.trials),
           "n_complete": len(done), "best_value": study.best_value if done else None,
           "best_params": study.best_params if done else None,
           "best_metrics": study.best_trial.user_attrs.get("metrics") if done else None}
    if save and done:
        p = Path(params_file)
        d = json.loads(p.read_text()) if p.is_file() else {}
        d["params"] = {**asdict(base), **study.best_params}
        d["search"] = {k: out[k] for k in ("study", "n_trials", "n_complete", "best_value", "best_metrics")}
        p.write_text(json.dumps(d, indent=1) + "\n")
    return out
