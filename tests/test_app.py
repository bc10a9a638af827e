import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import EXAMPLE, REPO
from PIL import Image

PY = sys.executable


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, env=e, timeout=600)


def _check_outputs(out: Path) -> dict:
    d = json.loads((out / "vertebrae.json").read_text())
    assert json.loads((out / "status.json").read_text())["ok"] is True
    assert "NOT FOR DIAGNOSTIC USE" in d["disclaimer"]
    assert d["input"]["n_slices"] == 19 and d["input"]["pixel_spacing_mm"] == [1.0, 1.0]
    assert d["n_vertebrae"] == len(d["vertebrae"]) >= 5
    for v in d["vertebrae"]:
        assert v["level"] and 0 <= v["name_confidence"] <= 1
        lo, hi = v["slice_range"]
        assert 0 <= lo <= hi < 19
        s = v["slices"][0]
        b = s["box_pixels"]
        assert b["row_min"] < b["row_max"] and b["col_min"] < b["col_max"]
        assert len(s["box_patient_mm"]["centre"]) == 3
    # named top-down, consecutive, lowest is L5 or S1
    levels = [v["level"] for v in d["vertebrae"] if v["level"] != "?"]
    assert levels[-1] in ("L5", "S1") and "L3" in levels
    im = Image.open(out / "key_image.png")
    assert im.size[0] >= 381 and im.mode == "RGB"
    _check_findings(d, np.asarray(im))
    import pydicom

    classes = {"sr": "1.2.840.10008.5.1.4.1.1.88.34", "seg": "1.2.840.10008.5.1.4.1.1.66.4",
               "pdf_report": "1.2.840.10008.5.1.4.1.1.104.1"}
    assert set(d["dicom_outputs"]) == set(classes)
    for kind, rel in d["dicom_outputs"].items():
        ds = pydicom.dcmread(out / rel, stop_before_pixels=True)
        assert ds.SOPClassUID == classes[kind] and ds.StudyInstanceUID == d["input"]["study_instance_uid"]
        assert ds.SeriesInstanceUID != d["input"]["series_instance_uid"]
    return d


def _check_findings(d: dict, key: np.ndarray) -> None:
    """Grading fields: every lumbar vertebra has a fused probability and label, every graded disc a grade."""
    graded = [v for v in d["vertebrae"] if v["pathology"] is not None]
    assert {v["level"] for v in graded} == {"L1", "L2", "L3", "L4", "L5"} & {v["level"] for v in d["vertebrae"]}
    assert len(graded) >= 4
    for v in d["vertebrae"]:
        if v["level"] not in ("L1", "L2", "L3", "L4", "L5"):
            assert v["pathology"] is None  # outside the levels the classifiers were trained on
    for v in graded:
        p = v["pathology"]
        assert 0 <= p["probability"] <= 1 and 0 < p["threshold"] < 1
        assert p["label"] == ("pathological" if p["probability"] >= p["threshold"] else "healthy")
        slices = {int(k) for k in p["per_slice_probability"]}
        assert slices and slices <= {s["slice_index"] for s in v["slices"]}
    # spark grades on the levels they were trained on; SPIDER degenerative grades on every disc of the chain
    discs = [x for x in d["discs"] if "grade" in x]
    assert len(discs) >= 4 and all(x["level"] in ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
                                   for x in discs)
    assert all(1 <= x["pfirrmann"]["grade"] <= 5 for x in d["discs"]) and len(d["discs"]) >= len(discs)
    for x in discs:
        probs = x["probabilities"]
        assert set(probs) == {"v1", "v2", "v3", "v4", "v5"} and abs(sum(probs.values()) - 1) < 1e-3
        assert x["grade"] in probs and x["grade_name"] and 0 <= x["abnormal_probability"] <= 1
    assert d["grading_model"]["fusion"] is True
    assert d["timings_s"]["classification"] > 0 and "fusion" in d["timings_s"]
    # the key image colours findings: red (pathological) or green (healthy) box outlines are drawn
    red = (key[..., 0] > 240) & (key[..., 1] < 70) & (key[..., 2] < 70)
    green = (key[..., 1] > 200) & (key[..., 0] < 90) & (key[..., 2] < 90)
    labels = {v["pathology"]["label"] for v in graded}
    assert ("pathological" not in labels or red.sum() > 50) and ("healthy" not in labels or green.sum() > 50)


def test_app_end_to_end_on_real_example(tmp_path):
    out = tmp_path / "out"
    r = _run(["app.py", "-i", str(EXAMPLE), "-o", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    d = _check_outputs(out)
    assert d["input"]["kind"] == "dicom"
    # no patient identifiers in logs
    assert "CHU02" not in r.stdout + r.stderr
    # the log states the reported per-vertebra decision (the spark score alone is named as one part of it)
    decided = {v["level"]: v["pathology"]["label"] for v in d["vertebrae"] if v["pathology"] is not None}
    assert f"per-vertebra decision: {decided}" in r.stdout + r.stderr
    # the closing line names every file this run wrote, the DICOM objects included
    assert all(str(out / rel) in r.stdout for rel in ("vertebrae.json", "key_image.png",
                                                     *d["dicom_outputs"].values()))


def test_app_with_holoscan_runtime_variables(tmp_path):
    """The MAP's runtime variables are read: the input (not the embedded default), the output and the models."""
    import pydicom

    other = EXAMPLE.parent / "chu_t2_04"  # the embedded default is chu_t2_02
    out = tmp_path / "out"
    env = {"HOLOSCAN_INPUT_PATH": str(other), "HOLOSCAN_OUTPUT_PATH": str(out),
           "HOLOSCAN_MODEL_PATH": str(REPO / "bundle" / "models")}
    r = _run(["app.py"], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    d = _check_outputs(out)
    series = pydicom.dcmread(next(p for p in sorted(other.iterdir()) if p.is_file()), stop_before_pixels=True)
    assert d["input"]["kind"] == "dicom" and d["input"]["series_instance_uid"] == series.SeriesInstanceUID
    # a model folder without the models: the variable is read, and the run fails cleanly
    empty = tmp_path / "no_models"
    empty.mkdir()
    r = _run(["app.py"], env={**env, "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "out2"), "HOLOSCAN_MODEL_PATH": str(empty)})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    st = json.loads((tmp_path / "out2" / "status.json").read_text())
    assert st["ok"] is False and str(empty / "model.pt") in st["message"]
    assert not (tmp_path / "out2" / "vertebrae.json").exists()


def test_app_default_input_says_which(tmp_path):
    out = tmp_path / "out"
    r = _run(["app.py", "-o", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((out / "vertebrae.json").read_text())
    assert d["input"]["kind"].startswith("real example")


def test_app_refuses_bad_input_cleanly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    r = _run(["app.py", "-i", str(empty), "-o", str(out)])
    assert r.returncode == 2
    assert "empty" in r.stderr and "Traceback" not in r.stderr
    st = json.loads((out / "status.json").read_text())
    assert st["ok"] is False and "empty" in st["message"]
    assert not (out / "vertebrae.json").exists()


def test_evaluate_cli_error_paths(tmp_path):
    r = _run(["-m", "spinepath", "evaluate", "detection", str(tmp_path)])
    assert r.returncode == 2 and "neither labels.json nor index.json" in r.stderr
    r = _run(
        [
            "-m",
            "spinepath",
            "evaluate",
            "detection",
            str(EXAMPLE.parent.parent / "chu_t2"),
            "--model",
            str(tmp_path / "missing.pt"),
        ]
    )
    assert r.returncode == 2 and "weights not found" in r.stderr
    r = _run(["-m", "spinepath", "evaluate", "detection", str(EXAMPLE.parent.parent / "spider_midsag")])
    assert r.returncode == 2 and "no locations" in r.stderr and "Traceback" not in r.stderr


def test_app_loads_models_from_holoscan_model_path(tmp_path):
    """Packaged layout: models in a sub-folder of HOLOSCAN_MODEL_PATH; an empty model path is refused."""
    import shutil

    models = tmp_path / "opt_models"
    (models / "models").mkdir(parents=True)
    for name in ("model.pt", "grader.pt", "spider_grader.pt", "segmentation.pt"):
        shutil.copy(REPO / "bundle" / "models" / name, models / "models" / name)
    out = tmp_path / "out"
    env = {"HOLOSCAN_INPUT_PATH": str(EXAMPLE), "HOLOSCAN_OUTPUT_PATH": str(out), "HOLOSCAN_MODEL_PATH": str(models)}
    r = _run(["app.py"], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["ok"] is True
    empty = tmp_path / "empty_models"
    empty.mkdir()
    out2 = tmp_path / "out2"
    r = _run(["app.py"], env={**env, "HOLOSCAN_MODEL_PATH": str(empty), "HOLOSCAN_OUTPUT_PATH": str(out2)})
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((out2 / "status.json").read_text())["ok"] is False
    assert not (out2 / "vertebrae.json").exists()
