"""Compare level-naming rule variants on a split part (default: selection, which is where rules are chosen).

Each ``KEY=VALUE[,KEY=VALUE]`` variant overrides ``configs/naming.json`` (e.g. ``s1_threshold=0.4``,
``anchor_search=4``); the calibration is switched off so raw naming is compared. Prints one JSON line per
variant: per dataset (accuracy of the matched names, count, anchored fraction) and the pooled accuracy.

Usage: python scripts/naming_rules.py [--model PATH] [--part selection] VARIANT [VARIANT ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import SHARED_EXAMPLES, resolve_model_path  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.detection.naming import load_naming_rules  # noqa: E402
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.evaluation.naming import naming_outcomes  # noqa: E402

DATASETS = ("spark_midsag", "chu_t2", "spineweb_vb", "spider_seg")


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model")
    ap.add_argument("--data-root", default=str(SHARED_EXAMPLES.parent))
    ap.add_argument("--part", default="selection", choices=("selection", "validation", "train"))
    ap.add_argument("variants", nargs="*", default=[""])
    args = ap.parse_args()
    model = VertebraDetector.load(resolve_model_path(args.model))
    root = Path(args.data_root)
    for spec in args.variants or [""]:
        rules = {**load_naming_rules(), "calibration": None}
        for kv in filter(None, spec.split(",")):
            k, v = kv.split("=")
            rules[k] = float(v)
        res, n_ok, n_all = {}, 0, 0
        for ds in DATASETS:
            o = naming_outcomes(root / ds, model, split_cases(root / ds, args.part), rules, progress=False)
            ok = sum(x.correct for x in o)
            res[ds] = {"accuracy": round(ok / max(len(o), 1), 4), "n": len(o),
                       "anchored": round(float(np.mean([x.anchored for x in o])) if o else 0.0, 3)}
            n_ok, n_all = n_ok + ok, n_all + len(o)
        print(json.dumps({"variant": spec or "as configured", "part": args.part, **res,
                          "pooled_accuracy": round(n_ok / max(n_all, 1), 4)}), flush=True)


if __name__ == "__main__":
    main()
