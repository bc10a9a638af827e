"""Image-quality range of the detector's training data: signal-to-noise, pixel size (spinepath.review).

Runs the detector on the clinical 4 mm slices of the chu_t2 / spineweb_vb training volumes and on the
spark_midsag training images, and prints per dataset the signal-to-noise of :func:`spinepath.review.signal_to_noise`
(min, 5th percentile, median) as JSON. ``configs/review.json`` sets ``min_signal_to_noise`` below the minimum.

Usage: python scripts/quality_range.py [--model PATH] [-q]
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

from spinepath.core.geometry import series_from_slices, spark_fov_spacing  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES, resolve_model_path  # noqa: E402
from spinepath.data.datasets import clinical_slice_indices, iter_volume_slices, load_spark, load_volume_index  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.review import signal_to_noise  # noqa: E402
from spinepath.stages import detect_series  # noqa: E402


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model")
    ap.add_argument("--data-root", default=str(SHARED_EXAMPLES.parent))
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    model = VertebraDetector.load(resolve_model_path(args.model))
    root = Path(args.data_root)
    out = {}
    for ds in ("chu_t2", "spineweb_vb", "spark_midsag"):
        train = split_cases(root / ds, "train")
        snr = []
        if ds == "spark_midsag":
            for c in tqdm([c for c in load_spark(root / ds) if c.case in train], desc=ds, disable=args.quiet):
                img = c.load_image()
                sp = spark_fov_spacing(img.shape)
                snr.append(signal_to_noise(detect_series(series_from_slices([img], (sp, sp), 4.0), model)))
        else:
            for case in tqdm([c for c in load_volume_index(root / ds) if c.case in train], desc=ds,
                             disable=args.quiet):
                slices = list(iter_volume_slices(case, clinical_slice_indices(case.n_slices)))
                vol = series_from_slices([s.image for s in slices], slices[0].spacing, 4.0)
                snr.append(signal_to_noise(detect_series(vol, model)))
        v = np.array([x for x in snr if x is not None])
        out[ds] = {"n": len(v), "min": round(float(v.min()), 2), "p5": round(float(np.percentile(v, 5)), 2),
                   "median": round(float(np.median(v)), 2)}
    print(json.dumps({"task": "quality_range", "signal_to_noise": out}))


if __name__ == "__main__":
    main()
