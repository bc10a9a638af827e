"""An installed wheel works from any folder: the configuration files ship inside the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO

CONFIGS = ("detection_train.json", "grading_params.json", "labels.json", "series_selection.json", "split.json")


def test_wheel_ships_the_configs_and_loads_them_from_another_folder(tmp_path):
    wheels, target, elsewhere, src = (tmp_path / n for n in ("wheels", "site", "elsewhere", "src"))
    elsewhere.mkdir()
    # build from a copy of what the package is made of, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "spinepath", src / "spinepath", ignore=shutil.ignore_patterns("__pycache__", "*.lock"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("spinepath-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"spinepath/configs/{c}" in names for c in CONFIGS), names
    r = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    code = (
        "import json, spinepath\n"
        "from spinepath.core.labels import load_label_map\n"
        "from spinepath.data.split import load_split\n"
        "from spinepath.io.dicom import load_rules\n"
        "from spinepath.grading.search import load_params\n"
        "from spinepath.core.config import config_file\n"
        "print(json.dumps({'file': spinepath.__file__, 'labels': len(load_label_map()),\n"
        "  'validation': sorted(load_split()['validation']), 'rules': sorted(load_rules()),\n"
        "  'disc_model': load_params('disc').model,\n"
        "  'train': sorted(json.loads(config_file('detection_train.json').read_text()))}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=elsewhere,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(target))  # the installed copy, not the checkout
    assert out["labels"] == 18 and "chu_t2" in out["validation"] and out["rules"]
    assert out["disc_model"] and "train" in out["train"]


def test_every_config_dataclass_round_trips_through_json_and_ignores_unknown_keys():
    """The configurations saved with the weights read back equal, tuples included, whatever a newer version added."""
    import dataclasses

    from spinepath.detection.network import DetectorConfig
    from spinepath.grading.classifier import GradingConfig
    from spinepath.grading.spider import SpiderConfig
    from spinepath.segmentation.network import SegNetConfig

    for cls in (DetectorConfig, GradingConfig, SpiderConfig, SegNetConfig):
        cfg = cls()
        stored = json.loads(json.dumps(dataclasses.asdict(cfg)))
        assert cls.from_dict({**stored, "added_by_a_newer_version": 1}) == cfg, cls.__name__
    assert DetectorConfig.from_dict({"anchor_shapes": [[8, 8], [16, 12]]}).anchor_shapes == ((8, 8), (16, 12))
