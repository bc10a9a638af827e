"""Benchmark: the whole chain on one example study (batched vs. a naive per-slice loop), the grading stages.

Also what the degenerative grading stage adds, with the T2 alone and with a T1, what the segmentation and
measurement stage adds, and the peak RAM.

Usage: python scripts/benchmark.py [--study DIR] [--repeats N] [--threads N] [--json]
Runs on CPU, and also on the GPU when one is available. Prints figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import DEFAULT_GRADER, DEFAULT_MODEL, SHARED_EXAMPLES  # noqa: E402
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.grading.grader import Grader  # noqa: E402
from spinepath.grading.inference import classify_detections, fuse_detections  # noqa: E402
from spinepath.io.dicom import load_study  # noqa: E402
from spinepath.io.phantom import add_t1_companion  # noqa: E402
from spinepath.outputs.writer import write_outputs  # noqa: E402
from spinepath.segmentation.inference import segment_slices  # noqa: E402
from spinepath.stages import (  # noqa: E402
    detect_series,
    grade_degeneration,
    load_segmenter,
    load_spider_grader,
    segment,
)


class OneByOneGrader(Grader):
    """The naive baseline's classifiers: one crop per forward pass."""

    def predict(self, task, images, structures, jitter=None):  # noqa: D102
        if not structures:
            return super().predict(task, images, structures, jitter)
        return np.concatenate([super(OneByOneGrader, self).predict(task, images, [s], jitter) for s in structures])


def bench(study: Path, device: str, repeats: int, naive: bool = False) -> dict:
    """Median timings over ``repeats`` runs with the models loaded once.

    ``naive``: the per-slice loop baseline (detection one slice per forward pass, classification one crop per
    forward pass); otherwise slices and crops are batched.
    """
    t0 = time.perf_counter()
    model = VertebraDetector.load(DEFAULT_MODEL, device=device)
    grader = Grader.load(DEFAULT_GRADER)  # the classifiers run on the CPU
    if naive:
        grader = OneByOneGrader(**vars(grader))
    t_model = time.perf_counter() - t0
    rows = []
    for _ in range(repeats + 1):  # first run is warm-up
        a = time.perf_counter()
        vol = load_study(study)
        b = time.perf_counter()
        res = detect_series(vol, model, batch_size=1 if naive else 8)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        c = time.perf_counter()
        scores = classify_detections(res, grader)
        c2 = time.perf_counter()
        res.findings = fuse_detections(res, scores, grader)
        c3 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            write_outputs(res, d)
        e = time.perf_counter()
        rows.append({"load_s": b - a, "detection_s": c - b, "classification_s": c2 - c, "fusion_s": c3 - c2,
                     "classification_plus_fusion_s": c3 - c, "write_s": e - c3, "total_s": e - a})
    rows = rows[1:]
    out = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    out.update(
        {
            "device": device,
            "mode": "naive per-slice loop" if naive else "batched",
            "model_load_s": round(t_model, 3),
            "n_slices": int(vol.pixels.shape[0]),
            "matrix": list(vol.pixels.shape[1:]),
            "n_vertebrae": len(res.vertebrae),
        }
    )
    return out


def bench_degeneration(study: Path, repeats: int) -> dict:
    """What the degenerative grading stage adds per study, T2 alone and with a T1 (issue 13: <= 1 s on 2 cores).

    The study is copied with a crafted T1 companion (:func:`spinepath.io.phantom.add_t1_companion`); the
    stage (T1 read, second detector pass, crops, 5 fold networks with flip, fusion) is timed after detection.
    """
    model = VertebraDetector.load(DEFAULT_MODEL)
    grader = load_spider_grader()
    out: dict = {"repeats": repeats}
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "study"
        shutil.copytree(study, copy)
        add_t1_companion(copy)
        vol = load_study(copy)
        for name, use_t1 in (("t2_only_s", False), ("t1_t2_s", True)):
            times = []
            for _ in range(repeats + 1):  # first run is warm-up
                res = detect_series(vol, model)
                a = time.perf_counter()
                grade_degeneration(res, grader, model, use_t1=use_t1)
                times.append(time.perf_counter() - a)
            out[name] = round(statistics.median(times[1:]), 3)
            out[name.replace("_s", "_sequences")] = res.findings.degeneration_model["sequences"]
    out["n_discs"] = len(res.findings.degeneration)
    return out


def bench_segmentation(study: Path, repeats: int) -> dict:
    """What the segmentation and measurement stage adds per study (issue 14: <= 1.5 s on 2 cores).

    Timed after detection: the key slice resampled, segmented, brought back, instances named, measured; and,
    apart, the extra SR groups / SEG segments / PDF page of the write step are part of ``dicom_outputs``.
    """
    model = VertebraDetector.load(DEFAULT_MODEL)
    segmenter = load_segmenter()
    vol = load_study(study)
    times, network = [], []
    for _ in range(repeats + 1):  # first run is warm-up
        res = detect_series(vol, model)
        a = time.perf_counter()
        segment(res, segmenter)
        times.append(time.perf_counter() - a)
        k = res.segmentation.key_slice
        b = time.perf_counter()
        with torch.no_grad():
            segment_slices(segmenter, vol.pixels[[k]], (float(vol.spacing[0]), float(vol.spacing[1])))
        network.append(time.perf_counter() - b)
    m = res.segmentation.measurements
    return {"repeats": repeats, "stage_s": round(statistics.median(times[1:]), 3),
            "network_s": round(statistics.median(network[1:]), 3), "n_bodies": len(m["vertebrae"]),
            "n_discs": len(m["discs"])}


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--study", default=str(SHARED_EXAMPLES / "chu_t2_02"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [bench(Path(args.study), "cpu", args.repeats), bench(Path(args.study), "cpu", args.repeats, naive=True)]
    results = {"torch_threads": torch.get_num_threads(), "runs": runs,
               "naive_over_batched_total": round(runs[1]["total_s"] / runs[0]["total_s"], 2)}
    if torch.cuda.is_available():
        results["runs"].append(bench(Path(args.study), "cuda", args.repeats))
        results["gpu"] = torch.cuda.get_device_name(0)
    results["degeneration"] = bench_degeneration(Path(args.study), args.repeats)
    results["segmentation"] = bench_segmentation(Path(args.study), args.repeats)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
