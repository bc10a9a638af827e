"""Do the measurements add evidence to the decisions? (issue 14, item 4) Out of fold, training + selection only.

On the spider_midsag T2 of the training + selection patients (validation never read), the committed detector
names the vertebrae and the committed segmentation network measures the mid-sagittal image. Two comparisons,
each a logistic regression cross-validated by patient (5 folds), with and without the measurements:

* per-vertebra pathology (issue 13's reference): log-odds of the endplate / marrow evidence and of the spark
  score (the product's decision) vs the same plus the body's height loss and wedge ratio;
* disc narrowing (SPIDER's label): log-odds of the fused narrowing probability vs the same plus the disc
  height index and the disc's middle height relative to its measured neighbours;
* the Pfirrmann grade: the level fusion with its booster (nested cross-validation by patient, the prior's
  weight and the rounds chosen on the folds, rounded expected grade) on the committed features vs the same
  plus the disc's T2 signal ratio to the CSF (what Pfirrmann grades by) and its height index, quadratic κ.

Prints both out-of-fold figures of each and the gain with a paired bootstrap 95% interval by patient; the README
and the model card report them. A measurement becomes a decision feature only where it measures better: where
that interval lies above 0.

Usage: python scripts/measurement_evidence.py [--oof runs/spider_r18/oof.npz] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.geometry import series_from_slices  # noqa: E402
from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS, disc_index_from_bottom  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.data.split import spider_fitting_studies  # noqa: E402
from spinepath.grading.calibration import logit  # noqa: E402
from spinepath.grading.fusion import oof_logistic, paired_gain, quadratic_kappa  # noqa: E402
from spinepath.grading.spider import (  # noqa: E402
    BOOST_ROUNDS,
    FUSION_FEATURES,
    TARGETS,
    fusion_settings,
    nested_pfirrmann,
    oof_fused_by_patient,
    pfirrmann_grade,
    vertebra_parts,
    vertebra_probability,
    vertebra_reference,
)
from spinepath.stages import detect_series, grade, load_models, load_segmenter, load_spider_grader, segment  # noqa: E402


def oof_auc(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Out-of-fold AUC of a logistic regression on ``X`` (5 folds by patient)."""
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, oof_logistic(X, y, groups, max_iter=1000))), 4)


def compare(base: np.ndarray, more: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float, dict]:
    """Out-of-fold AUCs of ``base`` and of ``more`` features, and the gain of ``more`` (:func:`paired_gain`)."""
    from sklearn.metrics import roc_auc_score

    pa, pb = (oof_logistic(X, y, groups, max_iter=1000) for X in (base, more))
    r = paired_gain(roc_auc_score, y, pa, pb, groups)
    return r["a"], r["b"], {"gain": r["gain"], "ci95": r["ci95"]}


def pfirrmann_comparison(oof: str, measured: dict[tuple[str, int], tuple[float, float]]) -> dict:
    """The Pfirrmann fusion with and without the T2 signal ratio and height index (:func:`nested_pfirrmann`)."""
    z = np.load(oof)
    X, Y, groups = z["X"], z["Y"], z["groups"]
    M = np.array([measured.get((str(p), int(i)), (np.nan, np.nan)) for p, i in zip(groups, X[:, -1])], float)
    # the booster's rounds searched on both sides: the features act through it (the committed fusion has none)
    grid = fusion_settings(BOOST_ROUNDS)
    pa, y, g = nested_pfirrmann(X, Y, groups, settings=grid)
    pb, _, _ = nested_pfirrmann(np.hstack([X, M]), Y, groups, (*FUSION_FEATURES, "t2_signal_ratio",
                                                                  "disc_height_index"), settings=grid)
    r = paired_gain(quadratic_kappa, y, pfirrmann_grade(pa, "expected"), pfirrmann_grade(pb, "expected"), g)
    out = {"kappa": r["a"], "kappa_with": r["b"], "gain": r["gain"], "ci95": r["ci95"]}
    lab = Y[:, TARGETS.index("pfirrmann")] >= 0
    out["measured_fraction"] = {"t2_signal_ratio": round(float(np.isfinite(M[lab, 0]).mean()), 3),
                                "disc_height_index": round(float(np.isfinite(M[lab, 1]).mean()), 3)}
    return out


def main() -> None:
    """Measure, compare, print JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oof", default=str(REPO / "runs" / "spider_r18" / "oof.npz"))
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    detector, spark = load_models()
    spider, segmenter = load_spider_grader(), load_segmenter()
    fused = oof_fused_by_patient(args.oof)
    studies = spider_fitting_studies(SHARED_EXAMPLES.parent / "spider_midsag")
    below = {lv: disc_index_from_bottom(f"{lv}-{VERTEBRA_LEVELS[VERTEBRA_LEVELS.index(lv) + 1]}")
             for lv in VERTEBRA_LEVELS[:-1]}
    vert, disc, signal = [], [], {}
    for p in tqdm(sorted(set(fused) & set(studies)), desc="measure", disable=args.quiet):
        st = studies[p]
        res = detect_series(series_from_slices([st.load_image("t2")], st.spacing.get("t2") or (1.0, 1.0), 4.0),
                            detector)
        if res.naming is None or res.naming.anchor != "S1":
            continue
        grade(res, spark)
        segment(res, segmenter)
        m = res.segmentation.measurements
        sp = {below[f.level]: f.probability for f in res.findings.vertebrae if f.level in below}
        for lv, i in below.items():
            parts = vertebra_parts(fused[p], i)
            ref = vertebra_reference(st.discs_by_index).get(i)
            if parts is None or ref is None or i not in sp:
                continue
            e = m["vertebrae"].get(lv, {})
            vert.append((p, ref, vertebra_probability(parts, spider.fusion.vertebra), sp[i],
                         e.get("height_loss", 0.0), e.get("wedge_ratio", 1.0)))
        for lv, e in m["discs"].items():
            signal[(p, disc_index_from_bottom(lv))] = tuple(np.nan if e.get(k) is None else e[k]
                                                            for k in ("t2_signal_ratio", "disc_height_index"))
        mids = {lv: e["middle"]["mm"] for lv, e in m["discs"].items() if e.get("middle")}
        order = [lv for lv in DISC_LEVELS if lv in mids]
        for lv in DISC_LEVELS:
            i = disc_index_from_bottom(lv) if lv in DISC_LEVELS[DISC_LEVELS.index("T12-L1"):] else None
            label = st.discs_by_index.get(i, {}).get("narrowing") if i else None
            if i is None or label is None or i not in fused[p]:
                continue
            e = m["discs"].get(lv, {})
            rel = 1.0
            if lv in order:
                j = order.index(lv)
                nb = [mids[n] for n in order[max(j - 1, 0):j + 2] if n != lv]
                rel = mids[lv] / float(np.mean(nb)) if nb else 1.0
            disc.append((p, int(label > 0), fused[p][i]["narrowing"], e.get("disc_height_index", 0.35), rel))
    out: dict = {"patients": len({r[0] for r in vert}), "vertebrae": len(vert), "discs": len(disc)}
    g, y = np.array([r[0] for r in vert]), np.array([r[1] for r in vert])
    base = np.stack([logit(np.array([r[2] for r in vert])), logit(np.array([r[3] for r in vert]))], 1)
    meas = np.array([[r[4], r[5]] for r in vert])
    a, b, gain = compare(base, np.hstack([base, meas]), y, g)
    out["vertebra_auc"] = {"decision": a, "decision_plus_height_loss_wedge": b, "gain_paired_bootstrap": gain}
    g, y = np.array([r[0] for r in disc]), np.array([r[1] for r in disc])
    base = logit(np.array([r[2] for r in disc]))[:, None]
    meas = np.array([[r[3], r[4]] for r in disc])
    a, b, gain = compare(base, np.hstack([base, meas]), y, g)
    out["narrowing_auc"] = {"fused": a, "fused_plus_dhi_relative_height": b,
                            "measurements_alone": oof_auc(meas, y, g), "gain_paired_bootstrap": gain}
    out["pfirrmann_kappa"] = pfirrmann_comparison(args.oof, signal)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
