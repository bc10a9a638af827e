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

from spinepath.core.files import atomic_file
from spinepath.data.datasets import load_spark, load_volume_index
from spinepath.data.split import is_validation
from spinepath.grading.classifier import MONAI_RESNETS, GradingConfig, build_classifier, to_input, warmup_cosine
from spinepath.grading.crops import (
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
    max_minutes: float = 0.0
    num_threads: int = 0
    seed: int = 0
    device: str = "cpu"  # where the network trains (the crops are cut on the CPU); the backbone is saved on the CPU
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
    scale = math.exp(rng.uniform(-0.1, 0.1))
    x = sample_crop(image, s, cfg.crop_mm * scale, cfg.crop_px, random_jitter(rng, cfg.aug_strength))
    return to_input(augment_intensity(x, rng, cfg.aug_strength * cfg.intensity_strength))


def pretrain(cfg: PretrainConfig) -> dict:
    """Run the pretraining; writes the backbone state dict (``cfg.out``) and a JSON history beside it."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    images, structs = collect_unlabelled(cfg.data_root, cfg.slice_step, cfg.spider, cfg.spider_patients)
    log.info("pretraining on %d structures in %d images", len(structs), len(images))
    dev = torch.device(cfg.device)
    model = SimCLR(cfg.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, cfg.crops_per_epoch // cfg.batch_size)
    sched = warmup_cosine(opt, steps_per_epoch, cfg.epochs * steps_per_epoch)
    out = Path(cfg.out)
    history = []
    t0 = time.time()
    for ep in tqdm(range(cfg.epochs), desc="pretrain epochs", disable=cfg.quiet):
        model.train()
        losses = []
        for _ in range(steps_per_epoch):
            batch = rng.sample(structs, min(cfg.batch_size, len(structs)))
            v1 = [_view(images[s.image_key], s, cfg, rng) for s in batch]
            v2 = [_view(images[s.image_key], s, cfg, rng) for s in batch]
            x = torch.from_numpy(np.stack(v1 + v2)).to(dev)
            loss = nt_xent(model(x), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": ep + 1, "loss": float(np.mean(losses)), "minutes": (time.time() - t0) / 60})
        if not cfg.quiet:
            tqdm.write(json.dumps(history[-1]))
        with atomic_file(out, ".pt") as tmp:
            torch.save({"format": "spinepath-backbone-1", "model": cfg.model, "config": asdict(cfg),
                        "state_dict": {k: v.cpu() for k, v in model.backbone.state_dict().items()},
                        "history": history}, tmp)
        if cfg.max_minutes and (time.time() - t0) / 60 > cfg.max_minutes:
            break
    return {"out": str(out), "structures": len(structs), "images": len(images), "history": history}


