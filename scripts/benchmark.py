"""Benchmark: the whole chain on one example study (batched vs. a naive per-slice loop), the grading stages.

Also what the degenerative grading stage adds, with the T2 alone and with a T1, what the segmentation and
measurement stage adds, the peak RAM, the cold process (``python app.py`` on the study, with the TorchScript
exports and with the eager networks) and the warm per-study time of a process that keeps its models loaded.

Usage: python scripts/benchmark.py [--study DIR] [--repeats N] [--threads N] [--only SECTION ...]
                                   [--devices cpu,cuda]
Runs every section on the CPU, and again on the GPU when one is available (``--devices`` chooses). Prints
figures as JSON: ``{"cpu": {section: ...}, "cuda": {section: ...}}``. A cold process on the CPU hides the
GPU (``CUDA_VISIBLE_DEVICES=""``); where the Deploy SDK is not installed, it is ``python -m spinepath run``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
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
    grader = Grader.load(DEFAULT_GRADER, device=device)
    if naive:
        grader = OneByOneGrader(**vars(grader))
    t_model = time.perf_counter() - t0
    rows = []
    for _ in range(repeats + 1):  # first run is warm-up
        a = time.perf_counter()
        vol = load_study(study)
        b = time.perf_counter()
        res = detect_series(vol, model, batch_size=1 if naive else 8)
        _sync(device)
        c = time.perf_counter()
        scores = classify_detections(res, grader)
        _sync(device)
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_degeneration(study: Path, repeats: int, device: str = "cpu") -> dict:
    """What the degenerative grading stage adds per study, T2 alone and with a T1 (issue 13: <= 1 s on 2 cores).

    The study is copied with a crafted T1 companion (:func:`spinepath.io.phantom.add_t1_companion`); the
    stage (T1 read, second detector pass, crops, 5 fold networks with flip, fusion) is timed after detection.
    """
    model = VertebraDetector.load(DEFAULT_MODEL, device=device)
    grader = load_spider_grader(device=device)
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
                _sync(device)
                times.append(time.perf_counter() - a)
            out[name] = round(statistics.median(times[1:]), 3)
            out[name.replace("_s", "_sequences")] = res.findings.degeneration_model["sequences"]
    out["n_discs"] = len(res.findings.degeneration)
    return out


def bench_segmentation(study: Path, repeats: int, device: str = "cpu") -> dict:
    """What the segmentation and measurement stage adds per study (issue 14: <= 1.5 s on 2 cores).

    Timed after detection: the key slice resampled, segmented, brought back, instances named, measured; and,
    apart, the extra SR groups / SEG segments / PDF page of the write step are part of ``dicom_outputs``.
    """
    model = VertebraDetector.load(DEFAULT_MODEL, device=device)
    segmenter = load_segmenter(device=device)
    vol = load_study(study)
    times, network = [], []
    for _ in range(repeats + 1):  # first run is warm-up
        res = detect_series(vol, model)
        a = time.perf_counter()
        segment(res, segmenter)
        _sync(device)
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


#: Runs a command from a small process and reports its wall time and peak RSS: a child forked from this (large)
#: benchmark process would count this process's memory as its own peak (Linux keeps the peak across exec).
LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "rc": os.waitstatus_to_exitcode(status)}))
"""


def _has_deploy_sdk() -> bool:
    from importlib.util import find_spec

    try:
        return find_spec("monai.deploy") is not None
    except ModuleNotFoundError:
        return False


def _app_once(study: Path, out: Path, model_dir: Path | None, device: str = "cpu") -> dict:
    """One ``python app.py`` process (``spinepath run`` without the Deploy SDK): wall, peak RSS, stage timings."""
    if _has_deploy_sdk():
        cmd = [sys.executable, str(REPO / "app.py"), "-i", str(study), "-o", str(out)]
    else:
        cmd = [sys.executable, "-m", "spinepath", "-q", "run", "-i", str(study), "-o", str(out)]
    if model_dir is not None:
        cmd += ["-m", str(model_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLOSCAN_")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"app.py failed ({res['rc']}): {r.stderr[-2000:]}")
    stages = json.loads((out / "vertebrae.json").read_text())["timings_s"]
    return {"wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"], "chain_s": sum(stages.values()),
            **{f"{k}_s": v for k, v in stages.items()}}


def bench_cold(study: Path, repeats: int, device: str = "cpu") -> dict:
    """The whole ``python app.py`` process on one study (issue 15: <= 4 s on 2 cores), medians of ``repeats``.

    ``exported``: the bundle's models with their TorchScript exports (``make env`` makes them); ``eager``: the
    same ``.pt`` files in a folder without exports (MONAI's networks, torchvision and timm imported).
    ``outside_chain_s``: the wall time not spent in the chain's stages (start-up, imports, model loading, exit).
    """
    out: dict = {"entry": "app.py" if _has_deploy_sdk() else "python -m spinepath run"}
    with tempfile.TemporaryDirectory() as d:
        eager_dir = Path(d) / "eager"
        eager_dir.mkdir()
        for name in ("model.pt", "grader.pt", "spider_grader.pt", "segmentation.pt"):
            shutil.copy(DEFAULT_MODEL.parent / name, eager_dir / name)
        for kind, model_dir in (("exported", None), ("eager", eager_dir)):
            _app_once(study, Path(d) / "warmup", model_dir, device)  # file caches
            rows = [_app_once(study, Path(d) / f"{kind}{i}", model_dir, device) for i in range(repeats)]
            med = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
            med["outside_chain_s"] = round(med["wall_s"] - med["chain_s"], 3)
            out[kind] = med
    return out


def bench_warm(study: Path, repeats: int, device: str = "cpu") -> dict:
    """Per-study time of a process that keeps its models loaded (the PACS worker, a batch worker)."""
    from spinepath.run import run_study
    from spinepath.stages import load_models

    model, grader = load_models(device=device)
    spider, seg = load_spider_grader(device=device), load_segmenter(device=device)
    times, chains = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats + 1):  # the first run is a warm-up
            t0 = time.perf_counter()
            res = run_study(study, Path(d) / str(i), model, grader=grader, spider_grader=spider, segmenter=seg)
            times.append(time.perf_counter() - t0)
            chains.append(sum(res["timings_s"].values()))
    return {"per_study_s": round(statistics.median(times[1:]), 3), "chain_s": round(statistics.median(chains[1:]), 3),
            "exported": type(model.detector).__name__ == "ExportedRetinaNet"}


def bench_batch(study: Path, repeats: int, device: str = "cpu", n_studies: int = 20, workers: int = 2) -> dict:
    """``spinepath batch`` over copies of the study (folder mode, a local cluster of ``workers``).

    Run as the command (``python -m spinepath batch``), in a process of its own: a local cluster's workers are
    spawned and re-import the launching program's main module, so run from this script they would import
    everything it imports (MONAI's networks among them) before their first study, which the command's workers do
    not. ``overhead_per_study_s``: each task's seconds minus the chain's own stages (reading, writing the
    folder); ``wall_over_ideal``: the batch's wall time against the chain times summed and shared by the workers
    (1.0: no start-up, no idle worker; issue 15 asks for throughput within 15 % of the summed chain times).
    """
    from spinepath.io.dicom import copy_with_new_uids

    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # for the workers (new processes)
    with tempfile.TemporaryDirectory() as d:
        for i in range(n_studies):
            copy_with_new_uids(study, Path(d) / "archive" / f"s{i:02d}")
        r = subprocess.run([sys.executable, "-m", "spinepath", "-q", "batch", "--folder", str(Path(d) / "archive"),
                            "--out", str(Path(d) / "out"), "--workers", str(workers)],
                           cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"spinepath batch failed ({r.returncode}): {r.stderr[-2000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        chain = sum(sum(json.loads(p.read_text())["timings_s"].values())
                    for p in (Path(d) / "out").glob("*/vertebrae.json"))
    return {"studies": n_studies, "workers": workers, "done": res["done"], "wall_s": round(res["wall_s"], 2),
            "study_s": round(res["study_s"], 2), "chain_s": round(chain, 2),
            "overhead_per_study_s": round((res["study_s"] - chain) / n_studies, 3),
            "wall_over_ideal": round(res["wall_s"] / (chain / workers), 3),
            "peak_worker_rss_mb": res.get("peak_worker_rss_mb")}


#: The sections of the benchmark (``--only``).
SECTIONS = ("chain", "degeneration", "segmentation", "warm", "cold_process", "batch")


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--study", default=str(SHARED_EXAMPLES / "chu_t2_02"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped without a GPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    study, only = Path(args.study), set(args.only or SECTIONS)
    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    results: dict = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    for device in devices:
        per: dict = {}
        if "chain" in only:
            runs = [bench(study, device, args.repeats), bench(study, device, args.repeats, naive=True)]
            per.update(runs=runs, naive_over_batched_total=round(runs[1]["total_s"] / runs[0]["total_s"], 2))
        for name, fn in (("degeneration", bench_degeneration), ("segmentation", bench_segmentation),
                         ("warm", bench_warm), ("cold_process", bench_cold), ("batch", bench_batch)):
            if name in only:
                per[name] = fn(study, args.repeats, device)
        results[device] = per
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
