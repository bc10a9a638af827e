"""Retraining rounds: a crash mid-round leaves the served model serving; failed rounds are recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spinepath.core.paths import resolve_model_path
from spinepath.detection.predictor import VertebraDetector
from spinepath.labeling.rounds import ModelStore, RoundConfig, run_round

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"

ROUND_SCRIPT = """
import sys
from spinepath.core.paths import resolve_model_path
from spinepath.labeling.rounds import ModelStore, RoundConfig, run_round
store = ModelStore(sys.argv[1], resolve_model_path())
run_round(store, RoundConfig(data_root=sys.argv[2], epochs=20, max_train_cases=1, val_max_cases=1,
                             num_threads=1), [])
"""


def test_crash_mid_round_keeps_the_served_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", resolve_model_path())
    store.ensure()
    served_before = store.served_file.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", ROUND_SCRIPT, str(store.dir), str(DATA)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = store.rounds / ".round-0001.partial"
    deadline = time.monotonic() + 300
    # wait until training has written its first epoch checkpoint, then kill the process mid-round
    while time.monotonic() < deadline and proc.poll() is None and not (partial / "last.pt").is_file():
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert (partial / "last.pt").is_file(), "the round did not start training in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert store.served_file.read_bytes() == served_before
    assert store.served()["round"] == 0
    VertebraDetector.load(store.served_model_path())  # still loadable and served
    assert not (store.rounds / "round-0001").exists() and store.history() == []
    assert store.next_round() == 1

    # the next round clears the crashed one's leftovers; this one fails (no data): recorded, still round 0
    with pytest.raises(FileNotFoundError):
        run_round(store, RoundConfig(data_root=str(tmp_path / "no-data"), epochs=1), [])
    assert not partial.exists() and not list(store.rounds.glob(".round-*.partial"))
    (rec,) = store.history()
    assert rec["round"] == 1 and rec["promoted"] is False and "FileNotFoundError" in rec["failed"]
    assert json.loads(store.served_file.read_text())["round"] == 0
    assert store.next_round() == 2


def test_round_options_from_a_request() -> None:
    cfg = RoundConfig.from_request({"epochs": "2", "lr": "0.001", "metric": "recall_at_iou50", "other": 1,
                                    "data_root": "/elsewhere", "val_max_cases": 1},
                                   data_root="/data", epochs=4)
    assert (cfg.epochs, cfg.lr, cfg.metric, cfg.data_root) == (2, 0.001, "recall_at_iou50", "/data")
    assert cfg.val_max_cases == 0  # the fixed validation set is a server setting
    for bad in ({"epochs": "x"}, {"epochs": 0}, {"metric": "accuracy"}, {"lr": -1}):
        with pytest.raises(ValueError):
            RoundConfig.from_request(bad)
