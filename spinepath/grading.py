"""Per-structure grading: ConvNeXt classifiers on crops around vertebrae and discs.

A crop is sampled around a structure's centre in a frame aligned with the local spine axis (rows run
superior -> inferior along the spine, columns anterior -> posterior), at a fixed physical scale
(``crop_mm`` square, ``crop_px`` pixels). Where the pixel spacing is unknown (spark_midsag) it is estimated
from the gap between neighbouring vertebra centres (:data:`spinepath.data.MEAN_LEVEL_GAP_MM`).

Two tasks share the code:

* ``vertebra``: healthy (``v1``) vs pathological / degenerative (``v2``), one logit;
* ``disc``: grades ``v1`` normal, ``v2`` bulge, ``v3`` protrusion, ``v4`` extrusion, ``v5`` Schmorl's node.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates
from torch import nn
from tqdm.auto import tqdm

from spinepath.data import MEAN_LEVEL_GAP_MM, SparkCase, labels_reversed
from spinepath.files import atomic_file

TASKS = ("vertebra", "disc")
VERTEBRA_GRADES = ("v1", "v2")
DISC_GRADES = ("v1", "v2", "v3", "v4", "v5")
DISC_GRADE_NAMES = ("normal", "bulge", "protrusion", "extrusion", "Schmorl's node")
#: Lumbar levels of spark_midsag, used to map reversed labels to anatomical levels.
_SPARK_VERTEBRAE = ("L1", "L2", "L3", "L4", "L5")
_SPARK_DISCS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
#: Levels the classifiers were trained on (the graded levels of spark_midsag); others are not graded.
GRADED_VERTEBRAE = _SPARK_VERTEBRAE
GRADED_DISCS = _SPARK_DISCS


def n_outputs(task: str) -> int:
    """Number of network outputs for a task (1 logit for vertebrae, 5 classes for discs)."""
    if task not in TASKS:
        raise ValueError(f"unknown grading task {task!r}; expected one of {TASKS}")
    return 1 if task == "vertebra" else len(DISC_GRADES)


# ------------------------------------------------------------------------------------------ structures
@dataclass
class Structure:
    """A vertebra or disc to grade on one 2D slice.

    Attributes:
        image_key: Key of the (normalised) slice in an image dictionary.
        kind: ``"vertebra"`` or ``"disc"``.
        level: Anatomical level name (``"L3"``, ``"L3-L4"``).
        centre: ``(row, col)`` in pixels.
        axis: Unit vector ``(drow, dcol)`` of the local spine axis, pointing inferior.
        spacing_mm: Pixel size in mm (estimated where unknown).
        grade: 0-based grade index, or -1 when unknown.
        case: Study / case identifier.

    """

    image_key: str
    kind: str
    level: str
    centre: tuple[float, float]
    axis: tuple[float, float]
    spacing_mm: float
    grade: int = -1
    case: str = ""


def spacing_from_gap(gap_px: float) -> float:
    """Pixel size (mm) for an image of unknown spacing, from the median vertebra centre gap in pixels."""
    return MEAN_LEVEL_GAP_MM / gap_px if np.isfinite(gap_px) and gap_px > 1 else 1.0


def local_axes(centres: np.ndarray) -> np.ndarray:
    """Unit spine-axis vector at each of a top-down ordered chain of centres ``(N, 2)``.

    The axis at a point is the direction from its upper to its lower neighbour (one-sided at the ends);
    a single point gets the image vertical.
    """
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    out = np.tile([1.0, 0.0], (len(c), 1))
    if len(c) < 2:
        return out
    for i in range(len(c)):
        a, b = c[max(i - 1, 0)], c[min(i + 1, len(c) - 1)]
        d = b - a
        n = np.linalg.norm(d)
        if n > 0:
            out[i] = d / n if d[0] >= 0 else -d / n
    return out


def anatomical_level(level: str, reversed_labels: bool) -> str:
    """Map a spark_midsag level name to the anatomical level (labels run bottom-up in some studies)."""
    if not reversed_labels:
        return level
    for names in (_SPARK_VERTEBRAE, _SPARK_DISCS):
        if level in names:
            return names[len(names) - 1 - names.index(level)]
    return level


def spark_structures(case: SparkCase) -> list[Structure]:
    """All graded vertebrae and discs of a spark_midsag study, at their labelled centres."""
    rev = labels_reversed(case)
    pts = sorted(case.points, key=lambda p: p["xy"][1])
    centres = np.array([[p["xy"][1], p["xy"][0]] for p in pts], dtype=np.float64)
    axes = local_axes(centres)
    sp = spacing_from_gap(case.level_gap_px())
    out = []
    for p, c, a in zip(pts, centres, axes):
        grades = VERTEBRA_GRADES if p["kind"] == "vertebra" else DISC_GRADES
        out.append(
            Structure(
                image_key=case.case,
                kind=p["kind"],
                level=anatomical_level(p["level"], rev),
                centre=(float(c[0]), float(c[1])),
                axis=(float(a[0]), float(a[1])),
                spacing_mm=sp,
                grade=grades.index(p["grade"]) if p.get("grade") in grades else -1,
                case=case.case,
            )
        )
    return out


def chain_structures(
    image_key: str, centres: np.ndarray, levels: list[str], spacing_mm: float, case: str = ""
) -> list[Structure]:
    """Vertebrae at the given top-down centres, plus a disc midway between each pair of neighbouring levels.

    Used at inference, where the structures come from the detector rather than from labels. Only the
    levels the classifiers were trained on are returned (:data:`GRADED_VERTEBRAE`, :data:`GRADED_DISCS`);
    the others only serve as neighbours (the spine axis, the T12-L1 and L5-S1 disc positions).
    """
    from spinepath.levels import VERTEBRA_LEVELS

    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    axes = local_axes(c)
    out = [
        Structure(image_key, "vertebra", lv, (float(p[0]), float(p[1])), (float(a[0]), float(a[1])), spacing_mm,
                  case=case)
        for p, a, lv in zip(c, axes, levels)
        if lv in GRADED_VERTEBRAE
    ]
    for i in range(len(c) - 1):
        a, b = levels[i], levels[i + 1]
        if f"{a}-{b}" in GRADED_DISCS and VERTEBRA_LEVELS.index(b) == VERTEBRA_LEVELS.index(a) + 1:
            m = (c[i] + c[i + 1]) / 2
            ax = (axes[i] + axes[i + 1]) / 2
            ax = ax / max(np.linalg.norm(ax), 1e-6)
            out.append(Structure(image_key, "disc", f"{a}-{b}", (float(m[0]), float(m[1])),
                                 (float(ax[0]), float(ax[1])), spacing_mm, case=case))
    return out


# ------------------------------------------------------------------------------------------------ crops
def normalise_image(image: np.ndarray, lo_hi: tuple[float, float] | None = None) -> np.ndarray:
    """Scale intensities to [0, 1] by the robust range (1st-99.5th percentile of the non-zero pixels)."""
    from spinepath.detection import intensity_range

    lo, hi = lo_hi or intensity_range(image, (1.0, 99.5))
    return np.clip((np.asarray(image, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class CropJitter:
    """A geometric perturbation of a crop (identity by default)."""

    rot_deg: float = 0.0
    scale: float = 1.0
    shift_mm: tuple[float, float] = (0.0, 0.0)
    flip_vertical: bool = False


def sample_crop(
    image: np.ndarray,
    s: Structure,
    crop_mm: float,
    crop_px: int,
    jitter: CropJitter | None = None,
    aspect: float = 1.0,
) -> np.ndarray:
    """Resample a crop around a structure in the spine-aligned frame.

    Args:
        image: Normalised slice ``(rows, cols)``.
        s: The structure.
        crop_mm: Width of the crop (anterior-posterior) in mm.
        crop_px: Side of the output in pixels.
        jitter: Optional rotation / scale / shift / superior-inferior flip.
        aspect: Height (along the spine) over width of the crop in mm; the output stays square.

    Returns:
        ``(crop_px, crop_px)`` float32; outside the image is 0.

    """
    j = jitter or CropJitter()
    a = np.asarray(s.axis, dtype=np.float64)
    t = math.radians(j.rot_deg)
    a = np.array([a[0] * math.cos(t) - a[1] * math.sin(t), a[0] * math.sin(t) + a[1] * math.cos(t)])
    p = np.array([-a[1], a[0]])  # anterior -> posterior for an upright spine displayed anterior-left
    step_v = crop_mm * j.scale / crop_px / s.spacing_mm
    step_u = step_v * aspect
    f = max(1, int(math.ceil(max(step_u, step_v) - 0.25)))  # supersampling: box-average when shrinking
    n = crop_px * f
    grid = np.arange(n) - (n - 1) / 2
    u, v = grid * (step_u / f), grid * (step_v / f)
    if j.flip_vertical:
        u = -u
    c = np.asarray(s.centre, dtype=np.float64) + (j.shift_mm[0] * a + j.shift_mm[1] * p) / s.spacing_mm
    rows = c[0] + u[:, None] * a[0] + v[None, :] * p[0]
    cols = c[1] + u[:, None] * a[1] + v[None, :] * p[1]
    out = map_coordinates(image, [rows, cols], order=1, mode="constant", cval=0.0)
    if f > 1:
        out = out.reshape(crop_px, f, crop_px, f).mean(axis=(1, 3))
    return out.astype(np.float32)


def random_jitter(rng: random.Random, strength: float) -> CropJitter:
    """Geometric augmentation: small rotation, scale, shift and a superior-inferior flip.

    No anterior-posterior flip: the canal is posterior, a flipped crop is not anatomy.
    """
    return CropJitter(
        rot_deg=rng.uniform(-10, 10) * strength,
        scale=math.exp(rng.uniform(-0.15, 0.15) * strength),
        shift_mm=(rng.uniform(-3, 3) * strength, rng.uniform(-3, 3) * strength),
        flip_vertical=rng.random() < 0.5,
    )


def augment_intensity(x: np.ndarray, rng: random.Random, strength: float) -> np.ndarray:
    """MRI intensity augmentation: gamma, contrast/brightness, smooth bias field and Rician-like noise."""
    if strength <= 0:
        return x
    n = x.shape[0]
    g = math.exp(rng.uniform(-0.35, 0.35) * strength)
    x = np.power(np.clip(x, 0, None), g)
    x = x * (1 + rng.uniform(-0.2, 0.2) * strength) + rng.uniform(-0.08, 0.08) * strength
    yy, xx = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    coef = [rng.uniform(-0.15, 0.15) * strength for _ in range(5)]
    bias = np.exp(coef[0] * yy + coef[1] * xx + coef[2] * yy * xx + coef[3] * yy**2 + coef[4] * xx**2)
    x = x * bias
    sd = rng.uniform(0, 0.04) * strength
    if sd > 0:
        nr = np.random.default_rng(rng.randrange(2**31))
        x = np.sqrt((x + nr.normal(0, sd, x.shape)) ** 2 + nr.normal(0, sd, x.shape) ** 2)
    return x.astype(np.float32)


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
    init: str = ""  # pretrained backbone (spinepath.pretrain) to start from; "" = random

    @classmethod
    def from_dict(cls, d: dict) -> GradingConfig:
        """Build from a dict, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: Model sizes the search may pick. ``convnext_zepto`` is a narrower ConvNeXt defined here (timm's
#: smallest named variant is atto); the others are timm's own definitions.
MODEL_SIZES = ("convnext_zepto", "convnext_atto", "convnext_femto")


def build_classifier(cfg: GradingConfig, num_outputs: int | None = None) -> nn.Module:
    """A ConvNeXt (timm) with one input channel and the task's outputs (or ``num_outputs``), randomly initialised."""
    import timm
    from timm.models.convnext import ConvNeXt

    n = num_outputs or n_outputs(cfg.task)
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


def warmup_cosine(opt: torch.optim.Optimizer, warm_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warm_steps`` then cosine decay to 0 at ``total_steps`` (stepped once per batch)."""
    warm, total = max(1, warm_steps), max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    )


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
    import time

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_classifier(cfg)
    if cfg.init:
        from spinepath.pretrain import load_backbone

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
def predict_crops(models: list[nn.Module], task: str, crops: np.ndarray, tta: bool = True, batch: int = 128):
    """Mean probabilities over models (and a superior-inferior flip when ``tta``) for ``(N, H, W)`` crops."""
    if len(crops) == 0:
        return np.zeros((0,) if task == "vertebra" else (0, len(DISC_GRADES)), dtype=np.float32)
    x = torch.from_numpy(np.stack([to_input(c) for c in crops]))
    views = [x, torch.flip(x, dims=[2])] if tta else [x]
    acc = None
    for m in models:
        m.eval()
        for v in views:
            p = torch.cat([probabilities(task, m(v[i : i + batch])) for i in range(0, len(v), batch)])
            acc = p if acc is None else acc + p
    return (acc / (len(models) * len(views))).numpy()


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
@dataclass
class Grader:
    """The trained grading models: an ensemble (e.g. one per cross-validation fold) per task, plus fusion.

    Attributes:
        configs: Hyper-parameters per task.
        models: Networks per task.
        fusion: Per-vertebra fusion model (:class:`spinepath.fusion.FusionModel`) or None.
        disc_decision: How a disc grade is chosen from its probabilities (``"argmax"`` or ``"ordinal"``)
            when there is no disc fusion model.
        disc_fusion: Per-disc fusion model (``kind="disc"``, with its own decision rule) or None.
        meta: Free-form training information.

    """

    configs: dict[str, GradingConfig]
    models: dict[str, list[nn.Module]]
    fusion: object | None = None
    disc_decision: str = "argmax"
    meta: dict = field(default_factory=dict)
    disc_fusion: object | None = None

    @property
    def disc_rule(self) -> str:
        """The disc decision rule in use: the disc fusion model's when there is one."""
        return self.disc_fusion.decision if self.disc_fusion is not None else self.disc_decision

    def predict(self, task: str, images: dict[str, np.ndarray], structures: list[Structure],
                jitter: CropJitter | None = None) -> np.ndarray:
        """Probabilities for structures of one task."""
        return predict_structures(self.models[task], self.configs[task], images, structures, jitter)

    def save(self, path: str | Path, half: bool = True) -> None:
        """Write one file with all networks (fp16 by default), configs and the fusion model."""
        def sd(m: nn.Module) -> dict:
            return {k: (v.half() if half and v.is_floating_point() else v) for k, v in m.state_dict().items()}

        ckpt = {
            "format": "spinepath-grader-1",
            "configs": {t: asdict(c) for t, c in self.configs.items()},
            "state_dicts": {t: [sd(m) for m in ms] for t, ms in self.models.items()},
            "fusion": self.fusion.to_dict() if self.fusion is not None else None,
            "disc_decision": self.disc_decision,
            "disc_fusion": self.disc_fusion.to_dict() if self.disc_fusion is not None else None,
            "meta": self.meta,
        }
        with atomic_file(path, ".pt") as tmp:
            torch.save(ckpt, tmp)

    @classmethod
    def load(cls, path: str | Path) -> Grader:
        """Read a file written by :meth:`save` (networks in float32, eval mode).

        Raises:
            FileNotFoundError: If the file is missing.
            ValueError: If it is not a grader file.

        """
        from spinepath.fusion import FusionModel

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"grading model not found: {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict) or ckpt.get("format") != "spinepath-grader-1":
            raise ValueError(f"{path} is not a spinepath grading model")
        configs = {t: GradingConfig.from_dict(c) for t, c in ckpt["configs"].items()}
        models = {}
        for t, sds in ckpt["state_dicts"].items():
            ms = []
            for sdict in sds:
                m = build_classifier(configs[t])
                m.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sdict.items()})
                ms.append(m.eval())
            models[t] = ms
        fusion = FusionModel.from_dict(ckpt["fusion"]) if ckpt.get("fusion") else None
        dfusion = FusionModel.from_dict(ckpt["disc_fusion"]) if ckpt.get("disc_fusion") else None
        return cls(configs, models, fusion, ckpt.get("disc_decision", "argmax"), ckpt.get("meta", {}), dfusion)


def disc_grade(prob: np.ndarray, decision: str = "argmax") -> np.ndarray:
    """0-based disc grades from ``(N, 5)`` probabilities.

    ``argmax`` takes the most probable grade. ``ordinal`` keeps Schmorl's node (v5) when it is the most
    probable, else rounds the expected grade over v1-v4 (renormalised), which respects the ordinal scale.
    """
    prob = np.asarray(prob, dtype=np.float64).reshape(-1, len(DISC_GRADES))
    am = prob.argmax(1)
    if decision == "argmax":
        return am
    p4 = prob[:, :4] / np.maximum(prob[:, :4].sum(1, keepdims=True), 1e-9)
    exp = np.rint(p4 @ np.arange(4)).astype(int)
    return np.where(am == 4, 4, exp)
