"""Model-card figures of the segmentation network (issue 14, item 7), on the validation split only.

For each annotated source (spider_seg, chu_t2, spineweb_vb, ivd_t2): the ``spinepath evaluate segmentation``
contract on its validation cases (also without the class offsets, for comparison), Dice per class with bootstrap
95% intervals by patient, measurement MAE with intervals; one Bland-Altman plot (body height, disc height,
canal AP: predicted vs reference masks, same code, same slice); the worst validation slices as images
(reference and predicted outlines).

Usage: python scripts/segmentation_report.py [--model bundle/models/segmentation.pt] [--out bundle/docs]
    [--bootstrap 1000] [-q]
Writes ``segmentation_metrics.json``, ``segmentation_bland_altman.png``, ``segmentation_failures.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import SHARED_EXAMPLES, resolve_segmentation_path  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.evaluation.segmentation import evaluate_segmentation  # noqa: E402
from spinepath.segmentation.inference import load_segmenter  # noqa: E402
from spinepath.segmentation.metrics import group_dice  # noqa: E402

SOURCES = ("spider_seg", "chu_t2", "spineweb_vb", "ivd_t2")
KINDS = {"body": "vertebral body height", "disc": "disc height", "canal": "canal AP diameter"}


def bootstrap(values_by_case: dict[str, list[float]], reduce, n: int, seed: int = 0) -> list[float] | None:
    """95% interval of ``reduce(all values)`` resampling cases (patients) with replacement."""
    cases = [c for c, v in values_by_case.items() if v]
    if len(cases) < 2:
        return None
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        pick = rng.choice(len(cases), len(cases), replace=True)
        stats.append(reduce([x for i in pick for x in values_by_case[cases[i]]]))
    return [round(float(q), 4) for q in np.percentile(stats, [2.5, 97.5])]


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(REPO / "bundle" / "docs"))
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    data = SHARED_EXAMPLES.parent
    path = resolve_segmentation_path(args.model)
    model = load_segmenter(path)
    raw = load_segmenter(path, offsets=False)  # the same network without its class offsets, for comparison
    out = Path(args.out)
    report: dict = {"model": model.meta["file"], "best_epoch": model.meta["epoch"], "split": "validation",
                    "class_log_offsets": model.meta["class_log_offsets"], "datasets": {}}
    pairs: dict[str, list[tuple]] = {k: [] for k in KINDS}
    worst = []
    for src in SOURCES:
        cases = split_cases(data / src, "validation")
        details: dict = {}
        res = evaluate_segmentation(data / src, model, cases=cases, progress=not args.quiet, details=details)
        res0 = evaluate_segmentation(data / src, raw, cases=cases, progress=not args.quiet)
        res["without_offsets"] = {"dice": res0["dice"], "measurements": res0["measurements"]}
        by_name: dict[str, dict[str, list[float]]] = {}
        for (_, case), d in details["per_case"].items():
            for name, v in d.items():
                by_name.setdefault(name, {}).setdefault(case, []).append(v)
        res["dice_ci95"] = {name: bootstrap(v, np.mean, args.bootstrap) for name, v in by_name.items()}
        res["dice_per_case"] = {name: {c: round(x[0], 4) for c, x in v.items()} for name, v in by_name.items()}
        res["measurements_ci95"], res["mid_sagittal_mae_mm"] = {}, {}
        # the product measures one slice: each case's central evaluated slice
        idx: dict[str, list[int]] = {}
        for s, _ in details["slices"]:
            idx.setdefault(s.case, []).append(s.index)
        mid = {c: sorted(v)[len(v) // 2] for c, v in idx.items()}
        for kind, items in details["pairs"].items():
            per_case: dict[str, list[float]] = {}
            for r, p, case, _ in items:
                per_case.setdefault(case, []).append(abs(r - p))
            res["measurements_ci95"][kind] = bootstrap(per_case, np.mean, args.bootstrap)
            central = [abs(r - p) for r, p, case, k in items if k == mid[case]]
            res["mid_sagittal_mae_mm"][kind] = {"n": len(central), "mae": round(float(np.mean(central)), 3)
                                                if central else None}
            pairs[kind] += items
        report["datasets"][src] = res
        for s, cls in details["slices"]:
            d = [v for v in group_dice(cls, s.target, s.groups, s.annotated).values() if v is not None]
            if d:
                worst.append((float(np.mean(d)), s, cls))
        if not args.quiet:
            print(src, json.dumps({k: res[k] for k in ("n_cases", "n_slices", "dice", "measurements")}))
    report["bland_altman"] = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (kind, name) in zip(axes, KINDS.items()):
        if not pairs[kind]:
            continue
        r, p = np.array([x[0] for x in pairs[kind]]), np.array([x[1] for x in pairs[kind]])
        diff, mean = p - r, (p + r) / 2
        bias, sd = float(diff.mean()), float(diff.std(ddof=1))
        report["bland_altman"][kind] = {"n": len(r), "bias_mm": round(bias, 3), "sd_mm": round(sd, 3),
                                        "limits_mm": [round(bias - 1.96 * sd, 3), round(bias + 1.96 * sd, 3)],
                                        "mae_mm": round(float(np.abs(diff).mean()), 3)}
        ax.scatter(mean, diff, s=6, alpha=0.5)
        for y, style in ((bias, "-"), (bias - 1.96 * sd, "--"), (bias + 1.96 * sd, "--")):
            ax.axhline(y, color="k", ls=style, lw=1)
        ax.set_xlabel(f"mean of reference and predicted {name} (mm)")
        ax.set_ylabel("predicted - reference (mm)")
        ax.set_title(f"{name}: bias {bias:+.2f} mm, limits +/-{1.96 * sd:.2f} mm (n={len(r)})", fontsize=9)
    fig.suptitle("Measurement agreement, validation split: predicted masks vs reference masks, same code, same slice",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "segmentation_bland_altman.png", dpi=90)
    plt.close(fig)
    worst.sort(key=lambda x: x[0])
    fig, axes = plt.subplots(1, 4, figsize=(16, 5))
    for ax, (score, s, cls) in zip(axes, worst[:4]):
        ax.imshow(s.image, cmap="gray")
        cls2group = np.argmax(s.groups[: len(s.annotated) + 1], axis=0)
        for g, colour in zip(range(1, len(s.annotated) + 1), ("#00e6ff", "#78ff78", "#ffff00")):
            ax.contour(s.target == g, [0.5], colors="white", linewidths=0.8)
            ax.contour(cls2group[cls] == g, [0.5], colors=colour, linewidths=0.8, linestyles="--")
        ax.set_title(f"{s.source} {s.case} slice {s.index}: mean Dice {score:.2f}\n"
                     f"white reference, dashed prediction ({', '.join(s.annotated)})", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "segmentation_failures.png", dpi=80)
    plt.close(fig)
    report["worst_slices"] = [{"source": s.source, "case": s.case, "slice": s.index, "mean_dice": round(v, 4)}
                              for v, s, _ in worst[:4]]
    (out / "segmentation_metrics.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: {"dice": v["dice"], "dice_ci95": v["dice_ci95"], "measurements": v["measurements"]}
                      for k, v in report["datasets"].items()}, indent=1))
    print(json.dumps(report["bland_altman"], indent=1))


if __name__ == "__main__":
    main()
