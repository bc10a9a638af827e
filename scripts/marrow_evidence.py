"""Does the marrow signal next to the endplates add to the any-Modic decision? Out of fold, training + selection.

Modic changes are marrow signal changes next to an endplate; the grader sees them in its 64 mm crop, and the
segmentation draws the bodies on the same T2 slice (:mod:`spinepath.measurements.marrow`: the band of marrow
just inside each endplate against the body's core and against the slice's bodies). Rows: every disc of the
spider_midsag *training + selection* patients (the validation part is never read) with a Modic label, located
in the nested cross-validated fusion of the committed grader's run (``runs/<run>/oof.npz``: ``image``), on a T2
anchored on S1 where the marrow signal facing that disc was measured on the bodies the product measures (the
committed detector and segmentation network, as in the product). The other located discs would keep the
image's probability.

A logistic regression on the image log-odds and :data:`~spinepath.measurements.marrow.MARROW_FEATURES` is
cross-validated by patient (5 folds) against the image refitted alone, with the paired bootstrap interval by
patient (:func:`~spinepath.grading.fusion.paired_gain`), for eight band definitions (four depths x the band's
median or 90th percentile; the module's defaults are the one chosen first), and once with the definition chosen
inside each outer fold on its training patients only (``nested``: the figure to trust). Also: the out-of-fold
threshold's balanced accuracy and positive predictive value, the AUC over every located disc (the combination
where measured, the image elsewhere), and the per-vertebra noisy-or
(:func:`~spinepath.grading.spider.vertebra_parts`) with the Modic parts of the combination. A decision is
adopted only where the interval lies above 0 (v0.5.15: it did not; model card, "Where the error comes from").

Usage: python scripts/marrow_evidence.py [--oof runs/spider_combined/oof.npz] [-q]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.levels import disc_index_from_bottom  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.data.split import spider_fitting_studies  # noqa: E402
from spinepath.evaluation.spider import anchored_t2  # noqa: E402
from spinepath.grading.calibration import logit  # noqa: E402
from spinepath.grading.fusion import best_threshold, oof_logistic, paired_gain  # noqa: E402
from spinepath.grading.spider import noisy_or, oof_fused_by_patient, vertebra_parts, vertebra_reference  # noqa: E402
from spinepath.measurements.marrow import (  # noqa: E402
    BAND_MAX_SHARE,
    BAND_MM,
    PERCENTILE,
    marrow_features,
    marrow_signal,
)
from spinepath.stages import load_models, load_segmenter, segment  # noqa: E402

#: The compared band definitions: (depth from, to mm; largest share of the height), percentile.
VARIANTS = tuple(((lo, hi), share, q) for lo, hi, share in ((1.0, 5.0, 0.4), (1.0, 8.0, 0.4), (2.0, 10.0, 0.5),
                                                            (0.0, 4.0, 0.4)) for q in (50.0, 90.0))
PRODUCT = (BAND_MM, BAND_MAX_SHARE, PERCENTILE)


def _name(v: tuple) -> str:
    return f"{v[0][0]:g}-{v[0][1]:g} mm, p{v[2]:g}"


def nested_choice(base: np.ndarray, designs: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray
                  ) -> tuple[np.ndarray, list[str]]:
    """Out-of-fold probabilities when each outer fold chooses its design on its own training patients."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    out, chosen = np.zeros(len(y)), []
    for tr, te in GroupKFold(n_splits=5).split(base, y, groups):
        score = {k: roc_auc_score(y[tr], oof_logistic(np.hstack([base, F])[tr], y[tr], groups[tr], max_iter=3000))
                 for k, F in designs.items()}
        k = max(score, key=score.get)
        chosen.append(k)
        X = np.hstack([base, designs[k]])
        out[te] = LogisticRegression(max_iter=3000).fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
    return out, chosen


def vertebra_auc(fused: dict[str, dict[int, dict[str, float]]], studies: dict) -> float:
    """AUC of the per-vertebra noisy-or of :func:`vertebra_parts` against :func:`vertebra_reference`."""
    from sklearn.metrics import roc_auc_score

    y, p = [], []
    for pid, by_index in fused.items():
        for i, ref in vertebra_reference(studies[pid].discs_by_index).items():
            if (parts := vertebra_parts(by_index, i)) is not None:
                y.append(ref)
                p.append(noisy_or(list(parts.values())))
    return round(float(roc_auc_score(y, p)), 4)


def main() -> None:
    """Measure, compare, print JSON."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oof", default=str(REPO / "runs" / "spider_combined" / "oof.npz"))
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    detector, _ = load_models()
    segmenter = load_segmenter()
    fused = oof_fused_by_patient(args.oof)
    studies = spider_fitting_studies(SHARED_EXAMPLES.parent / "spider_midsag")
    signal: dict[tuple, dict[tuple[str, int], dict]] = {v: {} for v in VARIANTS}
    for p in tqdm(sorted(set(fused) & set(studies)), desc="marrow signal", disable=args.quiet):
        res = anchored_t2(studies[p], detector)
        if res is None:
            continue
        seg = segment(res, segmenter).segmentation
        m = seg.measurements
        bodies = {lv: b for lv, b in seg.instances[seg.key_slice]["bodies"].items() if lv not in m["not_measured"]}
        for v in VARIANTS:
            e = marrow_signal(res.volume.pixels[seg.key_slice], bodies, float(res.volume.spacing[0]), band_mm=v[0],
                              max_share=v[1], percentile=v[2])
            signal[v].update({(p, disc_index_from_bottom(lv)): s for lv, s in e.items()})
    rows, unmeasured = [], []
    for p in sorted(set(fused) & set(studies)):
        for i, f in sorted(fused[p].items()):
            y = studies[p].discs_by_index.get(i, {}).get("modic")
            if y is None or y < 0:
                continue
            (rows if (p, i) in signal[PRODUCT] else unmeasured).append((p, i, int(y > 0), f["modic_any"]))
    y, groups = np.array([r[2] for r in rows]), np.array([r[0] for r in rows])
    p_img = np.array([r[3] for r in rows])
    base = logit(np.clip(p_img, 1e-6, 1 - 1e-6))[:, None]
    designs = {_name(v): np.stack([marrow_features(signal[v].get(r[:2])) for r in rows]) for v in VARIANTS}
    image = oof_logistic(base, y, groups, max_iter=3000)
    compared = {k: paired_gain(roc_auc_score, y, image, oof_logistic(np.hstack([base, F]), y, groups, max_iter=3000),
                               groups) for k, F in designs.items()}
    nested, chosen = nested_choice(base, designs, y, groups)
    compared["nested"] = {**paired_gain(roc_auc_score, y, image, nested, groups), "chosen": chosen}
    X = np.hstack([base, designs[_name(PRODUCT)]])
    oof = oof_logistic(X, y, groups, max_iter=3000)
    thr = best_threshold(y, oof)
    called = oof >= thr
    y_all = np.r_[y, [u[2] for u in unmeasured]]
    p_rest = np.array([u[3] for u in unmeasured])
    # the vertebra's noisy-or with the Modic parts of the combination (out of fold) instead of the image's
    combined = copy.deepcopy({p: fused[p] for p in set(groups)})
    for r, q in zip(rows, oof):
        combined[r[0]][r[1]]["modic_any"] = float(q)
    out = {
        "band": {"mm": list(BAND_MM), "max_share": BAND_MAX_SHARE, "percentile": PERCENTILE},
        "threshold": round(float(thr), 4),
        "rows": {"patients": int(len(set(groups))), "discs": int(len(y)), "positive": int(y.sum()),
                 "not_measured": {"discs": len(unmeasured), "positive": int(sum(u[2] for u in unmeasured))},
                 "oof": Path(args.oof).name},
        "out_of_fold": {
            "auc_image": round(float(roc_auc_score(y, p_img)), 4),
            "auc_combined": round(float(roc_auc_score(y, oof)), 4),
            "band_definitions": compared,
            "balanced_accuracy_combined": round(float(balanced_accuracy_score(y, called)), 4),
            "balanced_accuracy_image": round(float(balanced_accuracy_score(y, p_img >= best_threshold(y, p_img))), 4),
            "ppv_combined": round(float(y[called].mean()), 4) if called.any() else None,
            # every located labelled disc as a decision would report it: the combination where measured, else the image
            "auc_located_discs_image": round(float(roc_auc_score(y_all, np.r_[p_img, p_rest])), 4),
            "auc_located_discs_combined": round(float(roc_auc_score(y_all, np.r_[oof, p_rest])), 4),
            "vertebra_noisy_or_auc": {"image": vertebra_auc({p: fused[p] for p in set(groups)}, studies),
                                      "combined": vertebra_auc(combined, studies)},
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
