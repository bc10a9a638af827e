"""GPU check (issue 15): the whole chain on CUDA against the CPU, and mixed precision stage by stage.

For each real example study (and the first again with a crafted T1 companion, so the T1 path of the
degenerative grading runs too), the chain (:func:`spinepath.run.run_study`, outputs with fixed UIDs) runs on
the CPU in float32 (the reference), on CUDA in float32, on CUDA with float16 autocast for each network stage
alone, for all of them and for the default set, and on CUDA with the eager (not exported) networks. Each
run's ``vertebrae.json`` is compared with the reference's (:func:`spinepath.evaluation.parity.compare`):
every field but the floats (levels, grades, labels, flags, review reasons) must be equal ("same findings");
floats are compared by kind (box coordinates, probabilities and scores, measurements, the rest) and the
largest differences reported.

Usage: python scripts/gpu_check.py [--studies DIR ...] [--out FILE]
Prints JSON; exits 1 when a run's findings differ from the CPU's. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import SHARED_EXAMPLES, model_files  # noqa: E402
from spinepath.core.precision import DEFAULT_AMP_STAGES, STAGES  # noqa: E402
from spinepath.evaluation.parity import compare  # noqa: E402


def load_all(device: str, exported: bool = True) -> dict:
    """The four models of the bundle on ``device`` (exported or eager networks)."""
    from spinepath.detection.predictor import VertebraDetector
    from spinepath.grading.grader import Grader
    from spinepath.grading.spider import SpiderGrader
    from spinepath.segmentation.inference import load_segmenter

    det, grader, spider, seg = model_files(None)
    return {"model": VertebraDetector.load(det, device=device, exported=exported),
            "grader": Grader.load(grader, exported=exported, device=device),
            "spider_grader": SpiderGrader.load(spider, exported=exported, device=device),
            "segmenter": load_segmenter(seg, exported=exported, device=device)}


def run_once(study: Path, out: Path, models: dict, amp: str) -> tuple[dict, float]:
    """One chain run with ``$SPINEPATH_AMP=amp`` (empty: the default stages): the JSON result and seconds."""
    from spinepath.run import run_study

    os.environ["SPINEPATH_AMP"] = amp
    t0 = time.perf_counter()
    run_study(study, out, uid_seed="gpu-check", **models)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return json.loads((out / "vertebrae.json").read_text()), time.perf_counter() - t0


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", nargs="+", default=[str(SHARED_EXAMPLES / n) for n in ("chu_t2_02", "chu_t2_04")])
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--runs", nargs="+", help="only these runs (cuda_fp32, cuda_amp_<stage>, cuda_amp_all, "
                    "cuda_amp_default, cuda_eager_fp32, cuda_eager_amp_all, cuda_eager_amp_default)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"gpu": None, "note": "no CUDA device: nothing to check"}))
        return
    from spinepath.io.phantom import add_t1_companion

    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "tf32_conv": torch.backends.cudnn.allow_tf32, "studies": {}}
    loaded = {"cpu": load_all("cpu"), "cuda": load_all("cuda")}
    if not args.runs or any("eager" in r for r in args.runs):
        loaded["cuda_eager"] = load_all("cuda", exported=False)
    report["exported_on_cuda"] = type(loaded["cuda"]["model"].detector).__name__
    runs = [("cuda_fp32", "cuda", "none"), *[(f"cuda_amp_{s}", "cuda", s) for s in STAGES],
            ("cuda_amp_all", "cuda", "all"), ("cuda_amp_default", "cuda", ""),
            ("cuda_eager_fp32", "cuda_eager", "none"), ("cuda_eager_amp_all", "cuda_eager", "all"),
            ("cuda_eager_amp_default", "cuda_eager", "")]
    if args.runs:
        runs = [r for r in runs if r[0] in args.runs]
    report["default_amp_stages"] = sorted(DEFAULT_AMP_STAGES)
    ok = True
    with tempfile.TemporaryDirectory() as d:
        studies = [Path(s) for s in args.studies]
        with_t1 = Path(d) / f"{studies[0].name}_with_t1"
        shutil.copytree(studies[0], with_t1)
        add_t1_companion(with_t1)
        for study in [*studies, with_t1]:
            ref, t_ref = run_once(study, Path(d) / "ref", loaded["cpu"], "none")
            run_once(study, Path(d) / "warmup", loaded["cuda"], "none")  # CUDA kernels and caches
            entry: dict = {"cpu_chain_s": round(t_ref, 3), "levels": ref.get("levels"), "runs": {}}
            for name, which, amp in runs:
                res, t = run_once(study, Path(d) / name, loaded[which], amp)
                cmp = compare(ref, res)
                cmp["chain_s"] = round(t, 3)
                entry["runs"][name] = cmp
                ok &= cmp["same_findings"]
            report["studies"][study.name] = entry
    report["all_same_findings"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
