"""The Optuna search CLI on real data: a SQLite study, and two workers sharing a PostgreSQL study."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
from conftest import REPO
from servers import postgres_url  # noqa: F401  (fixture)

from spinepath.grading.classifier import MODEL_SIZES
from spinepath.grading.search import load_params

# the vertebra task's search dimensions
SEARCH_DIMS = {"model", "lr", "weight_decay", "crop_mm", "aug_strength", "epochs", "class_weight_power"}
# tiny and quick: 9 training studies, 4 epochs per trial
QUICK = ["--task", "vertebra", "--max-cases", "9", "--max-epochs", "4"]
TIMEOUT = 300


def search_cmd(data_root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "spinepath", "-q", "search", "grading", "--data-root", str(data_root), *args]


def worker_env() -> dict[str, str]:
    # One thread per worker: on a small, busy machine torch's default threads oversubscribe the cores
    # (a 4-epoch trial went from ~2 s to ~30 s with 2 threads beside another job).
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_search_sqlite_writes_params(tmp_path, data_root):
    params = tmp_path / "params.json"
    storage = f"sqlite:///{tmp_path / 's.db'}"
    cmd = search_cmd(data_root, *QUICK, "--storage", storage, "--trials", "3", "--params-file", str(params),
                     "--seed", "0")
    res = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = last_json(res.stdout)
    assert out["study"] == "grading-vertebra"
    assert out["n_trials"] == 3 and out["n_complete"] + out["n_pruned"] == 3 and out["n_complete"] >= 1
    best = out["best_params"]
    assert set(best) == SEARCH_DIMS
    assert best["model"] in MODEL_SIZES and 2e-4 <= best["lr"] <= 4e-3
    assert 48 <= best["crop_mm"] <= 96 and best["epochs"] == 4

    stored = json.loads(params.read_text())
    assert set(stored) == {"vertebra"}
    p = stored["vertebra"]["params"]
    assert p["task"] == "vertebra"
    assert {k: p[k] for k in SEARCH_DIMS} == best
    assert stored["vertebra"]["search"]["n_trials"] == 3
    assert stored["vertebra"]["search"]["best_value"] == out["best_value"]

    cfg = load_params("vertebra", params)
    assert cfg.task == "vertebra"
    assert (cfg.model, cfg.lr, cfg.weight_decay, cfg.crop_mm, cfg.aug_strength, cfg.epochs) == (
        best["model"], best["lr"], best["weight_decay"], best["crop_mm"], best["aug_strength"], best["epochs"])
    # another task's entry is absent: defaults
    assert load_params("disc", params).task == "disc"


def test_search_two_workers_share_postgres_study(tmp_path, data_root, postgres_url):  # noqa: F811
    cmd = search_cmd(data_root, *QUICK, "--storage", postgres_url, "--study", "shared-test", "--trials", "2",
                     "--no-save", "--params-file", str(tmp_path / "unused.json"))
    procs = [subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [last_json(o) for o, _ in outs]
    assert all(r["study"] == "shared-test" for r in results)
    assert all("@" not in r["storage"] for r in results)  # user part of the URL is not echoed
    # each worker saw at least its own trials; the last to finish saw all of them
    assert min(r["n_trials"] for r in results) >= 2
    assert max(r["n_trials"] for r in results) == 4
    assert not (tmp_path / "unused.json").exists()

    study = optuna.load_study(study_name="shared-test", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in trials)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert set(study.best_params) == SEARCH_DIMS


def test_search_unknown_task_is_rejected(tmp_path):
    cmd = search_cmd(tmp_path, "--task", "spine", "--trials", "1", "--storage", f"sqlite:///{tmp_path / 's.db'}")
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 2
    assert "invalid choice: 'spine'" in res.stderr
    assert not (tmp_path / "s.db").exists()


def test_spider_search_chooses_among_the_named_architectures(tmp_path, data_root):
    """`spinepath search spider` on 15 real training patients: one tiny trial scored on two folds, an enqueued
    variant tried first, the best parameters stored; the crops made by a loader worker (as on a GPU)."""
    params = tmp_path / "spider_params.json"
    storage = f"sqlite:///{tmp_path / 'spider.db'}"
    cmd = [sys.executable, "-m", "spinepath", "-q", "search", "spider", "--data-root", str(data_root),
           "--max-patients", "15", "--trials", "1", "--max-epochs", "2", "--models", "resnet10_narrow",
           "--storage", storage, "--params-file", str(params), "--seed", "0", "--scored-folds", "2",
           "--enqueue", '{"crop_mm": 56, "crop_norm": "crop"}', "--workers", "1"]  # crops in a loader process
    params.write_text(json.dumps({"params": {"lr": 0.0021, "epochs": 30, "model": "resnet18_narrow"}}))
    res = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = last_json(res.stdout)
    assert out["n_complete"] == 1
    best = out["best_params"]
    assert best["model"] == "resnet10_narrow" and best["epochs"] == 2
    # the enqueued variant; what it does not name keeps the stored value where the search space has it
    # (lr), else is sampled (epochs 30 > --max-epochs 2; a model outside --models)
    assert best["crop_mm"] == 56 and best["crop_norm"] == "crop" and best["lr"] == 0.0021
    assert set(out["best_metrics"]) == {"pfirrmann_kappa", "modic_auc", "binary_auc", "score", "folds"}
    assert out["best_metrics"]["folds"] == 2
    (trial,) = optuna.load_study(study_name="spider", storage=storage).trials
    folds = trial.user_attrs["fold_scores"]
    assert len(folds) == 2 and abs(sum(folds) / 2 - out["best_value"]) < 1e-3
    stored = json.loads(params.read_text())
    assert {k: stored["params"][k] for k in best} == best
    assert stored["search"]["best_value"] == out["best_value"]


def test_spider_search_refuses_unreadable_enqueued_parameters(tmp_path):
    cmd = [sys.executable, "-m", "spinepath", "-q", "search", "spider", "--trials", "1",
           "--storage", f"sqlite:///{tmp_path / 'spider.db'}", "--enqueue", "{crop_mm: 64}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 2
    assert "--enqueue is not JSON" in res.stderr
    assert not (tmp_path / "spider.db").exists()
