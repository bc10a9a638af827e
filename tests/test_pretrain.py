"""Self-supervised pretraining: unlabelled crops from the real training data, SimCLR, backbone initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA

from spinepath.data.datasets import load_spark
from spinepath.data.split import is_validation
from spinepath.grading.classifier import GradingConfig, build_classifier, load_backbone, train_classifier
from spinepath.grading.crops import spark_structures
from spinepath.grading.pretraining import PretrainConfig, SimCLR, collect_unlabelled, nt_xent, pretrain
from spinepath.transforms import normalise_image


def test_unlabelled_crops_use_training_data_only() -> None:
    images, structs = collect_unlabelled(DATA, slice_step=8)
    keys = set(images)
    assert {s.image_key for s in structs} <= keys
    datasets = {k.split("/")[0] for k in keys if "/" in k}
    assert {"chu_t2", "spineweb_vb", "ivd_t2"} <= datasets
    spark = [k for k in keys if "/" not in k]
    assert spark and not any(is_validation("spark_midsag", k) for k in spark)
    assert all(s.grade == -1 for s in structs)


def test_nt_xent_prefers_matching_views() -> None:
    z = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    same = nt_xent(torch.cat([z, z]), 0.2)
    other = nt_xent(torch.cat([z, torch.nn.functional.normalize(torch.randn(8, 16), dim=1)]), 0.2)
    assert same < other


def test_pretrain_then_initialise_a_classifier(tmp_path) -> None:
    out = tmp_path / "backbone.pt"
    res = pretrain(PretrainConfig(data_root=str(DATA), out=str(out), epochs=1, crops_per_epoch=32, batch_size=16,
                                  slice_step=8, quiet=True))
    assert out.is_file() and np.isfinite(res["history"][-1]["loss"])
    bb = torch.load(out, weights_only=False)["state_dict"]
    m = build_classifier(GradingConfig(task="disc"))
    load_backbone(m, out)
    assert torch.equal(m.stem[0].weight, bb["stem.0.weight"])
    with pytest.raises(ValueError, match="does not match"):
        load_backbone(build_classifier(GradingConfig(task="disc", model="convnext_femto")), out)
    # a classifier trained from it (GradingConfig.init) on a tiny real subset
    cases = [c for c in load_spark(DATA / "spark_midsag") if not is_validation("spark_midsag", c.case)][:4]
    images = {c.case: normalise_image(c.load_image()) for c in cases}
    train = [s for c in cases for s in spark_structures(c) if s.kind == "vertebra"]
    model, hist = train_classifier(GradingConfig(task="vertebra", epochs=1, batch_size=8, init=str(out)), images,
                                   train, progress=False)
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    assert isinstance(SimCLR("convnext_atto").backbone.num_features, int)


def test_train_grading_from_backbone_with_fold_ensemble(tmp_path) -> None:
    from spinepath.grading.grader import Grader
    from spinepath.grading.training import GradingTrainConfig, train_grading

    bb = tmp_path / "backbone.pt"
    pretrain(PretrainConfig(data_root=str(DATA), out=str(bb), epochs=1, crops_per_epoch=16, batch_size=16,
                            slice_step=16, quiet=True))
    out = tmp_path / "grading"
    summary = train_grading(GradingTrainConfig(data_root=str(DATA), out_dir=str(out), folds=2, views=1,
                                               max_train_cases=12, epochs=1, init=str(bb),
                                               ensemble="folds+final", quiet=True))
    g = Grader.load(out / "grader.pt")
    assert all(len(g.models[t]) == 3 for t in ("vertebra", "disc"))  # final + 2 fold models
    assert g.meta["ensemble"] == "folds+final" and summary["params"]["disc"]["init"] == str(bb)
    # calibration fitted out of fold and stored with the models
    assert g.calibration is not None and g.calibration.disc_temperature > 0
    assert summary["calibration"]["info"]["n_discs"] > 0
    with pytest.raises(ValueError, match="unknown ensemble"):
        train_grading(GradingTrainConfig(data_root=str(DATA), out_dir=str(out), ensemble="all"))


def test_resnet_backbone_from_spider_images_starts_the_spider_network(tmp_path) -> None:
    from spinepath.data.spider import load_spider_midsag
    from spinepath.data.split import split_part
    from spinepath.grading.pretraining import spider_unlabelled
    from spinepath.grading.spider import SpiderConfig, train_network
    from spinepath.grading.spider_training import collect

    images, structs = spider_unlabelled(DATA, max_patients=3)
    patients = {k.split("_")[0] for k in images}
    assert len(patients) == 3 and {s.image_key for s in structs} <= set(images)
    assert not any(split_part("spider_midsag", p, p) == "validation" for p in patients)
    assert all(s.grade == -1 for s in structs)
    out = tmp_path / "backbone.pt"
    res = pretrain(PretrainConfig(data_root=str(DATA), out=str(out), model="resnet18_narrow", crop_mm=64.0,
                                  spider=True, spider_patients=2, epochs=1, crops_per_epoch=16, batch_size=16,
                                  slice_step=16, quiet=True))
    assert np.isfinite(res["history"][-1]["loss"]) and res["images"] > len(images) // 3
    bb = torch.load(out, weights_only=False)["state_dict"]
    assert not any(k.startswith("fc.") for k in bb)  # the projection head's input, not a classifier
    cfg = SpiderConfig(model="resnet18_narrow", init=str(out), epochs=1, batch_size=8)
    net = cfg.network()
    load_backbone(net, out)
    assert torch.equal(net.conv1.weight, bb["conv1.weight"])
    with pytest.raises(ValueError, match="does not match"):
        load_backbone(SpiderConfig(model="resnet10_narrow").network(), out)
    # the fold network trains from it (SpiderConfig.init): its first layer starts at the backbone's
    from spinepath.core.paths import resolve_model_path
    from spinepath.detection.predictor import VertebraDetector

    studies = [s for s in load_spider_midsag(DATA / "spider_midsag") if s.patient in patients][:2]
    ims, samples = collect(studies, VertebraDetector.load(resolve_model_path(None)), progress=False,
                           labelled_only=True)
    cfg.epochs, cfg.lr = 1, 1e-12  # a step too small to move the weights: the start is what is compared
    model = train_network(cfg, ims, samples[:16], progress=False)
    assert torch.allclose(model.conv1.weight, bb["conv1.weight"], atol=1e-6)


def test_a_pack_gives_the_same_views_and_trains_with_loader_processes(tmp_path) -> None:
    """``scripts/pack_pretrain_images.py`` / ``train pretrain --pack``: a machine without the data (a lent GPU)
    cuts the same views from the pack (8-bit images cut to their structures plus a margin)."""
    import random

    from spinepath.grading.pretraining import _view, load_pretrain_pack, save_pretrain_pack, view_reach_mm

    images, structs = collect_unlabelled(DATA, slice_step=16)
    info = save_pretrain_pack(tmp_path / "p.npz.xz", images, structs)
    assert info["structures"] == len(structs) and info["bytes"] < sum(v.size for v in images.values())
    packed, pstructs, margin = load_pretrain_pack(tmp_path / "p.npz.xz")
    assert len(pstructs) == len(structs) and margin == 64.0
    cfg = PretrainConfig(model="resnet18_narrow", crop_mm=64)
    assert view_reach_mm(cfg) <= margin < view_reach_mm(PretrainConfig())  # the default 84 mm views need more
    # the same structures, image by image, in the same order; each image's cut moves all its centres alike
    orig: dict[str, list] = {}
    for st in structs:
        orig.setdefault(st.image_key, []).append(st)
    got: dict[str, list] = {}
    for st in pstructs:
        got.setdefault(st.image_key, []).append(st)
    assert set(got) == set(orig)
    for n, key in enumerate(sorted(orig)[:: max(len(orig) // 25, 1)]):
        shifts = {(round(a.centre[0] - b.centre[0], 6), round(a.centre[1] - b.centre[1], 6))
                  for a, b in zip(orig[key], got[key])}
        assert len(shifts) == 1 and min(next(iter(shifts))) >= 0
        a, b = orig[key][0], got[key][0]
        assert a.axis == b.axis and a.spacing_mm == b.spacing_mm
        va = _view(images[key], a, cfg, random.Random(n))
        vb = _view(packed[key], b, cfg, random.Random(n))
        assert np.abs(va - vb).max() < 0.1 and np.abs(va - vb).mean() < 0.01
    res = pretrain(PretrainConfig(pack=str(tmp_path / "p.npz.xz"), model="resnet18_narrow", crop_mm=64,
                                  out=str(tmp_path / "bb.pt"), epochs=5, crops_per_epoch=32, batch_size=16,
                                  workers=1, time_budget=1e-4, quiet=True))
    assert np.isfinite(res["history"][-1]["loss"]) and res["structures"] == len(structs)
    assert len(res["history"]) == 2  # the time budget cut the 5 epochs to the 2 it always runs
    with pytest.raises(ValueError, match="margin"):
        pretrain(PretrainConfig(pack=str(tmp_path / "p.npz.xz"), out=str(tmp_path / "x.pt"), epochs=1))
