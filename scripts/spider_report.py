"""Model-card figures of the SPIDER degenerative grader on the validation patients (which chose nothing).

End to end from the images, as ``spinepath evaluate spider``: with both sequences and with the T2 alone,
bootstrap 95% intervals by patient, a per-level table, the Pfirrmann confusion matrix, ROC curves of the binary
findings and a reliability diagram of the binary probabilities. Writes ``bundle/docs/spider_metrics.json`` and
``bundle/docs/spider_*.png``.

Usage: python scripts/spider_report.py [--grader PATH] [--model PATH] [--bootstrap 1000] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from spinepath.core.geometry import series_from_slices  # noqa: E402
from spinepath.core.paths import (  # noqa: E402
    SHARED_EXAMPLES,
    resolve_grader_path,
    resolve_model_path,
    resolve_spider_grader_path,
)
from spinepath.data.datasets import iter_volume_slices, load_volume_index  # noqa: E402
from spinepath.data.spider import load_spider_midsag  # noqa: E402
from spinepath.data.split import split_cases  # noqa: E402
from spinepath.detection.predictor import VertebraDetector  # noqa: E402
from spinepath.evaluation.calibration import plot_reliability, reliability  # noqa: E402
from spinepath.evaluation.spider import (  # noqa: E402
    CONTRACT_BINARY,
    apply_listhesis_decision,
    bootstrap_spider,
    grade_studies,
    spider_metrics,
    t2_evidence,
    vertebra_rows,
)
from spinepath.grading.grader import Grader  # noqa: E402
from spinepath.grading.spider import SpiderGrader  # noqa: E402
from spinepath.grading.spider_inference import (  # noqa: E402
    endplate_marrow,
    load_listhesis_decision,
    load_vertebra_decision,
)
from spinepath.stages import detect_series, grade, grade_degeneration, load_segmenter  # noqa: E402

DOCS = REPO / "bundle" / "docs"


def chu_sanity(det: VertebraDetector, spark: Grader, grader: SpiderGrader, quiet: bool) -> dict:
    """Lumbar vertebrae of the chu_t2 volumes (healthy volunteers) called pathological.

    By the product's decision (item 4: endplate / marrow evidence with the spark score) and by the endplate /
    marrow evidence alone. Every 4th 1 mm slice, as the DICOM examples are cut; with the Pfirrmann grades of
    their lumbar discs.
    """
    flagged, n, pf, decided = 0, 0, [], 0
    for case in load_volume_index(SHARED_EXAMPLES.parent / "chu_t2"):
        k = case.n_slices
        sl = list(iter_volume_slices(case, list(range((k % 4) // 2, k, 4))))
        res = detect_series(series_from_slices([s.image for s in sl], sl[0].spacing, 4.0), det)
        grade(res, spark)
        grade_degeneration(res, grader, det, use_t1=False)
        decided += sum(f.label == "pathological" for f in res.findings.vertebrae)
        for lv, e in endplate_marrow(res.findings, grader).items():
            if lv in ("L1", "L2", "L3", "L4", "L5"):
                n += 1
                flagged += e["positive"]
        lumbar_discs = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
        pf += [g.pfirrmann for g in res.findings.degeneration if g.level in lumbar_discs]
    return {"lumbar_vertebrae": n, "endplate_marrow_positive": int(flagged), "pathological": int(decided),
            "pfirrmann_counts": {str(g): pf.count(g) for g in range(1, 6)}}


def main() -> None:
    """Evaluate, plot, write."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grader")
    ap.add_argument("--model")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args()
    root = SHARED_EXAMPLES.parent / "spider_midsag"
    grader = SpiderGrader.load(resolve_spider_grader_path(args.grader))
    det = VertebraDetector.load(resolve_model_path(args.model))
    spark = Grader.load(resolve_grader_path())
    decision = load_vertebra_decision()
    segmenter, listhesis = load_segmenter(), load_listhesis_decision()
    cases = split_cases(root, "validation")
    studies_all = [s for s in load_spider_midsag(root) if s.patient in cases]
    report: dict = {"grader": grader.meta, "n_patients": len(studies_all), "vertebra_decision": decision,
                    "listhesis_decision": listhesis}
    # one detection per T2 for the spark scores and the slips, once for both variants
    evidence = {st.patient: t2_evidence(st, det, spark, segmenter) for st in studies_all}
    spark_p, slips = ({p: e[k] for p, e in evidence.items()} for k in (0, 1))
    keep = {}
    for name, seqs in (("t1_t2", ("t1", "t2")), ("t2_only", ("t2",))):
        studies = [s for s in studies_all if any(q in s.sequences for q in seqs)]
        graded, fused, _ = grade_studies(studies, det, grader, seqs, progress=not args.quiet)
        # spondylolisthesis as the product decides it: the image with the slip measured on the T2
        n_slips = apply_listhesis_decision(fused, slips, listhesis)
        vrows = vertebra_rows(studies, fused, grader.fusion.vertebra, spark_p, decision)
        m = spider_metrics(graded, vrows)
        # the endplate / marrow evidence alone, beside the product's decision
        m["vertebra_endplate_marrow_only"] = spider_metrics([], vertebra_rows(studies, fused, grader.fusion.vertebra))[
            "vertebra"]
        m["located_fraction"] = round(sum(g.finding is not None for g in graded) / len(graded), 4)
        m["spondylolisthesis_decision"] = f"image and measured slip on {n_slips} discs, image elsewhere"
        m["intervals"] = bootstrap_spider(graded, vrows, args.bootstrap)
        report[name] = m
        keep[name] = (graded, vrows)
    graded, vrows = keep["t1_t2"]
    # per level (index from the bottom) on both sequences
    per_level = {}
    for idx in sorted({g.index for g in graded}):
        sub = [g for g in graded if g.index == idx]
        if len(sub) >= 10:
            m = spider_metrics(sub, [])
            located = round(sum(g.finding is not None for g in sub) / len(sub), 3)
            per_level[str(idx)] = {"n": len(sub), "located": located,
                                   "pfirrmann_kappa": m["pfirrmann"]["quadratic_kappa"],
                                   "pfirrmann_within_one": m["pfirrmann"]["within_one_accuracy"],
                                   "modic_auc": m["modic"]["auc"], "narrowing_auc": m["narrowing"]["auc"]}
    report["per_level_index_from_bottom"] = per_level
    # figures
    pf = [g for g in graded if g.labels.get("pfirrmann") is not None]
    y = [int(g.labels["pfirrmann"]) for g in pf]
    p = [(g.finding["pfirrmann"]["grade"] if g.finding else 1) for g in pf]
    cm = confusion_matrix(y, p, labels=[1, 2, 3, 4, 5])
    report["pfirrmann_confusion"] = cm.tolist()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(5):
        for j in range(5):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(5), [str(i) for i in range(1, 6)])
    ax.set_yticks(range(5), [str(i) for i in range(1, 6)])
    ax.set_xlabel("predicted Pfirrmann")
    ax.set_ylabel("reference Pfirrmann")
    ax.set_title("SPIDER validation, T1+T2, end to end")
    fig.tight_layout()
    fig.savefig(DOCS / "spider_pfirrmann_confusion.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    ys, ps = [], []
    for name, cols in {"modic (any)": ("modic",), **CONTRACT_BINARY}.items():
        yy, pp = [], []
        for c in cols:
            for g in graded:
                if g.labels.get(c) is None:
                    continue
                yy.append(int(g.labels[c]) > 0)
                key = "modic_any" if c == "modic" else c
                pp.append(g.finding[key] if g.finding else 0.0)
        if len(set(yy)) > 1:
            fpr, tpr, _ = roc_curve(yy, pp)
            ax.plot(fpr, tpr, label=name)
            ys += yy
            ps += pp
    yv, pv = [v[1] for v in vrows], [v[2] for v in vrows]
    fpr, tpr, _ = roc_curve(yv, pv)
    ax.plot(fpr, tpr, "k--", label="vertebra (product decision)")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=8)
    ax.set_title("SPIDER validation, T1+T2, end to end")
    fig.tight_layout()
    fig.savefig(DOCS / "spider_roc.png", dpi=120)
    plt.close(fig)
    rel = reliability(np.array(ps, float), np.array(ys, float))
    report["binary_reliability"] = rel
    plot_reliability({"binary findings (pooled)": rel}, DOCS / "spider_reliability.png",
                     "SPIDER validation: binary findings")
    report["chu_t2_sanity"] = chu_sanity(det, spark, grader, args.quiet)
    (DOCS / "spider_metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("t1_t2", "t2_only")}))


if __name__ == "__main__":
    main()
