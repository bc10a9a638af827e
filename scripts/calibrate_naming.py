"""Fit the name-confidence calibration on the selection split and check it on the validation split.

The raw name confidences (``configs/naming.json`` with ``calibration`` off) of every matched vertebra of the
selection split (spark_midsag, chu_t2, spineweb_vb: never trained on by models after the split existed) are
fitted by isotonic regression to whether the name was right, anchored and unanchored names apart (a map
needs 20 outcomes; fitted values are capped at 0.99); the map is written into ``configs/naming.json``
(``--write``). The validation split (which chooses nothing) is then scored with the map: JSON on stdout and
in ``bundle/docs/naming_calibration.json``, and a reliability diagram ``bundle/docs/naming_reliability.png``.

Usage: python scripts/calibrate_naming.py [--model PATH] [--write] [-q]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sklearn.isotonic import IsotonicRegression  # noqa: E402

from spinepath.core.paths import SHARED_EXAMPLES, resolve_model_path  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.detection.naming import NAMING_RULES, load_naming_rules  # noqa: E402
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.evaluation.calibration import plot_reliability  # noqa: E402
from spinepath.evaluation.naming import calibration_report, naming_outcomes  # noqa: E402

DATASETS = ("spark_midsag", "chu_t2", "spineweb_vb", "spider_seg")


def outcomes(root: Path, model, part: str, rules: dict, quiet: bool) -> list:
    """Outcomes over the datasets' ``part`` split."""
    out = []
    for ds in DATASETS:
        out += naming_outcomes(root / ds, model, split_cases(root / ds, part), rules, progress=not quiet)
    return out


#: Fewer outcomes than this: no map (the raw confidence is kept). A fitted 1.0 is capped: finite samples.
MIN_OUTCOMES, MAX_CONFIDENCE = 20, 0.99


def _isotonic(raw: list) -> dict | None:
    if len(raw) < MIN_OUTCOMES:
        return None
    x = np.array([o.confidence for o in raw])
    y = np.array([o.correct for o in raw], float)
    iso = IsotonicRegression(y_min=0.0, y_max=MAX_CONFIDENCE, increasing=True, out_of_bounds="clip").fit(x, y)
    return {"raw": [round(float(v), 4) for v in iso.X_thresholds_],
            "correct": [round(float(v), 4) for v in iso.y_thresholds_], "n": len(raw)}


def fit(raw: list) -> dict:
    """Isotonic maps raw confidence -> fraction correct (anchored and unanchored names), as breakpoints."""
    return {"anchored": _isotonic([o for o in raw if o.anchored]),
            "unanchored": _isotonic([o for o in raw if not o.anchored]),
            "fitted_on": "selection split: " + ", ".join(DATASETS)}


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model")
    ap.add_argument("--data-root", default=str(SHARED_EXAMPLES.parent))
    ap.add_argument("--write", action="store_true", help="write the fitted map into configs/naming.json")
    ap.add_argument("--docs", default=str(REPO / "bundle" / "docs"))
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    model = VertebraDetector.load(resolve_model_path(args.model))
    root = Path(args.data_root)
    rules = dict(load_naming_rules())
    raw_rules = {**rules, "calibration": None}
    selection = outcomes(root, model, "selection", raw_rules, args.quiet)
    cal = fit(selection)
    fitted = {**rules, "calibration": cal}
    val_raw = outcomes(root, model, "validation", raw_rules, args.quiet)
    val = outcomes(root, model, "validation", fitted, args.quiet)
    reports = {"validation, raw": calibration_report(val_raw), "validation, calibrated": calibration_report(val),
               "selection, raw": calibration_report(selection)}
    by_dataset = {ds: calibration_report([o for o in val if o.dataset == ds]) for ds in DATASETS}
    result = {"task": "naming_calibration", "calibration": cal, **reports, "validation_by_dataset": by_dataset,
              "validation_outcomes": [dataclasses.asdict(o) for o in val]}
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "naming_calibration.json").write_text(json.dumps(result, indent=1))
    plot_reliability({k: v for k, v in reports.items() if k.startswith("validation")}, docs / "naming_reliability.png",
                     "Level-name reliability (validation split)", "name confidence", "fraction of names correct")
    if args.write:
        NAMING_RULES.write_text(json.dumps(fitted, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "validation_outcomes"}))


if __name__ == "__main__":
    main()
