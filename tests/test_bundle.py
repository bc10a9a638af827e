"""The MONAI bundle: metadata keys and the inference config run through ``monai.bundle``."""

import json
import subprocess
import sys

from conftest import EXAMPLE, REPO

BUNDLE = REPO / "bundle"


def test_metadata_standard_keys_and_disclaimer():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "name", "task", "description",
                "network_data_format", "intended_use", "eval_metrics"):
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    assert "NOT FOR DIAGNOSTIC USE" in meta["description"] and "NOT FOR DIAGNOSTIC USE" in meta["intended_use"]
    assert any(k.startswith("spark_midsag_val_vertebra") for k in meta["eval_metrics"])


def test_bundle_inference_runs_with_grading(tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "inference.json"),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--bundle_root", str(BUNDLE),
           "--input_dir", str(EXAMPLE), "--output_dir", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((out / "vertebrae.json").read_text())
    graded = [v for v in d["vertebrae"] if v["pathology"] is not None]
    assert graded and all(v["pathology"]["label"] in ("healthy", "pathological") for v in graded)
    assert d["discs"] and json.loads((out / "status.json").read_text())["ok"] is True
