"""Calibration of the grading probabilities (Platt, temperature) and the reliability metrics."""

import numpy as np

from spinepath.evaluation.calibration import reliability, top_label
from spinepath.grading.calibration import Calibration, disc_grade, fit_calibration, fit_platt, fit_temperature
from spinepath.grading.fusion import FEATURES, VertebraScores
from spinepath.grading.grader import Grader
from spinepath.grading.inference import fuse


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_platt_recovers_an_overconfident_score():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 20000)
    y = (rng.random(z.size) < _sigmoid(z)).astype(int)  # true probability sigmoid(z)
    raw = _sigmoid(3 * z - 1)  # overconfident and shifted: logit(raw) = 3z - 1
    a, b = fit_platt(y, raw)
    assert abs(a - 1 / 3) < 0.03 and abs(b - 1 / 3) < 0.06
    cal = Calibration(vertebra=(a, b))
    assert reliability(cal.vertebra_probability(raw), y)["ece"] < 0.02 < reliability(raw, y)["ece"]
    # strictly increasing: the order, hence every decision at a mapped threshold, is unchanged
    order = np.argsort(raw)
    assert np.all(np.diff(cal.vertebra_probability(raw[order])) >= 0)


def test_temperature_recovers_sharpened_probabilities():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.0, (20000, 5))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=p) for p in true_p])
    sharp = np.exp(2.5 * logits) / np.exp(2.5 * logits).sum(1, keepdims=True)
    t = fit_temperature(y, sharp)
    assert abs(t - 2.5) < 0.15
    cal = Calibration(disc_temperature=t)
    p = cal.disc_probabilities(sharp)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-9)
    assert (p.argmax(1) == sharp.argmax(1)).all()
    before, after = reliability(*top_label(y, sharp)), reliability(*top_label(y, p))
    assert after["ece"] < 0.02 < before["ece"]


def test_reliability_bins_and_ece_by_hand():
    r = reliability([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1], n_bins=10)
    # bin 0.1: mean 0.1, rate 0.5; bin 0.9: mean 0.9, rate 1.0 -> ECE = 0.5*0.4 + 0.5*0.1
    assert r["n"] == 4 and abs(r["ece"] - 0.25) < 1e-9 and len(r["bins"]) == 2
    assert reliability([], [])["ece"] is None


def test_calibration_round_trip_and_fuse_keeps_decisions(tmp_path):
    """Saved with the grader; fuse() reports calibrated probabilities with the mapped threshold, same labels."""
    rng = np.random.default_rng(2)
    cal = fit_calibration(rng.integers(0, 2, 200), rng.random(200), rng.integers(0, 5, 200),
                          rng.dirichlet(np.ones(5), 200), "test")
    g = Grader({}, {}, None, "ordinal", {}, None, cal)
    g.save(tmp_path / "g.pt")
    back = Grader.load(tmp_path / "g.pt").calibration
    assert back.vertebra == cal.vertebra and back.disc_temperature == cal.disc_temperature
    plain = Grader({}, {}, None, "ordinal", {})
    verts = [VertebraScores(lv, [p], 0, (30.0, 40.0), 0.9) for lv, p in (("L3", 0.2), ("L4", 0.55), ("L5", 0.9))]
    discs = {"L3-L4": rng.dirichlet(np.ones(5), 3), "L4-L5": rng.dirichlet(np.ones(5), 3)}
    vf_raw, df_raw, _ = fuse(plain, verts, discs)
    vf, df, X = fuse(g, verts, discs)
    assert X.shape[1] == len(FEATURES)
    assert [f.label for f in vf] == [f.label for f in vf_raw]
    assert g.vertebra_threshold == vf[0].threshold != vf_raw[0].threshold == 0.5
    for f, r in zip(vf, vf_raw):
        assert abs(f.probability - float(cal.vertebra_probability(np.array([r.probability]))[0])) < 1e-9
    for d, r in zip(df, df_raw):
        np.testing.assert_allclose(d.probabilities, cal.disc_probabilities(r.probabilities[None])[0])
        assert d.grade == f"v{int(disc_grade(d.probabilities[None], 'ordinal')[0]) + 1}"
