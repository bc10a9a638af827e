"""Per-structure grading: ConvNeXt classifiers on crops around vertebrae and discs.

A crop is sampled around a structure's centre in a frame aligned with the local spine axis (rows run
superior -> inferior along the spine, columns anterior -> posterior), at a fixed physical scale
(``crop_mm`` square, ``crop_px`` pixels). Where the pixel spacing is unknown (spark_midsag) it is estimated
from the gap between neighbouring vertebra centres (:data:`spinepath.core.geometry.MEAN_LEVEL_GAP_MM`).

Two tasks share the code:

* ``vertebra``: healthy (``v1``) vs pathological / degenerative (``v2``), one logit;
* ``disc``: grades ``v1`` normal, ``v2`` bulge, ``v3`` protrusion, ``v4`` extrusion, ``v5`` Schmorl's node.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from spinepath.core.config import dataclass_from_dict
from spinepath.core.levels import DISC_GRADES
from spinepath.core.precision import forward_context
from spinepath.grading.calibration import disc_grade
from spinepath.grading.crops import (
    CropJitter,
    Structure,
    augment_intensity,
    random_jitter,
    sample_crop,
)

TASKS = ("vertebra", "disc")


def n_outputs(task: str) -> int:
    """Number of network outputs for a task (1 logit for vertebrae, 5 classes for discs)."""
    if task not in TASKS:
        raise ValueError(f"unknown grading task {task!r}; expected one of {TASKS}")
    return 1 if task == "vertebra" else len(DISC_GRADES)


# ----------------------------------------------------------------------------------------------- models
@dataclass
class GradingConfig:
    """Hyper-parameters of one grading classifier (``configs/grading_params.json`` holds the searched ones)."""

    task: str = "vertebra"
    model: str = "convnext_atto"
    crop_mm: float = 64.0
    crop_px: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 30
    batch_size: int = 32
    aug_strength: float = 1.0
    drop_path: float = 0.1
    label_smoothing: float = 0.05
    class_weight_power: float = 0.5
    ordinal_weight: float = 0.0
    crop_aspect: float = 1.0
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of training pairs; 0 = off
    ema: float = 0.0  # decay of an exponential moving average of the weights used as the final model; 0 = off
    seed: int = 0
    init: str = ""  # pretrained backbone (spinepath.grading.pretraining) to start from; "" = random

    @classmethod
    def from_dict(cls, d: dict) -> GradingConfig:
        """Build from a dict, ignoring unknown keys."""
        return dataclass_from_dict(cls, d)


#: Model sizes the search may pick. ``convnext_zepto`` is a narrower ConvNeXt defined here (timm's
#: smallest named variant is atto); the others are timm's own definitions.
MODEL_SIZES = ("convnext_zepto", "convnext_atto", "convnext_femto")


#: MONAI 2D ResNets (batch norm, basic blocks): name -> (blocks per stage, channels per stage).
MONAI_RESNETS: dict[str, tuple[list[int], list[int]]] = {
    "resnet10_narrow": ([1, 1, 1, 1], [32, 64, 128, 256]),
    "resnet18_narrow": ([2, 2, 2, 2], [32, 64, 128, 256]),
}


def build_classifier(cfg: GradingConfig, num_outputs: int | None = None) -> nn.Module:
    """A randomly initialised classifier with one input channel and the task's outputs (or ``num_outputs``).

    ``cfg.model`` names a timm ConvNeXt (``convnext_atto``, ..., or the smaller ``convnext_zepto``) or a MONAI
    2D ResNet of :data:`MONAI_RESNETS` (batch norm: it learns faster from a few thousand crops).
    """
    n = num_outputs or n_outputs(cfg.task)
    if cfg.model in MONAI_RESNETS:
        # MONAI's networks are imported only where one is built (inference runs the TorchScript export)
        from monai.networks.nets import ResNet

        layers, planes = MONAI_RESNETS[cfg.model]
        return ResNet("basic", layers, planes, spatial_dims=2, n_input_channels=1, conv1_t_size=5,
                      conv1_t_stride=1, num_classes=n)
    # timm is imported only where a ConvNeXt is built
    import timm
    from timm.models.convnext import ConvNeXt

    if cfg.model == "convnext_zepto":
        return ConvNeXt(in_chans=1, num_classes=n, depths=(2, 2, 4, 2), dims=(32, 64, 128, 256),
                        drop_path_rate=cfg.drop_path, conv_mlp=True)
    return timm.create_model(cfg.model, pretrained=False, in_chans=1, num_classes=n, drop_path_rate=cfg.drop_path)


class CropDataset(torch.utils.data.Dataset):
    """Crops of labelled structures, augmented when ``train`` is set."""

    def __init__(
        self, images: dict[str, np.ndarray], structures: list[Structure], cfg: GradingConfig, train: bool
    ) -> None:
        self.images, self.structures, self.cfg, self.train = images, structures, cfg, train
        self.rng = random.Random(cfg.seed)

    def __len__(self) -> int:
        return len(self.structures)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.structures[i]
        jit = random_jitter(self.rng, self.cfg.aug_strength) if self.train else None
        x = sample_crop(self.images[s.image_key], s, self.cfg.crop_mm, self.cfg.crop_px, jit, self.cfg.crop_aspect)
        if self.train:
            x = augment_intensity(x, self.rng, self.cfg.aug_strength)
        return torch.from_numpy(to_input(x)), s.grade


def to_input(crop: np.ndarray) -> np.ndarray:
    """Network input from a [0, 1] crop: ``(1, H, W)`` centred on zero."""
    return ((crop - 0.5) / 0.25)[None].astype(np.float32)


def class_weights(grades: list[int], n_classes: int, power: float = 0.5) -> torch.Tensor:
    """Class weights ``frequency ** -power`` (0.5: inverse square root), normalised to mean 1 over the samples."""
    counts = np.bincount(np.asarray(grades, dtype=int), minlength=n_classes).astype(np.float64)
    w = np.maximum(counts, 1.0) ** -power
    w = w / (w[np.asarray(grades, dtype=int)].mean())
    return torch.tensor(w, dtype=torch.float32)


def loss_fn(
    task: str, logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, smoothing: float, ordinal: float = 0.0
):
    """Class-balanced loss: BCE for vertebrae (positive = ``v2``), cross-entropy for discs.

    With ``ordinal > 0`` the disc loss adds ``ordinal`` times the squared error of the expected grade over the
    ordinal grades v1-v4 (softmax restricted to them) for discs graded v1-v4, so that near misses cost less
    than far ones.
    """
    if task == "vertebra":
        t = y.float() * (1 - smoothing) + smoothing / 2
        w = weights[y]
        return (F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none") * w).mean()
    loss = F.cross_entropy(logits, y, weight=weights, label_smoothing=smoothing)
    keep = y < 4
    if ordinal > 0 and bool(keep.any()):
        p4 = torch.softmax(logits[keep, :4], dim=1)
        expected = p4 @ torch.arange(4, dtype=p4.dtype)
        loss = loss + ordinal * F.mse_loss(expected, y[keep].to(p4.dtype))
    return loss


def probabilities(task: str, logits: torch.Tensor) -> torch.Tensor:
    """``(N,)`` P(v2) for vertebrae, ``(N, 5)`` grade probabilities for discs."""
    return torch.sigmoid(logits[:, 0]) if task == "vertebra" else torch.softmax(logits, dim=1)


def task_metrics(task: str, y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Quick validation metrics used during training and by the search (AUC / quadratic kappa)."""
    # scikit-learn takes about a second to import: only fitting and metrics need it
    from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

    if task == "vertebra":
        auc = roc_auc_score(y, prob) if len(set(y.tolist())) > 1 else float("nan")
        return {"auc": float(auc)}
    pred = prob.argmax(1)
    ordinal = disc_grade(prob, "ordinal")
    return {
        "quadratic_kappa": float(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(5)))),
        "quadratic_kappa_ordinal": float(cohen_kappa_score(y, ordinal, weights="quadratic", labels=list(range(5)))),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(5)), zero_division=0)),
    }


def objective_value(task: str, m: dict[str, float]) -> float:
    """The single number a search maximises for a task."""
    return m["auc"] if task == "vertebra" else m["quadratic_kappa"]


def warmup_cosine(opt: torch.optim.Optimizer, warm_steps: int,
                  total_steps: int | Callable[[], int]) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warm_steps`` then cosine decay to 0 at ``total_steps`` (stepped once per batch).

    ``total_steps`` may be a callable, read at every step: a horizon shortened during training (a time budget).
    """
    warm = max(1, warm_steps)
    horizon = total_steps if callable(total_steps) else (lambda: total_steps)

    def factor(i: int) -> float:
        total = max(1, horizon())
        return min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def seed_loader_worker(worker_id: int) -> None:
    """``worker_init_fn`` of a training loader: the worker's copy of the dataset reseeds its augmentation.

    Each worker would otherwise repeat the others' draws. The dataset names how (``reseed(seed)``); the seed is
    torch's per-worker one, drawn from the loader's generator.
    """
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(info.seed)


def train_classifier(
    cfg: GradingConfig,
    images: dict[str, np.ndarray],
    train: list[Structure],
    val: list[Structure] | None = None,
    progress: bool = True,
    trial=None,
    max_minutes: float = 0.0,
) -> tuple[nn.Module, list[dict]]:
    """Train one classifier (AdamW, warm-up + cosine schedule, fixed number of epochs).

    From scratch, or from a self-supervised backbone when ``cfg.init`` names one.

    Args:
        cfg: Hyper-parameters.
        images: Normalised slices by key.
        train: Labelled training structures of ``cfg.task``.
        val: Optional validation structures, scored after each epoch.
        progress: Show a progress bar.
        trial: Optional Optuna trial: the validation objective is reported each epoch and the trial pruned
            when the pruner says so.
        max_minutes: Stop early after this many minutes (0: no limit).

    Returns:
        ``(model in eval mode, history)``; the history has the loss and validation metrics per epoch.

    """
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_classifier(cfg)
    if cfg.init:
        load_backbone(model, cfg.init)
    ds = CropDataset(images, train, cfg, train=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(ds) > cfg.batch_size,
                                     generator=torch.Generator().manual_seed(cfg.seed))
    weights = class_weights([s.grade for s in train], 2 if cfg.task == "vertebra" else 5, cfg.class_weight_power)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, len(dl), cfg.epochs * len(dl))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True
    ) if cfg.ema > 0 else None
    mix_rng = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    t0 = time.time()
    bar = tqdm(range(cfg.epochs), desc=f"{cfg.task} epochs", disable=not progress, leave=False)
    for ep in bar:
        model.train()
        tot, n = 0.0, 0
        for x, y in dl:
            if cfg.mixup > 0:
                lam = float(mix_rng.beta(cfg.mixup, cfg.mixup))
                perm = torch.from_numpy(mix_rng.permutation(len(y)))
                logits = model(lam * x + (1 - lam) * x[perm])
                loss = lam * loss_fn(cfg.task, logits, y, weights, cfg.label_smoothing, cfg.ordinal_weight) \
                    + (1 - lam) * loss_fn(cfg.task, logits, y[perm], weights, cfg.label_smoothing, cfg.ordinal_weight)
            else:
                loss = loss_fn(cfg.task, model(x), y, weights, cfg.label_smoothing, cfg.ordinal_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            tot += loss.item() * len(y)
            n += len(y)
        rec = {"epoch": ep + 1, "loss": tot / max(n, 1)}
        if val:
            prob = predict_structures([ema.module if ema is not None else model], cfg, images, val)
            rec.update(task_metrics(cfg.task, np.array([s.grade for s in val]), prob))
            if trial is not None:
                # Optuna is imported only where a search runs
                import optuna

                trial.report(objective_value(cfg.task, rec), ep)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        history.append(rec)
        bar.set_postfix({k: round(v, 3) for k, v in rec.items() if k != "epoch"})
        if max_minutes and time.time() - t0 > 60 * max_minutes:
            break
    if ema is not None:
        model = ema.module
    model.eval()
    return model, history


@torch.no_grad()
def ensemble_mean(models: list[nn.Module], crops: np.ndarray, to_probs, tta: bool = True, batch: int = 128,
                  stage: str = "classification") -> np.ndarray:
    """Mean of ``to_probs(logits)`` over models (and a superior-inferior flip when ``tta``), ``(N, H, W)`` crops.

    The crops go to the device of the first model (CUDA when the models were loaded there); there the forward
    passes autocast when ``stage`` does (:func:`spinepath.core.precision.forward_context`), the logits cast back to
    float32.
    """
    dev = next(models[0].parameters()).device
    x = torch.from_numpy(np.stack([to_input(c) for c in crops])).to(dev)
    views = [x, torch.flip(x, dims=[2])] if tta else [x]
    acc = None
    for m in models:
        m.eval()
        for v in views:
            with forward_context(dev, stage):
                logits = [m(v[i : i + batch]) for i in range(0, len(v), batch)]
            p = torch.cat([to_probs(z.float()) for z in logits])
            acc = p if acc is None else acc + p
    return (acc / (len(models) * len(views))).cpu().numpy()


def predict_crops(models: list[nn.Module], task: str, crops: np.ndarray, tta: bool = True, batch: int = 128):
    """Mean probabilities over models (and a superior-inferior flip when ``tta``) for ``(N, H, W)`` crops."""
    if len(crops) == 0:
        return np.zeros((0,) if task == "vertebra" else (0, len(DISC_GRADES)), dtype=np.float32)
    return ensemble_mean(models, crops, lambda z: probabilities(task, z), tta, batch)


def predict_structures(
    models: list[nn.Module],
    cfg: GradingConfig,
    images: dict[str, np.ndarray],
    structures: list[Structure],
    jitter: CropJitter | None = None,
    tta: bool = True,
) -> np.ndarray:
    """Probabilities for structures (all of ``cfg.task``) with the given models."""
    crops = np.stack([sample_crop(images[s.image_key], s, cfg.crop_mm, cfg.crop_px, jitter, cfg.crop_aspect)
                      for s in structures]) \
        if structures else np.zeros((0, cfg.crop_px, cfg.crop_px), np.float32)
    return predict_crops(models, cfg.task, crops, tta=tta)


# ------------------------------------------------------------------------------------- the saved model


def load_backbone(model: nn.Module, path: str | Path) -> None:
    """Initialise a grading classifier's backbone from :func:`pretrain` output (the head stays random).

    Raises:
        ValueError: If the file is not a backbone of the same architecture.

    """
    ck = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != "spinepath-backbone-1":
        raise ValueError(f"{path} is not a spinepath pretrained backbone")
    heads = ("head.fc", "fc.")  # the classifier layer of a ConvNeXt / of a MONAI ResNet: stays random
    state = {k: v for k, v in ck["state_dict"].items() if not k.startswith(heads)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another model size
        raise ValueError(f"{path} ({ck.get('model')}) does not match the classifier's architecture") from exc
    if unexpected or any(not k.startswith(heads) for k in missing):
        raise ValueError(f"{path} does not match the classifier ({ck.get('model')}): {missing[:3]} {unexpected[:3]}")

