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


def _findings(d: dict) -> dict:
    """What a run found: levels, per-vertebra label and probability, per-disc grades and probabilities."""
    return {
        "levels": d["levels"],
        "vertebrae": [(v["level"], v["pathology"] and (v["pathology"]["label"], v["pathology"]["probability"],
                                                        v["pathology"]["per_slice_probability"]))
                      for v in d["vertebrae"]],
        "discs": [(x["level"], x.get("grade"), x.get("probabilities"), x["pfirrmann"]) for x in d["discs"]],
        "boxes": [[s["box_pixels"] for s in v["slices"]] for v in d["vertebrae"]],
        "measurements": {lv: [e[p]["mm"] for p in ("anterior", "middle", "posterior") if e.get(p)]
                         for lv, e in d["measurements"]["vertebrae"].items()},
    }


def test_bundle_inference_runs_with_grading_and_finds_what_the_app_finds(tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "inference.json"),
           "--meta_file", str(BUNDLE / "configs" / "metadata.json"), "--bundle_root", str(BUNDLE),
           "--input_dir", str(EXAMPLE), "--output_dir", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((out / "vertebrae.json").read_text())
    # the MONAI Deploy app on the same example, with the bundle's models
    app_out = tmp_path / "app"
    r = subprocess.run([sys.executable, "app.py", "-i", str(EXAMPLE), "-o", str(app_out), "-m", str(BUNDLE / "models")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((app_out / "vertebrae.json").read_text())
    assert _findings(d) == _findings(a)
    assert d["input"]["series_instance_uid"] == a["input"]["series_instance_uid"]
    graded = [v for v in d["vertebrae"] if v["pathology"] is not None]
    assert graded and all(v["pathology"]["label"] in ("healthy", "pathological") for v in graded)
    assert d["discs"] and json.loads((out / "status.json").read_text())["ok"] is True


def test_bundle_inference_uses_the_standard_keys_for_the_stages():
    """network_def, preprocessing, inferer and postprocessing name the network and the stages ``run`` goes through."""
    from monai.bundle import ConfigParser

    from spinepath import stages
    from spinepath.core.geometry import SeriesVolume

    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.json")
    parser["bundle_root"] = str(BUNDLE)
    assert parser.get_parsed_content("device") in ("cuda", "cpu")
    assert parser.get_parsed_content("preprocessing") is stages.load
    volume = parser.get_parsed_content("preprocessing")(EXAMPLE)
    assert isinstance(volume, SeriesVolume)
    result = parser.get_parsed_content("inferer")(volume)
    assert result.vertebrae and result.findings is None
    graded = parser.get_parsed_content("postprocessing")(result)
    assert graded.findings is not None and graded.findings.vertebrae
    assert parser.get_parsed_content("network_def") is parser.get_parsed_content("detector").detector.network
    from monai.networks.nets import DynUNet

    seg_net = parser.get_parsed_content("segmentation_network_def")  # the TorchScript export when there is one
    assert getattr(seg_net, "original_name", type(seg_net).__name__) == "MeanLogits"  # two networks (model card)
    assert [getattr(m, "original_name", type(m).__name__) for m in seg_net.members.children()] == ["DynUNet"] * 2
    segmented = stages.segment(graded, parser.get_parsed_content("segmenter"))
    assert segmented.segmentation.measurements["vertebrae"]
    train = ConfigParser()
    train.read_config(BUNDLE / "configs" / "train.json")
    train["bundle_root"] = str(BUNDLE)
    net = train.get_parsed_content("segmentation_network_def")
    seg_cfg = train.get_parsed_content("segmentation_config")  # the committed weights' recipe (model card)
    assert isinstance(net, DynUNet) and (seg_cfg.epochs, seg_cfg.patch) == (228, 256)
    cpu = [train.get_parsed_content(k) for k in ("segmentation_cpu_config", "segmentation_cpu_cycle2_config")]
    assert [(c.epochs, c.patch, c.lr) for c in cpu] == [(36, 192, 2e-3), (30, 192, 1e-3)]  # the second member's
    assert "combine_segmenters" in train["run_segmentation_combine"][0]
