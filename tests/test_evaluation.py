import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import MODEL, REPO

from spinepath.detection.predictor import VertebraDetector
from spinepath.evaluation.detection import evaluate_detection
from spinepath.evaluation.matching import match_slice


def test_match_slice_hungarian_and_ignored_references():
    ref = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=float)
    ignore = np.array([False, False, True])
    pred = np.array([[0, 0, 10, 10], [22, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]], dtype=float)
    m = match_slice(pred, ref, ignore)
    assert m["ious"] == pytest.approx([1.0, 0.8])
    assert m["tp"] == 2
    assert m["fp"] == 1  # the box on the ignored reference is neither right nor wrong


@pytest.fixture(scope="module")
def model():
    return VertebraDetector.load(MODEL)


def test_evaluate_detection_contract_volumes(model, data_root):
    res = evaluate_detection(data_root / "chu_t2", model, cases=["04"], progress=False)
    assert set(res) == {
        "task",
        "n_cases",
        "n_vertebrae",
        "mean_iou",
        "recall_at_iou50",
        "precision_at_iou50",
        "level_accuracy",
    }
    assert res["task"] == "detection" and res["n_cases"] == 1 and res["n_vertebrae"] == 7
    assert res["mean_iou"] > 0.6 and res["recall_at_iou50"] > 0.8
    res = evaluate_detection(data_root / "spineweb_vb", model, cases=["16"], progress=False)
    assert res["level_accuracy"] is None


def test_evaluate_detection_contract_spark(model, data_root):
    res = evaluate_detection(data_root / "spark_midsag", model, cases=["002-000", "007-000"], progress=False)
    assert set(res) == {
        "task",
        "n_images",
        "n_vertebrae",
        "centre_recall",
        "level_accuracy",
        "false_positives_per_image",
    }
    assert res["n_images"] == 2 and res["n_vertebrae"] == 10
    assert res["centre_recall"] >= 0.8


def test_cli_quiet_before_or_after_the_subcommand_and_validation_by_default():
    from spinepath.cli import build_parser

    p = build_parser()
    for argv, quiet in ((["-q", "evaluate", "detection", "d"], True), (["evaluate", "detection", "d", "-q"], True),
                        (["evaluate", "detection", "d"], False), (["run", "--quiet"], True), (["-q", "run"], True),
                        (["train", "detection", "-q"], True), (["search", "grading", "--task", "disc", "-q"], True)):
        assert p.parse_args(argv).quiet is quiet, argv
    assert p.parse_args(["evaluate", "detection", "d"]).split == "val"
    assert p.parse_args(["evaluate", "grading", "d"]).split == "val"
    assert p.parse_args(["evaluate", "grading", "d", "--split", "all"]).split == "all"


def test_cli_evaluate_says_which_split(tmp_path, data_root):
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "-m", "spinepath", "evaluate", "detection", str(data_root / "spark_midsag"),
                        "-q", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["split"] == "val" and res["dataset"] == "spark_midsag" and res["n_images"] == 29
    assert "images" not in r.stderr  # -q after the subcommand: no progress bar
