"""How far small acquisition changes move the SPIDER grader's decisions: the review margin of each finding.

On the spider_midsag *selection* patients (the validation part chooses nothing), each T2 image is graded as
acquired and under the perturbations of the robustness tests that raise no image-quality flag: Rician noise at
5% of the 99th intensity percentile (three seeds) and a 40% bias field. The discs are located once on the
original image, so only the grading moves. For every binary finding (and any Modic change) it measures the
change of the fused log-odds, ``|delta|``; a decision that flips moves across its threshold, so a margin of
half the finding's 95th percentile of ``|delta|`` around its threshold catches at least 95% of flips on one side or the
other (``configs/review.json`` -> ``degeneration_logit_margin``). Prints JSON: the margins, the quantiles and
the fraction of out-of-fold discs (``--oof``, default ``runs/spider_r18/oof.npz``, when present) each margin
flags, and the positive predictive value of each finding's calls there (``degeneration_oof_ppv``).

Usage: python scripts/degeneration_margin.py [--limit N] [--oof RUN/oof.npz] [-q]
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

from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.data.spider import load_spider_midsag  # noqa: E402
from spinepath.data.split import split_part  # noqa: E402
from spinepath.grading.calibration import logit  # noqa: E402
from spinepath.grading.spider import (  # noqa: E402
    BINARY,
    TARGETS,
    fit_level_fusion,
    fused_findings,
    level_table,
    predict_samples,
)
from spinepath.grading.spider_training import study_samples  # noqa: E402
from spinepath.stages import load_models, load_spider_grader  # noqa: E402
from spinepath.transforms import normalise_image  # noqa: E402

FINDINGS = (*BINARY, "modic_any")


def rician(img: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rician noise at ``fraction`` of the 99th percentile (as in the robustness tests)."""
    rng = np.random.default_rng(seed)
    sd = fraction * np.percentile(img, 99)
    return np.sqrt((img + rng.normal(0, sd, img.shape)) ** 2 + rng.normal(0, sd, img.shape) ** 2)


def bias(img: np.ndarray, strength: float) -> np.ndarray:
    """A smooth multiplicative field (as in the robustness tests)."""
    r, c = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return img * (1 + strength * (r / r.max() - 0.5) + 0.5 * strength * np.sin(np.pi * c / c.max()))


PERTURBATIONS = {"noise 5% seed 0": lambda x: rician(x, 0.05, 0), "noise 5% seed 1": lambda x: rician(x, 0.05, 1),
                 "noise 5% seed 2": lambda x: rician(x, 0.05, 2), "bias field 40%": lambda x: bias(x, 0.4)}


def fused_logits(grader, images: dict, samples: list) -> dict[int, dict[str, float]]:
    """Fused log-odds per disc index and finding."""
    table = level_table(samples, predict_samples(grader.models, grader.cfg, images, samples))
    keys = sorted(table)
    fused = grader.fusion.predict(np.stack([table[k] for k in keys]))
    return {idx: {k: float(logit(v)) for k, v in fused_findings(fused, i).items()} for i, (_, idx) in enumerate(keys)}


def main() -> None:
    """Measure and print the margins."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="first N selection patients only")
    ap.add_argument("--oof", type=Path, default=REPO / "runs" / "spider_r18" / "oof.npz",
                    help="a training run's level table, the committed grader's (for the flagged fractions and PPVs)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    detector, _ = load_models()
    grader = load_spider_grader()
    studies = [s for s in load_spider_midsag(SHARED_EXAMPLES.parent / "spider_midsag")
               if split_part("spider_midsag", s.patient, s.patient) == "selection" and "t2" in s.sequences]
    studies = studies[:args.limit] if args.limit else studies
    deltas: dict[str, list[float]] = {k: [] for k in FINDINGS}
    for st in tqdm(studies, desc="perturbed grading", disable=args.quiet):
        images, samples, _ = study_samples(st, detector, ("t2",))
        if not samples:
            continue
        ref = fused_logits(grader, images, samples)
        raw = st.load_image("t2").astype(np.float64)
        (key,) = images
        for fn in PERTURBATIONS.values():
            img = fn(raw)
            got = fused_logits(grader, {key: normalise_image(img)}, samples)
            for idx, f in ref.items():
                for k in FINDINGS:
                    deltas[k].append(abs(got[idx][k] - f[k]))
    out: dict = {"n_patients": len(studies), "perturbations": list(PERTURBATIONS), "findings": {}}
    for k in FINDINGS:
        d = np.asarray(deltas[k])
        out["findings"][k] = {"n": int(d.size), "median_abs_delta": round(float(np.median(d)), 3),
                              "q95_abs_delta": round(float(np.quantile(d, 0.95)), 3)}
    margin = {k: round(v["q95_abs_delta"] / 2, 2) for k, v in out["findings"].items()}
    out["degeneration_logit_margin"] = margin
    oof = args.oof
    if oof.exists():
        z = np.load(oof)
        fus, cv = fit_level_fusion(z["X"], z["Y"], z["groups"])
        probs = {k: cv[k] for k in BINARY} | {"modic_any": 1 - cv["modic"][:, 0]}
        near = {k: np.abs(logit(probs[k]) - logit(fus.thresholds[k])) < margin[k] for k in FINDINGS}
        out["oof_flagged_fraction"] = {k: round(float(v.mean()), 3) for k, v in near.items()}
        out["oof_discs_with_any_flag"] = round(float(np.any(list(near.values()), axis=0).mean()), 3)
        # the positive predictive value of each finding's calls (configs/review.json -> degeneration_oof_ppv)
        y = {k: z["Y"][:, TARGETS.index("modic" if k == "modic_any" else k)] for k in FINDINGS}
        out["oof_ppv"] = {k: round(float((y[k][(probs[k] >= fus.thresholds[k]) & (y[k] >= 0)] > 0).mean()), 3)
                          for k in FINDINGS}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
