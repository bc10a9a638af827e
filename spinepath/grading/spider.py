"""Level-by-level degenerative grading learned from SPIDER: one multi-task ConvNeXt per disc crop, fused by level.

A disc is found as the product finds it: between two neighbouring vertebrae of the named chain, numbered from
the bottom (``index_from_bottom``, 1 = L5-S1) as spider_midsag's labels are. Its crop (spine-aligned, both
endplates and the neighbouring bodies in view) goes through one network with a head per finding:

* ``pfirrmann`` 1-5 (5 classes, cross-entropy plus an expected-grade penalty: ordinal-aware),
* ``modic`` none / 1 / 2 / 3 (4 classes; "any" = 1 - P(none)),
* ``upper_endplate_change``, ``lower_endplate_change``, ``spondylolisthesis``, ``herniation``, ``narrowing``,
  ``bulging`` (one logit each).

One network sees the T1 and the T2 crops (more images; the contrast tells the sequence). The T1 and T2 of a
patient are separate acquisitions, so they are fused *by level*: per finding, a weighted mean of both
sequences' head probabilities (the one present where the other is missing; the T2's weight chosen per
finding) calibrated by a Platt map, both fitted on cross-validated predictions by patient of out-of-fold
network outputs. A LightGBM model per finding can boost from that prior over both sequences' probabilities
(missing = NaN), the disc's height relative to its neighbouring bodies on each, and its index; the committed
fusion searches no rounds (:data:`FUSION_ROUNDS`). The per-vertebra endplate/marrow probability combines the fused
endplate and Modic probabilities of the vertebra's two discs (:func:`vertebra_probability`), calibrated and
thresholded on out-of-fold data.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from spinepath.core.config import dataclass_from_dict
from spinepath.core.exported import load_export, save_export
from spinepath.core.files import save_torch
from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS, disc_index_from_bottom
from spinepath.core.results import Vertebra
from spinepath.core.weights import float_state, half_state
from spinepath.grading.calibration import apply_platt, fit_platt
from spinepath.grading.classifier import (
    GradingConfig,
    build_classifier,
    ensemble_mean,
    load_backbone,
    seed_loader_worker,
    to_input,
    warmup_cosine,
)
from spinepath.grading.crops import Structure, augment_intensity, local_axes, random_jitter, sample_crop
from spinepath.grading.fusion import best_threshold, quadratic_kappa

#: Heads of the network and their output sizes (1 = one logit).
HEADS: dict[str, int] = {"pfirrmann": 5, "modic": 4, "upper_endplate_change": 1, "lower_endplate_change": 1,
                         "spondylolisthesis": 1, "herniation": 1, "narrowing": 1, "bulging": 1}
BINARY = tuple(k for k, n in HEADS.items() if n == 1)
N_OUTPUTS = sum(HEADS.values())
SEQUENCES = ("t2", "t1")
#: Columns of a head-probability row: P(pfirrmann = 1..5), P(modic = 0..3), then one per binary finding.
PROB_COLUMNS = (*(f"pfirrmann_{g}" for g in range(1, 6)), *(f"modic_{t}" for t in range(4)), *BINARY)
#: Context per sequence beside the probabilities: disc height / mean neighbouring body height, both on the
#: detector's boxes along the image rows.
CONTEXT = ("disc_height_ratio",)
FUSION_FEATURES = (*(f"{s}_{c}" for s in SEQUENCES for c in (*PROB_COLUMNS, *CONTEXT)), "index_from_bottom")
#: Fused outputs: the two multi-class findings and the binaries.
TARGETS = ("pfirrmann", "modic", *BINARY)
#: Optional heads trained on spark_midsag crops beside the SPIDER ones (``SpiderConfig.spark_heads``): the disc
#: grade v1-v5 and the vertebra's pathological logit. They share the backbone only: nothing downstream reads them.
SPARK_HEADS: dict[str, int] = {"spark_disc": 5, "spark_vertebra": 1}
#: Training targets with the spark heads (SPIDER samples carry -1 there, spark samples -1 in :data:`TARGETS`).
SPARK_TARGETS = (*TARGETS, *SPARK_HEADS)
ALL_HEADS = {**HEADS, **SPARK_HEADS}


def _slices() -> dict[str, slice]:
    out, i = {}, 0
    for k, n in ALL_HEADS.items():
        out[k] = slice(i, i + n)
        i += n
    return out


HEAD_SLICES = _slices()


@dataclass
class SpiderConfig:
    """Hyper-parameters of the multi-task disc network (``configs/spider_params.json`` holds the searched)."""

    model: str = "convnext_atto"
    crop_mm: float = 64.0
    crop_px: int = 64
    crop_aspect: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 25
    batch_size: int = 32
    aug_strength: float = 1.0
    drop_path: float = 0.1
    label_smoothing: float = 0.05
    ordinal_weight: float = 0.5
    pfirrmann_soft: float = 0.0  # > 0: soft ordinal labels softmax(-a (k - y)^2) for Pfirrmann (SORD), 0: one-hot
    binary_weight: float = 1.0
    pfirrmann_sequences: tuple[str, ...] = ("t1", "t2")  # crops whose Pfirrmann label is trained on
    spark_heads: bool = False  # also train the spark_midsag disc / vertebra heads on the same backbone
    crop_norm: str = "image"  # "image": the slice's intensity range; "crop": each crop's own 1st-99.5th pct
    parasagittal: bool = False  # also train on the spider_seg slices of the fold's training patients (T2)
    init: str = ""  # self-supervised backbone (``spinepath train pretrain``) to start from; "" = random
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> SpiderConfig:
        """Build from a dict, ignoring unknown keys."""
        return dataclass_from_dict(cls, d, tuples=("pfirrmann_sequences",))

    def network(self) -> nn.Module:
        """A randomly initialised network: :data:`N_OUTPUTS` outputs, then the spark heads' when enabled."""
        n = N_OUTPUTS + (sum(SPARK_HEADS.values()) if self.spark_heads else 0)
        return build_classifier(GradingConfig(model=self.model, drop_path=self.drop_path), n)


# ------------------------------------------------------------------------------------------- the discs
@dataclass
class DiscSample:
    """One disc on one sequence's image.

    Attributes:
        patient: Patient id.
        sequence: ``"t1"`` or ``"t2"``.
        index: ``index_from_bottom`` as the product counts it (1 = L5-S1).
        structure: Where to crop (``image_key`` = ``"<patient>_<sequence>"``).
        context: :data:`CONTEXT` values.
        target: Labels in :data:`TARGETS` order (Pfirrmann 0-based; -1 unknown); empty at inference.

    """

    patient: str
    sequence: str
    index: int
    structure: Structure
    context: dict[str, float]
    target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


#: An edge disc (above the highest vertebra found) is kept when its centre is this far inside the image (mm).
EDGE_DISC_MARGIN_MM = 4.0


def chain_discs(vertebrae: list[Vertebra], image_key: str, spacing_mm: float, slice_index: int | None = None,
                image_rows: int | None = None) -> list[tuple[int, Structure, dict[str, float]]]:
    """The discs between neighbouring named vertebrae of a top-down chain, on one slice.

    With ``image_rows`` given, the disc *above* the highest vertebra is added too (an edge disc) when its
    extrapolated centre (half the distance to the next vertebra below, along the spine axis) lies at least
    :data:`EDGE_DISC_MARGIN_MM` inside the image: the vertebra above it is cut by the field of view and not
    detected, but its lower endplate and the disc are in view (spider_midsag grades that disc). Its height
    ratio is unknown (NaN).

    Args:
        vertebrae: Named chain, top-down (``level`` set; ``"?"`` ends it).
        image_key: Key of the slice in the image dictionary.
        spacing_mm: Pixel size.
        slice_index: The slice whose boxes are used (default: each vertebra's first box).
        image_rows: Rows of the slice (enables the edge disc).

    Returns:
        ``(index_from_bottom, disc structure, context)`` per disc, top-down.

    """
    named = [v for v in vertebrae if v.level in VERTEBRA_LEVELS
             and (slice_index is None or v.box_on(slice_index) is not None)]
    if len(named) < 2:
        return []
    boxes = np.array([v.boxes[0] if slice_index is None else v.box_on(slice_index) for v in named], float)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    axes = local_axes(centres)
    out = []
    top = VERTEBRA_LEVELS.index(named[0].level)
    if image_rows is not None and top > 0:
        mid = centres[0] - (centres[1] - centres[0]) / 2
        if mid[0] * spacing_mm >= EDGE_DISC_MARGIN_MM and mid[0] < image_rows:
            level = f"{VERTEBRA_LEVELS[top - 1]}-{named[0].level}"
            out.append((disc_index_from_bottom(level),
                        Structure(image_key, "disc", level, (float(mid[0]), float(mid[1])),
                                  (float(axes[0][0]), float(axes[0][1])), float(spacing_mm), case=image_key),
                        {"disc_height_ratio": float("nan")}))
    for i in range(len(named) - 1):
        level = f"{named[i].level}-{named[i + 1].level}"
        if level not in DISC_LEVELS:
            continue
        ax = axes[i] + axes[i + 1]
        ax = ax / max(float(np.linalg.norm(ax)), 1e-6)
        mid = (centres[i] + centres[i + 1]) / 2
        heights = (boxes[i, 2] - boxes[i, 0], boxes[i + 1, 2] - boxes[i + 1, 0])
        gap = max(float(boxes[i + 1, 0] - boxes[i, 2]), 0.0)
        s = Structure(image_key, "disc", level, (float(mid[0]), float(mid[1])), (float(ax[0]), float(ax[1])),
                      float(spacing_mm), case=image_key)
        out.append((disc_index_from_bottom(level), s, {"disc_height_ratio": gap / max(float(np.mean(heights)), 1e-6)}))
    return out


def disc_targets(disc: dict) -> np.ndarray:
    """A spider_midsag disc row as :data:`TARGETS` labels (Pfirrmann 0-based; -1 where missing)."""
    def get(k: str, off: int = 0) -> int:
        v = disc.get(k)
        return -1 if v is None else int(v) - off

    return np.array([get("pfirrmann", 1), get("modic"), *(get(k) for k in BINARY)], dtype=np.int64)


# ------------------------------------------------------------------------------------------ the network
def disc_crop(image: np.ndarray, structure: Structure, cfg: SpiderConfig, jitter=None) -> np.ndarray:
    """The network's crop of one structure: spine-aligned, ``cfg.crop_mm`` over ``cfg.crop_px``.

    With ``cfg.crop_norm == "crop"`` it is rescaled to its own 1st-99.5th percentiles (contrast from the crop
    alone, whatever the rest of the slice holds: bowel, fat saturation, coil shading).
    """
    x = sample_crop(image, structure, cfg.crop_mm, cfg.crop_px, jitter, cfg.crop_aspect)
    if cfg.crop_norm == "crop":
        lo, hi = np.percentile(x, (1.0, 99.5))
        x = np.clip((x - lo) / max(float(hi - lo), 1e-3), 0.0, 1.0).astype(np.float32)
    return x


class DiscCrops(torch.utils.data.Dataset):
    """Crops of disc samples (augmented when ``train``) with their targets."""

    def __init__(self, images: dict[str, np.ndarray], samples: list[DiscSample], cfg: SpiderConfig,
                 train: bool) -> None:
        self.images, self.samples, self.cfg, self.train = images, samples, cfg, train
        self.rng = random.Random(cfg.seed)

    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int) -> None:
        """A new augmentation generator (a loader worker's: :func:`seed_loader_worker`)."""
        self.rng = random.Random(seed)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        jit = random_jitter(self.rng, self.cfg.aug_strength) if self.train else None
        x = disc_crop(self.images[s.structure.image_key], s.structure, self.cfg, jit)
        if self.train:
            x = augment_intensity(x, self.rng, self.cfg.aug_strength)
        return torch.from_numpy(to_input(x)), torch.from_numpy(s.target)


def head_weights(targets: np.ndarray) -> dict[str, torch.Tensor]:
    """Class weights (inverse square root of frequency) for the multi-class heads, positive weights for the rest."""
    out: dict[str, torch.Tensor] = {}
    for j, k in enumerate(SPARK_TARGETS[: targets.shape[1]]):
        y = targets[:, j]
        y = y[y >= 0]
        if ALL_HEADS[k] > 1:
            c = np.maximum(np.bincount(y, minlength=ALL_HEADS[k]).astype(float), 1.0) ** -0.5
            out[k] = torch.tensor(c / c[y].mean() if len(y) else c, dtype=torch.float32)
        else:
            pos = max(float((y == 1).sum()), 1.0)
            out[k] = torch.tensor(math.sqrt(max(float((y == 0).sum()), 1.0) / pos), dtype=torch.float32)
    return out


def soft_ordinal_targets(y: torch.Tensor, n: int, a: float) -> torch.Tensor:
    """Soft ordinal labels (SORD, Diaz & Marathe 2019): ``softmax(-a (k - y)^2)`` over the ``n`` grades.

    A near miss then costs less than a far one in the cross-entropy itself; larger ``a`` is nearer the one-hot.
    """
    k = torch.arange(n, dtype=torch.float32, device=y.device)
    return torch.softmax(-a * (k[None] - y[:, None].float()) ** 2, dim=1)


def multitask_loss(logits: torch.Tensor, target: torch.Tensor, weights: dict[str, torch.Tensor],
                   cfg: SpiderConfig) -> torch.Tensor:
    """Sum of the heads' losses over the labelled entries (a -1 target is skipped).

    Pfirrmann: class-weighted cross-entropy (to :func:`soft_ordinal_targets` with ``pfirrmann_soft``) plus
    ``ordinal_weight`` times the squared error of the expected grade (near misses cost less); Modic:
    class-weighted cross-entropy; binaries: BCE with a positive weight, times ``binary_weight``. Targets wider
    than :data:`TARGETS` train the spark heads too (:data:`SPARK_TARGETS`).
    """
    total = logits.new_zeros(())
    for j, k in enumerate(SPARK_TARGETS[: target.shape[1]]):
        y = target[:, j]
        m = y >= 0
        if not bool(m.any()):
            continue
        z = logits[m, HEAD_SLICES[k]]
        if ALL_HEADS[k] == 1:
            t = y[m].float() * (1 - cfg.label_smoothing) + cfg.label_smoothing / 2
            total = total + cfg.binary_weight * F.binary_cross_entropy_with_logits(
                z[:, 0], t, pos_weight=weights[k])
        elif k == "pfirrmann" and cfg.pfirrmann_soft > 0:
            total = total + F.cross_entropy(z, soft_ordinal_targets(y[m], ALL_HEADS[k], cfg.pfirrmann_soft),
                                            weight=weights[k])
        else:
            total = total + F.cross_entropy(z, y[m], weight=weights[k], label_smoothing=cfg.label_smoothing)
        if k == "pfirrmann" and cfg.ordinal_weight > 0:
            expected = torch.softmax(z, 1) @ torch.arange(ALL_HEADS[k], dtype=z.dtype, device=z.device)
            total = total + cfg.ordinal_weight * F.mse_loss(expected, y[m].to(z.dtype))
    return total


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over the SPIDER heads of the cross-entropy to a teacher's probabilities (:data:`PROB_COLUMNS` order).

    Multi-class heads: soft cross-entropy to the teacher's distribution; binary heads: BCE to its probability.
    """
    total = logits.new_zeros(())
    for k, n in HEADS.items():  # the SPIDER heads' probability columns lie where their logits do
        z, t = logits[:, HEAD_SLICES[k]], teacher[:, HEAD_SLICES[k]]
        if n > 1:
            total = total - (t * F.log_softmax(z, 1)).sum(1).mean()
        else:
            total = total + F.binary_cross_entropy_with_logits(z[:, 0], t[:, 0])
    return total


def head_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``(N, 15)`` probabilities in :data:`PROB_COLUMNS` order."""
    parts = [torch.softmax(logits[:, HEAD_SLICES[k]], 1) if HEADS[k] > 1 else torch.sigmoid(logits[:, HEAD_SLICES[k]])
             for k in HEADS]
    return torch.cat(parts, 1)


def training_targets(samples: list[DiscSample], cfg: SpiderConfig) -> list[DiscSample]:
    """The samples with the Pfirrmann label hidden (-1) on sequences outside ``cfg.pfirrmann_sequences``.

    Pfirrmann grades the T2 signal of the nucleus: a T1 crop cannot show it.
    """
    j = TARGETS.index("pfirrmann")
    out = []
    for s in samples:
        if s.sequence in cfg.pfirrmann_sequences or s.target[j] < 0:
            out.append(s)
            continue
        t = s.target.copy()
        t[j] = -1
        out.append(replace(s, target=t))
    return out


def train_network(cfg: SpiderConfig, images: dict[str, np.ndarray], samples: list[DiscSample],
                  progress: bool = True, max_minutes: float = 0.0, device: str = "cpu",
                  workers: int = 0, teachers: list[nn.Module] | None = None,
                  distill_weight: float = 0.5) -> nn.Module:
    """Train one multi-task network (AdamW, warm-up + cosine schedule); returns it in eval mode, on ``device``.

    With ``cfg.spark_heads`` the SPIDER samples' targets are padded with -1 for the spark heads. ``workers``:
    data-loader processes for the crops (0, the default, keeps a run reproducible on the CPU). ``teachers``
    (knowledge distillation): networks whose mean probabilities on the same augmented crop the student also
    learns (:func:`distillation_loss`), weighted ``distill_weight`` against ``1 - distill_weight`` for the labels.
    """
    samples = training_targets(samples, cfg)
    if cfg.spark_heads:
        pad = len(SPARK_TARGETS) - len(TARGETS)
        samples = [s if len(s.target) == len(SPARK_TARGETS) else
                   replace(s, target=np.concatenate([s.target, np.full(pad, -1, np.int64)])) for s in samples]
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    model = cfg.network()
    if cfg.init:
        load_backbone(model, cfg.init)
    model = model.to(dev)
    for m in teachers or []:
        m.eval().to(dev)
    ds = DiscCrops(images, samples, cfg, train=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(ds) > cfg.batch_size,
                                     generator=torch.Generator().manual_seed(cfg.seed), num_workers=workers,
                                     persistent_workers=workers > 0,
                                     worker_init_fn=seed_loader_worker if workers else None)
    weights = {k: w.to(dev) for k, w in head_weights(np.stack([s.target for s in samples])).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, len(dl), cfg.epochs * len(dl))
    start = time.time()
    bar = tqdm(range(cfg.epochs), desc="spider epochs", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        tot, n = 0.0, 0
        for x, y in dl:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            z = model(x)
            loss = multitask_loss(z, y, weights, cfg)
            if teachers:
                with torch.no_grad():
                    t = torch.stack([head_probabilities(m(x)) for m in teachers]).mean(0)
                loss = (1 - distill_weight) * loss + distill_weight * distillation_loss(z, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(y)
            n += len(y)
        bar.set_postfix(loss=round(tot / max(n, 1), 4))
        if max_minutes and time.time() - start > 60 * max_minutes:
            break
    model.eval()
    return model


def predict_samples(models: list[nn.Module], cfg: SpiderConfig, images: dict[str, np.ndarray],
                    samples: list[DiscSample], tta: bool = True, batch: int = 128) -> np.ndarray:
    """Mean head probabilities ``(N, 15)`` over models (and a superior-inferior flip when ``tta``)."""
    if not samples:
        return np.zeros((0, N_OUTPUTS), np.float32)
    crops = np.stack([disc_crop(images[s.structure.image_key], s.structure, cfg) for s in samples])
    return ensemble_mean(models, crops, head_probabilities, tta, batch, stage="degeneration")


# ------------------------------------------------------------------------------------ fusion by level
def level_table(samples: list[DiscSample], probs: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """Per ``(patient, index_from_bottom)``: the :data:`FUSION_FEATURES` row (a missing sequence is NaN)."""
    out: dict[tuple[str, int], np.ndarray] = {}
    width = len(PROB_COLUMNS) + len(CONTEXT)
    for s, p in zip(samples, probs):
        row = out.setdefault((s.patient, s.index), np.full(len(FUSION_FEATURES), np.nan))
        j = SEQUENCES.index(s.sequence) * width
        row[j:j + len(PROB_COLUMNS)] = p
        row[j + len(PROB_COLUMNS):j + width] = [s.context[c] for c in CONTEXT]
        row[-1] = s.index
    return out


LGB_PARAMS = {"learning_rate": 0.05, "num_leaves": 7, "max_depth": 3, "min_data_in_leaf": 20,
              "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
              "verbose": -1, "seed": 0, "num_threads": 2}
#: The booster alone, from no prior (the fusion of v0.5.2-v0.5.6). Out of fold it fitted the ~860 levels worse
#: than the plain mean of its own inputs (model card), so it is no longer the default.
PLAIN: dict = {"t2_weight": None, "rounds": 150, "learning_rate": 0.05}
#: The fusion's grid, searched per finding on cross-validated predictions by patient: the T2's weight in the
#: prior (the weighted mean of both sequences' network probabilities; the one present where the other is
#: missing) and the LightGBM rounds boosted from that prior over every feature (0: the prior alone).
PRIOR_T2_WEIGHTS = (0.5, 0.7, 0.85, 1.0)
BOOST_ROUNDS = (0, 15, 30, 60, 120)
#: The rounds the committed fusion searches: none. With the rounds chosen inside each training part of an outer
#: cross-validation, boosting from the prior never beat the prior alone (listhesis 0.64 against 0.76; model card,
#: ``scripts/nested_fusion_choice.py``), so the booster stays for comparisons (``fusion_settings(BOOST_ROUNDS)``).
FUSION_ROUNDS = (0,)
BOOST_LEARNING_RATE = 0.02
_EPS = 1e-4


def _target_columns(target: str) -> list[str]:
    if target == "pfirrmann":
        return [f"pfirrmann_{g}" for g in range(1, 6)]
    if target == "modic":
        return [f"modic_{t}" for t in range(4)]
    return [target]


def sequence_prior(X: np.ndarray, target: str, t2_weight: float) -> np.ndarray:
    """One finding's prior from the network alone: ``t2_weight`` x T2 + the rest x T1, per level.

    Where one sequence is missing (NaN), the other's probabilities. ``X``'s first columns are
    :data:`FUSION_FEATURES`. Returns ``(N, classes)`` for a multi-class target, ``(N,)`` for a binary one.
    """
    cols = _target_columns(target)
    a2, a1 = (X[:, [FUSION_FEATURES.index(f"{s}_{c}") for c in cols]] for s in SEQUENCES)
    p = np.where(np.isnan(a1), a2, np.where(np.isnan(a2), a1, t2_weight * a2 + (1 - t2_weight) * a1))
    return p if len(cols) > 1 else p[:, 0]


def _raw_prior(X: np.ndarray, target: str, setting: dict) -> np.ndarray | None:
    """The prior as LightGBM's raw score (log-probabilities / log-odds), or None for :data:`PLAIN`."""
    if setting.get("t2_weight") is None:
        return None
    p = np.clip(sequence_prior(X, target, setting["t2_weight"]), _EPS, 1 - _EPS)
    return np.log(p) if p.ndim == 2 else np.log(p / (1 - p))


def _fit_booster(X: np.ndarray, y: np.ndarray, n_classes: int, features: tuple[str, ...] = FUSION_FEATURES,
                 setting: dict = PLAIN, init: np.ndarray | None = None):
    """LightGBM boosted from ``init`` (raw scores; None: from nothing), or None for a setting of 0 rounds."""
    if setting["rounds"] == 0:
        return None
    # LightGBM is imported only where a fusion model is fitted or run
    import lightgbm as lgb

    params = dict(LGB_PARAMS, learning_rate=setting["learning_rate"])
    params = dict(params, objective="multiclass", num_class=n_classes) if n_classes > 2 else \
        dict(params, objective="binary")
    data = lgb.Dataset(X, label=y, feature_name=list(features), init_score=init)
    return lgb.train(params, data, num_boost_round=setting["rounds"])


def _predict(booster, X: np.ndarray, n_classes: int, init: np.ndarray | None) -> np.ndarray:
    """Probabilities of a booster on top of its prior's raw scores (either may be absent, not both)."""
    if booster is None and init is None:
        raise ValueError("a fused finding needs a booster or a prior")
    raw = booster.predict(X, raw_score=True) if booster is not None else 0.0
    raw = raw + init if init is not None else raw
    if n_classes > 2:
        e = np.exp(raw - raw.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-raw))


def fit_predict(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, target: str, setting: dict,
                features: tuple[str, ...] = FUSION_FEATURES) -> np.ndarray:
    """One target's fusion with ``setting`` fitted on rows ``train`` of ``(X, y)``, its probabilities on ``test``."""
    nc = _n_classes(target)
    init = _raw_prior(X, target, setting)
    b = _fit_booster(X[train], y[train], nc, features, setting, None if init is None else init[train])
    return _predict(b, X[test], nc, None if init is None else init[test])


def target_score(target: str, y: np.ndarray, p: np.ndarray) -> float:
    """What the fusion's setting is chosen on: Pfirrmann κ (rounded expected grade), any-Modic AUC, else AUC."""
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import roc_auc_score

    if target == "pfirrmann":
        return quadratic_kappa(y, pfirrmann_grade(p, "expected"))
    if target == "modic":
        y, p = (y > 0).astype(int), 1 - p[:, 0]
    return float(roc_auc_score(y, p)) if len(set(y.tolist())) > 1 else 0.5


def fusion_settings(rounds: tuple[int, ...] = FUSION_ROUNDS) -> list[dict]:
    """The grid of :data:`PRIOR_T2_WEIGHTS` x ``rounds`` (fewer rounds first: ties keep the simpler one)."""
    return [{"t2_weight": w, "rounds": r, "learning_rate": BOOST_LEARNING_RATE} for r in rounds
            for w in PRIOR_T2_WEIGHTS]


def nested_predictions(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, target: str,
                       features: tuple[str, ...] = FUSION_FEATURES, n_folds: int = 5,
                       settings: list[dict] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cross-validated (by patient) fused predictions of one target on its labelled rows, setting chosen.

    What :func:`fit_level_fusion` computes for each target; with other ``features`` (the columns of ``X``,
    :data:`FUSION_FEATURES` first) it measures another feature set the same way. Every setting of
    ``settings`` (default :func:`fusion_settings`; ``[PLAIN]`` for the booster alone) is predicted on the same
    folds and the one with the best :func:`target_score` is kept.

    Returns:
        ``(predictions of the labelled rows, their row mask, the chosen setting)``: ``(n, classes)``
        probabilities for a multi-class target, ``(n,)`` P(positive) for a binary one.

    """
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.model_selection import GroupKFold

    m = Y[:, TARGETS.index(target)] >= 0
    Xk, yk, gk = X[m], Y[m, TARGETS.index(target)], groups[m]
    nc = _n_classes(target)
    folds = list(GroupKFold(n_splits=n_folds).split(Xk, yk, gk))
    best: tuple[float, np.ndarray, dict] | None = None
    for setting in settings or fusion_settings():
        pk = np.zeros((len(yk), nc)) if nc > 2 else np.zeros(len(yk))
        for tr, te in folds:
            pk[te] = fit_predict(Xk, yk, tr, te, target, setting, features)
        score = target_score(target, yk, pk)
        if best is None or score > best[0]:
            best = (score, pk, setting)
    return best[1], m, best[2]


def nested_pfirrmann(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, features: tuple[str, ...] = FUSION_FEATURES,
                     n_folds: int = 5, settings: list[dict] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`nested_predictions` of the Pfirrmann fusion (the measurements' comparison).

    Returns ``(probabilities, labels, patients)`` of the labelled rows.
    """
    pk, m, _ = nested_predictions(X, Y, groups, "pfirrmann", features, n_folds, settings)
    return pk, Y[m, TARGETS.index("pfirrmann")], groups[m]


def _n_classes(target: str) -> int:
    return HEADS[target] if HEADS[target] > 1 else 2


def modic_type_weights(prob: np.ndarray, y: np.ndarray) -> list[float]:
    """Per Modic type 1-3: its frequency among the labelled changes over its mean ``P(type | change)`` there.

    The networks were trained with class weights, so the rare types are overstated (SPIDER has almost only
    type 2); counts get half a case each so that an absent type keeps a small probability, and a weight is at
    most 10 (a type the network hardly predicts cannot be made up).
    """
    changed = y > 0
    q = prob[changed, 1:] / np.clip(prob[changed, 1:].sum(1, keepdims=True), 1e-12, None)
    freq = (np.bincount(y[changed].astype(int) - 1, minlength=3) + 0.5) / (changed.sum() + 1.5)
    return [float(v) for v in np.minimum(freq / np.clip(q.mean(0), 1e-6, None), 10.0)]


def calibrate_fused(fused: dict[str, np.ndarray], calibration: dict[str, dict]) -> dict[str, np.ndarray]:
    """Apply :attr:`LevelFusion.calibration`: each binary finding's Platt map; Modic's to P(any change).

    The Modic type probabilities among the changes (``P(type | change)``) are reweighted by ``type_weights``
    (the types' frequency among the labelled changes over their mean prediction there: a prior shift) and
    renormalised; NaN rows (levels a target does not label) stay NaN.
    """
    out = dict(fused)
    for k, c in calibration.items():
        if k == "modic_any":
            p = np.asarray(fused["modic"], np.float64)
            any_ = apply_platt(np.clip(1 - p[:, 0], 1e-6, 1 - 1e-6), c["a"], c["b"])
            rest = p[:, 1:] * np.asarray(c.get("type_weights", [1.0, 1.0, 1.0]))
            rest = rest / np.clip(rest.sum(1, keepdims=True), 1e-12, None)
            out["modic"] = np.hstack([(1 - any_)[:, None], rest * any_[:, None]])
        else:
            out[k] = apply_platt(np.asarray(fused[k], np.float64), c["a"], c["b"])
    return out


@dataclass
class LevelFusion:
    """How a disc's sequences are fused by level, with the decisions chosen out of fold.

    Per target: the sequences' weighted mean (:func:`sequence_prior`), a LightGBM booster on top where its
    setting has rounds (none in the committed fusion; every target in graders saved before v0.5.7, from no
    prior), then the calibration.

    Attributes:
        boosters: LightGBM text model per :data:`TARGETS` entry ("" for a setting of 0 rounds).
        thresholds: Decision threshold per binary finding and for ``modic_any`` (max balanced accuracy).
        pfirrmann_rule: ``"argmax"`` or ``"expected"`` (the rounded expected grade), whichever had the higher
            out-of-fold quadratic kappa.
        vertebra: Platt ``(a, b)`` on the logit of the noisy-or of a vertebra's endplate / Modic
            probabilities and its ``threshold`` (see :func:`vertebra_probability`).
        info: Out-of-fold metrics.
        settings: Per target, the prior's T2 weight and the rounds boosted from it (:func:`fusion_settings`);
            a target without one is the booster alone (:data:`PLAIN`, graders saved before v0.5.7). A
            target of 0 rounds has an empty booster: its prior is its answer.
        calibration: Platt ``{"a", "b"}`` per binary finding and for ``modic_any`` (with the Modic
            ``type_weights``, :func:`modic_type_weights`), fitted on the nested cross-validated fused
            probabilities (the networks' class weights make a prior overstate rare findings); a monotone map:
            rankings and AUCs unchanged, thresholds chosen after it. Absent: the fused probability as it is
            (graders saved before v0.5.7).

    """

    boosters: dict[str, str]
    thresholds: dict[str, float]
    pfirrmann_rule: str = "expected"
    vertebra: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)
    calibration: dict[str, dict] = field(default_factory=dict)
    _parsed: dict = field(default_factory=dict, repr=False, compare=False)

    def predict(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Per target: ``(N, classes)`` probabilities (multi-class) or ``(N,)`` P(positive)."""
        # LightGBM is imported only where a fusion model is fitted or run
        import lightgbm as lgb

        X = np.asarray(X, dtype=np.float64).reshape(-1, len(FUSION_FEATURES))
        out = {}
        for k in TARGETS:
            if not len(X):
                out[k] = np.zeros((0, HEADS[k]) if HEADS[k] > 1 else 0)
                continue
            if k not in self._parsed:
                self._parsed[k] = lgb.Booster(model_str=self.boosters[k]) if self.boosters[k] else None
            setting = self.settings.get(k, PLAIN)
            out[k] = _predict(self._parsed[k], X, _n_classes(k), _raw_prior(X, k, setting))
        return calibrate_fused(out, self.calibration)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"boosters": self.boosters, "thresholds": self.thresholds, "pfirrmann_rule": self.pfirrmann_rule,
                "vertebra": self.vertebra, "info": self.info, "settings": self.settings,
                "calibration": self.calibration, "features": list(FUSION_FEATURES)}

    @classmethod
    def from_dict(cls, d: dict) -> LevelFusion:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: If the stored features differ from this version's.

        """
        if tuple(d.get("features", ())) != FUSION_FEATURES:
            raise ValueError("SPIDER level fusion features do not match this version's")
        return cls(d["boosters"], d["thresholds"], d.get("pfirrmann_rule", "expected"), d.get("vertebra", {}),
                   d.get("info", {}), d.get("settings", {}), d.get("calibration", {}))


def pfirrmann_grade(prob: np.ndarray, rule: str) -> np.ndarray:
    """0-based Pfirrmann grades from ``(N, 5)`` probabilities: ``argmax`` or the rounded expected grade."""
    prob = np.asarray(prob, np.float64).reshape(-1, 5)
    if rule == "argmax":
        return prob.argmax(1)
    return np.clip(np.rint(prob @ np.arange(5)), 0, 4).astype(int)


def noisy_or(ps: list[float]) -> float:
    """P(at least one) of independent events (missing entries skipped; 0 when none)."""
    q = 1.0
    for p in ps:
        if p is not None and np.isfinite(p):
            q *= 1.0 - float(p)
    return 1.0 - q


def vertebra_parts(fused: dict[int, dict[str, float]], index_below: int) -> dict[str, float | None] | None:
    """The named evidence for the vertebra above disc ``index_below`` (its own endplates and marrow).

    The disc above it is ``index_below + 1``: its *lower* endplate is this vertebra's upper endplate; the
    disc below is ``index_below``: its *upper* endplate is this vertebra's lower one. None when neither disc
    was graded.
    """
    above, below = fused.get(index_below + 1), fused.get(index_below)
    if above is None and below is None:
        return None
    return {"upper_endplate": above["lower_endplate_change"] if above else None,
            "lower_endplate": below["upper_endplate_change"] if below else None,
            "modic_above": above["modic_any"] if above else None,
            "modic_below": below["modic_any"] if below else None}


def vertebra_probability(parts: dict[str, float | None], platt: dict[str, float]) -> float:
    """Endplate / marrow P(pathology) of a vertebra: Platt-calibrated noisy-or of its :func:`vertebra_parts`."""
    p = float(np.clip(noisy_or(list(parts.values())), 1e-6, 1 - 1e-6))
    return float(apply_platt(p, platt["a"], platt["b"])) if platt else p


def fused_findings(probs: dict[str, np.ndarray], i: int) -> dict[str, float]:
    """Row ``i`` of :meth:`LevelFusion.predict` as named probabilities (``modic_any`` included)."""
    out = {k: float(probs[k][i]) for k in BINARY}
    out["modic_any"] = float(1.0 - probs["modic"][i][0])
    return out


def oof_fused_by_patient(oof_path: str | Path) -> dict[str, dict[int, dict[str, float]]]:
    """Nested cross-validated fused findings of a training run's ``oof.npz``: patient -> disc index -> findings."""
    z = np.load(oof_path)
    _, cv = fit_level_fusion(z["X"], z["Y"], z["groups"])
    fused: dict[str, dict[int, dict[str, float]]] = {}
    for i, (p, idx) in enumerate(zip(z["groups"], z["X"][:, -1])):
        fused.setdefault(str(p), {})[int(idx)] = fused_findings(cv, i)
    return fused


def fit_level_fusion(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, n_folds: int = 5
                     ) -> tuple[LevelFusion, dict[str, np.ndarray]]:
    """Fit each target's fusion on out-of-fold network outputs; choose decisions on nested CV predictions.

    Per target, the setting (the prior's T2 weight, the rounds boosted from it) with the best cross-validated
    :func:`target_score` (:func:`nested_predictions`); the booster is then fitted on every labelled row.

    Args:
        X: ``(N, len(FUSION_FEATURES))`` rows of :func:`level_table`.
        Y: ``(N, len(TARGETS))`` labels (-1 unknown: that row is skipped for that target).
        groups: Patient per row (folds never split a patient).
        n_folds: Folds of the nested predictions.

    Returns:
        ``(fusion fitted on every row, cross-validated predictions per target)``.

    """
    boosters, cv, settings, calibration = {}, {}, {}, {}
    for j, k in enumerate(TARGETS):
        pk, m, settings[k] = nested_predictions(X, Y, groups, k, n_folds=n_folds)
        nc = _n_classes(k)
        full = np.full((len(Y), nc) if nc > 2 else len(Y), np.nan)
        full[m] = pk
        cv[k] = full
        b = _fit_booster(X[m], Y[m, j], nc, setting=settings[k], init=_raw_prior(X[m], k, settings[k]))
        boosters[k] = b.model_to_string() if b is not None else ""
        y = (Y[m, j] > 0).astype(int)
        # the Pfirrmann probabilities come out of the fusion calibrated in frequency (model card); a tiny
        # run may hold one class only: no map there
        if k != "pfirrmann" and len(set(y.tolist())) > 1:
            a, b0 = fit_platt(y, 1 - pk[:, 0] if k == "modic" else pk)
            calibration["modic_any" if k == "modic" else k] = {"a": a, "b": b0}
            if k == "modic":
                calibration["modic_any"]["type_weights"] = modic_type_weights(pk, Y[m, j])
    cv = calibrate_fused(cv, calibration)
    thresholds = {}
    for k in BINARY:
        m = Y[:, TARGETS.index(k)] >= 0
        thresholds[k] = best_threshold(Y[m, TARGETS.index(k)], cv[k][m])
    jm = TARGETS.index("modic")
    m = Y[:, jm] >= 0
    thresholds["modic_any"] = best_threshold((Y[m, jm] > 0).astype(int), 1 - cv["modic"][m, 0])
    jp = TARGETS.index("pfirrmann")
    m = Y[:, jp] >= 0
    kappa = {r: quadratic_kappa(Y[m, jp], pfirrmann_grade(cv["pfirrmann"][m], r)) for r in ("argmax", "expected")}
    rule = max(kappa, key=kappa.get)
    info = {"n_levels": int(len(Y)), "cv_pfirrmann_quadratic_kappa": kappa}
    return LevelFusion(boosters, thresholds, rule, {}, info, settings, calibration), cv


def fit_vertebra_decision(parts: list[dict[str, float | None]], y: np.ndarray) -> dict[str, float]:
    """Platt map and threshold (max balanced accuracy) of the vertebra noisy-or, on out-of-fold parts."""
    p = np.array([vertebra_probability(q, {}) for q in parts])
    a, b = fit_platt(np.asarray(y, int), p)
    cal = np.array([vertebra_probability(q, {"a": a, "b": b}) for q in parts])
    return {"a": float(a), "b": float(b), "threshold": best_threshold(np.asarray(y, int), cal)}


def vertebra_reference(discs: dict[int, dict]) -> dict[int, int]:
    """SPIDER per-vertebra reference, keyed by the index of the disc below the vertebra.

    Positive when its own endplates are involved: the lower-endplate change of the disc above it, the
    upper-endplate change of the disc below it, or a Modic change at either. Only vertebrae between two
    labelled discs; a vertebra with no positive part and an unknown one (``None``: not graded) is left out.
    """
    out = {}
    for i, below in discs.items():
        above = discs.get(i + 1)
        if above is None:
            continue
        parts = (above.get("lower_endplate_change"), below.get("upper_endplate_change"), above.get("modic"),
                 below.get("modic"))
        if any(v is not None and v > 0 for v in parts):
            out[i] = 1
        elif all(v is not None for v in parts):
            out[i] = 0
    return out


# ---------------------------------------------------------------------------------------- saved model
@dataclass
class SpiderGrader:
    """The SPIDER disc grader: the networks (one per cross-validation fold) and the level fusion."""

    cfg: SpiderConfig
    models: list[nn.Module]
    fusion: LevelFusion
    meta: dict = field(default_factory=dict)

    FORMAT = "spinepath-spider-grader-1"

    def save(self, path: str | Path) -> None:
        """Write fp16 weights, configuration and fusion, atomically."""
        sds = [half_state(m.state_dict()) for m in self.models]
        save_torch({"format": self.FORMAT, "cfg": asdict(self.cfg), "state_dicts": sds,
                    "fusion": self.fusion.to_dict(), "meta": self.meta}, path)

    def export(self, path: str | Path) -> Path:
        """Write the TorchScript export of the networks beside this grader's file ``path``."""
        return save_export({"models": self.models}, path, {"kind": "spider grader"})

    @classmethod
    def load(cls, path: str | Path, exported: bool = True, device: str = "cpu") -> SpiderGrader:
        """Inverse of :meth:`save` (networks in float32, eval mode, on ``device``).

        With ``exported`` (default) and a current export beside the file (:meth:`export`), the exported
        networks (no timm imported); else the networks are built and loaded.

        Raises:
            FileNotFoundError: If the file is missing.
            ValueError: If it is not a SPIDER grader of this version.

        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"SPIDER grader not found: {p}")
        ck = torch.load(p, map_location="cpu", weights_only=False)
        if not isinstance(ck, dict) or ck.get("format") != cls.FORMAT:
            raise ValueError(f"{p} is not a spinepath SPIDER grader")
        cfg = SpiderConfig.from_dict(ck["cfg"])
        found = load_export(p, device) if exported else None
        models = found[0]["models"] if found is not None else []
        for sd in ck["state_dicts"] if found is None else ():
            m = cfg.network()
            m.load_state_dict(float_state(sd))
            models.append(m.eval().to(device))
        return cls(cfg, models, LevelFusion.from_dict(ck["fusion"]), ck.get("meta", {}))

    def grade(self, images: dict[str, np.ndarray], samples: list[DiscSample]) -> dict[int, dict]:
        """Fused findings per disc index of one study (samples of one patient, any sequences).

        Returns:
            ``{index_from_bottom: {"pfirrmann": {"grade", "probabilities"}, "modic": {...}, <binary>: p,
            "modic_any": p, "sequences": [...], "level": name}}``.

        """
        probs = predict_samples(self.models, self.cfg, images, samples)
        table = level_table(samples, probs)
        keys = sorted(table)
        fused = self.fusion.predict(np.stack([table[k] for k in keys])) if keys else {}
        out = {}
        for i, (_, idx) in enumerate(keys):
            f = fused_findings(fused, i)
            pf = fused["pfirrmann"][i]
            f["pfirrmann"] = {"grade": int(pfirrmann_grade(pf, self.fusion.pfirrmann_rule)[0]) + 1,
                              "probabilities": [round(float(v), 4) for v in pf]}
            # the type follows the any-change decision: the likeliest of types 1-3 when present, else 0
            present = f["modic_any"] >= self.fusion.thresholds.get("modic_any", 0.5)
            f["modic"] = {"type": int(np.argmax(fused["modic"][i][1:])) + 1 if present else 0,
                          "probabilities": [round(float(v), 4) for v in fused["modic"][i]]}
            f["sequences"] = sorted(s.sequence for s in samples if s.index == idx)
            f["level"] = next(s.structure.level for s in samples if s.index == idx)
            out[idx] = f
        return out
