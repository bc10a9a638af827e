"""Evaluate the bundle's detector on the validation split of every dataset; write bundle/docs/metrics.json.

Besides the per-dataset contracts (chu_t2, spineweb_vb, spark_midsag, spider_seg), the whole chain runs on the
two DICOM examples (validation cases chu_t2 02 and 04, read as the app reads them): the names of every vertebra
found, the anchor, and the level accuracy of the vertebrae matched to the chu_t2 masks by centre (nearest
reference body centre within half a body height).

Usage: python scripts/evaluate_validation.py [--model PATH] [--out bundle/docs/metrics.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from spinepath import stages  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES, resolve_model_path  # noqa: E402
from spinepath.data.datasets import load_volume_index  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.evaluation.detection import evaluate_detection  # noqa: E402


def dicom_example_naming(example: Path, chu_root: Path, model) -> dict:
    """Whole-chain names on a DICOM example against the chu_t2 masks of the same case (matched by centre)."""
    vol = stages.load(example)
    res = stages.detect_series(vol, model)
    case = next(c for c in load_volume_index(chu_root) if c.case == example.name.rsplit("_", 1)[-1])
    _, mask, _ = case.load()
    ref = {}
    for lab, name in enumerate(case.level_names(), start=1):
        rr, cc, _ = np.nonzero(mask == lab)
        ref[name] = (rr.mean(), cc.mean(), rr.max() - rr.min() + 1)
    ok = n = 0
    for name, (r, c, h) in ref.items():
        n += 1
        near = [t for t in res.vertebrae if np.hypot(*(t.centre - (r, c))) < h / 2]
        ok += int(len(near) == 1 and near[0].level == name)
    naming = res.naming
    return {"names_top_down": [t.level for t in res.vertebrae], "anchor": naming.anchor if naming else None,
            "level_accuracy": ok / max(n, 1), "n_reference": n}


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
    for ds in ("chu_t2", "spineweb_vb", "spark_midsag", "spider_seg"):
        cases = split_cases(root / ds, "validation")
        res[ds] = {"cases": cases, **evaluate_detection(root / ds, model, cases=cases, progress=False)}
        print(ds, json.dumps(res[ds]), flush=True)
    res["dicom_examples"] = {ex.name: dicom_example_naming(ex, root / "chu_t2", model)
                             for ex in sorted((root / "dicom_examples").iterdir())}
    print("dicom_examples", json.dumps(res["dicom_examples"]), flush=True)
    res["model_meta"] = model.meta
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
