"""SPIDER disc grading: disc finding and numbering, the multi-task loss, the per-vertebra reference, and a
real (tiny) training run through to the evaluation contract."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from spinepath.core.results import Vertebra
from spinepath.grading.spider import (
    HEADS,
    N_OUTPUTS,
    TARGETS,
    SpiderConfig,
    chain_discs,
    disc_targets,
    head_probabilities,
    head_weights,
    multitask_loss,
    noisy_or,
    pfirrmann_grade,
    soft_ordinal_targets,
    vertebra_parts,
    vertebra_probability,
    vertebra_reference,
)
from spinepath.io.phantom import add_t1_companion


def _vert(level: str, r0: float, h: float) -> Vertebra:
    v = Vertebra(level=level)
    v.add(0, np.array([r0, 50, r0 + h, 90], np.float32), 0.9, 0.0)
    return v


def test_chain_discs_number_from_the_bottom_with_the_height_ratio():
    chain = [_vert("L3", 0, 30), _vert("L4", 40, 30), _vert("L5", 76, 30), _vert("S1", 112, 20)]
    discs = chain_discs(chain, "k", 0.5)
    assert [(i, s.level) for i, s, _ in discs] == [(3, "L3-L4"), (2, "L4-L5"), (1, "L5-S1")]
    assert discs[0][2]["disc_height_ratio"] == pytest.approx(10 / 30)
    assert discs[1][2]["disc_height_ratio"] == pytest.approx(6 / 30)
    assert discs[2][2]["disc_height_ratio"] == pytest.approx(6 / 25)
    assert discs[0][1].centre == pytest.approx((35.0, 70.0)) and discs[0][1].spacing_mm == 0.5
    # the edge disc: above the highest vertebra, half a pitch up, kept only well inside the image
    low = [_vert(v.level, v.boxes[0][0] + 30, v.boxes[0][2] - v.boxes[0][0]) for v in chain]
    edge = chain_discs(low, "k", 0.5, image_rows=200)
    assert [(i, s.level) for i, s, _ in edge][:2] == [(4, "L2-L3"), (3, "L3-L4")]
    assert edge[0][1].centre == pytest.approx((45.0 - 20.0, 70.0)) and np.isnan(edge[0][2]["disc_height_ratio"])
    assert [i for i, _, _ in chain_discs(chain, "k", 0.5, image_rows=200)] == [3, 2, 1]  # centre above the top
    # an unnamed vertebra ends the chain: no disc is invented across it
    assert chain_discs([_vert("?", 0, 30), _vert("L5", 40, 30)], "k", 1.0) == []


def test_disc_targets_and_the_vertebra_reference():
    d = {"index_from_bottom": 1, "pfirrmann": 4, "modic": 2, "upper_endplate_change": 1,
         "lower_endplate_change": 0, "spondylolisthesis": 0, "herniation": 1, "narrowing": None, "bulging": 1}
    assert disc_targets(d).tolist() == [3, 2, 1, 0, 0, 1, -1, 1]
    discs = {1: {"modic": 0, "upper_endplate_change": 0, "lower_endplate_change": 1},
             2: {"modic": 0, "upper_endplate_change": 0, "lower_endplate_change": 1},
             3: {"modic": 0, "upper_endplate_change": 1, "lower_endplate_change": 0},
             4: {"modic": 2, "upper_endplate_change": 0, "lower_endplate_change": 0}}
    # the vertebra above disc i: the lower endplate change of disc i+1, the upper of disc i, Modic at either.
    # L5 (above disc 1) is positive through disc 2's lower endplate; disc 1's lower endplate is S1's.
    # L4 (above disc 2): disc 3's lower and disc 2's upper endplates are clear, no Modic -> negative
    assert vertebra_reference(discs) == {1: 1, 2: 0, 3: 1}
    discs[2]["lower_endplate_change"] = 0
    assert vertebra_reference(discs)[1] == 0
    # a Modic change not graded (no T1): unknown unless an endplate is positive
    discs[2]["modic"] = None
    assert 1 not in vertebra_reference(discs) and 2 not in vertebra_reference(discs)
    discs[2]["upper_endplate_change"] = 1  # L4's lower endplate: known positive
    assert vertebra_reference(discs)[2] == 1 and 1 not in vertebra_reference(discs)
    fused = {1: {"lower_endplate_change": 0.9, "upper_endplate_change": 0.1, "modic_any": 0.2},
             2: {"lower_endplate_change": 0.3, "upper_endplate_change": 0.4, "modic_any": 0.5}}
    assert vertebra_parts(fused, 1) == {"upper_endplate": 0.3, "lower_endplate": 0.1, "modic_above": 0.5,
                                        "modic_below": 0.2}
    assert vertebra_parts(fused, 2)["lower_endplate"] == 0.4 and vertebra_parts(fused, 2)["upper_endplate"] is None
    assert noisy_or([0.5, 0.5, None]) == pytest.approx(0.75)
    assert vertebra_probability({"a": 0.5, "b": 0.5}, {}) == pytest.approx(0.75)
    assert vertebra_probability({"a": 0.5}, {"a": 1.0, "b": 0.0}) == pytest.approx(0.5)


def test_multitask_loss_skips_unknown_labels_and_probabilities_add_up():
    torch.manual_seed(0)
    logits = torch.randn(4, N_OUTPUTS, requires_grad=True)
    y = torch.tensor([[0, 0, 1, 0, 0, 0, 1, 0], [4, 3, 0, 1, 1, 1, 0, 1], [2, -1, -1, -1, -1, -1, -1, -1],
                      [-1] * 8])
    w = head_weights(y.numpy())
    loss = multitask_loss(logits, y, w, SpiderConfig())
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[3].abs().sum() == 0  # the unlabelled disc adds nothing
    assert logits.grad[2, 5:].abs().sum() == 0  # nor do the unknown heads of the third
    p = head_probabilities(logits.detach())
    assert p[:, :5].sum(1) == pytest.approx(torch.ones(4)) and p[:, 5:9].sum(1) == pytest.approx(torch.ones(4))
    assert len(TARGETS) == len(HEADS) == y.shape[1]
    prob = np.array([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.0, 0.6, 0.0, 0.4]])
    assert pfirrmann_grade(prob, "argmax").tolist() == [3, 2]
    assert pfirrmann_grade(prob, "expected").tolist() == [2, 3]


def test_soft_ordinal_pfirrmann_labels():
    """SORD targets: a distribution peaked at the grade, symmetric, sharper with a larger ``a``; the option changes
    only the Pfirrmann term of the loss, and a near miss costs less than a far one."""
    q = soft_ordinal_targets(torch.tensor([0, 2]), 5, 2.0)
    assert q.sum(1) == pytest.approx(torch.ones(2)) and q.argmax(1).tolist() == [0, 2]
    assert q[1, 1] == pytest.approx(q[1, 3]) and q[1, 1] > q[1, 0]
    assert soft_ordinal_targets(torch.tensor([2]), 5, 8.0)[0, 2] > q[1, 2]
    y = torch.tensor([[2, 0, 0, 0, 0, 0, 0, 0]] * 2)
    w = head_weights(np.array([[g, 0, 0, 0, 0, 0, 0, 0] for g in range(5)]))
    near, far = torch.zeros(1, N_OUTPUTS), torch.zeros(1, N_OUTPUTS)
    near[0, 3], far[0, 4] = 6.0, 6.0  # the network says grade 4 (near) or 5 (far) for a grade 3 disc
    cfg = SpiderConfig(pfirrmann_soft=2.0, ordinal_weight=0.0)
    assert multitask_loss(near, y[:1], w, cfg) < multitask_loss(far, y[:1], w, cfg)
    logits = torch.randn(2, N_OUTPUTS)
    a, b = (multitask_loss(logits, y, w, SpiderConfig(pfirrmann_soft=v)) for v in (0.0, 2.0))
    assert a != b


@pytest.fixture(scope="module")
def tiny_spider(tmp_path_factory, data_root):
    """A real SPIDER grader trained for one epoch on 8 training patients (2 folds)."""
    out = tmp_path_factory.mktemp("spider")
    res = subprocess.run([sys.executable, "-m", "spinepath", "-q", "train", "spider", "--data-root", str(data_root),
                          "--out-dir", str(out), "--max-patients", "8", "--folds", "2", "--epochs", "1",
                          "--num-threads", "2"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    return out, json.loads(res.stdout.strip().splitlines()[-1])


def test_training_saves_a_grader_that_grades_a_study(tiny_spider, data_root, models):
    from spinepath.data.spider import load_spider_midsag
    from spinepath.data.split import split_part
    from spinepath.grading.spider import SpiderGrader
    from spinepath.grading.spider_training import study_samples

    out, summary = tiny_spider
    assert summary["patients"] == 8 and summary["samples"] > 40
    assert (out / "fold0.pt").is_file() and (out / "fold1.pt").is_file()
    g = SpiderGrader.load(out / "spider_grader.pt")
    assert len(g.models) == 2 and set(g.fusion.thresholds) >= {"narrowing", "modic_any"}
    study = next(s for s in load_spider_midsag(data_root / "spider_midsag")
                 if split_part("spider_midsag", s.patient, s.patient) == "validation" and len(s.sequences) == 2)
    images, samples, anchors = study_samples(study, models[0])
    found = g.grade(images, samples)
    assert found and set(anchors) == {"t1", "t2"}
    f = found[min(found)]
    assert 1 <= f["pfirrmann"]["grade"] <= 5 and len(f["pfirrmann"]["probabilities"]) == 5
    assert sum(f["modic"]["probabilities"]) == pytest.approx(1.0, abs=1e-3)
    assert 0 <= f["modic_any"] <= 1 and 0 <= f["herniation"] <= 1 and f["sequences"]
    # T2 alone: the T1 columns are missing and the fusion still answers
    t2 = [s for s in samples if s.sequence == "t2"]
    assert g.grade(images, t2)
    with pytest.raises(ValueError, match="not a spinepath SPIDER grader"):
        torch.save({"format": "other"}, out / "bad.pt")
        SpiderGrader.load(out / "bad.pt")


def test_runs_combine_into_one_grader(tiny_spider, data_root, tmp_path):
    """``train spider --combine``: every fold network of the runs, the fusion refitted on their mean table."""
    import shutil

    from spinepath.grading.spider import SpiderGrader
    from spinepath.grading.spider_training import combine_runs

    out, _ = tiny_spider
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "spider_grader.pt", other / "spider_grader.pt")
    z = dict(np.load(out / "oof.npz"))
    X2 = z["X"].copy()
    X2[:, :5] = X2[:, [4, 3, 2, 1, 0]]  # the other run's T2 Pfirrmann probabilities: reversed grades
    np.savez(other / "oof.npz", **{**z, "X": X2})
    res = subprocess.run([sys.executable, "-m", "spinepath", "-q", "train", "spider", "--data-root", str(data_root),
                          "--combine", str(out), str(other), "--out-dir", str(tmp_path / "both")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    both = np.load(tmp_path / "both" / "oof.npz")
    np.testing.assert_allclose(both["X"], (z["X"] + X2) / 2)
    assert (both["Y"] == z["Y"]).all() and (both["groups"] == z["groups"]).all()
    g = SpiderGrader.load(tmp_path / "both" / "spider_grader.pt", exported=False)
    assert len(g.models) == 4 and g.meta["networks"] == 4 and g.fusion.vertebra
    first = SpiderGrader.load(out / "spider_grader.pt", exported=False)
    assert torch.equal(next(g.models[2].parameters()), next(first.models[0].parameters()))  # the second run's
    np.savez(other / "oof.npz", **{k: v[1:] for k, v in z.items()})  # one disc fewer
    with pytest.raises(ValueError, match="graded other discs"):
        combine_runs([out, other], tmp_path / "bad", data_root)


def test_a_student_learns_its_teachers_probabilities(tiny_spider, data_root, models, tmp_path):
    """Knowledge distillation (``train spider --distill RUN``): each fold network also learns the teacher run's
    network of the same fold; a teacher must crop as the student does and hold one network per fold."""
    from dataclasses import replace

    from spinepath.grading.spider import SpiderGrader, distillation_loss, predict_samples, train_network
    from spinepath.grading.spider_training import fold_teachers, study_samples, training_studies

    # the loss is least where the student's probabilities are the teacher's
    torch.manual_seed(0)
    z = torch.randn(6, N_OUTPUTS)
    t = head_probabilities(z)
    assert distillation_loss(z, t) < distillation_loss(z + 0.5 * torch.randn(6, N_OUTPUTS), t)

    out, _ = tiny_spider
    teacher = SpiderGrader.load(out / "spider_grader.pt", exported=False)
    images, samples, _ = study_samples(training_studies(data_root, 1)[0], models[0], labelled_only=True)
    want = predict_samples([teacher.models[0]], teacher.cfg, images, samples, tta=False)
    cfg = replace(teacher.cfg, epochs=6, aug_strength=0.0, lr=3e-3)
    torch.manual_seed(cfg.seed)
    before = predict_samples([cfg.network().eval()], cfg, images, samples, tta=False)
    student = train_network(cfg, images, samples, progress=False, teachers=[teacher.models[0]], distill_weight=1.0)
    after = predict_samples([student], cfg, images, samples, tta=False)
    assert np.abs(after - want).mean() < 0.5 * np.abs(before - want).mean()

    with pytest.raises(ValueError, match="not one per fold"):
        fold_teachers([str(out)], teacher.cfg, 5)
    with pytest.raises(ValueError, match="crop_px"):
        fold_teachers([str(out)], replace(teacher.cfg, crop_px=96), 2)
    res = subprocess.run([sys.executable, "-m", "spinepath", "-q", "train", "spider", "--data-root", str(data_root),
                          "--out-dir", str(tmp_path / "student"), "--max-patients", "8", "--folds", "2",
                          "--epochs", "1", "--num-threads", "2", "--distill", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    g = SpiderGrader.load(tmp_path / "student" / "spider_grader.pt", exported=False)
    assert len(g.models) == 2 and g.meta["distilled_from"] == {"runs": [str(out)], "weight": 0.5}


def test_the_pfirrmann_booster_is_compared_on_the_fusions_own_folds(tiny_spider):
    """``nested_pfirrmann`` reproduces the fusion's nested Pfirrmann predictions and takes more columns."""
    from spinepath.grading.spider import (
        BOOST_ROUNDS,
        FUSION_FEATURES,
        fit_level_fusion,
        fusion_settings,
        nested_pfirrmann,
    )

    out, _ = tiny_spider
    z = np.load(out / "oof.npz")
    X, Y, groups = z["X"], z["Y"], z["groups"]
    _, cv = fit_level_fusion(X, Y, groups)
    p, y, g = nested_pfirrmann(X, Y, groups)
    m = Y[:, TARGETS.index("pfirrmann")] >= 0
    np.testing.assert_allclose(p, cv["pfirrmann"][m], atol=1e-9)
    assert (y == Y[m, 0]).all() and (g == groups[m]).all() and np.allclose(p.sum(1), 1)
    # a measurement column (NaN where not measured) goes through the booster (the measurements' comparison
    # searches its rounds): same shape, probabilities
    grid = fusion_settings(BOOST_ROUNDS)
    extra = np.where(np.arange(len(X)) % 3, X[:, -1] * 0.1, np.nan)[:, None]
    q, _, _ = nested_pfirrmann(np.hstack([X, extra]), Y, groups, (*FUSION_FEATURES, "t2_signal_ratio"), settings=grid)
    assert q.shape == p.shape and np.allclose(q.sum(1), 1)
    with pytest.raises(Exception, match="[Ff]eature"):
        nested_pfirrmann(np.hstack([X, extra]), Y, groups, settings=grid)  # the names must match the columns


def _fusion_rows(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic level rows: the narrowing label follows the T2 probability; the T1's is noise; a third of the
    T1 crops is missing. Every other target's columns are filler, every target labelled."""
    from spinepath.grading.spider import FUSION_FEATURES

    F = list(FUSION_FEATURES)
    X = rng.uniform(0.05, 0.95, (n, len(F)))
    for s in ("t2", "t1"):
        X[:, [F.index(f"{s}_pfirrmann_{g}") for g in range(1, 6)]] = 0.2
        X[:, [F.index(f"{s}_modic_{t}") for t in range(4)]] = 0.25
    y = (rng.uniform(size=n) < X[:, F.index("t2_narrowing")]).astype(int)
    X[rng.uniform(size=n) < 0.33, F.index("t1_narrowing")] = np.nan
    X[:, -1] = rng.integers(1, 7, n)
    Y = np.zeros((n, len(TARGETS)), int)
    Y[:, TARGETS.index("narrowing")] = y
    Y[::2, TARGETS.index("herniation")] = 1
    return X, Y, np.repeat(np.arange(n // 4), 4).astype(str)


def test_the_level_fusion_weighs_the_sequences_and_calibrates():
    from sklearn.metrics import roc_auc_score

    from spinepath.grading.calibration import apply_platt
    from spinepath.grading.spider import (
        BOOST_ROUNDS,
        FUSION_FEATURES,
        PLAIN,
        LevelFusion,
        _fit_booster,
        _n_classes,
        calibrate_fused,
        fit_level_fusion,
        fusion_settings,
        modic_type_weights,
        nested_predictions,
        sequence_prior,
    )

    F = list(FUSION_FEATURES)
    X, Y, groups = _fusion_rows(np.random.default_rng(0))
    # the prior: the T2's weight on both, the T2 alone where the T1 is missing
    p = sequence_prior(X, "narrowing", 0.7)
    t2, t1 = X[:, F.index("t2_narrowing")], X[:, F.index("t1_narrowing")]
    np.testing.assert_allclose(p, np.where(np.isnan(t1), t2, 0.7 * t2 + 0.3 * t1))
    assert sequence_prior(X, "pfirrmann", 0.5).shape == (len(X), 5)
    # the T1 carries nothing: the setting chosen on the folds weighs the T2 most, and its cross-validated
    # predictions beat the booster alone (the v0.5.6 fusion) on the same folds
    pk, m, setting = nested_predictions(X, Y, groups, "narrowing")
    assert setting["t2_weight"] >= 0.85 and m.all()
    plain, _, chosen = nested_predictions(X, Y, groups, "narrowing", settings=[PLAIN])
    y = Y[:, TARGETS.index("narrowing")]
    assert chosen is PLAIN and roc_auc_score(y, pk) > roc_auc_score(y, plain) + 0.01
    # the booster from the prior (searched for comparisons) answers probabilities on the same folds
    boosted, _, s = nested_predictions(X, Y, groups, "narrowing", settings=fusion_settings(BOOST_ROUNDS)[-4:])
    assert s["rounds"] == BOOST_ROUNDS[-1] and ((boosted > 0) & (boosted < 1)).all()
    assert roc_auc_score(y, boosted) > roc_auc_score(y, plain)
    fusion, cv = fit_level_fusion(X, Y, groups)
    # the reported probabilities are Platt-calibrated on those predictions: same ranking, the label's frequency
    c = fusion.calibration["narrowing"]
    np.testing.assert_allclose(cv["narrowing"], apply_platt(pk, c["a"], c["b"]))
    assert abs(cv["narrowing"].mean() - y.mean()) < 0.01
    assert roc_auc_score(y, cv["narrowing"]) == pytest.approx(roc_auc_score(y, pk))
    # a target of 0 rounds answers its calibrated prior; settings and maps survive saving; a grader saved
    # before them predicts with its boosters alone, as it did
    back = LevelFusion.from_dict(json.loads(json.dumps(fusion.to_dict())))
    out = back.predict(X)
    assert back.settings == fusion.settings and back.calibration == fusion.calibration
    s = fusion.settings["narrowing"]
    if s["rounds"] == 0:
        assert fusion.boosters["narrowing"] == ""
        prior = np.clip(sequence_prior(X, "narrowing", s["t2_weight"]), 1e-4, 1 - 1e-4)
        np.testing.assert_allclose(out["narrowing"], apply_platt(prior, c["a"], c["b"]), rtol=1e-9)
    # Modic: the map moves P(any change); the types keep their proportions among the changes, reweighted
    # by their frequency there (a type the labels hardly hold is pulled down)
    modic = np.array([[0.6, 0.1, 0.3, 0.0], [0.2, 0.0, 0.8, 0.0]])
    got = calibrate_fused({"modic": modic}, {"modic_any": {"a": 1.0, "b": -1.0}})["modic"]
    np.testing.assert_allclose(got.sum(1), 1.0)
    np.testing.assert_allclose(1 - got[:, 0], apply_platt(np.array([0.4, 0.8]), 1.0, -1.0))
    np.testing.assert_allclose(got[0, 1] / got[0, 2], 1 / 3)
    w = modic_type_weights(np.array([[0.5, 0.25, 0.25, 0.0]] * 4), np.array([2, 2, 2, 0]))
    assert w[1] > 1 > w[0] and w[2] == 10  # type 2 up, type 1 down; type 3 never predicted: the cap
    got = calibrate_fused({"modic": modic}, {"modic_any": {"a": 1.0, "b": 0.0, "type_weights": w}})["modic"]
    np.testing.assert_allclose(got.sum(1), 1.0)
    assert got[0, 1] / got[0, 2] < 1 / 3
    old = {k: _fit_booster(X, Y[:, j], _n_classes(k)) for j, k in enumerate(TARGETS)}
    legacy = LevelFusion({k: b.model_to_string() for k, b in old.items()}, {}).predict(X[:5])
    for k, b in old.items():
        np.testing.assert_allclose(legacy[k], b.predict(X[:5]), rtol=1e-6)


def test_the_evaluation_fuses_a_t1_only_where_the_product_would():
    """A T1 beside a T2 counts only when both chains are anchored on S1 (indices from the same vertebra)."""
    from types import SimpleNamespace

    from spinepath.evaluation.spider import product_samples

    samples = [SimpleNamespace(sequence=q, index=i) for q in ("t2", "t1") for i in (1, 2)]
    assert product_samples(samples, {"t2": "S1", "t1": "S1"}) == samples
    for anchors in ({"t2": "S1", "t1": "none"}, {"t2": "L5", "t1": "S1"}):
        assert [s.sequence for s in product_samples(samples, anchors)] == ["t2", "t2"]
    t1_alone = samples[2:]
    assert product_samples(t1_alone, {"t1": "none"}) == t1_alone


def test_paired_gain_resamples_patients_and_sees_a_real_gain():
    from sklearn.metrics import roc_auc_score

    from spinepath.grading.fusion import paired_gain

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5)
    y = rng.integers(0, 2, len(groups))
    noise = rng.normal(size=len(y))
    weak, strong = y + 2.0 * noise, y + 0.3 * noise
    r = paired_gain(roc_auc_score, y, weak, strong, groups, n=200)
    assert r["gain"] > 0.1 and r["ci95"][0] > 0 and r["b"] == pytest.approx(roc_auc_score(y, strong), abs=1e-4)
    same = paired_gain(roc_auc_score, y, weak, weak, groups, n=50)
    assert same["gain"] == 0 and same["ci95"] == [0.0, 0.0]
    # a resample holding one class only is skipped, not an error
    one = paired_gain(roc_auc_score, np.r_[np.zeros(9), 1], np.arange(10.0), np.arange(10.0)[::-1], np.arange(10),
                      n=50)
    assert one["gain"] < 0 and len(one["ci95"]) == 2


def test_parasagittal_crops_carry_their_discs_labels_and_stay_in_their_patients_folds(data_root, models):
    """spider_seg's central slices of a training patient become T2 samples labelled from spider_midsag."""
    from spinepath.data.spider import load_spider_midsag, load_spider_seg
    from spinepath.grading.spider_training import (
        PARASAGITTAL_SLICES,
        fold_training_set,
        parasagittal_samples,
        patient_folds,
    )

    seg = {c.patient: c for c in load_spider_seg(data_root / "spider_seg")}
    studies = [s for s in load_spider_midsag(data_root / "spider_midsag") if s.patient in seg][:2]
    images, samples = parasagittal_samples(data_root, studies, models[0], progress=False)
    assert samples and {s.patient for s in samples} <= {st.patient for st in studies}
    per = {st.patient: {k for k in images if k.startswith(f"{st.patient}_seg_")} for st in studies}
    assert all(1 <= len(v) <= PARASAGITTAL_SLICES for v in per.values())
    for st in studies:  # the central slices only
        case, used = seg[st.patient], per[st.patient]
        mid = len(case.slices) // 2
        assert {f"{st.patient}_seg_{n[:-4]}" for n in case.slices[mid - 2: mid + 3]} >= used
    labels = {st.patient: st.discs_by_index for st in studies}
    for s in samples:
        assert s.sequence == "t2" and s.structure.image_key in images
        assert (s.target == disc_targets(labels[s.patient][s.index])).all()
    # a patient's parasagittal crops never train the fold that holds that patient out
    fold_of = patient_folds([st.patient for st in studies], 2)
    for k in (0, 1):
        assert all(fold_of[s.patient] != k for s in fold_training_set(k, fold_of, samples, []))
    with pytest.raises(KeyError):
        fold_training_set(0, {}, samples, [])


def test_evaluate_spider_contract(tiny_spider, data_root, tmp_path):
    out, _ = tiny_spider
    res = subprocess.run([sys.executable, "-m", "spinepath", "-q", "evaluate", "spider",
                          str(data_root / "spider_midsag"), "--grader", str(out / "spider_grader.pt"),
                          "--sequences", "t2", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "r.json").read_text())
    from spinepath.data.spider import load_spider_midsag
    from spinepath.data.split import split_cases

    val = split_cases(data_root / "spider_midsag", "validation")
    with_t2 = [s for s in load_spider_midsag(data_root / "spider_midsag") if s.patient in val and "t2" in s.sequences]
    assert r["task"] == "spider_grading" and r["n_patients"] == len(with_t2) and r["sequences"] == ["t2"]
    assert set(r["pfirrmann"]) == {"quadratic_kappa", "within_one_accuracy", "balanced_accuracy", "accuracy"}
    for k in ("modic", "endplate_change", "spondylolisthesis", "herniation", "narrowing", "bulging"):
        assert set(r[k]) == {"auc"}
    assert set(r["vertebra"]) == {"auc", "balanced_accuracy"}
    assert 0.7 < r["located_fraction"] <= 1.0 and r["n_discs"] > 200
    # spondylolisthesis as the product decides it: with the slip the segmentation measures on each T2
    assert r["spondylolisthesis_decision"].startswith("image and measured slip on ")
    assert int(r["spondylolisthesis_decision"].split()[5]) > 100
    bad = subprocess.run([sys.executable, "-m", "spinepath", "-q", "evaluate", "spider",
                          str(data_root / "spark_midsag"), "--grader", str(out / "spider_grader.pt")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "spider_midsag-format" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "spinepath", "-q", "evaluate", "spider",
                          str(data_root / "spider_midsag"), "--sequences", "t3"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--sequences" in bad.stderr


def test_the_product_reports_degenerative_grades_per_disc(example_copy, tmp_path, models):
    from spinepath.run import run_study

    out = run_study(example_copy, tmp_path / "t2", model=models[0], grader=models[1])
    deg = out["degeneration_model"]
    assert deg["sequences"] == ["t2"] and deg["t1"] == "none in the study"
    discs = {d["level"]: d for d in out["discs"]}
    for lv in ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"):
        d = discs[lv]
        assert 1 <= d["pfirrmann"]["grade"] <= 5 and "Pfirrmann" in d["pfirrmann"]["words"]
        assert 0 <= d["modic"]["probability_any"] <= 1 and d["modic"]["label"] in ("present", "absent")
        for k in ("endplate_change_upper", "endplate_change_lower", "spondylolisthesis", "herniation", "narrowing",
                  "bulging"):
            # spondylolisthesis names its parts: the image and the measured slip
            assert set(d[k]) == {"probability", "label", "threshold"} | ({"evidence"} if k == "spondylolisthesis"
                                                                         else set())
        assert d["sequences"] == ["t2"] and "grade" in d  # beside the spark grade of the same disc
    add_t1_companion(example_copy)  # the example's pixels with T1 timing: the T1 plumbing
    out2 = run_study(example_copy, tmp_path / "t1", model=models[0], grader=models[1])
    deg2 = out2["degeneration_model"]
    assert deg2["sequences"] == ["t2", "t1"] and deg2["t1"] == "used", deg2
    assert out2["input"]["series_selection"]["t1"]["loaded"]
    d2 = {d["level"]: d for d in out2["discs"]}
    assert d2["L4-L5"]["sequences"] == ["t1", "t2"]
    # the main series is still the T2, and its findings are the same as without the T1: the vertebrae, their
    # boxes and the spark grades (T2 only); the SPIDER grades of a disc the T1 also shows may move
    def found(o: dict) -> tuple:
        return ([(v["level"], v["slices"]) for v in o["vertebrae"]],
                {d["level"]: (d.get("grade"), d.get("probabilities")) for d in o["discs"]})

    assert found(out2) == found(out) and sum(g is not None for g, _ in found(out)[1].values()) >= 5


def test_pfirrmann_labels_can_be_kept_to_the_t2_crops():
    from spinepath.grading.crops import Structure
    from spinepath.grading.spider import DiscSample, training_targets

    st = Structure("k", "disc", "L4-L5", (0.0, 0.0), (1.0, 0.0), 1.0)
    t = np.array([2, 1, 0, 0, 0, 1, 0, 1])
    samples = [DiscSample("p", seq, 2, st, {}, t.copy()) for seq in ("t1", "t2")]
    both = training_targets(samples, SpiderConfig())
    assert [s.target[0] for s in both] == [2, 2]
    cfg = SpiderConfig.from_dict({"pfirrmann_sequences": ["t2"]})
    t2 = training_targets(samples, cfg)
    assert [s.target[0] for s in t2] == [-1, 2] and t2[0].target[1:].tolist() == t[1:].tolist()
    assert samples[0].target[0] == 2  # the caller's samples are left as they were


@pytest.fixture(scope="module")
def graded_example(models):
    from conftest import EXAMPLE

    from spinepath import stages
    from spinepath.io.dicom import load_study

    return stages.analyse(load_study(EXAMPLE), *models)


def test_degenerative_grades_in_the_sr(graded_example, tmp_path):
    """One TID 1410 group per graded disc: Pfirrmann and Modic as coded values, each finding Present / Absent with
    its probability, SNOMED CT where verified (disc degeneration, spondylolisthesis, herniation)."""
    from conftest import dciodvfy_errors

    from spinepath.core.results import key_slice
    from spinepath.outputs.common import write_dataset
    from spinepath.outputs.sr import ALGORITHM_MODELS, build_sr, read_findings

    res = graded_example
    p = write_dataset(build_sr(res), tmp_path / "sr.dcm")
    assert dciodvfy_errors(p) == []
    found = read_findings(p)
    # each group names the model it came from: the two disc gradings are told apart in a PACS
    for kind, groups in (("vertebra", found["vertebrae"]), ("disc", found["discs"]),
                         ("degeneration", found["degeneration"]), ("measurements", found["measurements"])):
        assert groups and all(b["algorithm_parameters"] == [ALGORITHM_MODELS[kind]] for b in groups.values()), kind
    back = found["degeneration"]
    assert set(back) == {g.level for g in res.findings.degeneration}
    key_uid = res.volume.sop_instance_uids[key_slice(res)]
    for g in res.findings.degeneration:
        b = back[g.level]
        assert b["finding_type"] == "Degeneration of intervertebral disc"
        assert b["finding_site"].replace("/", "-").startswith(g.level.split("-")[0])
        assert b["pfirrmann"] == g.pfirrmann and b["modic_type"] == g.modic_type
        assert (g.modic_type > 0) == g.positive("modic_any")  # the type follows the any-change decision
        for k, p_ in {**g.binary, "modic_any": g.modic_any}.items():
            assert b["present"][k] == g.positive(k) and b["probability"][k] == round(p_, 4)
        assert b["coding"]["spondylolisthesis"] == ("SCT", "274152003")
        assert b["coding"]["herniation"] == ("SCT", "73589001")
        assert b["needs_review"] == res.review.discs[g.level].needs_review
        assert b["source_sop_instance_uid"] == key_uid  # drawn on the key slice the grades were read from


def test_degenerative_grades_in_the_pdf_and_key_image(graded_example, tmp_path):
    from PIL import Image

    from spinepath.outputs.key_image import DEGENERATION_COLOURS, DISC_COLOURS, disc_grades_text, disc_label, key_image
    from spinepath.outputs.pdf import DEGENERATION_HEADER, PFIRRMANN_SHORT, degeneration_table, render_pdf

    res = graded_example
    rows = degeneration_table(res)
    assert [r[0] for r in rows] == [g.level for g in res.findings.degeneration]
    for r, g in zip(rows, res.findings.degeneration):
        assert len(r) == len(DEGENERATION_HEADER) and r[1] == PFIRRMANN_SHORT[g.pfirrmann - 1]
        assert r[5].startswith("suspected") == g.positive("herniation")
        assert (r[8] == "yes") == res.review.discs[g.level].needs_review
    pdf = render_pdf(res)
    pages = len(re.findall(rb"/Type /Page[^s]", pdf))
    assert pdf.startswith(b"%PDF") and pages == 3  # findings, measurements (segmented), key image
    g = res.findings.degeneration[-1]
    text = disc_grades_text(g)
    assert text.startswith(f"Pf{g.pfirrmann}") and ("H" in text.split(" ")[-1]) == g.positive("herniation")
    k = key_image(res, tmp_path / "key.png")
    with Image.open(tmp_path / "key.png") as im:
        assert im.size[1] > res.volume.pixels.shape[1] and k == res.findings.degeneration_model["t2_slice"]
    # one disc finding on the key image: the SPIDER grades where they exist (a Spark "protrusion" beside
    # "no herniation" read as a contradiction), the Spark grade only elsewhere
    spark = {d.level: d for d in res.findings.discs}
    both = [g for g in res.findings.degeneration if g.level in spark]
    assert both
    for g in both:
        text, colour = disc_label(g.level, spark[g.level], g)
        assert text == f"{g.level} {disc_grades_text(g)}" and spark[g.level].grade_name not in text
        suspected = g.modic_type > 0 or any(g.positive(k) for k in ("upper_endplate_change", "lower_endplate_change",
                                                                     "spondylolisthesis", "herniation", "narrowing",
                                                                     "bulging"))
        assert colour == DEGENERATION_COLOURS[suspected]
    d = next(iter(spark.values()))
    assert disc_label(d.level, d, None) == (f"{d.level} {d.grade_name}", DISC_COLOURS[d.grade])


def test_vertebra_pathology_combines_its_named_evidence(graded_example):
    """Item 4: where the endplate / marrow evidence exists the decision is the fitted combination with the spark
    score (threshold chosen out of fold), and both parts stay named beside it."""
    from spinepath.grading.spider_inference import combined_probability, load_vertebra_decision

    decision = load_vertebra_decision()
    assert decision["fitted_on"]["vertebrae"] > 100 and 0 < decision["threshold"] < 1
    combined = 0
    for f in graded_example.findings.vertebrae:
        ev = f.evidence
        spark = ev["spark_degenerative"]
        if "endplate_marrow" not in ev:
            assert ev["decision"] == {"rule": "spark_degenerative"} and abs(f.probability - spark["probability"]) < 1e-4
            continue
        combined += 1
        p = combined_probability(ev["endplate_marrow"]["probability"], spark["probability"], decision)
        assert abs(f.probability - p) < 1e-3 and f.threshold == decision["threshold"]
        assert f.label == ("pathological" if f.probability >= f.threshold else "healthy")
        assert ev["decision"]["rule"] == "combined" and f.to_dict()["evidence"]["endplate_marrow"]["parts"]
    assert combined >= 4  # L1-L5 of the example, each between two graded discs
    # the weights move the decision the way the evidence points
    lo, hi = combined_probability(0.1, 0.5, decision), combined_probability(0.9, 0.5, decision)
    assert lo < decision["threshold"] < hi


def test_spondylolisthesis_combines_the_image_with_the_measured_slip(graded_example):
    """Where the segmentation measured the slip at a disc against the body below, spondylolisthesis is the
    out-of-fold fitted combination of the grader's image probability and that slip; elsewhere (nothing measured,
    or L5-S1 measured over the disc where S1 was not segmented) the image alone. Both parts stay named in the
    JSON, and a second pass of the stage decides nothing twice."""
    from spinepath.core.thresholds import graded_slip
    from spinepath.grading.spider_inference import (
        attach_listhesis_evidence,
        listhesis_probability,
        load_listhesis_decision,
    )

    decision = load_listhesis_decision()
    assert decision["fitted_on"]["discs"] > 400 and 0 < decision["threshold"] < 1 and decision["coef_slip"] > 0
    slips = graded_example.segmentation.measurements["listhesis"]
    combined = 0
    for g in graded_example.findings.degeneration:
        ev = g.evidence["spondylolisthesis"]
        assert g.to_dict()["spondylolisthesis"]["evidence"] == ev
        if not graded_slip(slips.get(g.level)):
            assert ev["rule"] == "image" and (ev["measured_slip"] is None) == (g.level not in slips)
            assert ev["measured_slip"] is None or ev["measured_slip"]["against"] == "disc"
            assert abs(g.binary["spondylolisthesis"] - ev["image"]["probability"]) < 1e-4
            continue
        combined += 1
        assert ev["rule"] == "combined" and ev["measured_slip"]["percent"] == slips[g.level]["percent"]
        p = listhesis_probability(ev["image"]["probability"], slips[g.level]["percent"], decision)
        assert abs(g.binary["spondylolisthesis"] - p) < 1e-3
        assert g.thresholds["spondylolisthesis"] == decision["threshold"]
        assert g.positive("spondylolisthesis") == (p >= decision["threshold"])
    assert combined >= 4  # the lumbar discs of the example, each between two measured bodies
    before = [g.binary["spondylolisthesis"] for g in graded_example.findings.degeneration]
    attach_listhesis_evidence(graded_example.findings, slips)
    assert [g.binary["spondylolisthesis"] for g in graded_example.findings.degeneration] == before
    # a slip over the L5-S1 disc is reported and does not decide
    g = next(g for g in graded_example.findings.degeneration if g.level == "L5-S1")
    kept = (g.evidence.pop("spondylolisthesis"), g.binary["spondylolisthesis"], g.thresholds["spondylolisthesis"])
    p_img = g.binary["spondylolisthesis"] = kept[0]["image"]["probability"]
    g.thresholds["spondylolisthesis"] = kept[0]["image"]["threshold"]
    over_disc = {"offset_mm": 9.0, "percent": 25.0, "against": "disc"}
    attach_listhesis_evidence(graded_example.findings, {"L5-S1": over_disc})
    ev = g.evidence["spondylolisthesis"]
    assert ev["rule"] == "image" and ev["measured_slip"]["against"] == "disc" and g.binary["spondylolisthesis"] == p_img
    g.evidence["spondylolisthesis"], g.binary["spondylolisthesis"], g.thresholds["spondylolisthesis"] = kept
    assert not graded_slip(None) and graded_slip({"percent": 3.0, "against": "body"})
    # a larger slip raises the probability, whatever the image says
    for p_img in (0.01, 0.3):
        assert listhesis_probability(p_img, 2.0, decision) < listhesis_probability(p_img, 20.0, decision)
        assert listhesis_probability(p_img, -20.0, decision) == listhesis_probability(p_img, 20.0, decision)


def test_monai_resnets_script_to_the_same_outputs():
    """The MONAI ResNet choices give the heads' outputs and export through TorchScript unchanged."""
    from spinepath.grading.classifier import MONAI_RESNETS

    x = torch.randn(3, 1, 64, 64)
    for name in MONAI_RESNETS:
        net = SpiderConfig(model=name).network().eval()
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        with torch.no_grad():
            y = net(x)
            assert y.shape == (3, N_OUTPUTS)
            assert torch.allclose(torch.jit.script(net)(x), y, atol=1e-5)


def test_spark_heads_share_the_backbone(data_root):
    """With ``spark_heads`` the network also learns the spark_midsag grades; the SPIDER outputs are unchanged."""
    from spinepath.grading.classifier import to_input
    from spinepath.grading.crops import sample_crop
    from spinepath.grading.spider import SPARK_TARGETS
    from spinepath.grading.spider_training import spark_samples

    images, extra = spark_samples(data_root)
    assert len(extra) > 500 and all(len(s.target) == len(SPARK_TARGETS) for s in extra)
    assert all((s.target[: len(TARGETS)] == -1).all() and (s.target[len(TARGETS):] >= 0).sum() == 1 for s in extra)
    kinds = {s.structure.kind for s in extra}
    assert kinds == {"disc", "vertebra"}
    cfg = SpiderConfig(model="convnext_zepto", spark_heads=True)
    net = cfg.network()
    batch = extra[:6]
    x = torch.from_numpy(np.stack([to_input(sample_crop(images[s.structure.image_key], s.structure, cfg.crop_mm,
                                                        cfg.crop_px)) for s in batch]))
    logits = net(x)
    assert logits.shape == (6, N_OUTPUTS + 6) and head_probabilities(logits).shape == (6, N_OUTPUTS)
    y = torch.from_numpy(np.stack([s.target for s in batch]))
    loss = multitask_loss(logits, y, head_weights(y.numpy()), cfg)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
