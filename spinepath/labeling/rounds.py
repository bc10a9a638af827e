"""Versioned retraining rounds with measured, atomic promotion (used by the MONAI Label app).

The detector (task ``vertebrae``) and the segmentation network (task ``spine_structures``) each have their own
model folder and rounds; one round skeleton (:func:`run_versioned_round`) serves both.

A model folder holds::

    served.json                 which round's model is served, with its selection metrics (atomic switch)
    rounds/round-0000/model.pt  the initial model (a copy of the bundle's detector)
    rounds/round-NNNN/          model.pt, metrics.json, history.json, training_curve.png of round N
    rounds/history.json         one record per finished round; rounds/history.png plots them

A round fine-tunes the served model on the base training data plus the annotators' corrections, then
measures the served and the new model on the same fixed *selection* set (training patients held out of
training, ``configs/split.json``). The new model is served only if it measures at least as well there on the
chosen metric. Both are also measured on the *validation* split, which decides nothing: those are the figures
to report.
A round works in a hidden ``.round-NNNN.partial`` folder, renamed when complete; the served model changes only
by an atomic rename of ``served.json``, so a crash at any point leaves the previous model serving.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from spinepath.core.files import atomic_file
from spinepath.data.datasets import Slice2D
from spinepath.detection.predictor import VertebraDetector
from spinepath.detection.training import TrainConfig, selection_samples, train, validate, validation_samples

log = logging.getLogger(__name__)

METRICS = ("mean_iou", "recall_at_iou50", "precision_at_iou50")
#: The segmentation rounds' promotion metric (mean Dice of the annotated classes) and its per-class parts.
SEGMENTATION_METRICS = ("mean_dice", "vertebra", "vertebral_body", "disc", "spinal_canal")
#: Round options a train request may not change (data location, the fixed selection / validation sets).
SERVER_ONLY = ("data_root", "val_max_cases", "quiet")


@dataclass
class RoundConfig:
    """Options of one retraining round.

    Attributes:
        data_root: The shared data folder (base training data, the fixed selection and validation sets).
        epochs: Fine-tuning epochs.
        lr: Peak learning rate (one-cycle schedule).
        max_train_cases: Base data subset per dataset (0 = all).
        val_max_cases: Selection and validation subset per dataset (0 = the whole fixed parts of the split); a
            server setting, not a request option, so a request cannot weaken the promotion test.
        slice_step: Every n-th lateral slice of the base training volumes.
        metric: Selection-split metric that decides promotion (one of :data:`METRICS`).
        num_threads: Torch CPU threads (0 = default).
        seed: Random seed.
        quiet: No progress bars.

    """

    data_root: str = "../shared/data"
    epochs: int = 4
    lr: float = 3e-4
    max_train_cases: int = 0
    val_max_cases: int = 0
    slice_step: int = 2
    metric: str = "mean_iou"
    num_threads: int = 0
    seed: int = 0
    quiet: bool = True

    @classmethod
    def from_request(cls, request: dict, metrics: tuple[str, ...] = METRICS, **defaults: object) -> RoundConfig:
        """Options from a MONAI Label train request (unknown keys ignored), over ``defaults``.

        ``metrics``: the promotion metrics this model's rounds know (:data:`METRICS` for the detector).

        Raises:
            ValueError: If a value has the wrong type or is out of range.

        """
        cfg = cls(**defaults)  # type: ignore[arg-type]
        for f in dataclasses.fields(cls):
            if f.name in SERVER_ONLY:
                continue
            if f.name in request and request[f.name] is not None:
                typ = type(getattr(cfg, f.name))
                try:
                    value = typ(request[f.name]) if typ is not bool else str(request[f.name]).lower() == "true"
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"train option {f.name}={request[f.name]!r} is not a {typ.__name__}") from exc
                setattr(cfg, f.name, value)
        if cfg.metric not in metrics:
            raise ValueError(f"unknown metric {cfg.metric!r}; use one of {metrics}")
        if cfg.epochs < 1 or cfg.lr < 0:
            raise ValueError("epochs must be >= 1 and lr >= 0")
        return cfg


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically and durably: temporary file, fsync, rename, fsync of the folder."""
    with atomic_file(path, ".json", durable=True) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


class ModelStore:
    """The served model and its round history in one folder (see the module docstring).

    Args:
        model_dir: The folder.
        initial_model: Weights served before any round (copied into round 0 on first use).

    """

    def __init__(self, model_dir: str | Path, initial_model: str | Path) -> None:
        self.dir = Path(model_dir)
        self.rounds = self.dir / "rounds"
        self.initial_model = Path(initial_model)

    @property
    def served_file(self) -> Path:
        """The pointer to the served round."""
        return self.dir / "served.json"

    def ensure(self) -> None:
        """Create round 0 from the initial model if the folder is new (safe when processes race)."""
        if self.served_file.is_file():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".init.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if not self.served_file.is_file():
                    self._create_round_zero()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _create_round_zero(self) -> None:
        r0 = self.rounds / "round-0000"
        if not (r0 / "model.pt").is_file():
            tmp = self.rounds / ".round-0000.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy2(self.initial_model, tmp / "model.pt")
            os.rename(tmp, r0)
        write_json(self.served_file, {"round": 0, "model": "rounds/round-0000/model.pt", "metrics": None,
                                       "source": self.initial_model.name, "since": time.time()})

    def served(self) -> dict:
        """The served round's record (``round``, ``model`` relative path, ``metrics``)."""
        self.ensure()
        return json.loads(self.served_file.read_text())

    def served_model_path(self) -> Path:
        """Weights of the served model."""
        return self.dir / self.served()["model"]

    def history(self) -> list[dict]:
        """Finished rounds, oldest first."""
        p = self.rounds / "history.json"
        return json.loads(p.read_text()) if p.is_file() else []

    def next_round(self) -> int:
        """Number of the next round (failed rounds keep their number)."""
        done = [int(p.name.split("-")[1]) for p in self.rounds.glob("round-*") if p.name.split("-")[1].isdigit()]
        return max(done + [h["round"] for h in self.history()], default=0) + 1

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One round at a time per folder (an advisory lock, released if the process dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".round.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RuntimeError("another retraining round is running on this model folder") from exc
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def run_round(store: ModelStore, cfg: RoundConfig, corrections: list[Slice2D],
              correction_info: list[dict] | None = None) -> dict:
    """Run one retraining round of the detector; returns its record (also appended to ``rounds/history.json``).

    Args:
        store: The model folder.
        cfg: Round options.
        corrections: Training slices from the annotators' saved labels.
        correction_info: Per corrected study: what it contributed (kept in the record).

    """
    def fit(work: Path, served_path: Path) -> None:
        base = VertebraDetector.load(served_path)
        tc = TrainConfig(
            data_root=cfg.data_root, out_dir=str(work), epochs=cfg.epochs, lr=cfg.lr,
            max_train_cases=cfg.max_train_cases, val_max_cases=cfg.val_max_cases, slice_step=cfg.slice_step,
            val_every=cfg.epochs,
            seed=cfg.seed, num_threads=cfg.num_threads, quiet=cfg.quiet, resume=False,
            init_from=str(served_path), freeze_bn=True, report_validation=False,
        )
        train(tc, base.cfg, extra_train=corrections)
        (work / "best.pt").rename(work / "model.pt")
        (work / "last.pt").unlink(missing_ok=True)  # optimizer state: not kept

    def measure(path: Path) -> tuple[dict, dict, dict]:
        model = VertebraDetector.load(path)
        sel = selection_samples(cfg.data_root, model.cfg, cfg.val_max_cases)
        val = validation_samples(cfg.data_root, model.cfg, cfg.val_max_cases)
        with torch.no_grad():
            return validate(model, sel), validate(model, val), {"selection": len(sel), "validation": len(val)}

    return run_versioned_round(store, cfg, {"corrections": correction_info or [],
                                            "correction_slices": len(corrections)}, fit, measure)


def run_segmentation_round(store: ModelStore, cfg: RoundConfig, corrections: list,
                           correction_info: list[dict] | None = None) -> dict:
    """Run one retraining round of the segmentation network (MONAI Label task ``spine_structures``).

    The served network is fine-tuned on the base training slices (``max_train_cases`` per source) plus the
    corrected slices (:class:`spinepath.segmentation.data.SegSlice`); promotion compares the mean Dice of the
    annotated classes (``mean_dice``) of both networks on the fixed selection slices.
    """
    # imported here: the segmentation stack loads only for segmentation rounds
    from spinepath.segmentation.inference import load_segmenter
    from spinepath.segmentation.network import SegNetConfig
    from spinepath.segmentation.training import evaluate_slices, load_slices, train_segmentation

    def fit(work: Path, served_path: Path) -> None:
        seg_cfg = SegNetConfig(epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed)
        train_segmentation(cfg.data_root, work, seg_cfg, step=cfg.slice_step, max_cases=cfg.max_train_cases,
                           num_threads=cfg.num_threads, progress=not cfg.quiet, init_from=served_path,
                           extra_train=corrections, selection_max_cases=cfg.val_max_cases)
        (work / "segmentation.pt").rename(work / "model.pt")

    def measure(path: Path) -> tuple[dict, dict, dict]:
        model = load_segmenter(path)
        sel = load_slices(cfg.data_root, "selection", 4, cfg.val_max_cases)
        val = load_slices(cfg.data_root, "validation", 4, cfg.val_max_cases)
        out = []
        for slices in (sel, val):
            dice = evaluate_slices(model, slices)
            out.append({**dice, "mean_dice": round(float(sum(dice.values()) / max(len(dice), 1)), 4)})
        return out[0], out[1], {"selection": len(sel), "validation": len(val)}

    return run_versioned_round(store, cfg, {"corrections": correction_info or [],
                                            "correction_slices": len(corrections)}, fit, measure)


def run_versioned_round(store: ModelStore, cfg: RoundConfig, training_data: dict,
                        fit: Callable[[Path, Path], None], measure: Callable[[Path], tuple[dict, dict, dict]]
                        ) -> dict:
    """One round of any served model: fit in a hidden folder, measure both models, promote only if not worse.

    Args:
        store: The model folder.
        cfg: Round options (``metric`` decides the promotion).
        training_data: What the round trained on (kept in the record).
        fit: ``fit(work, served_path)`` trains from the served model and leaves ``work/model.pt``.
        measure: ``measure(model_path)`` -> ``(selection metrics, validation metrics, slice counts)``.

    Returns:
        The round's record (also appended to ``rounds/history.json``).

    """
    with store.lock():
        store.ensure()
        served = store.served()
        served_path = store.dir / served["model"]
        n = store.next_round()
        for stale in store.rounds.glob(".round-*.partial"):  # left by a crashed round
            shutil.rmtree(stale, ignore_errors=True)
        work = store.rounds / f".round-{n:04d}.partial"
        work.mkdir(parents=True)
        started = time.time()
        record = {"round": n, "started": started, "config": dataclasses.asdict(cfg), "base_round": served["round"],
                  "training_data": training_data}
        try:
            fit(work, served_path)
            # both models on the same fixed sets, measured now: selection decides, validation is reported
            new_m, new_v, sizes = measure(work / "model.pt")
            old_m, old_v, _ = measure(served_path)
        except Exception as exc:  # the round failed (e.g. training diverged): record it, keep serving
            shutil.rmtree(work, ignore_errors=True)
            record.update(failed=f"{type(exc).__name__}: {exc}", promoted=False,
                          minutes=round((time.time() - started) / 60, 3))
            write_json(store.rounds / "history.json", store.history() + [record])
            log.error("round %d failed (%s); the served model is unchanged", n, record["failed"])
            raise
        promoted = new_m[cfg.metric] >= old_m[cfg.metric]
        record.update(
            minutes=round((time.time() - started) / 60, 3),
            selection={"n_slices": sizes["selection"], "metric": cfg.metric, "max_cases": cfg.val_max_cases},
            metrics=new_m,  # on the selection split: they decide the promotion
            served_metrics=old_m,
            validation={"n_slices": sizes["validation"], "max_cases": cfg.val_max_cases},
            validation_metrics=new_v,  # on the validation split: reported, decide nothing
            served_validation_metrics=old_v,
            promoted=bool(promoted),
        )
        write_json(work / "metrics.json", record)
        final = store.rounds / f"round-{n:04d}"
        os.rename(work, final)
        if promoted:
            write_json(store.served_file, {"round": n, "model": f"rounds/{final.name}/model.pt", "metrics": new_m,
                                            "since": time.time()})
        history = store.history() + [record]
        write_json(store.rounds / "history.json", history)
        try:
            plot_rounds(history, store.rounds / "history.png", cfg.metric)
        except Exception as exc:  # noqa: BLE001 (the plot is a convenience; the round is done)
            log.warning("history plot not written: %s", exc)
        log.info("round %d: %s %.4f vs served %.4f -> %s", n, cfg.metric, new_m[cfg.metric], old_m[cfg.metric],
                 "promoted" if promoted else "kept the served model")
        return record


def plot_rounds(history: list[dict], path: Path, metric: str = "mean_iou") -> None:
    """PNG of the selection-split metrics per round (filled markers: promoted)."""
    # matplotlib is imported only where a figure is drawn (Agg backend set first)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    history = [h for h in history if "metrics" in h]  # failed rounds have none
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [h["round"] for h in history]
    for k in (history[-1]["metrics"] if history else {}):
        ax.plot(rounds, [h["metrics"][k] for h in history], marker="o", label=f"round model: {k}")
    ax.plot(rounds, [h["served_metrics"][metric] for h in history], "k--", label=f"served before: {metric}")
    prom = [h for h in history if h["promoted"]]
    ax.scatter([h["round"] for h in prom], [h["metrics"][metric] for h in prom], s=140, facecolors="none",
               edgecolors="green", linewidths=2, label="promoted")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.set_title("selection-split metrics per retraining round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path, ".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
