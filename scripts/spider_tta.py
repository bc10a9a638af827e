"""Does test-time augmentation beyond the superior-inferior flip help the SPIDER grader? Out of fold only.

Each training + selection disc crop is predicted by the fold network that did not train on it (the run's
``fold<k>.pt``, the same folds as ``spinepath train spider``), under several sets of views: the committed
flip, and the flip with small geometric jitters (shift along / across the spine, scale, rotation) averaged. The
level fusion is then refitted with nested cross-validation by patient on each set's level table, and the fused
out-of-fold metrics are printed with the Pfirrmann κ gain's paired bootstrap 95% interval. The validation
patients are never read.

Usage: python scripts/spider_tta.py [--run runs/spider_r18] [--params FILE] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.grading.classifier import ensemble_mean  # noqa: E402
from spinepath.grading.crops import CropJitter  # noqa: E402
from spinepath.grading.fusion import paired_gain, quadratic_kappa  # noqa: E402
from spinepath.grading.spider import (  # noqa: E402
    N_OUTPUTS,
    TARGETS,
    disc_crop,
    fit_level_fusion,
    head_probabilities,
    level_table,
    pfirrmann_grade,
)
from spinepath.grading.spider_training import (  # noqa: E402
    collect,
    load_spider_params,
    oof_metrics,
    patient_folds,
    training_studies,
)
from spinepath.stages import load_models  # noqa: E402

VIEWS = {
    "flip (committed)": [CropJitter()],
    "flip + shifts 2 mm": [CropJitter(), *(CropJitter(shift_mm=s) for s in ((2, 0), (-2, 0), (0, 2), (0, -2)))],
    "flip + scale 0.9 / 1.1": [CropJitter(), CropJitter(scale=0.9), CropJitter(scale=1.1)],
    "flip + rotation 5 deg": [CropJitter(), CropJitter(rot_deg=5), CropJitter(rot_deg=-5)],
}


def main() -> None:
    """Predict out of fold under each view set, refit the fusion, compare."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "spider_r18"))
    ap.add_argument("--params", default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_spider_params(args.params) if args.params else load_spider_params()
    detector, _ = load_models()
    studies = training_studies(SHARED_EXAMPLES.parent)
    images, samples = collect(studies, detector, progress=not args.quiet, labelled_only=True, anchored_only=True)
    fold_of = patient_folds([s.patient for s in samples], args.folds)
    models = []
    for k in range(args.folds):
        m = cfg.network()
        m.load_state_dict(torch.load(Path(args.run) / f"fold{k}.pt", map_location="cpu"))
        models.append(m.eval())
    ref = np.load(Path(args.run) / "oof.npz")
    labels = {(s.patient, s.index): s.target for s in samples}
    keys = sorted(labels)  # the level table's rows (level_table keys every sample's level)
    Y = np.stack([labels[q] for q in keys])
    groups = np.array([q[0] for q in keys])
    jp = TARGETS.index("pfirrmann")
    labelled = Y[:, jp] >= 0
    base = next(iter(VIEWS))
    out: dict = {"discs": len(samples)}
    kept: dict[str, np.ndarray] = {}
    for name, views in tqdm(VIEWS.items(), desc="view sets", disable=args.quiet):
        probs = np.zeros((len(samples), N_OUTPUTS), np.float32)
        for k in range(args.folds):
            te = [i for i, s in enumerate(samples) if fold_of[s.patient] == k]
            acc = 0
            for j in views:
                crops = np.stack([disc_crop(images[samples[i].structure.image_key], samples[i].structure, cfg, j)
                                  for i in te])
                with torch.no_grad():
                    acc = acc + ensemble_mean([models[k]], crops, head_probabilities, True)
            probs[te] = acc / len(views)
        table = level_table(samples, probs)
        X = np.stack([table[q] for q in keys])
        if name == base:
            out["reproduces_the_run"] = bool(np.allclose(np.nan_to_num(X), np.nan_to_num(ref["X"]), atol=1e-4))
        _, cv = fit_level_fusion(X, Y, groups)
        out[name] = oof_metrics(Y, cv)
        kept[name] = pfirrmann_grade(cv["pfirrmann"][labelled], "expected")
    out["pfirrmann_kappa_gain"] = {n: paired_gain(quadratic_kappa, Y[labelled, jp], kept[base], kept[n],
                                                  groups[labelled])
                                   for n in list(VIEWS)[1:]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
