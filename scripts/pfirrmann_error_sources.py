"""Where the out-of-fold Pfirrmann error of a SPIDER training run lies: per level, per patient, per scanner.

Reads a run's level table (``RUN/oof.npz`` of ``spinepath train spider``), refits the level fusion with nested
cross-validation by patient as the training does, and splits the error of the fused expected grade (0-4) into
a part shared by all discs of a patient (the patient's mean error) and the rest. Prints JSON:
- ``kappa``: the quadratic κ of the rounded expected grade (the product's rule), and per disc index from the
  bottom (``per_index``: κ, n, mean label, mean expected grade);
- ``variance``: the error's variance, its between-patient part and the within-patient rest;
- ``slopes``: the expected grade regressed on the label between patients (patient means) and within them
  (deviations from the patient's mean); 1 = no compression to the middle;
- ``kappa_without_patient_offset``: κ after subtracting each patient's own mean error (an oracle, not a
  method: it needs the labels) = how much of the gap to a perfect ranking the per-patient offsets hold;
- ``by_scanner``: the mean patient offset per T2 scanner group (manufacturer, field strength, series).
The validation patients are never read.

Usage: python scripts/pfirrmann_error_sources.py [RUN] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.grading.fusion import quadratic_kappa  # noqa: E402
from spinepath.grading.spider import TARGETS, fit_level_fusion, pfirrmann_grade  # noqa: E402


def main() -> None:
    """Refit the fusion out of fold, decompose the Pfirrmann error, print JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", default=REPO / "runs" / "spider_r18")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    z = np.load(args.run / "oof.npz")
    _, cv = fit_level_fusion(z["X"], z["Y"], z["groups"])
    j = TARGETS.index("pfirrmann")
    m = z["Y"][:, j] >= 0
    y, groups, index = z["Y"][m, j], z["groups"][m], z["X"][m, -1].astype(int)
    prob = cv["pfirrmann"][m]
    expected = prob @ np.arange(prob.shape[1])
    grade = pfirrmann_grade(prob, "expected")
    out: dict = {"run": str(args.run), "levels": int(m.sum()), "patients": len(set(groups)),
                 "kappa": round(quadratic_kappa(y, grade), 4), "per_index": {}}
    for i in sorted(set(index)):
        k = index == i
        if k.sum() >= 10:
            out["per_index"][int(i)] = {"n": int(k.sum()), "kappa": round(quadratic_kappa(y[k], grade[k]), 3),
                                        "mean_label": round(float(y[k].mean()), 2),
                                        "mean_expected": round(float(expected[k].mean()), 2)}
    err = expected - y
    patients = sorted(set(groups))
    offset = {p: float(err[groups == p].mean()) for p in patients}
    per_disc = np.array([offset[p] for p in groups])
    out["variance"] = {"error": round(float(err.var()), 3), "between_patients": round(float(per_disc.var()), 3),
                       "within_patients": round(float((err - per_disc).var()), 3)}
    ym = np.array([y[groups == p].mean() for p in patients])
    em = np.array([expected[groups == p].mean() for p in patients])
    dy = y - np.array([y[groups == p].mean() for p in groups])
    de = expected - np.array([expected[groups == p].mean() for p in groups])
    out["slopes"] = {"between_patients": round(float(np.polyfit(ym, em, 1)[0]), 3),
                     "within_patients": round(float(np.polyfit(dy, de, 1)[0]), 3),
                     "offset_vs_patient_mean_label_r": round(float(np.corrcoef(em - ym, ym)[0, 1]), 3)}
    corrected = np.clip(np.rint(expected - per_disc), 0, 4).astype(int)
    out["kappa_without_patient_offset"] = round(quadratic_kappa(y, corrected), 4)
    labels = json.loads((args.data_root / "spider_midsag" / "labels.json").read_text())
    by: dict[str, list[float]] = defaultdict(list)
    for p in patients:
        sc = labels[p].get("scanner", {}).get("t2") or {}
        key = f"{sc.get('manufacturer')} {sc.get('field_strength_t')} T {sc.get('series_description') or ''}".strip()
        by[key if sc else "no T2"].append(offset[p])
    out["by_scanner"] = {k: {"patients": len(v), "mean_offset": round(float(np.mean(v)), 2),
                             "sd": round(float(np.std(v)), 2)}
                         for k, v in sorted(by.items(), key=lambda kv: -len(kv[1])) if len(v) >= 3}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
