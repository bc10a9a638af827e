"""Evaluate the bundle's detector on the validation split of every dataset; write bundle/docs/metrics.json.

Usage: python scripts/evaluate_validation.py [--model PATH] [--out bundle/docs/metrics.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import SHARED_EXAMPLES, resolve_model_path  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.evaluation.detection import evaluate_detection  # noqa: E402


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model")
    ap.add_argument("--data-root", default=str(SHARED_EXAMPLES.parent))
    ap.add_argument("--out", default=str(REPO / "bundle" / "docs" / "metrics.json"))
    args = ap.parse_args()
    model = VertebraDetector.load(resolve_model_path(args.model))
    root = Path(args.data_root)
    res = {}
    for ds in ("chu_t2", "spineweb_vb", "spark_midsag"):
        cases = split_cases(root / ds, "validation")
        res[ds] = {"cases": cases, **evaluate_detection(root / ds, model, cases=cases, progress=False)}
        print(ds, json.dumps(res[ds]), flush=True)
    res["model_meta"] = model.meta
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
