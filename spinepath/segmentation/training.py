"""Training of the segmentation network on the four annotated sources with partial labels (issue 14, item 1).

Split by patient (``configs/split.json``; SPIDER patients on the same side as in the grading issue): the
training part trains, the *selection* part chooses the best epoch (mean Dice of the annotated classes), the
validation part is never read here. Patches of :attr:`SegNetConfig.patch` pixels with MONAI dictionary
augmentation (affine, contrast, bias field, noise); the loss is
:func:`spinepath.segmentation.partial.partial_label_loss` on the full-resolution output plus the deep-supervision
outputs (weights 1, 1/2, 1/4). Writes ``<out>/segmentation.pt`` (fp16, best epoch), ``history.json`` and
``curves.png``; progress with tqdm, quiet on request. On a machine without the shared data (a lent GPU) the
slices come from a pack (:func:`spinepath.segmentation.data.save_slice_pack`); ``device``, loader workers and a
time budget (the cosine schedule shortened to the epochs that fit) serve such a run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from tqdm.auto import tqdm

from spinepath.core.exported import file_digest
from spinepath.core.files import save_torch
from spinepath.core.weights import half_state
from spinepath.data.datasets import load_volume_index
from spinepath.data.spider import load_spider_seg
from spinepath.data.split import split_part
from spinepath.grading.classifier import seed_loader_worker, warmup_cosine
from spinepath.segmentation.data import (
    SegSlice,
    load_slice_pack,
    sacrum_unknown,
    spider_seg_slices,
    volume_seg_slices,
)
from spinepath.segmentation.inference import load_segmenter
from spinepath.segmentation.metrics import case_dice
from spinepath.segmentation.network import (
    FORMAT,
    MeanLogits,
    SegNetConfig,
    build_segnet,
    predict_probabilities,
    to_input,
)
from spinepath.segmentation.partial import partial_label_loss

log = logging.getLogger(__name__)

#: The annotated sources and the folder names in the shared data.
SOURCES = ("spider_seg", "chu_t2", "spineweb_vb", "ivd_t2")
#: Most groups of a source (spider_seg: background, vertebra, disc, canal): batches pad to it.
MAX_GROUPS = 4
#: Deep-supervision weights of the outputs (full resolution first), nnU-Net style.
DS_WEIGHTS = (1.0, 0.5, 0.25)
#: The configuration keys that fix a network's layout (kept when fine-tuning saved weights).
LAYOUT = ("filters", "deep_supr_num", "members")


def load_slices(data_root: str | Path, part: str, step: int = 2, max_cases: int = 0) -> list[SegSlice]:
    """The slices of one part of the split (``train`` / ``selection`` / ``validation``) from every source.

    ``step``: every ``step``-th lateral slice of the 3D volumes (spider_seg keeps all its slices);
    ``max_cases``: at most that many cases per source (0 = all), for quick runs.
    """
    root = Path(data_root)
    out: list[SegSlice] = []
    cases = [c for c in load_spider_seg(root / "spider_seg") if split_part("spider_seg", c.patient, c.patient) == part]
    for c in cases[: max_cases or None]:
        out += list(spider_seg_slices(c))
    for src in SOURCES[1:]:
        vols = [v for v in load_volume_index(root / src) if split_part(src, v.case, v.patient) == part]
        for v in vols[: max_cases or None]:
            out += [s for s in volume_seg_slices(v, step=step) if (s.target > 0).any()]
    return out


def augmentation(cfg: SegNetConfig) -> Compose:
    """MONAI dictionary transforms of a training patch (``image`` and ``target``, channel first)."""
    keys = ("image", "target")
    t = Compose([
        SpatialPadd(keys, (cfg.patch, cfg.patch)),
        RandSpatialCropd(keys, (cfg.patch, cfg.patch), random_size=False),
        RandAffined(keys, prob=0.6, rotate_range=0.2, scale_range=0.15, mode=("bilinear", "nearest"),
                    padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.2, prob=0.5),
        RandAdjustContrastd("image", prob=0.5, gamma=(0.7, 1.5)),
        RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.2)),
        RandGaussianNoised("image", prob=0.3, std=0.03),
    ])
    t.set_random_state(seed=cfg.seed)
    return t


class PatchDataset(torch.utils.data.Dataset):
    """Augmented patches of segmentation slices: ``(image, target, groups padded to MAX_GROUPS)``."""

    def __init__(self, slices: list[SegSlice], cfg: SegNetConfig) -> None:
        self.slices, self.transform = slices, augmentation(cfg)

    def __len__(self) -> int:
        return len(self.slices)

    def reseed(self, seed: int) -> None:
        """A new state of the augmentation's generators (a loader worker's: ``seed_loader_worker``)."""
        self.transform.set_random_state(seed=seed % 2**32)  # MONAI takes 32-bit seeds

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.slices[i]
        d = self.transform({"image": s.image[None], "target": s.target[None].astype(np.float32)})
        groups = np.zeros((MAX_GROUPS, s.groups.shape[1]), np.float32)
        groups[: len(s.groups)] = s.groups
        img = torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32)
        tgt = torch.as_tensor(np.asarray(d["target"])[0]).round().long()
        return img, tgt, torch.from_numpy(groups)


def evaluate_slices(model: torch.nn.Module, slices: list[SegSlice]) -> dict[str, float]:
    """Mean Dice per annotation name over cases (each case's Dice over all its slices), on the model's device."""
    dev = next(model.parameters()).device
    return case_dice((s, predict_probabilities(model, torch.from_numpy(s.image)[None, None].to(dev))[0]
                      .argmax(0).cpu().numpy()) for s in slices)


def train_segmentation(data_root: str | Path, out_dir: str | Path, cfg: SegNetConfig | None = None,
                       step: int = 2, max_cases: int = 0, num_threads: int = 0, progress: bool = True,
                       init_from: str | Path | None = None, extra_train: list[SegSlice] | None = None,
                       selection_max_cases: int | None = None, pack: str | Path | None = None,
                       device: str = "cpu", workers: int = 0, time_budget_min: float = 0.0,
                       resume: bool = False) -> dict:
    """Train, choose the best epoch on the selection part, write the model, history and curves.

    Args:
        data_root: The shared data folder.
        out_dir: Where ``segmentation.pt``, ``history.json`` and ``curves.png`` go.
        cfg: Hyper-parameters (the network's layout is the one of ``init_from`` when given).
        step: Every ``step``-th lateral slice of the 3D training volumes.
        max_cases: At most that many training cases per source (0 = all).
        num_threads: Torch CPU threads (0 = default).
        progress: Show a progress bar.
        init_from: Fine-tune these weights (a retraining round) instead of a random initialisation.
        extra_train: More training slices (an annotator's corrections).
        selection_max_cases: Selection cases per source (default ``max_cases``).
        pack: Read the training and selection slices from this pack instead of ``data_root``.
        device: Torch device of the network (``cpu``, ``cuda``).
        workers: Data-loader processes for the augmentation (0 = in this process, the reproducible default).
        time_budget_min: When > 0, the epochs are cut to those that fit in this many minutes (measured on the
            second epoch) and the cosine schedule ends there.
        resume: Continue the interrupted run in ``out_dir`` from its ``last.pt``, written after every epoch
            (weights, optimiser, schedule, the batches' and the augmentation's random states, history) and
            removed when the run ends: on the CPU with ``workers=0`` the resumed run equals an uninterrupted
            one. A long CPU run can so span several sessions.

    Raises:
        ValueError: When resuming with other settings than the interrupted run's.

    Returns:
        The history summary (best epoch, its selection Dice per class, slices used).

    """
    cfg = cfg or SegNetConfig()
    if num_threads:
        torch.set_num_threads(num_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pack is not None:
        parts = load_slice_pack(pack)
        train, select = parts["train"] + list(extra_train or []), parts["selection"]
    else:
        train = load_slices(data_root, "train", step, max_cases) + list(extra_train or [])
        select = load_slices(data_root, "selection", 4,
                             max_cases if selection_max_cases is None else selection_max_cases)
    if cfg.sacrum_unknown:  # the selection slices keep their masks: Dice is scored as the contract scores it
        train = [sacrum_unknown(s) for s in train]
    log.info("segmentation: %d training and %d selection slices", len(train), len(select))
    torch.manual_seed(cfg.seed)
    if init_from is not None:
        model = load_segmenter(init_from)
        cfg = SegNetConfig.from_dict({**asdict(cfg), **{k: model.meta["cfg"][k] for k in LAYOUT
                                                        if k in model.meta["cfg"]}})
    else:
        model = build_segnet(cfg)
    dev = torch.device(device)
    model.to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dl = torch.utils.data.DataLoader(PatchDataset(train, cfg), batch_size=cfg.batch_size, shuffle=True,
                                     drop_last=len(train) > cfg.batch_size,
                                     generator=torch.Generator().manual_seed(cfg.seed), num_workers=workers,
                                     persistent_workers=workers > 0,
                                     worker_init_fn=seed_loader_worker if workers else None,
                                     pin_memory=dev.type == "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, len(dl), lambda: cfg.epochs * len(dl))
    history: list[dict] = []
    best = (-1.0, -1)
    summary: dict = {}
    asked, last = asdict(cfg), out / "last.pt"
    epoch = -1
    if resume and last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        if ck["asked_cfg"] != asked:
            raise ValueError(f"{last}: the interrupted run has other settings ({ck['asked_cfg']}); "
                             "resume it with those, or start a new run in another folder")
        cfg = SegNetConfig.from_dict(ck["cfg"])  # its epochs as a time budget cut them
        _restore_training_state(ck, model, opt, sched, dl)
        history, best, epoch = ck["history"], tuple(ck["best"]), ck["epochs_done"] - 1
        log.info("segmentation: resumed after epoch %d of %d", epoch + 1, cfg.epochs)
    start = time.time()
    bar = tqdm(total=cfg.epochs, initial=epoch + 1, desc="segmentation epochs", disable=not progress)
    while epoch + 1 < cfg.epochs:
        epoch += 1
        model.train()
        t0, tot, n = time.time(), 0.0, 0
        for img, tgt, groups in dl:
            img, tgt, groups = img.to(dev, non_blocking=True), tgt.to(dev, non_blocking=True), groups.to(dev)
            outs = model(to_input(img))
            outs = outs.unbind(1) if outs.dim() == 5 else (outs,)
            loss = sum(w * partial_label_loss(o, tgt, groups, cfg.dice_weight) for w, o in zip(DS_WEIGHTS, outs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(img)
            n += len(img)
        dice = evaluate_slices(model, select)
        score = float(np.mean(list(dice.values()))) if dice else 0.0
        history.append({"epoch": epoch + 1, "loss": round(tot / max(n, 1), 4), "selection_dice": dice,
                        "selection_score": round(score, 4), "seconds": round(time.time() - t0, 1)})
        bar.set_postfix(loss=history[-1]["loss"], dice=round(score, 3))
        bar.update()
        if time_budget_min and epoch == 1:
            fit = 2 + int((60 * time_budget_min - (time.time() - start)) / max(time.time() - t0, 1e-3))
            if fit < cfg.epochs:
                log.info("segmentation: %d epochs fit in %.1f min (of %d)", fit, time_budget_min, cfg.epochs)
                cfg = replace(cfg, epochs=max(fit, 2))  # the schedule reads cfg.epochs: it ends there
                bar.total = cfg.epochs
        if score > best[0]:
            best = (score, epoch + 1)
            save_segmenter(model, cfg, out / "segmentation.pt", epoch=epoch + 1, selection_dice=dice)
        summary = {"best_epoch": best[1], "best_selection_score": round(best[0], 4),
                   "best_selection_dice": history[best[1] - 1]["selection_dice"],
                   "train_slices": len(train), "selection_slices": len(select), "cfg": asdict(cfg),
                   "history": history}
        (out / "history.json").write_text(json.dumps(summary, indent=1))  # every epoch: a long run can be cut
        save_torch({"asked_cfg": asked, "cfg": asdict(cfg), "epochs_done": epoch + 1, "history": history,
                    "best": list(best), **_training_state(model, opt, sched, dl)}, last)
    last.unlink(missing_ok=True)  # the run is complete: nothing to resume
    bar.close()
    plot_curves(history, out / "curves.png")
    return summary


def _training_state(model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, dl: torch.utils.data.DataLoader) -> dict:
    """What an epoch boundary needs to continue exactly: weights, optimiser, schedule and random states."""
    return {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
            "sched": sched.state_dict(), "loader_rng": dl.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "augmentation": dl.dataset.transform}  # pickled whole: its transforms' nested generators too


def _restore_training_state(ck: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
                            sched: torch.optim.lr_scheduler.LRScheduler,
                            dl: torch.utils.data.DataLoader) -> None:
    """Put :func:`_training_state`'s values back."""
    model.load_state_dict(ck["state"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    dl.generator.set_state(ck["loader_rng"])
    torch.set_rng_state(ck["torch_rng"])
    dl.dataset.transform = ck["augmentation"]


def save_segmenter(model: torch.nn.Module, cfg: SegNetConfig, path: str | Path, **meta) -> None:
    """Write a segmentation model file atomically: fp16 weights, ``cfg`` and ``meta`` (epoch, selection Dice...)."""
    state = half_state(model.state_dict(), device="cpu")
    save_torch({"format": FORMAT, "cfg": asdict(cfg), "state": state, **meta}, path)


def combine_segmenters(paths: list[str | Path], out_dir: str | Path, data_root: str | Path,
                       max_cases: int = 0, num_threads: int = 0) -> dict:
    """One model of several trained networks of one layout: the mean of their logits (:class:`MeanLogits`).

    Writes ``<out_dir>/segmentation.pt`` with each member's weights and its selection Dice, scored like a
    training epoch (the selection split; validation is not read).

    Raises:
        ValueError: For fewer than two files, a file that is itself a combination, or different layouts.

    """
    if num_threads:
        torch.set_num_threads(num_threads)
    if len(paths) < 2:
        raise ValueError("combining needs at least two segmentation models")
    members = [load_segmenter(p, exported=False, offsets=False) for p in paths]
    cfgs = [SegNetConfig.from_dict(m.meta["cfg"]) for m in members]
    if any(c.members > 1 for c in cfgs):
        raise ValueError("a combined model cannot be a member: combine its members' files")
    if len({(c.filters, c.deep_supr_num) for c in cfgs}) > 1:
        raise ValueError(f"different network layouts cannot be combined: {[c.filters for c in cfgs]}")
    model = MeanLogits(members).eval()
    cfg = replace(cfgs[0], members=len(members))
    dice = evaluate_slices(model, load_slices(data_root, "selection", 4, max_cases))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the members by content, not by path: the same files combine to the same bytes wherever they lie
    info = [{"sha256": file_digest(p), "epoch": m.meta["epoch"], "selection_dice": m.meta["selection_dice"]}
            for p, m in zip(paths, members)]
    save_segmenter(model, cfg, out / "segmentation.pt", epoch=None, selection_dice=dice, members=info)
    return {"segmentation": str(out / "segmentation.pt"), "members": info, "selection_dice": dice,
            "selection_score": round(float(np.mean(list(dice.values()))), 4)}


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and selection Dice per class by epoch (PNG)."""
    # matplotlib only where a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [h["epoch"] for h in history]
    a.plot(ep, [h["loss"] for h in history])
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    for name in sorted({k for h in history for k in h["selection_dice"]}):
        b.plot(ep, [h["selection_dice"].get(name) for h in history], label=name)
    b.set_xlabel("epoch")
    b.set_ylabel("selection Dice")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
