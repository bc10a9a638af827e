"""Experiment: one network that sees a level's T2 and T1 crops together (two input channels).

The committed grader reads each sequence's crop alone and fuses the two probabilities by level (late fusion).
Modic changes are defined by the marrow signal on T1 *and* T2 together (type 1: T1 dark, T2 bright; type 2:
both bright), and on the validation patients the T1 added nothing to the T2's Modic AUC. Here the crops of one
level (each centred on its own sequence's disc: the two images are separate acquisitions) are stacked as two
channels [T2, T1]; a missing sequence is a constant channel, and training drops one of two present channels at
random so the network learns to grade from one. Same discs, folds, settings and fusion as
``spinepath train spider``; the validation patients are never read.

Writes ``OUT/oof.npz`` (the level table with the paired network's probabilities in both sequences' columns,
so the fusion's prior is that network's output) and ``OUT/oof_avg.npz`` (its mean with a reference run's
table), to compare with ``scripts/compare_spider_runs.py``.

Usage: python scripts/spider_paired_experiment.py --out runs/spider_paired [--reference runs/spider_combined]
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import resolve_model_path  # noqa: E402
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.grading.classifier import GradingConfig, build_classifier, load_backbone, warmup_cosine  # noqa: E402
from spinepath.grading.crops import augment_intensity, random_jitter  # noqa: E402
from spinepath.grading.spider import (  # noqa: E402
    CONTEXT,
    N_OUTPUTS,
    PROB_COLUMNS,
    SEQUENCES,
    DiscSample,
    disc_crop,
    head_probabilities,
    head_weights,
    multitask_loss,
)
from spinepath.grading.spider_training import (  # noqa: E402
    collect,
    load_spider_params,
    patient_folds,
    training_studies,
)

FILL = -2.0  # a missing channel: the input value of a black crop


class Level:
    """One (patient, disc index): its T2 and T1 samples (None where missing) and its labels."""

    def __init__(self, patient: str, index: int, by_seq: dict[str, DiscSample]) -> None:
        self.patient, self.index, self.by_seq = patient, index, by_seq
        self.target = next(iter(by_seq.values())).target


def levels_of(samples: list[DiscSample]) -> list[Level]:
    """The samples grouped by level, sorted by patient and index as the level table is."""
    d: dict[tuple[str, int], dict[str, DiscSample]] = {}
    for s in samples:
        d.setdefault((s.patient, s.index), {})[s.sequence] = s
    return [Level(p, i, d[(p, i)]) for p, i in sorted(d)]


def pair_input(images, lv: Level, cfg, rng: random.Random | None, drop: float) -> np.ndarray:
    """``(2, px, px)`` network input [T2, T1]; ``rng`` set: jitter (shared), intensity and channel dropout."""
    jit = random_jitter(rng, cfg.aug_strength) if rng else None
    present = [q for q in SEQUENCES if q in lv.by_seq]
    if rng and len(present) == 2 and rng.random() < drop:
        present = [rng.choice(present)]
    out = np.full((2, cfg.crop_px, cfg.crop_px), FILL, np.float32)
    for c, q in enumerate(SEQUENCES):  # ("t2", "t1")
        if q not in present:
            continue
        s = lv.by_seq[q]
        x = disc_crop(images[s.structure.image_key], s.structure, cfg, jit)
        if rng:
            x = augment_intensity(x, rng, cfg.aug_strength)
        out[c] = (x - 0.5) / 0.25
    return out


class PairCrops(torch.utils.data.Dataset):
    """Two-channel crops of levels with their targets."""

    def __init__(self, images, levels: list[Level], cfg, drop: float, seed: int) -> None:
        self.images, self.levels, self.cfg, self.drop = images, levels, cfg, drop
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int):
        lv = self.levels[i]
        return torch.from_numpy(pair_input(self.images, lv, self.cfg, self.rng, self.drop)), torch.from_numpy(lv.target)


def network(cfg, init: str = "") -> torch.nn.Module:
    """resnet18_narrow with a two-channel stem (``init``: a one-channel backbone, its stem weights copied)."""
    m = build_classifier(GradingConfig(model=cfg.model, drop_path=cfg.drop_path), N_OUTPUTS)
    if init:
        load_backbone(m, init)
    w = m.conv1.weight.data  # (C, 1, k, k)
    conv = torch.nn.Conv2d(2, w.shape[0], w.shape[2:], stride=m.conv1.stride, padding=m.conv1.padding, bias=False)
    conv.weight.data = torch.cat([w, w], 1) / 2
    m.conv1 = conv
    return m


def train(cfg, images, levels: list[Level], drop: float, progress: bool, init: str = "") -> torch.nn.Module:
    """As :func:`spinepath.grading.spider.train_network`, on two-channel level crops."""
    torch.manual_seed(cfg.seed)
    model = network(cfg, init)
    ds = PairCrops(images, levels, cfg, drop, cfg.seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                     generator=torch.Generator().manual_seed(cfg.seed))
    weights = head_weights(np.stack([lv.target for lv in levels]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, len(dl), cfg.epochs * len(dl))
    for _ in tqdm(range(cfg.epochs), desc="epochs", leave=False, disable=not progress):
        model.train()
        for x, y in dl:
            loss = multitask_loss(model(x), y, weights, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model, cfg, images, levels: list[Level]) -> np.ndarray:
    """``(N, 15)`` head probabilities, mean of the crop and its superior-inferior flip."""
    x = torch.from_numpy(np.stack([pair_input(images, lv, cfg, None, 0.0) for lv in levels]))
    return ((head_probabilities(model(x)) + head_probabilities(model(torch.flip(x, dims=[2])))) / 2).numpy()


def main() -> None:
    """Train the 5 fold networks, write the level tables, print the fused out-of-fold metrics."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/spider_paired"))
    ap.add_argument("--reference", type=Path, default=Path("runs/spider_combined"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--drop", type=float, default=0.3, help="chance of dropping one of two present channels")
    ap.add_argument("--init", default="", help="a one-channel backbone (spinepath train pretrain)")
    ap.add_argument("--cache", type=Path, default=Path("runs/spider_samples.pkl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = replace(load_spider_params(), epochs=a.epochs, seed=a.seed)
    if a.cache.is_file():
        images, samples = pickle.loads(a.cache.read_bytes())
    else:
        det = VertebraDetector.load(resolve_model_path(None))
        images, samples = collect(training_studies("../shared/data"), det, progress=not a.quiet,
                                  labelled_only=True, anchored_only=True)
        a.cache.write_bytes(pickle.dumps((images, samples)))
    levels = levels_of(samples)
    fold_of = patient_folds([s.patient for s in samples], 5)
    oof = np.full((len(levels), N_OUTPUTS), np.nan, np.float32)
    t0 = time.time()
    for k in tqdm(range(5), desc="folds", disable=a.quiet):
        ck = a.out / f"fold{k}.pt"
        tr = [lv for lv in levels if fold_of[lv.patient] != k]
        te = [i for i, lv in enumerate(levels) if fold_of[lv.patient] == k]
        if ck.is_file():
            m = network(cfg)
            m.load_state_dict(torch.load(ck))
            m.eval()
        else:
            m = train(cfg, images, tr, a.drop, not a.quiet, a.init)
            torch.save(m.state_dict(), ck)
        oof[te] = predict(m, cfg, images, [levels[i] for i in te])
    ref = np.load(a.reference / "oof.npz")
    groups = np.array([lv.patient for lv in levels])
    idx = np.array([lv.index for lv in levels])
    if not (np.array_equal(groups, ref["groups"]) and np.array_equal(idx, ref["X"][:, -1].astype(int))):
        sys.exit("the levels differ from the reference run's")
    width = len(PROB_COLUMNS) + len(CONTEXT)
    X = ref["X"].copy()
    Xavg = ref["X"].copy()
    for j in range(len(SEQUENCES)):
        cols = slice(j * width, j * width + len(PROB_COLUMNS))
        X[:, cols] = oof
        has = ~np.isnan(ref["X"][:, cols.start])
        Xavg[has, cols] = (ref["X"][has, cols] + oof[has]) / 2
        Xavg[~has, cols] = np.nan
    np.savez_compressed(a.out / "oof.npz", X=X, Y=ref["Y"], groups=ref["groups"])
    avg = a.out.parent / f"{a.out.name}_avg"
    avg.mkdir(exist_ok=True)
    np.savez_compressed(avg / "oof.npz", X=Xavg, Y=ref["Y"], groups=ref["groups"])
    print(json.dumps({"levels": len(levels), "minutes": round((time.time() - t0) / 60, 1), "out": str(a.out),
                      "avg": str(avg)}))


if __name__ == "__main__":
    main()
