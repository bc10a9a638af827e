"""The README's annotated figure of the measurement definitions (issue 14, item 3), drawn from a real study.

Runs detection, naming and the segmentation stage with the committed models on the example study, then draws
the key slice around L3-L5 with the masks' outlines and every kind of measured line labelled: the three body
heights, the three disc heights, the canal's AP diameter at a disc and at mid-body, the listhesis offset, and
(inset) the two endplates of the lumbar lordosis.

Usage: python scripts/measurement_figure.py [--study DIR] [--out bundle/docs/measurement_definitions.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath import stages  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--study", default=str(SHARED_EXAMPLES / "chu_t2_02"))
    ap.add_argument("--out", default=str(REPO / "bundle" / "docs" / "measurement_definitions.png"))
    args = ap.parse_args()
    detector, _ = stages.load_models()
    result = stages.segment(stages.detect_series(stages.load(args.study), detector), stages.load_segmenter())
    seg = result.segmentation
    k, m, inst = seg.key_slice, seg.measurements, seg.instances[seg.key_slice]
    img = result.volume.pixels[k]
    fig, (ax, inset) = plt.subplots(1, 2, figsize=(12, 7.5), gridspec_kw={"width_ratios": [2.2, 1]})
    for a in (ax, inset):
        a.imshow(img, cmap="gray", vmax=np.percentile(img, 99.5))
        a.axis("off")
    for masks, colour in ((inst["bodies"], "#00e6ff"), (inst["discs"], "#78ff78")):
        for mask in masks.values():
            ax.contour(mask, [0.5], colors=colour, linewidths=0.6)
    if inst["canal"] is not None:
        ax.contour(inst["canal"], [0.5], colors="#ffff00", linewidths=0.6)

    labels: list[tuple[float, float, str, str]] = []  # (row, col) of a line's middle, text, colour

    def draw(a, line: dict | None, colour: str, text: str) -> None:
        if not line:
            return
        (r0, c0), (r1, c1) = line["points"]
        a.plot([c0, c1], [r0, r1], color=colour, lw=2)
        if a is ax:
            labels.append(((r0 + r1) / 2, (c0 + c1) / 2, f"{text} {line['mm']:.1f} mm", colour))
        else:
            a.annotate(f"{text} {line['mm']:.1f} mm", (c1, r1), xytext=(6, 0), textcoords="offset points",
                       color=colour, fontsize=8, bbox={"boxstyle": "round,pad=0.15", "fc": "black", "lw": 0})

    body, disc = m["vertebrae"].get("L4", {}), m["discs"].get("L3-L4", {})
    for p in ("anterior", "middle", "posterior"):
        draw(ax, body.get(p), "#00e6ff", f"L4 {p} body height")
        draw(ax, disc.get(p), "#78ff78", f"L3-L4 {p} disc height")
    draw(ax, disc.get("canal_ap"), "#ffff00", "canal AP at L3-L4")
    draw(ax, body.get("canal_ap_mid_body"), "#ffff00", "canal AP at mid-L4")
    slip = m["listhesis"].get("L4-L5")
    if slip:
        draw(ax, {**slip["line"], "mm": slip["offset_mm"]}, "#ff50ff", "L4 over L5 offset")
    pts = np.concatenate([np.argwhere(inst["bodies"][lv]) for lv in ("L3", "L4", "L5") if lv in inst["bodies"]])
    (r0, c0), (r1, c1) = pts.min(0) - 15, pts.max(0) + 15
    right = c1 + 60  # the labels in a column right of the spine, joined to their lines
    ax.set_xlim(c0 - 20, right + 150)
    ax.set_ylim(r1, r0)
    y = r0
    for row, col, text, colour in sorted(labels):
        y = max(y + 9, row)
        ax.plot([col, right], [row, y], color=colour, lw=0.6)
        ax.text(right + 2, y, text, color=colour, fontsize=8, va="center",
                bbox={"boxstyle": "round,pad=0.15", "fc": "black", "lw": 0})
    ax.set_title("Key slice (mid-sagittal): body and disc heights at 15 / 50 / 85% of the depth (each the mean "
                 "of nine runs over +-10%),\nacross the mean endplate direction; canal AP along the structure's AP "
                 "axis; listhesis between the posterior corners", fontsize=8.5)
    for name, line in (m.get("lordosis_lines") or {}).items():
        draw(inset, line, "#ff9600", name.replace("_", " "))
    lord = m.get("lordosis_deg")
    inset.set_title("Lumbar lordosis: the angle between\nthe L1 and S1 superior endplates"
                    + (f" = {lord:.1f} deg" if lord is not None else ": not measured"), fontsize=8.5)
    fig.suptitle("spinepath measurement definitions (real study, committed models) - NOT FOR DIAGNOSTIC USE",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
