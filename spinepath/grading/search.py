"""Optuna hyper-parameter search for the grading classifiers.

One study per task (TPE sampler, median pruner). A trial trains a classifier on two thirds of the
spark_midsag *training* studies and scores it on the other third (vertebra AUC or disc quadratic kappa);
the validation split of ``configs/split.json`` is never seen. Storage is a SQLite file by default; with
``--storage postgresql://...`` several worker processes (or machines) share one study. The best parameters
are written to ``configs/grading_params.json`` under the task's key, where training reads them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from spinepath.core.config import config_file
from spinepath.core.files import atomic_file
from spinepath.data.datasets import load_spark
from spinepath.data.split import is_validation
from spinepath.grading.classifier import MODEL_SIZES, GradingConfig, objective_value, train_classifier
from spinepath.grading.crops import spark_structures
from spinepath.transforms import normalise_image

log = logging.getLogger(__name__)

PARAMS_FILE = config_file("grading_params.json")


def load_params(task: str, path: str | Path = PARAMS_FILE) -> GradingConfig:
    """The stored hyper-parameters of a task (defaults where the file has none)."""
    p = Path(path)
    d = json.loads(p.read_text()).get(task, {}) if p.is_file() else {}
    return GradingConfig.from_dict({**d.get("params", d), "task": task})


def save_params(task: str, cfg: GradingConfig, info: dict, path: str | Path = PARAMS_FILE) -> None:
    """Store a task's parameters (other tasks' entries are kept).

    Workers of different tasks may finish together: the read-modify-write holds a lock file and the new
    content replaces the old atomically.
    """
    p = Path(path)
    with open(p.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(p.read_text()) if p.is_file() else {}
        data[task] = {"params": asdict(cfg), "search": info}
        with atomic_file(p, ".json") as tmp:
            Path(tmp).write_text(json.dumps(data, indent=1) + "\n")


def suggest(trial, task: str, max_epochs: int) -> GradingConfig:
    """The search space."""
    step = max(1, max_epochs // 8)
    return GradingConfig(
        task=task,
        model=trial.suggest_categorical("model", list(MODEL_SIZES)),
        lr=trial.suggest_float("lr", 2e-4, 4e-3, log=True),
        weight_decay=trial.suggest_float("weight_decay", 1e-3, 0.2, log=True),
        crop_mm=trial.suggest_int("crop_mm", 48, 96, step=8),
        aug_strength=trial.suggest_float("aug_strength", 0.2, 1.5),
        epochs=trial.suggest_int("epochs", max(step, max_epochs - 5 * step), max_epochs, step=step),
        class_weight_power=trial.suggest_float("class_weight_power", 0.0, 1.0),
        ordinal_weight=trial.suggest_float("ordinal_weight", 0.0, 1.0) if task == "disc" else 0.0,
    )


def search_split(cases: list[str]) -> tuple[list[str], list[str]]:
    """Deterministic 2/3 - 1/3 split of training study ids for the search."""
    cases = sorted(cases)
    return [c for i, c in enumerate(cases) if i % 3], [c for i, c in enumerate(cases) if i % 3 == 0]


def optuna_storage(url: str):
    """An Optuna RDB storage.

    Creating the schema is retried: workers starting together on an empty database race to create the
    tables (optuna/optuna#1092).
    """
    # Optuna is imported only where a search runs
    import optuna
    import sqlalchemy.exc

    for i in range(6):
        try:
            return optuna.storages.RDBStorage(url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            if i == 5:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def run_search(
    task: str,
    n_trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    data_root: str = "../shared/data",
    max_epochs: int = 45,
    max_cases: int = 0,
    save: bool = True,
    params_file: str | Path = PARAMS_FILE,
    seed: int | None = None,
    progress: bool = True,
    num_threads: int = 0,
) -> dict:
    """Run (or join) a study and optionally store its best parameters.

    Args:
        task: ``vertebra`` or ``disc``.
        n_trials: Trials this worker runs.
        storage: Optuna storage URL; default ``sqlite:///runs/search/<task>.db``.
        study_name: Study name (default ``grading-<task>``); workers sharing it share trials.
        data_root: Folder with ``spark_midsag``.
        max_epochs: Upper bound of the epochs dimension.
        max_cases: Use only this many training studies (0: all); for quick checks.
        save: Write the best parameters to ``params_file``.
        params_file: Where the parameters go.
        seed: Sampler seed (None: random, as for parallel workers).
        progress: Show progress bars.
        num_threads: Torch threads of this worker (0: torch's default); use 1 when several workers share
            a machine, oversubscribed threads slow training down many times over.

    Returns:
        ``{"study", "storage", "n_trials", "n_complete", "n_pruned", "best_value", "best_params"}``.

    """
    # Optuna is imported only where a search runs
    import optuna


    if storage is None:
        Path("runs/search").mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///runs/search/{task}.db"
    study_name = study_name or f"grading-{task}"
    if num_threads:
        torch.set_num_threads(num_threads)
    cases = [c for c in load_spark(Path(data_root) / "spark_midsag") if not is_validation("spark_midsag", c.case)]
    if max_cases:
        cases = cases[:max_cases]
    tr_ids, va_ids = search_split([c.case for c in cases])
    images = {c.case: normalise_image(c.load_image()) for c in cases}
    structs = [s for c in cases for s in spark_structures(c) if s.kind == task and s.grade >= 0]
    train = [s for s in structs if s.case in tr_ids]
    val = [s for s in structs if s.case in va_ids]

    def objective(trial) -> float:
        cfg = suggest(trial, task, max_epochs)
        _, hist = train_classifier(cfg, images, train, val, progress=False, trial=trial)
        v = objective_value(task, hist[-1])
        return float(v) if np.isfinite(v) else 0.0

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=optuna_storage(storage),
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
        # warm-up of a third of the epochs: disc kappa climbs slowly and early pruning killed every trial
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(3, max_epochs // 3)),
    )
    study.optimize(objective, n_trials=n_trials, show_progress_bar=progress, gc_after_trial=True)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    out = {
        "study": study_name,
        "storage": storage.split("@")[-1] if "@" in storage else storage,
        "n_trials": len(trials),
        "n_complete": len(done),
        "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "best_value": study.best_value if done else None,
        "best_params": study.best_params if done else None,
    }
    if save and done:
        best = GradingConfig.from_dict({**asdict(GradingConfig(task=task)), **study.best_params})
        save_params(task, best, {k: out[k] for k in ("study", "n_trials", "n_complete", "n_pruned", "best_value")},
                    params_file)
    return out
