"""Grading: crops, classifier training/prediction on real data, fusion, metrics and the evaluation CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DATA, REPO

from spinepath.data.datasets import load_spark
from spinepath.data.split import is_validation
from spinepath.evaluation.grading import grading_metrics
from spinepath.grading.calibration import disc_grade
from spinepath.grading.classifier import GradingConfig, predict_structures, train_classifier
from spinepath.grading.crops import chain_structures, sample_crop, spark_structures
from spinepath.grading.fusion import (
    FEATURES,
    FUSION_INPUTS,
    FusionModel,
    VertebraScores,
    best_threshold,
    fit_fusion,
    study_features,
)
from spinepath.grading.grader import Grader
from spinepath.transforms import normalise_image

SPARK = DATA / "spark_midsag"


@pytest.fixture(scope="module")
def spark_cases():
    return load_spark(SPARK)


@pytest.fixture(scope="module")
def tiny(spark_cases):
    """Six real training studies and two validation studies, normalised."""
    tr = [c for c in spark_cases if not is_validation("spark_midsag", c.case)][:6]
    va = [c for c in spark_cases if is_validation("spark_midsag", c.case)][:2]
    images = {c.case: normalise_image(c.load_image()) for c in tr + va}
    structs = {c.case: spark_structures(c) for c in tr + va}
    return tr, va, images, structs


def test_structures_and_crops(spark_cases):
    c = spark_cases[0]
    ss = spark_structures(c)
    assert {s.kind for s in ss} == {"vertebra", "disc"}
    assert len([s for s in ss if s.kind == "vertebra"]) == 5
    for s in ss:
        assert abs(np.hypot(*s.axis) - 1) < 1e-6 and s.axis[0] > 0.7  # upright spine, pointing inferior
        assert s.grade >= 0
    img = normalise_image(c.load_image())
    crop = sample_crop(img, ss[0], 64, 64)
    assert crop.shape == (64, 64) and crop.dtype == np.float32 and 0 <= crop.min() and crop.max() <= 1
    assert crop.std() > 0.05  # real anatomy, not padding
    # the crop of a vertebra is centred on the body: brighter disc bands are above and below, not in the centre
    v = [s for s in ss if s.kind == "vertebra"][2]
    prof = sample_crop(img, v, 64, 64)[:, 24:40].mean(1)
    assert prof[28:36].mean() < max(prof[:12].max(), prof[-12:].max())


def test_spark_structures_are_named_top_down(spark_cases):
    # the shared data names every study anatomically: graded vertebrae run L1 .. L5 from the top of the image
    for c in spark_cases:
        vs = sorted([s for s in spark_structures(c) if s.kind == "vertebra"], key=lambda s: s.centre[0])
        levels = [s.level for s in vs]
        assert levels == sorted(levels, key=["L1", "L2", "L3", "L4", "L5"].index), (c.case, levels)


def test_chain_structures_only_graded_levels():
    c = np.array([[50.0, 100], [90, 102], [130, 104], [170, 106]])
    ss = chain_structures("k", c, ["T12", "L1", "L2", "L3"], 1.0)
    assert [s.level for s in ss if s.kind == "vertebra"] == ["L1", "L2", "L3"]
    assert [s.level for s in ss if s.kind == "disc"] == ["T12-L1", "L1-L2", "L2-L3"]
    d = next(s for s in ss if s.level == "L1-L2")
    assert d.centre == (110.0, 103.0)


def test_train_predict_save_load(tiny, tmp_path):
    tr, va, images, structs = tiny
    models, cfgs = {}, {}
    for task in ("vertebra", "disc"):
        cfg = GradingConfig(task=task, model="convnext_zepto", epochs=2, batch_size=16)
        train = [s for c in tr for s in structs[c.case] if s.kind == task]
        val = [s for c in va for s in structs[c.case] if s.kind == task]
        m, hist = train_classifier(cfg, images, train, val, progress=False)
        assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
        assert ("auc" in hist[-1]) if task == "vertebra" else ("quadratic_kappa" in hist[-1])
        p = predict_structures([m], cfg, images, val)
        if task == "vertebra":
            assert p.shape == (len(val),) and np.all((p >= 0) & (p <= 1))
        else:
            assert p.shape == (len(val), 5) and np.allclose(p.sum(1), 1, atol=1e-5)
        models[task], cfgs[task] = [m], cfg
    g = Grader(cfgs, models, None, "ordinal", {"version": "test"})
    g.save(tmp_path / "grader.pt")
    g2 = Grader.load(tmp_path / "grader.pt")
    assert g2.disc_decision == "ordinal" and g2.meta["version"] == "test"
    val = [s for c in va for s in structs[c.case] if s.kind == "vertebra"]
    np.testing.assert_allclose(g.predict("vertebra", images, val), g2.predict("vertebra", images, val), atol=2e-2)


def test_ema_and_mixup_training(tiny):
    """The weight average is the returned model (a slow average barely moves after its first step); mixup trains."""
    tr, va, images, structs = tiny
    train = [s for c in tr for s in structs[c.case] if s.kind == "disc"]
    val = [s for c in va for s in structs[c.case] if s.kind == "disc"]

    def probs(**kw):
        cfg = GradingConfig(task="disc", model="convnext_zepto", batch_size=16, lr=4e-3, **kw)
        m, hist = train_classifier(cfg, images, train, progress=False)
        assert all(np.isfinite(h["loss"]) for h in hist)
        return predict_structures([m], cfg, images, val)

    raw1, raw = probs(epochs=1), probs(epochs=3)
    slow1, slow = probs(epochs=1, ema=0.9999), probs(epochs=3, ema=0.9999)
    mixed = probs(epochs=3, mixup=0.4)
    assert np.abs(slow - slow1).max() < 0.2 * np.abs(raw - raw1).max()
    assert np.allclose(mixed.sum(1), 1, atol=1e-5) and not np.allclose(mixed, raw, atol=1e-3)


def test_grader_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Grader.load(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a spinepath grading model"):
        Grader.load(tmp_path / "x.pt")


def test_disc_decision_rules():
    p = np.array([[0.5, 0.1, 0.1, 0.3, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6], [0.3, 0.0, 0.4, 0.3, 0.0]])
    assert disc_grade(p, "argmax").tolist() == [0, 4, 2]
    # ordinal: expected grade over v1-v4 (0.5*0 + .1 + .2 + .9 = 1.2 -> v2), v5 kept when most probable
    assert disc_grade(p, "ordinal").tolist() == [1, 4, 2]


def test_fusion_features():
    vs = [
        VertebraScores("L1", [0.2, 0.4, 0.6], 1, (30.0, 40.0), 0.9, 4.0),
        VertebraScores("L2", [0.8], 0, (32.0, 40.0), 0.8, 0.0),
        VertebraScores("L3", [0.5, 0.7], 0, (31.0, 38.0), 0.7, 0.0),
    ]
    X = study_features(vs, {"T12-L1": 0.1, "L1-L2": 0.3, "L2-L3": 0.6})
    f = dict(zip(FEATURES, X[0]))
    assert X.shape == (3, len(FEATURES))
    assert f["p_mid"] == 0.4 and f["p_mean"] == pytest.approx(0.4) and f["p_max"] == 0.6 and f["n_slices"] == 3
    assert np.isnan(f["p_above"]) and f["p_below"] == 0.8
    assert f["study_mean_other"] == pytest.approx(0.65) and f["study_max_other"] == 0.8
    assert f["disc_above_abnormal"] == 0.1 and f["disc_below_abnormal"] == 0.3
    assert f["box_aspect"] == pytest.approx(0.75) and f["detection_score"] == 0.9 and f["mid_offset_mm"] == 4.0
    assert np.isnan(dict(zip(FEATURES, X[2]))["disc_below_abnormal"])  # L3-L4 not seen


def test_fusion_fit_threshold_persistence(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.7).astype(int)
    X = np.full((n, len(FEATURES)), np.nan)
    for name in ("p_mid", "p_mean", "p_max"):  # informative per-slice scores
        X[:, FEATURES.index(name)] = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.15, n), 0, 1)
    X[:, FEATURES.index("study_mean_other")] = np.clip(0.5 + 0.2 * y + rng.normal(0, 0.2, n), 0, 1)
    groups = np.repeat(np.arange(n // 5), 5)
    model, cv = fit_fusion(X, y, groups)
    assert 0 < model.threshold < 1 and model.threshold == pytest.approx(best_threshold(y, cv))
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, cv) > 0.8
    assert model.inputs == FUSION_INPUTS
    # monotone in the per-slice score: raising p_max never lowers the fused probability
    lo, hi = X[:20].copy(), X[:20].copy()
    hi[:, FEATURES.index("p_max")] = np.minimum(hi[:, FEATURES.index("p_max")] + 0.3, 1)
    assert np.all(model.predict(hi) >= model.predict(lo) - 1e-12)
    d = json.loads(json.dumps(model.to_dict()))
    m2 = FusionModel.from_dict(d)
    assert m2.threshold == model.threshold and m2.inputs == FUSION_INPUTS
    np.testing.assert_allclose(m2.predict(X[:20]), model.predict(X[:20]))
    bad = dict(d, features=["p_mid"])
    with pytest.raises(ValueError, match="features"):
        FusionModel.from_dict(bad)


def test_grading_metrics_toy_values():
    m = grading_metrics(
        np.array([1, 1, 0, 0, 1]), np.array([0.9, 0.4, 0.3, 0.6, 0.8]), 0.5,
        np.array([1, 2, 3, 4, 5, 1]), np.array([1, 3, 3, 5, 5, 2]),
    )  # fmt: skip
    v, d = m["vertebra"], m["disc"]
    assert v["auc"] == pytest.approx(5 / 6)
    assert v["accuracy"] == pytest.approx(0.6) and v["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert v["precision"] == pytest.approx(2 / 3) and v["recall"] == pytest.approx(2 / 3)
    assert v["f1"] == pytest.approx(2 / 3) and v["threshold"] == 0.5
    assert d["accuracy"] == pytest.approx(0.5)
    assert d["within_one_accuracy"] == pytest.approx(5 / 6)  # the v5 predicted for a v4 disc is a miss
    assert d["macro_f1"] == pytest.approx(0.4)
    # quadratic kappa from its definition
    t, p = np.array([1, 2, 3, 4, 5, 1]) - 1, np.array([1, 3, 3, 5, 5, 2]) - 1
    obs = np.zeros((5, 5))
    for a, b in zip(t, p):
        obs[a, b] += 1
    W = np.array([[(i - j) ** 2 / 16 for j in range(5)] for i in range(5)])
    exp = np.outer(obs.sum(1), obs.sum(0)) / obs.sum()
    assert d["quadratic_kappa"] == pytest.approx(1 - (W * obs).sum() / (W * exp).sum())


@pytest.fixture(scope="module")
def small_spark(tmp_path_factory, spark_cases):
    """A spark_midsag-format folder with three real validation studies (images linked, not copied)."""
    root = tmp_path_factory.mktemp("spark_small") / "spark_midsag"  # named as in the split
    root.mkdir()
    labels = json.loads((SPARK / "labels.json").read_text())
    keep = [c.case for c in spark_cases if is_validation("spark_midsag", c.case)][:3]
    (root / "images").mkdir()
    for k in keep:
        (root / labels[k]["image"]).symlink_to(SPARK / labels[k]["image"])
    (root / "labels.json").write_text(json.dumps({k: labels[k] for k in keep}))
    return root


@pytest.mark.parametrize("mode", ["end_to_end", "reference"])
def test_evaluate_grading_cli(small_spark, tmp_path, mode):
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "spinepath", "-q", "evaluate", "grading", str(small_spark), "--out", str(out)]
    if mode == "reference":
        cmd.append("--from-reference-locations")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res == json.loads(out.read_text())
    assert res["task"] == "grading" and res["n_images"] == 3 and res["split"] == "val"  # the default
    assert set(res["vertebra"]) == {"auc", "balanced_accuracy", "accuracy", "precision", "recall", "f1", "threshold"}
    assert set(res["disc"]) == {"accuracy", "macro_f1", "within_one_accuracy", "quadratic_kappa"}
    # the committed grader's figures on these images, computed here the way the contract defines them
    from spinepath.core.paths import resolve_grader_path
    from spinepath.evaluation.grading import collect_grading

    grader = Grader.load(resolve_grader_path(None))
    assert res["vertebra"]["threshold"] == pytest.approx(grader.vertebra_threshold)
    if mode == "reference":
        c = collect_grading(small_spark, grader, None, progress=False)
        want = grading_metrics(c["v_true"], c["v_prob"], grader.vertebra_threshold, c["d_true"], c["d_pred"])
        assert res["vertebra"] == pytest.approx(want["vertebra"]) and res["disc"] == pytest.approx(want["disc"])


def test_evaluate_grading_refuses_3d_folder():
    r = subprocess.run([sys.executable, "-m", "spinepath", "-q", "evaluate", "grading", str(DATA / "chu_t2")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "spark_midsag-format" in r.stderr and "Traceback" not in r.stderr


def test_grading_cv_script(spark_cases, tmp_path):
    """The model-card ceiling study: out-of-fold metrics of a multi-task run and a refused setting."""
    train = [c for c in spark_cases if not is_validation("spark_midsag", c.case)]
    n = {k: sum(s.kind == k and s.grade >= 0 for c in train for s in spark_structures(c)) for k in ("vertebra", "disc")}
    save = tmp_path / "oof.npz"
    cmd = [sys.executable, "scripts/grading_cv.py", "disc", "--multitask", "--folds", "2", "--set", "epochs=1",
           "--set", "model=convnext_zepto", "--quiet", "--save", str(save)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["vertebra"]["n"] == n["vertebra"] and res["disc"]["n"] == n["disc"]
    assert 0 <= res["vertebra"]["auc"] <= 1
    for rule in ("argmax", "ordinal"):
        assert -1 <= res["disc"][rule]["quadratic_kappa"] <= 1 and 0 <= res["disc"][rule]["within_one_accuracy"] <= 1
    oof = np.load(save)
    assert oof["disc_p"].shape == (n["disc"], 5) and np.allclose(oof["disc_p"].sum(1), 1, atol=1e-5)
    assert sorted(oof["vertebra_y"].tolist()) == sorted(s.grade for c in train for s in spark_structures(c)
                                                        if s.kind == "vertebra" and s.grade >= 0)
    # the printed figures are those of the saved out-of-fold predictions
    from sklearn.metrics import roc_auc_score

    from spinepath.evaluation.grading import disc_metrics

    assert res["vertebra"]["auc"] == round(float(roc_auc_score(oof["vertebra_y"], oof["vertebra_p"])), 4)
    for rule in ("argmax", "ordinal"):
        d = disc_metrics(oof["disc_y"] + 1, disc_grade(oof["disc_p"], rule) + 1)
        assert res["disc"][rule] == {k: round(d[k], 4) for k in ("quadratic_kappa", "macro_f1", "within_one_accuracy")}
    bad = subprocess.run([sys.executable, "scripts/grading_cv.py", "disc", "--set", "crop=56"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode != 0 and "crop_mm" in bad.stderr
