"""Training of the vertebral-body detector on the shared real data.

Training slices: chu_t2 and spineweb_vb training cases (every lateral slice that shows a body), plus
spark_midsag training images with boxes derived from the labelled centres. The best epoch is chosen on the
*selection* split (training patients held out of training, ``configs/split.json``) and the chosen model is then
measured once on the *validation* split, which chose nothing. Both give the clinical 4 mm slices of their volumes
and their spark images, scored per slice as in ``spinepath evaluate detection`` (without 3D grouping, to keep
epochs fast).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from spinepath.core.files import atomic_file
from spinepath.core.geometry import spark_fov_spacing
from spinepath.data.datasets import (
    Slice2D,
    clinical_slice_indices,
    iter_volume_slices,
    load_spark,
    load_volume_index,
    spark_slice,
)
from spinepath.data.spider import load_spider_midsag, load_spider_seg, spider_seg_slices
from spinepath.data.split import PARTS, load_split, split_part
from spinepath.detection.grouping import group_and_name_with_evidence
from spinepath.detection.network import DetectorConfig
from spinepath.detection.predictor import VertebraDetector
from spinepath.evaluation.matching import match_slice
from spinepath.transforms import intensity_range, to_grid

log = logging.getLogger(__name__)

#: Boxes whose cross-section is below this fraction of the body's largest are not training targets.
TRAIN_MIN_FRACTION = 0.35


@dataclass
class TrainConfig:
    """Training options (see ``configs/detection_train.json``)."""

    data_root: str = "../shared/data"
    out_dir: str = "runs/detection"
    epochs: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patch: int = 192
    slice_step: int = 2
    max_minutes: float = 0.0
    max_train_cases: int = 0
    val_max_cases: int | None = None  # selection / validation subset per dataset; None: as max_train_cases
    val_every: int = 1
    seed: int = 0
    num_threads: int = 0
    quiet: bool = False
    resume: bool = True
    init_from: str = ""
    device: str = "cpu"
    freeze_bn: bool = False  # keep batch-norm statistics fixed (fine-tuning on few images)
    report_validation: bool = True  # measure the chosen best.pt on the validation split at the end
    pseudo_t1_from: str = ""  # detector whose spider_midsag T2 boxes become T1 pseudo-labels ("" = none)
    pseudo_with_t2: bool = False  # the same patients' T2 images with those boxes too


@dataclass
class GridSample:
    """A slice resampled to the detector grid with its targets (grid pixels)."""

    image: torch.Tensor  # (1, H, W) in [0, 1]
    boxes: np.ndarray
    classes: np.ndarray
    span: tuple[float, float] | None
    spark: bool
    key: str
    ignore: np.ndarray  # per box: cross-section < 50% of the body's largest (not scored in validation)


def _to_grid_sample(s: Slice2D, cfg: DetectorConfig, lo_hi: tuple[float, float], min_fraction: float) -> GridSample:
    x, (fr, fc) = to_grid(s.image, s.spacing, cfg, lo_hi)
    keep = s.area_fraction >= min_fraction
    boxes = s.boxes[keep] * np.array([fr, fc, fr, fc], dtype=np.float32)
    span = (s.span[0] * fr, s.span[1] * fr) if s.span else None
    ignore = s.area_fraction[keep] < 0.5
    if s.derived is not None:
        ignore |= s.derived[keep]
    return GridSample(
        x, boxes, s.classes[keep], span, s.dataset == "spark_midsag", f"{s.dataset}/{s.case}/{s.index}", ignore
    )


def collect_slices(
    data_root: str | Path, part: str, split: dict | None = None, slice_step: int = 1, max_cases: int = 0
) -> list[Slice2D]:
    """Training, selection or validation slices of chu_t2, spineweb_vb, spark_midsag and spider_seg.

    Selection and validation volumes give their clinical 4 mm slices; training volumes every ``slice_step``-th
    slice with a body. Level names of spineweb_vb are the inferred ones (lowest = S1) so the S1 class can be
    learned. spider_seg gives every slice of its patients, with the derived S1 box (:mod:`spinepath.data.spider`)
    as a target that is not scored; it is skipped when the folder is absent.

    Args:
        data_root: The shared data folder.
        part: ``"train"``, ``"selection"`` or ``"validation"`` (``"val"``): a part of the split
            (:func:`spinepath.data.split.split_part`).
        split: The split (default ``configs/split.json``).
        slice_step: Every n-th lateral slice of the training volumes.
        max_cases: Cases per dataset (4 times as many spark images); 0 = all.

    """
    root = Path(data_root)
    split = split or load_split()
    part = "validation" if part == "val" else part
    if part not in PARTS:
        raise ValueError(f"unknown split part {part!r}; expected one of {PARTS}")
    want_val = part != "train"  # scored like the evaluation: clinical slices, no labels used for the spacing
    out: list[Slice2D] = []
    for ds in ("chu_t2", "spineweb_vb"):
        cases = [c for c in load_volume_index(root / ds) if split_part(ds, c.case, c.patient, split) == part]
        if max_cases:
            cases = cases[:max_cases]
        for c in cases:
            n = c.n_slices
            idx = clinical_slice_indices(n) if want_val else list(range(0, n, slice_step))
            for s in iter_volume_slices(c, idx, inferred=True):
                # lateral slices without any body are kept as negatives (every 2nd of them)
                if want_val or len(s.boxes) or s.index % (2 * slice_step) == 0:
                    out.append(s)
    spark = [
        c for c in load_spark(root / "spark_midsag") if split_part("spark_midsag", c.case, split=split) == part
    ]
    if max_cases:
        spark = spark[: max_cases * 4]
    for c in spark:
        s = spark_slice(c, with_s1=True) if not want_val else spark_slice(c, spark_fov_spacing(c.size_hw))
        out.append(s)
    if (root / "spider_seg" / "index.json").is_file():
        spider = [c for c in load_spider_seg(root / "spider_seg")
                  if split_part("spider_seg", c.patient, c.patient, split) == part]
        for c in spider[: max_cases or None]:
            out += spider_seg_slices(c)
    return out


def _volume_ranges(slices: list[Slice2D], cfg: DetectorConfig) -> dict[str, tuple[float, float]]:
    """Normalisation range per case (volume-wide for 3D cases, as at inference)."""
    groups: dict[str, list[np.ndarray]] = {}
    for s in slices:
        groups.setdefault(f"{s.dataset}/{s.case}", []).append(s.image)
    return {k: intensity_range(np.stack(v), cfg.percentiles) for k, v in groups.items()}


def to_grid_samples(slices: list[Slice2D], cfg: DetectorConfig, min_fraction: float) -> list[GridSample]:
    """Resample slices to the detector grid once (cached in memory for the epochs)."""
    ranges = _volume_ranges(slices, cfg)
    return [_to_grid_sample(s, cfg, ranges[f"{s.dataset}/{s.case}"], min_fraction) for s in slices]


#: T1 pseudo-labels: the bodies found on T1 and on T2 must agree within this median offset (mm).
PSEUDO_T1_MAX_OFFSET_MM = 3.0


def t1_pseudo_slices(data_root: str | Path, detector: VertebraDetector, part: str = "train",
                     max_offset_mm: float = PSEUDO_T1_MAX_OFFSET_MM, progress: bool = False,
                     cases: list[str] | None = None, with_t2: bool = False) -> list[Slice2D]:
    """spider_midsag T1 images of ``part``'s patients with the boxes and names the detector gives their T2.

    A patient's T1 and T2 are separate acquisitions of one session; only those with the same matrix and
    pixel spacing are used, and only when the T2 is anchored on S1 and the bodies found on both sequences
    (matched nearest first) lie within ``max_offset_mm`` of each other in the median (at least 3 matched): then
    the T2 boxes, which the detector finds far more completely, are the T1 targets. Below the T2's S1 the
    sacrum is background; above its highest box the image is blanked (``span``). ``cases`` restricts the
    patients (default: every patient of ``part``). ``with_t2`` adds each kept patient's T2 image with the same
    targets (self-training on these scanners' T2, so the T1 images do not pull the T2 anchor away).
    """
    root = Path(data_root) / "spider_midsag"
    out: list[Slice2D] = []
    studies = [s for s in load_spider_midsag(root) if split_part("spider_midsag", s.patient, s.patient) == part
               and s.sequences == ["t1", "t2"] and s.spacing.get("t1") == s.spacing.get("t2")
               and (cases is None or s.patient in cases)]
    for s in tqdm(studies, desc="T1 pseudo-labels", disable=not progress):
        t1, t2 = s.load_image("t1"), s.load_image("t2")
        if t1.shape != t2.shape:
            continue
        found = {}
        for seq, img in (("t1", t1), ("t2", t2)):
            found[seq] = group_and_name_with_evidence(detector.predict([img], s.spacing[seq]), img.shape)
        (v1, _), (v2, naming2) = found["t1"], found["t2"]
        if naming2 is None or naming2.anchor != "S1" or len(v1) < 3:
            continue
        c1 = np.array([v.centre for v in v1])
        c2 = np.array([v.centre for v in v2])
        d = np.linalg.norm(c1[:, None] - c2[None], axis=2) * s.spacing["t1"][0]
        r, c = linear_sum_assignment(d)
        if len(r) < 3 or float(np.median(d[r, c])) > max_offset_mm:
            continue
        boxes = np.array([v.boxes[0] for v in v2], dtype=np.float32).reshape(-1, 4)
        for seq, img in (("t1", t1), ("t2", t2))[: 2 if with_t2 else 1]:
            out.append(Slice2D(image=img, spacing=s.spacing[seq], boxes=boxes.copy(), levels=[v.level for v in v2],
                               area_fraction=np.ones(len(boxes), np.float32), case=s.patient,
                               dataset=f"spider_midsag_{seq}", span=(float(boxes[:, 0].min()), float(img.shape[0])),
                               spacing_known=True, derived=np.ones(len(boxes), bool)))
    return out


# ------------------------------------------------------------------------------------------- augmentation
def augment(sample: GridSample, patch: int, rng: random.Random) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """MRI-style augmentation: scale, crop/pad to ``patch``, blanking of unlabelled anatomy, intensity.

    Scale is wider for spark_midsag, whose pixel spacing is an estimate. Anatomy outside the labelled span
    (e.g. thoracic levels above T11 in chu_t2, the sacrum below L5) is blanked so that unlabelled vertebrae
    are never taught as background.

    Hand-written rather than MONAI's ``RandAffined`` / ``RandBiasFieldd`` / ``RandGaussianNoised`` /
    ``RandAdjustContrastd``: those draw from their own random states with other parameterisations (a
    polynomial bias field, a centred affine grid), so a seeded training run would no longer reproduce the
    committed detector's; and the box-aware crop (keeping the labelled boxes in the patch) has no MONAI
    counterpart for 2D boxes with unlabelled-span blanking.
    """
    x = sample.image.clone()
    boxes = sample.boxes.copy()
    _, h, w = x.shape
    if sample.span is not None:
        m_top, m_bot = rng.uniform(2, 6), rng.uniform(2, 6)
        r0, r1 = max(0, int(sample.span[0] - m_top)), min(h, int(math.ceil(sample.span[1] + m_bot)))
        x[:, :r0] = 0
        x[:, r1:] = 0
    s = rng.uniform(0.8, 1.25) if sample.spark else rng.uniform(0.9, 1.1)
    sr, sc = s * rng.uniform(0.95, 1.05), s * rng.uniform(0.95, 1.05)
    nh, nw = max(16, round(h * sr)), max(16, round(w * sc))
    x = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    boxes = boxes * np.array([nh / h, nw / w, nh / h, nw / w], dtype=np.float32)
    # random crop/pad to patch x patch; keep the labelled boxes inside when possible
    canvas = torch.zeros((1, patch, patch))
    if len(boxes):
        lo_r, hi_r = boxes[:, 2].max() - patch, boxes[:, 0].min()
        lo_c, hi_c = boxes[:, 3].max() - patch, boxes[:, 1].min()
    else:
        lo_r, hi_r, lo_c, hi_c = 0, nh - patch, 0, nw - patch

    def pick(lo: float, hi: float, n: int) -> int:
        a, b = min(lo, hi), max(lo, hi)
        a, b = max(a, min(0, n - patch)), min(b, max(0, n - patch))
        return int(round(rng.uniform(a, b))) if b >= a else int(round((a + b) / 2))

    or_, oc = pick(lo_r, hi_r, nh), pick(lo_c, hi_c, nw)
    src_r0, src_c0 = max(0, or_), max(0, oc)
    dst_r0, dst_c0 = max(0, -or_), max(0, -oc)
    hh = min(nh - src_r0, patch - dst_r0)
    ww = min(nw - src_c0, patch - dst_c0)
    canvas[:, dst_r0 : dst_r0 + hh, dst_c0 : dst_c0 + ww] = x[:, src_r0 : src_r0 + hh, src_c0 : src_c0 + ww]
    boxes = boxes - np.array([or_, oc, or_, oc], dtype=np.float32)
    # keep boxes mostly inside the patch, clip them
    cl = np.clip(boxes, 0, patch)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    carea = (cl[:, 2] - cl[:, 0]) * (cl[:, 3] - cl[:, 1])
    keep = carea >= 0.6 * np.maximum(area, 1e-6)
    classes = sample.classes[keep]
    boxes = cl[keep]
    # intensity: gamma, contrast, smooth bias field, noise
    x = canvas
    x = x.clamp(0, 1) ** rng.uniform(0.7, 1.5)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, patch), torch.linspace(-1, 1, patch), indexing="ij")
    bias = 1 + rng.uniform(-0.25, 0.25) * yy + rng.uniform(-0.25, 0.25) * xx + rng.uniform(-0.15, 0.15) * xx * yy
    x = x * bias * rng.uniform(0.8, 1.2)
    x = x + torch.randn_like(x) * rng.uniform(0.0, 0.04)
    return x.clamp_(0, 1.2), boxes, classes


# -------------------------------------------------------------------------------------------- validation
def validate(model: VertebraDetector, samples: list[GridSample]) -> dict[str, float]:
    """Per-slice mean IoU / recall / precision on grid samples (reference boxes >= 50% cross-section)."""
    model.detector.eval()
    ious: list[float] = []
    tp = fp = 0
    with torch.no_grad():
        for i in range(0, len(samples), 8):
            chunk = samples[i : i + 8]
            res = model.detector([s.image.to(model.device) for s in chunk])
            for s, r in zip(chunk, res):
                det = model._postprocess(r, (1.0, 1.0))
                m = match_slice(det.boxes, s.boxes, s.ignore)
                ious += m["ious"]
                tp += m["tp"]
                fp += m["fp"]
    n_ref = len(ious)
    return {
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "recall_at_iou50": tp / max(n_ref, 1),
        "precision_at_iou50": tp / max(tp + fp, 1),
    }


def plot_history(history: list[dict], path: Path) -> None:
    """Training curve PNG: loss and validation metrics per epoch."""
    # matplotlib is imported only where a figure is drawn (Agg backend set first)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["loss"] for h in history], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    for k in ("mean_iou", "recall_at_iou50", "precision_at_iou50"):
        ax[1].plot(ep, [h.get(k, np.nan) for h in history], label=k)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    ax[1].set_title("selection split (per slice)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- training
def split_samples(data_root: str | Path, cfg: DetectorConfig, part: str, max_cases: int = 0) -> list[GridSample]:
    """The fixed ``"selection"`` or ``"validation"`` set of the split, on the detector grid.

    ``max_cases`` per dataset for quick runs (0: all).
    """
    return to_grid_samples(collect_slices(data_root, part, max_cases=max_cases), cfg, 0.0)


def validation_samples(data_root: str | Path, cfg: DetectorConfig, max_cases: int = 0) -> list[GridSample]:
    """The fixed validation set (reported only, never chosen on); see :func:`split_samples`."""
    return split_samples(data_root, cfg, "validation", max_cases)


def selection_samples(data_root: str | Path, cfg: DetectorConfig, max_cases: int = 0) -> list[GridSample]:
    """The fixed selection set (training patients held out to choose models on); see :func:`split_samples`."""
    return split_samples(data_root, cfg, "selection", max_cases)


def _freeze_batch_norm(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def train(tc: TrainConfig, dc: DetectorConfig | None = None, extra_train: list[Slice2D] | None = None) -> dict:
    """Train the detector; keeps ``best.pt`` (by selection-split mean IoU), ``last.pt`` and curves in ``out_dir``.

    The chosen ``best.pt`` is then measured on the validation split (``meta["val_per_slice"]``, also returned as
    ``best_val_per_slice``); that split chooses nothing.

    Args:
        tc: Training options.
        dc: Detector configuration (default :class:`DetectorConfig`).
        extra_train: More training slices (e.g. annotators' corrections), added to the base data.

    Returns:
        The best selection mean IoU, its validation metrics and the paths.

    """
    dc = dc or DetectorConfig()
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(tc.seed)

    train_slices = collect_slices(tc.data_root, "train", slice_step=tc.slice_step, max_cases=tc.max_train_cases)
    train_slices += extra_train or []
    if tc.pseudo_t1_from:
        pseudo = t1_pseudo_slices(tc.data_root, VertebraDetector.load(tc.pseudo_t1_from), progress=not tc.quiet,
                                  with_t2=tc.pseudo_with_t2)
        log.info("T1 pseudo-labelled images: %d", len(pseudo))
        train_slices += pseudo
    train_s = to_grid_samples(train_slices, dc, TRAIN_MIN_FRACTION)
    n_eval = tc.max_train_cases if tc.val_max_cases is None else tc.val_max_cases
    sel_s = selection_samples(tc.data_root, dc, n_eval)
    log.info("training slices: %d, selection slices: %d", len(train_s), len(sel_s))

    model = VertebraDetector.new(dc).to(tc.device)
    if tc.init_from:  # fine-tune from a saved detector (same configuration)
        init = VertebraDetector.load(tc.init_from)
        model.detector.network.load_state_dict(init.detector.network.state_dict())
        log.info("initialised from %s", tc.init_from)
    opt = torch.optim.AdamW(model.detector.network.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(len(train_s) / tc.batch_size)
    total = tc.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=total, pct_start=0.1)
    history: list[dict] = []
    best = -1.0
    start_epoch = 0
    last = out / "last.pt"
    if tc.resume and last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        model.detector.network.load_state_dict(ck["network"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        history, best, start_epoch = ck["history"], ck["best"], ck["epoch"] + 1
        log.info("resumed at epoch %d", start_epoch)
    t0 = time.time()
    for epoch in range(start_epoch, tc.epochs):
        model.detector.train()
        if tc.freeze_bn:
            _freeze_batch_norm(model.detector.network)
        order = list(range(len(train_s)))
        rng.shuffle(order)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{tc.epochs}", disable=tc.quiet, leave=False)
        for b in bar:
            idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]
            imgs, targets = [], []
            for i in idx:
                x, bx, cl = augment(train_s[i], tc.patch, rng)
                imgs.append(x.to(tc.device))
                targets.append(
                    {
                        "boxes": torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4).to(tc.device),
                        "labels": torch.as_tensor(cl, dtype=torch.long).to(tc.device),
                    }
                )
            loss_d = model.detector(torch.stack(imgs), targets)
            loss = loss_d["classification"] + loss_d["box_regression"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.detector.network.parameters(), 10.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        rec: dict = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "minutes": (time.time() - t0) / 60}
        if (epoch + 1) % tc.val_every == 0 or epoch + 1 == tc.epochs:
            rec.update(validate(model, sel_s))  # choose on the selection split
            if rec["mean_iou"] > best:
                best = rec["mean_iou"]
                model.meta = {
                    "selection_per_slice": {k: rec[k] for k in ("mean_iou", "recall_at_iou50", "precision_at_iou50")},
                    "epoch": epoch + 1,
                    "train_slices": len(train_s),
                }
                model.save(out / "best.pt")
        history.append(rec)
        if not tc.quiet:
            tqdm.write(json.dumps(rec))
        with atomic_file(last, ".pt") as tmp:
            torch.save(
                {
                    "network": model.detector.network.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "history": history,
                    "best": best,
                    "epoch": epoch,
                },
                tmp,
            )
        (out / "history.json").write_text(json.dumps(history, indent=1))
        plot_history(history, out / "training_curve.png")
        if tc.max_minutes and (time.time() - t0) / 60 > tc.max_minutes:
            log.info("time budget reached after epoch %d", epoch + 1)
            break
    res = {"best_mean_iou": best, "best": str(out / "best.pt"), "history": str(out / "history.json")}
    # the chosen model, measured once on the validation split (which chose nothing)
    if tc.report_validation and (out / "best.pt").is_file():
        chosen = VertebraDetector.load(out / "best.pt", device=tc.device)
        chosen.meta["val_per_slice"] = validate(chosen, validation_samples(tc.data_root, dc, n_eval))
        chosen.save(out / "best.pt")
        res["best_val_per_slice"] = chosen.meta["val_per_slice"]
    return res
