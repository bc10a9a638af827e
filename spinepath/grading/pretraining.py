"""Self-supervised pretraining of a grading backbone on unlabelled spine crops (SimCLR).

Crops come from every training image in the shared data, without grades: the spark_midsag training slices
(at their vertebra and disc centres) and the sagittal slices of the chu_t2, spineweb_vb and ivd_t2 training
volumes (at the mask centroids and between neighbouring bodies); with ``spider`` also the spider_midsag T1
and T2 images of the training and selection patients, at the discs the product finds (their grades unread).
The backbone is a ConvNeXt (the spark grader's) or a MONAI ResNet (the SPIDER grader's). Two augmented views
of each crop (the grading augmentation: rotation, scale, shift, superior-inferior flip, gamma, bias field,
noise) are pulled together by the NT-Xent loss. The backbone then initialises the grading classifiers
(``GradingConfig.init``) or the SPIDER disc network (``SpiderConfig.init``). Validation studies of
``configs/split.json`` are never used.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from spinepath.core.files import read_npz_xz, save_torch, write_npz_xz
from spinepath.data.datasets import load_spark, load_volume_index
from spinepath.data.split import is_validation
from spinepath.grading.classifier import MONAI_RESNETS, GradingConfig, build_classifier, to_input, warmup_cosine
from spinepath.grading.crops import (
    JITTER_LOG_SCALE,
    JITTER_SHIFT_MM,
    Structure,
    augment_intensity,
    local_axes,
    random_jitter,
    sample_crop,
    spark_structures,
)
from spinepath.transforms import normalise_image

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Options of ``spinepath train pretrain``."""

    data_root: str = "../shared/data"
    out: str = "runs/pretrain/backbone.pt"
    model: str = "convnext_atto"
    crop_mm: float = 84.0
    crop_px: int = 64
    epochs: int = 30
    crops_per_epoch: int = 4096
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    temperature: float = 0.2
    aug_strength: float = 1.0
    intensity_strength: float = 1.0  # times aug_strength for the views' intensity changes (the geometry's stays)
    slice_step: int = 2
    spider: bool = False  # also the spider_midsag training + selection images (discs found by the product)
    spider_patients: int = 0  # at most this many of those patients (0: all; quick runs)
    max_minutes: float = 0.0  # stop after the epoch that passes this (the schedule stays the asked epochs')
    time_budget: float = 0.0  # minutes: the epochs (and the cosine schedule) cut to those that fit, timed on epoch 2
    num_threads: int = 0
    seed: int = 0
    device: str = "cpu"  # where the network trains (the crops are cut on the CPU); the backbone is saved on the CPU
    workers: int = 0  # processes cutting the views (0: in the main process, reproducible on the CPU)
    pack: str = ""  # read the images and positions from this pack (save_pretrain_pack) instead of data_root
    quiet: bool = False


def volume_structures(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], key: str,
                      slice_step: int = 2) -> tuple[dict[str, np.ndarray], list[Structure]]:
    """Unlabelled structures on the sagittal slices of a 3D case (axes S->I, A->P, lateral).

    Per slice with at least two labelled bodies/discs: their centroids, and the midpoints between neighbours.
    """
    images, out = {}, []
    labels = [v for v in np.unique(mask) if v]
    for k in range(0, image.shape[2], slice_step):
        m = mask[:, :, k]
        cents = [np.argwhere(m == v).mean(0) for v in labels if np.any(m == v)]
        if len(cents) < 2:
            continue
        c = np.array(sorted(cents, key=lambda x: x[0]))
        mids = (c[1:] + c[:-1]) / 2
        allc = np.array(sorted([*c, *mids], key=lambda x: x[0]))
        axes = local_axes(allc)
        sk = f"{key}/{k}"
        images[sk] = normalise_image(image[:, :, k])
        out += [Structure(sk, "any", "", (float(p[0]), float(p[1])), (float(a[0]), float(a[1])), float(spacing[0]))
                for p, a in zip(allc, axes)]
    return images, out


def spider_unlabelled(data_root: str | Path, max_patients: int = 0) -> tuple[dict[str, np.ndarray], list[Structure]]:
    """The spider_midsag T1 and T2 images of the training and selection patients at the discs the product finds.

    The detector and naming chain of the committed detector place the discs, as for the SPIDER grader's
    training (:func:`spinepath.grading.spider_training.study_samples`); no grade is read and the validation
    patients are left out. ``max_patients``: the first N of the others (0: all).
    """
    # the chain (detector, MONAI) is imported only where SPIDER images are asked for
    from spinepath.core.paths import resolve_model_path
    from spinepath.detection.predictor import VertebraDetector
    from spinepath.grading.spider_training import collect, training_studies

    studies = training_studies(data_root, max_patients)
    images, samples = collect(studies, VertebraDetector.load(resolve_model_path(None)), progress=False)
    return images, [s.structure for s in samples]


def collect_unlabelled(data_root: str | Path, slice_step: int = 2, spider: bool = False, spider_patients: int = 0
                       ) -> tuple[dict[str, np.ndarray], list[Structure]]:
    """Images and structure positions of all training data (no grades used); SPIDER's too with ``spider``."""
    root = Path(data_root)
    images: dict[str, np.ndarray] = {}
    structs: list[Structure] = []
    if spider:
        images, structs = spider_unlabelled(root, spider_patients)
    for c in load_spark(root / "spark_midsag"):
        if is_validation("spark_midsag", c.case):
            continue
        images[c.case] = normalise_image(c.load_image())
        structs += [Structure(s.image_key, "any", "", s.centre, s.axis, s.spacing_mm) for s in spark_structures(c)]
    for ds in ("chu_t2", "spineweb_vb", "ivd_t2"):
        if not (root / ds).is_dir():
            continue
        for vc in load_volume_index(root / ds):
            if is_validation(ds, vc.case, vc.patient):
                continue
            image, mask, spacing = vc.load()
            im, st = volume_structures(image, mask, spacing, f"{ds}/{vc.case}", slice_step)
            images.update(im)
            structs += st
    return images, structs


#: A view's own log-scale bound (beside the crop jitter's).
VIEW_LOG_SCALE = 0.1
#: Margin kept around a packed image's structures (mm): a view of up to this half-diagonal fits in it.
PACK_MARGIN_MM = 64.0


def view_reach_mm(cfg: PretrainConfig) -> float:
    """How far from its structure's centre a view may reach (mm): half its largest diagonal plus its largest shift.

    The bounds of :func:`_view`'s scale and :func:`~spinepath.grading.crops.random_jitter` (scale, shift) at
    ``cfg.aug_strength``.
    """
    a = max(cfg.aug_strength, 0.0)
    half = cfg.crop_mm / 2 * math.exp(VIEW_LOG_SCALE) * math.exp(JITTER_LOG_SCALE * a)
    return (half + JITTER_SHIFT_MM * a) * math.sqrt(2)


def save_pretrain_pack(path: str | Path, images: dict[str, np.ndarray], structs: list[Structure],
                       margin_mm: float = PACK_MARGIN_MM) -> dict:
    """Write the unlabelled images and positions to one xz-compressed ``.npz`` (for a machine without the data).

    Each image is cut to its structures' bounding box plus ``margin_mm`` and stored in 8 bits (the [0, 1]
    normalised slice); the structures' centres move with the cut. :func:`load_pretrain_pack` reads it back.

    Returns:
        ``{"images", "structures", "bytes"}``.

    """
    arrays: dict[str, np.ndarray] = {}
    meta: list[dict] = []
    by_key: dict[str, list[Structure]] = {}
    for st in structs:
        by_key.setdefault(st.image_key, []).append(st)
    for j, (key, sts) in enumerate(sorted(by_key.items())):
        img = images[key]
        c = np.array([st.centre for st in sts])
        m = margin_mm / sts[0].spacing_mm
        r0, c0 = (max(int(np.floor(v - m)), 0) for v in c.min(0))
        r1, c1 = (int(np.ceil(v + m)) + 1 for v in c.max(0))
        arrays[str(j)] = np.round(np.clip(img[r0:r1, c0:c1], 0, 1) * 255).astype(np.uint8)
        meta.append({"key": key, "spacing_mm": [st.spacing_mm for st in sts],
                     "centre": [[st.centre[0] - r0, st.centre[1] - c0] for st in sts],
                     "axis": [list(st.axis) for st in sts]})
    write_npz_xz(path, arrays, {"margin_mm": margin_mm, "images": meta})
    return {"images": len(meta), "structures": len(structs), "bytes": Path(path).stat().st_size}


def load_pretrain_pack(path: str | Path) -> tuple[dict[str, np.ndarray], list[Structure], float]:
    """The images, structures and margin (mm) of a :func:`save_pretrain_pack` file."""
    z, meta = read_npz_xz(path)
    images, structs = {}, []
    for j, row in enumerate(meta["images"]):
        images[row["key"]] = z[str(j)].astype(np.float32) / 255
        structs += [Structure(row["key"], "any", "", (float(c[0]), float(c[1])), (float(a[0]), float(a[1])),
                              float(sp)) for c, a, sp in zip(row["centre"], row["axis"], row["spacing_mm"])]
    return images, structs, float(meta["margin_mm"])


class _ViewBatches(torch.utils.data.IterableDataset):
    """Endless batches of two views per sampled structure, cut in data-loader processes (``workers`` > 0)."""

    def __init__(self, images: dict[str, np.ndarray], structs: list[Structure], cfg: PretrainConfig) -> None:
        self.images, self.structs, self.cfg = images, structs, cfg

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.cfg.seed * 1000 + (info.id if info else 0))
        while True:
            yield _batch(self.images, self.structs, self.cfg, rng)


def _batch(images: dict[str, np.ndarray], structs: list[Structure], cfg: PretrainConfig,
           rng: random.Random) -> torch.Tensor:
    """``(2B, 1, px, px)``: first views of B sampled structures, then their second views."""
    batch = rng.sample(structs, min(cfg.batch_size, len(structs)))
    v1 = [_view(images[s.image_key], s, cfg, rng) for s in batch]
    v2 = [_view(images[s.image_key], s, cfg, rng) for s in batch]
    return torch.from_numpy(np.stack(v1 + v2))


class SimCLR(nn.Module):
    """Backbone (timm ConvNeXt or MONAI ResNet, 1 channel, no classifier) + a two-layer projection head."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.backbone = build_classifier(GradingConfig(model=model, task="vertebra"))
        if model in MONAI_RESNETS:
            d = self.backbone.fc.in_features
            self.backbone.fc = nn.Identity()
        else:
            self.backbone.reset_classifier(0)
            d = self.backbone.num_features
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised projections of a batch of crops."""
        return F.normalize(self.head(self.backbone(x)), dim=1)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent loss of ``2N`` normalised embeddings where rows ``i`` and ``i + N`` are the two views."""
    n = z.shape[0] // 2
    sim = z @ z.T / temperature
    sim.fill_diagonal_(-1e9)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def _view(image: np.ndarray, s: Structure, cfg: PretrainConfig, rng: random.Random) -> np.ndarray:
    scale = math.exp(rng.uniform(-VIEW_LOG_SCALE, VIEW_LOG_SCALE))
    x = sample_crop(image, s, cfg.crop_mm * scale, cfg.crop_px, random_jitter(rng, cfg.aug_strength))
    return to_input(augment_intensity(x, rng, cfg.aug_strength * cfg.intensity_strength))


def pretrain(cfg: PretrainConfig) -> dict:
    """Run the pretraining; writes the backbone state dict (``cfg.out``) and a JSON history beside it."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.pack:
        images, structs, margin = load_pretrain_pack(cfg.pack)
        if view_reach_mm(cfg) > margin:
            raise ValueError(f"{cfg.pack}: its {margin:g} mm margin is narrower than a {cfg.crop_mm:g} mm view "
                             f"reaches ({view_reach_mm(cfg):.0f} mm); pack with a wider margin")
    else:
        images, structs = collect_unlabelled(cfg.data_root, cfg.slice_step, cfg.spider, cfg.spider_patients)
    log.info("pretraining on %d structures in %d images", len(structs), len(images))
    dev = torch.device(cfg.device)
    model = SimCLR(cfg.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, cfg.crops_per_epoch // cfg.batch_size)
    epochs = [cfg.epochs]  # a time budget shortens it after the second epoch; the schedule reads it every step
    sched = warmup_cosine(opt, steps_per_epoch, lambda: epochs[0] * steps_per_epoch)
    out = Path(cfg.out)
    history = []
    # views cut in loader processes where asked (a GPU outruns one process); else here, from ``rng`` (reproducible)
    batches = iter(torch.utils.data.DataLoader(_ViewBatches(images, structs, cfg), batch_size=None,
                                               num_workers=cfg.workers, persistent_workers=True,
                                               prefetch_factor=4)) if cfg.workers else None
    t0 = time.time()
    bar = tqdm(total=cfg.epochs, desc="pretrain epochs", disable=cfg.quiet)
    for ep in range(cfg.epochs):
        if ep >= epochs[0]:
            break
        t_epoch = time.time()
        model.train()
        losses = []
        for _ in range(steps_per_epoch):
            x = (next(batches) if batches is not None else _batch(images, structs, cfg, rng)).to(dev)
            loss = nt_xent(model(x), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": ep + 1, "loss": float(np.mean(losses)), "minutes": (time.time() - t0) / 60})
        if not cfg.quiet:
            tqdm.write(json.dumps(history[-1]))
        save_torch({"format": "spinepath-backbone-1", "model": cfg.model, "config": asdict(cfg),
                    "state_dict": {k: v.cpu() for k, v in model.backbone.state_dict().items()},
                    "history": history}, out)
        bar.update()
        if cfg.time_budget and ep == 1:
            fit = 2 + int((60 * cfg.time_budget - (time.time() - t0)) / max(time.time() - t_epoch, 1e-3))
            if fit < epochs[0]:
                log.info("pretraining: %d epochs fit in %.1f min (of %d)", fit, cfg.time_budget, cfg.epochs)
                epochs[0] = max(fit, 2)
                bar.total = epochs[0]
        if cfg.max_minutes and (time.time() - t0) / 60 > cfg.max_minutes:
            break
    bar.close()
    return {"out": str(out), "structures": len(structs), "images": len(images), "history": history}


