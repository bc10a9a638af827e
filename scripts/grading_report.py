"""Model-card figures and metrics of the grading model on the validation split.

Usage:
    python scripts/grading_report.py [--grader bundle/models/grader.pt] [--train-dir runs/grading]
                                     [--out bundle/docs] [--seeds 0] [--quiet]

Writes ``grading_metrics.json`` (contract metrics end to end and at reference locations, bootstrap 95%
intervals by image, fused vs. mid-slice / mean / max pooling, reliability and ECE of every output uncalibrated
and as reported, optional seed variance) and PNGs (ROC, PR, confusion matrices, reliability diagrams, training
curves) into ``--out``. Prints the metrics JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _plots(out: Path, r: dict, thr: float, summary: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay, confusion_matrix

    fig, ax = plt.subplots(1, 2, figsize=(10, 4.5))
    RocCurveDisplay.from_predictions(r["v_true"], r["v_prob"], ax=ax[0], name="fused (end to end)")
    ax[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    ax[0].set_title("Vertebra v2 (pathological) - ROC, validation")
    PrecisionRecallDisplay.from_predictions(r["v_true"], r["v_prob"], ax=ax[1], name="fused (end to end)")
    ax[1].set_title("Vertebra v2 - precision/recall, validation")
    fig.tight_layout()
    fig.savefig(out / "grading_roc_pr.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    cm_v = confusion_matrix(r["v_true"], (r["v_prob"] >= thr).astype(int), labels=[0, 1])
    ConfusionMatrixDisplay(cm_v, display_labels=["v1 healthy", "v2 path."]).plot(ax=ax[0], colorbar=False)
    ax[0].set_title(f"Vertebrae (threshold {thr:.2f})")
    cm_d = confusion_matrix(r["d_true"], r["d_pred"], labels=[1, 2, 3, 4, 5])
    ConfusionMatrixDisplay(cm_d, display_labels=["v1", "v2", "v3", "v4", "v5"]).plot(ax=ax[1], colorbar=False)
    ax[1].set_title("Discs (true rows, predicted columns)")
    fig.tight_layout()
    fig.savefig(out / "grading_confusion.png", dpi=110)
    plt.close(fig)

    if summary:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for i, task in enumerate(("vertebra", "disc")):
            for j, h in enumerate(summary["histories"]["folds"][task]):
                ax[i].plot([e["loss"] for e in h], color="0.6", lw=0.8, label="CV folds" if j == 0 else None)
            ax[i].plot([e["loss"] for e in summary["histories"]["final"][task]], color="C0", label="final model")
            ax[i].set_title(f"{task} classifier training loss")
            ax[i].set_xlabel("epoch")
            ax[i].legend()
        fig.tight_layout()
        fig.savefig(out / "grading_training_curves.png", dpi=110)
        plt.close(fig)


def _calibration(out: Path, grader, e2e: dict, root: Path, detector, val: list[str], progress: bool) -> dict:
    """Reliability (ECE, bins) of each output on the validation split end to end, uncalibrated vs as reported.

    Outputs: vertebra P(pathological); disc grade (top-label confidence); disc P(abnormal) = 1 - P(v1).
    Reference structures without a paired prediction are left out (their 0 / v1 stand-ins are not outputs).
    Writes ``grading_reliability_<output>.png``.
    """
    from dataclasses import replace

    from spinepath.evaluation.calibration import plot_reliability, reliability, top_label
    from spinepath.evaluation.grading import collect_grading

    def outputs(r: dict) -> dict:
        paired_v = np.array([x is not None for x in r["v_features"]])
        d_true, d_prob = r["d_true"] - 1, r["d_prob"]
        paired_d = ~np.all(d_prob == np.eye(5)[0], axis=1)
        return {"vertebra_pathological": reliability(r["v_prob"][paired_v], r["v_true"][paired_v]),
                "disc_grade_top_label": reliability(*top_label(d_true[paired_d], d_prob[paired_d])),
                "disc_abnormal": reliability(1 - d_prob[paired_d, 0], (d_true[paired_d] > 0).astype(float))}

    raw = collect_grading(root, replace(grader, calibration=None), detector, val, progress=progress)
    res = {"as_reported": outputs(e2e), "uncalibrated": outputs(raw),
           "maps": grader.calibration.to_dict() if grader.calibration is not None else None}
    names = {"vertebra_pathological": "vertebra P(pathological)", "disc_grade_top_label": "disc grade (top label)",
             "disc_abnormal": "disc P(abnormal, >= v2)"}
    for key, title in names.items():
        plot_reliability({"uncalibrated": res["uncalibrated"][key], "calibrated (reported)": res["as_reported"][key]},
                         out / f"grading_reliability_{key}.png", f"{title}, validation end to end")
    return res


def _seed_variance(seeds: int, grader, data_root: Path, progress: bool) -> dict:
    """Retrain the crop classifiers with other seeds; score them at the reference centres (no fusion)."""
    from spinepath.data.datasets import load_spark
    from spinepath.data.split import is_validation
    from spinepath.grading.classifier import predict_structures, task_metrics, train_classifier
    from spinepath.grading.crops import spark_structures
    from spinepath.transforms import normalise_image

    cases = load_spark(data_root / "spark_midsag")
    images = {c.case: normalise_image(c.load_image()) for c in cases}
    structs = [s for c in cases for s in spark_structures(c) if s.grade >= 0]
    out: dict[str, list[float]] = {"vertebra_auc": [], "disc_quadratic_kappa": []}
    for seed in range(1, seeds + 1):
        for task in ("vertebra", "disc"):
            cfg = grader.configs[task]
            cfg.seed = seed
            tr = [s for s in structs if s.kind == task and not is_validation("spark_midsag", s.case)]
            va = [s for s in structs if s.kind == task and is_validation("spark_midsag", s.case)]
            m, _ = train_classifier(cfg, images, tr, progress=progress)
            met = task_metrics(task, np.array([s.grade for s in va]), predict_structures([m], cfg, images, va))
            if task == "vertebra":
                out["vertebra_auc"].append(round(met["auc"], 4))
            else:
                out["disc_quadratic_kappa"].append(round(met["quadratic_kappa"], 4))
    return {k: {"values": v, "mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)), 4)
                if len(v) > 1 else None} for k, v in out.items()}


def main() -> int:
    """Compute and write the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grader", default=str(REPO / "bundle" / "models" / "grader.pt"))
    ap.add_argument("--detector", default=str(REPO / "bundle" / "models" / "model.pt"))
    ap.add_argument("--train-dir", default=str(REPO / "runs" / "grading"))
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(REPO / "bundle" / "docs"))
    ap.add_argument("--seeds", type=int, default=0, help="extra classifier seeds to train for seed variance")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    from spinepath.data.split import split_cases
    from spinepath.detection.predictor import VertebraDetector
    from spinepath.evaluation.grading import bootstrap_intervals, collect_grading, grading_metrics
    from spinepath.grading.fusion import FEATURES, best_threshold
    from spinepath.grading.grader import Grader

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    grader = Grader.load(args.grader)
    detector = VertebraDetector.load(args.detector)
    root = Path(args.data_root) / "spark_midsag"
    val = split_cases(root, "validation")
    thr = grader.vertebra_threshold
    report: dict = {"split": "validation (spinepath/configs/split.json)", "n_images": len(val)}
    e2e = collect_grading(root, grader, detector, val, progress=progress)
    ref = collect_grading(root, grader, None, val, progress=progress)
    for name, r in (("end_to_end", e2e), ("reference_locations", ref)):
        m = grading_metrics(r["v_true"], r["v_prob"], thr, r["d_true"], r["d_pred"])
        m["bootstrap_95ci"] = bootstrap_intervals(r["v_true"], r["v_prob"], thr, r["d_true"], r["d_pred"],
                                                  r["v_group"], r["d_group"])
        m["n_vertebrae"], m["n_discs"] = int(len(r["v_true"])), int(len(r["d_true"]))
        m["n_vertebrae_unpaired"] = int(sum(x is None for x in r["v_features"]))
        report[name] = m
    # fused vs. pooling of the per-slice (pseudo-slice) scores, thresholds chosen on the out-of-fold data
    summary = None
    oof_path = Path(args.train_dir) / "oof.npz"
    if oof_path.is_file():
        oof = np.load(oof_path)
        summary = json.loads((Path(args.train_dir) / "summary.json").read_text())
        comp = {}
        for name, r in (("end_to_end", e2e), ("reference_locations", ref)):
            X = np.array([x if x is not None else np.full(len(FEATURES), np.nan) for x in r["v_features"]])
            rows = {}
            for pool, col in (("mid_slice", 0), ("mean_pool", 1), ("max_pool", 2)):
                t = best_threshold(oof["y"], oof["X"][:, col])
                p = np.nan_to_num(X[:, col], nan=0.0)
                mm = grading_metrics(r["v_true"], p, t, r["d_true"], r["d_pred"])["vertebra"]
                rows[pool] = {k: round(v, 4) for k, v in mm.items() if k in ("auc", "balanced_accuracy", "threshold")}
            mm = grading_metrics(r["v_true"], r["v_prob"], thr, r["d_true"], r["d_pred"])["vertebra"]
            rows["fused_lightgbm"] = {k: round(v, 4) for k, v in mm.items() if k in ("auc", "balanced_accuracy",
                                                                                   "threshold")}
            comp[name] = rows
        report["fusion_comparison"] = comp
        report["training"] = {k: summary[k] for k in summary if k not in ("histories",)}
    report["calibration"] = _calibration(out, grader, e2e, root, detector, val, progress)
    if args.seeds:
        report["seed_variance_reference_locations_no_fusion"] = _seed_variance(
            args.seeds, grader, Path(args.data_root), progress)
    _plots(out, e2e, thr, summary)
    (out / "grading_metrics.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
