"""TorchScript exports of the four networks (issue 15, item 1): parity with the eager networks, staleness, and
an inference process that imports only what runs."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, EXAMPLE, REPO

from spinepath import stages
from spinepath.core.exported import export_meta, export_path
from spinepath.core.paths import DEFAULT_MODEL
from spinepath.core.precision import DEFAULT_AMP_STAGES, STAGES, amp_stages, autocast, forward_context
from spinepath.detection.exported import ExportedRetinaNet
from spinepath.detection.predictor import VertebraDetector
from spinepath.evaluation.parity import compare, differences
from spinepath.grading.grader import Grader
from spinepath.grading.spider import SpiderGrader
from spinepath.segmentation.data import grid_image
from spinepath.segmentation.inference import export_segmenter, load_segmenter
from spinepath.segmentation.network import predict_probabilities
from spinepath.segmentation.partial import CLASSES

EXAMPLES = [EXAMPLE, DATA / "dicom_examples" / "chu_t2_04"]
NAMES = ("model.pt", "grader.pt", "spider_grader.pt", "segmentation.pt")


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory) -> str:
    """A copy of the bundle's four .pt files with their exports made by the CLI."""
    d = tmp_path_factory.mktemp("models")
    for n in NAMES:
        shutil.copy(DEFAULT_MODEL.parent / n, d / n)
    out = subprocess.run([sys.executable, "-m", "spinepath", "-q", "export", "--model-dir", str(d)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {n: "exported" for n in NAMES}
    again = subprocess.run([sys.executable, "-m", "spinepath", "-q", "export", "--model-dir", str(d)],
                           capture_output=True, text=True, check=True)
    assert json.loads(again.stdout) == {n: "current" for n in NAMES}  # idempotent
    return str(d)


@pytest.fixture(scope="module")
def both(exported_dir):
    """(eager, exported) models of the same files."""
    def load(exported: bool):
        p = Path(exported_dir)
        return (VertebraDetector.load(p / "model.pt", exported=exported), Grader.load(p / "grader.pt", exported),
                SpiderGrader.load(p / "spider_grader.pt", exported),
                load_segmenter(p / "segmentation.pt", exported))
    eager, exported = load(False), load(True)
    assert isinstance(exported[0].detector, ExportedRetinaNet)
    assert not isinstance(eager[0].detector, ExportedRetinaNet)
    assert all(isinstance(m, torch.jit.ScriptModule) for m in exported[2].models)
    assert isinstance(exported[3], torch.jit.ScriptModule) and not isinstance(eager[3], torch.jit.ScriptModule)
    return eager, exported


@pytest.mark.parametrize("study", EXAMPLES, ids=lambda p: p.name)
def test_detector_boxes_match(both, study):
    (eager, *_), (exported, *_) = both
    vol = stages.load(study)
    slices = list(vol.pixels)
    a, b = eager.predict(slices, vol.spacing), exported.predict(slices, vol.spacing)
    assert sum(len(x.boxes) for x in a) > 3 * len(slices)  # a real detection, not an empty one
    for x, y in zip(a, b):
        assert x.boxes.shape == y.boxes.shape
        assert np.abs(x.boxes - y.boxes).max(initial=0) <= 0.5
        assert np.abs(x.scores - y.scores).max(initial=0) <= 1e-3
        assert np.array_equal(x.labels, y.labels)


class _HalfMaps(torch.nn.Module):
    """The exported network with its maps rounded to float16, as they come out of it under CUDA autocast."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return {k: [t.half() for t in v] for k, v in self.network(x).items()}


def test_float16_maps_are_decoded_in_float32(both):
    """Mixed precision (issue 15): the exported detector decodes float16 maps in float32, boxes stay put."""
    _, (exported, *_) = both
    assert exported.detector.autocast_safe
    half = VertebraDetector(ExportedRetinaNet(_HalfMaps(exported.detector.network), exported.cfg), exported.cfg)
    vol = stages.load(EXAMPLE)
    slices = list(vol.pixels)
    a, b = exported.predict(slices, vol.spacing), half.predict(slices, vol.spacing)
    assert sum(len(x.boxes) for x in a) > 3 * len(slices)
    for x, y in zip(a, b):
        assert x.boxes.shape == y.boxes.shape and np.array_equal(x.labels, y.labels)
        assert np.abs(x.boxes - y.boxes).max(initial=0) <= 0.05  # float16 boxes would be 0.1-0.2 px off
        assert np.abs(x.scores - y.scores).max(initial=0) <= 2e-3


def test_mixed_precision_stages(monkeypatch):
    monkeypatch.delenv("SPINEPATH_AMP", raising=False)
    assert amp_stages() == DEFAULT_AMP_STAGES
    assert "degeneration" not in DEFAULT_AMP_STAGES  # its findings moved under float16 on a GPU (README)
    monkeypatch.setenv("SPINEPATH_AMP", "none")
    assert amp_stages() == frozenset()
    monkeypatch.setenv("SPINEPATH_AMP", "all")
    assert amp_stages() == frozenset(STAGES)
    assert isinstance(autocast("cpu", "detection"), contextlib.nullcontext)  # never on the CPU
    monkeypatch.setenv("SPINEPATH_AMP", "detection, segmentation")
    assert amp_stages() == {"detection", "segmentation"}
    monkeypatch.setenv("SPINEPATH_AMP", "detction")
    with pytest.raises(ValueError, match="detction"):
        amp_stages()


def test_cpu_forward_passes_run_unoptimised_graphs(both):
    """On the CPU the stages' forward passes run TorchScript graphs without the executor's optimisation passes
    (one-shot calls in a cold process); the exported segmenter's probabilities are the same either way."""
    assert torch._C._get_graph_executor_optimize()
    with forward_context("cpu", "segmentation"):
        assert not torch._C._get_graph_executor_optimize()
    assert torch._C._get_graph_executor_optimize()
    seg = both[1][3]  # the exported segmenter
    x = torch.rand(1, 1, 160, 192)
    with torch.no_grad():
        optimised = [seg(x) for _ in range(3)][-1]
        with forward_context("cpu", "segmentation"):
            plain = seg(x)
    torch.testing.assert_close(plain, optimised, atol=1e-4, rtol=0)


def test_parity_compares_findings_and_floats():
    ref = {"levels": ["L4", "L5"], "n": 2, "probability": 0.50, "box_px": [10.0, 20.0], "timings_s": {"a": 1.0}}
    same = {"levels": ["L4", "L5"], "n": 2, "probability": 0.5004, "box_px": [10.3, 20.0], "timings_s": {"a": 9.0}}
    assert differences(ref, same, tol=1e-3) == ["box_px[0]: 10.0 != 10.3"]
    res = compare(ref, same)
    assert res["same_findings"] and res["max_abs_diff"]["box_px"] == {"diff": 0.3, "at": "box_px[0]"}
    assert res["max_abs_diff"]["probability"]["diff"] == pytest.approx(4e-4)
    other = dict(same, levels=["L4", "S1"], n=3)
    res = compare(ref, other)
    assert not res["same_findings"] and res["changed"] == ["levels[1]: 'L5' != 'S1'", "n: 2 != 3"]


def test_segmenter_probabilities_match(both):
    (*_, eager), (*_, exported) = both
    for study in EXAMPLES:
        vol = stages.load(study)
        img = grid_image(vol.pixels[len(vol.pixels) // 2], vol.spacing)  # another size than the traced one
        x = torch.from_numpy(img)[None, None]
        assert x.shape[-2:] != (256, 192)
        pa, pb = predict_probabilities(eager, x), predict_probabilities(exported, x)
        assert pa.shape == pb.shape
        assert float((pa - pb).abs().max()) <= 1e-3
        # bodies segmented: the comparison is not on an empty map
        assert (pa.argmax(1) == CLASSES.index("vertebral_body")).sum() > 100


def test_intensity_scaling_is_monais_bit_for_bit():
    from monai.transforms import ScaleIntensityRange

    from spinepath.transforms import intensity_range, scale_to_unit

    for study in EXAMPLES:
        pixels = stages.load(study).pixels
        lo, hi = intensity_range(pixels, (1.0, 99.5))
        monai = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
        for img in (pixels, pixels[len(pixels) // 2]):
            ours = scale_to_unit(img, (lo, hi))
            assert ours.dtype == np.float32
            assert np.array_equal(ours, np.asarray(monai(np.asarray(img, dtype=np.float32))))


@pytest.mark.parametrize("study", EXAMPLES, ids=lambda p: p.name)
def test_same_findings_on_the_real_examples(both, study):
    eager, exported = both
    ra = stages.analyse(stages.load(study), *eager).to_dict()
    rb = stages.analyse(stages.load(study), *exported).to_dict()
    assert ra["vertebrae"] and ra["discs"] and ra["measurements"]["vertebrae"]
    assert differences(ra, rb, tol=1e-3) == []


def test_stale_export_is_ignored(exported_dir, tmp_path, caplog):
    src = Path(exported_dir)
    shutil.copy(src / "segmentation.pt", tmp_path / "segmentation.pt")
    shutil.copy(src / "segmentation.ts", tmp_path / "segmentation.ts")
    assert export_meta(tmp_path / "segmentation.pt") is not None
    d = torch.load(tmp_path / "segmentation.pt", weights_only=False)
    d["epoch"] = -1  # another version of the weights file
    torch.save(d, tmp_path / "segmentation.pt")
    assert export_meta(tmp_path / "segmentation.pt") is None
    model = load_segmenter(tmp_path / "segmentation.pt")
    assert not isinstance(model, torch.jit.ScriptModule)
    assert "stale" in caplog.text
    export_segmenter(model, tmp_path / "segmentation.pt")  # exporting again makes it current
    assert export_meta(tmp_path / "segmentation.pt") is not None
    assert isinstance(load_segmenter(tmp_path / "segmentation.pt"), torch.jit.ScriptModule)
    size = export_path(tmp_path / "segmentation.pt").stat().st_size
    assert size < 1.2 * (tmp_path / "segmentation.pt").stat().st_size  # fp16 weights, as the .pt


LEAN_RUN = """
import json, sys
from spinepath.core.lean import defer_if_exported
assert not defer_if_exported(sys.argv[4])  # a model folder without exports: MONAI imported as usual
assert defer_if_exported(sys.argv[3])
from spinepath.run import run_study
res = run_study(sys.argv[1], sys.argv[2], sys.argv[3])
heavy = [m for m in ("torchvision", "timm", "monai.networks.nets", "monai.apps.detection.networks.retinanet_detector",
                     "sklearn", "cupy", "scipy.signal") if sys.modules.get(m) is not None]
print(json.dumps({"heavy": heavy, "levels": res["levels"]}))
"""


def test_inference_process_imports_only_what_runs(exported_dir, tmp_path):
    out = subprocess.run([sys.executable, "-c", LEAN_RUN, str(EXAMPLE), str(tmp_path / "out"),
                          str(Path(exported_dir) / "model.pt"), str(REPO / "tests")],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    assert len(res["levels"]) >= 5
    assert (tmp_path / "out" / "dicom" / "sr.dcm").is_file()
    assert json.loads((tmp_path / "out" / "status.json").read_text())["ok"] is True


def test_cli_run_process_takes_the_lean_path(exported_dir, tmp_path):
    """``spinepath run`` as a process of its own imports only what runs, as app.py does (issue 15)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "spinepath", "-q", "run", "-i", str(EXAMPLE),
                          "-o", str(tmp_path / "out"), "-m", str(Path(exported_dir) / "model.pt")],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert {"torch", "monai.apps.detection.utils.box_coder", "highdicom"} <= imported  # the log is read for real
    assert not imported & {"torchvision", "timm", "monai.networks.nets",
                           "monai.apps.detection.networks.retinanet_detector"}
    assert json.loads((tmp_path / "out" / "status.json").read_text())["ok"] is True
    assert json.loads(out.stdout.strip().splitlines()[-1])["levels"][-1] == "S1"
