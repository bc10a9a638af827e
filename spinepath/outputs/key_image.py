"""The key image PNG: the mid-sagittal slice with the vertebrae's boxes, level names, findings and measured lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spinepath import __version__
from spinepath.core.labels import label_colors
from spinepath.core.levels import DISC_LEVELS
from spinepath.core.results import DegenerationFinding, DetectionResult, DiscFinding, key_slice
from spinepath.core.thresholds import STENOSIS_GRADES

#: Key-image colours of vertebra findings and disc grades.
FINDING_COLOURS = {"pathological": (255, 48, 48), "healthy": (64, 220, 64)}


DISC_COLOURS = {"v1": (160, 200, 255), "v2": (255, 220, 64), "v3": (255, 150, 40), "v4": (255, 48, 48),
                "v5": (220, 120, 255)}


#: Long side of the key image's picture (pixels; small matrices are enlarged) and its font height.
KEY_IMAGE_SIZE = 768
FONT_PX = 13
#: Key-image colours of a disc graded by the SPIDER grader: a degenerative finding suspected, or none.
DEGENERATION_COLOURS = {True: (255, 150, 40), False: (160, 200, 255)}
#: Key-image colours of the measured lines (issue 14): body heights, disc heights, canal AP, listhesis,
#: lordosis endplates; a flagged measurement is drawn in :data:`FLAGGED_LINE`.
LINE_COLOURS = {"body": (0, 230, 255), "disc": (120, 255, 120), "canal": (255, 255, 0), "listhesis": (255, 80, 255),
                "lordosis": (255, 150, 0)}
FLAGGED_LINE = (255, 48, 48)
#: Key-image abbreviations of the degenerative findings (the PDF's key-image legend spells them out).
DEGENERATION_ABBREVIATIONS = {"upper_endplate_change": "E", "lower_endplate_change": "E", "spondylolisthesis": "L",
                              "herniation": "H", "narrowing": "N", "bulging": "B"}


def disc_grades_text(g: DegenerationFinding) -> str:
    """The degenerative grades beside a disc: ``Pf3 M2 EHN`` (Pfirrmann, Modic type, findings present)."""
    present = "".join(dict.fromkeys(a for k, a in DEGENERATION_ABBREVIATIONS.items() if g.positive(k)))
    return " ".join(x for x in (f"Pf{g.pfirrmann}", f"M{g.modic_type}" if g.modic_type else "", present) if x)


def disc_label(level: str, spark: DiscFinding | None, degeneration: DegenerationFinding | None
               ) -> tuple[str, tuple[int, int, int]]:
    """A disc's key-image label and colour: its SPIDER grades where the SPIDER grader graded it, else its Spark grade.

    The SPIDER grader is the disc finding (issue 13): on SPIDER's training + selection discs it ranks herniation,
    bulging and endplate change better than the Spark grade, whose "protrusion" calls were herniated in 7% of
    discs and bulging in 82% (`scripts/spark_disc_agreement.py`); both beside each other read as a contradiction.
    The Spark grade stays in the JSON, the SR and the PDF's first table.
    """
    if degeneration is not None:
        suspected = bool(degeneration.modic_type) or any(degeneration.positive(k) for k in DEGENERATION_ABBREVIATIONS)
        return f"{level} {disc_grades_text(degeneration)}", DEGENERATION_COLOURS[suspected]
    if spark is not None:
        return f"{level} {spark.grade_name}", DISC_COLOURS[spark.grade]
    return level, DEGENERATION_COLOURS[False]


def measured_lines(seg) -> list[tuple[dict, str, bool]]:
    """Every measured line of a segmentation: ``(line dict, kind of :data:`LINE_COLOURS`, flagged)``."""
    m, flags = seg.measurements, seg.flags()
    out = []
    for lv, e in m["vertebrae"].items():
        loss = any("height loss" in f or f == "wedge" for f in flags["vertebrae"].get(lv, []))
        out += [(e[p], "body", loss) for p in ("anterior", "middle", "posterior") if e.get(p)]
        if e.get("canal_ap_mid_body"):
            out.append((e["canal_ap_mid_body"], "canal", e["canal_ap_mid_body"]["stenosis"] in STENOSIS_GRADES))
    for lv, e in m["discs"].items():
        narrow = "narrowing" in flags["discs"].get(lv, [])
        out += [(e[p], "disc", narrow) for p in ("anterior", "middle", "posterior") if e.get(p)]
        if e.get("canal_ap"):
            out.append((e["canal_ap"], "canal", e["canal_ap"]["stenosis"] in STENOSIS_GRADES))
    for lv, e in m["listhesis"].items():
        if flags["listhesis"].get(lv):
            out.append((e["line"], "listhesis", True))
    for ln in (m.get("lordosis_lines") or {}).values():
        out.append((ln, "lordosis", False))
    return out


def draw_measurement_lines(draw: ImageDraw.ImageDraw, seg, volume, scale: float, top: float) -> None:
    """Draw the measured lines on the key image (stored pixel order, scaled, below the header band)."""
    for line, kind, flagged in measured_lines(seg):
        pts = []
        for r, c in line["points"]:
            sr, sc = volume.inplane.point_to_source(float(r), float(c))
            pts.append(((sc + 0.5) * scale, (sr + 0.5) * scale + top))
        draw.line(pts, fill=FLAGGED_LINE if flagged else LINE_COLOURS[kind], width=2)


def key_image(result: DetectionResult, path: str | Path) -> int:
    """Write the key image PNG: the :func:`key_slice` with the vertebrae's boxes and level names drawn.

    Returns:
        The slice index shown.

    """
    v = result.volume
    k = key_slice(result)
    sl = v.inplane.to_source(v.pixels[k])  # shown as the archive stores it (as the PACS shows the series)
    lo, hi = np.percentile(sl, [1, 99.5])
    g = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1)
    scale = max(1.0, KEY_IMAGE_SIZE / max(sl.shape))
    img = Image.fromarray((g * 255).astype(np.uint8)).convert("RGB")
    img = img.resize((round(sl.shape[1] * scale), round(sl.shape[0] * scale)), Image.BILINEAR)
    # a header band above the image and a footer below: the text never covers the anatomy there
    font = ImageFont.load_default(size=FONT_PX)
    line = FONT_PX + 4
    f = result.findings
    head = [("NOT FOR DIAGNOSTIC USE", (255, 170, 0))]
    if f is not None:
        if f.degeneration:
            head.append(("boxes: red = pathological, green = healthy; discs: orange = a finding suspected",
                         (255, 255, 255)))
            head.append(("Pf Pfirrmann, M Modic type, E endplate change, L listhesis, H herniation, N narrowing, "
                         "B bulging", (255, 255, 255)))
        else:
            head.append(("boxes: red = pathological, green = healthy; beside each disc: its grade", (255, 255, 255)))
    seg = result.segmentation if result.segmentation is not None and result.segmentation.key_slice == k else None
    if seg is not None:
        lord = seg.measurements.get("lordosis_deg")
        head.append(("lines: cyan body heights, green disc heights, yellow canal AP, magenta slip, red flagged",
                     (255, 255, 255)))
        if lord is not None:  # a line of its own: the legend above fills the width of a 768 px image
            head.append((f"orange: L1 and S1 superior endplates, lumbar lordosis {lord:.0f} deg", (255, 255, 255)))
    if result.review is not None and result.review.study.needs_review:
        first = result.review.study.reasons[0]
        head.append(("NEEDS REVIEW: " + (first if len(first) <= 90 else first[:87] + "..."), (255, 220, 0)))
    top = line * len(head) + 6
    im = Image.new("RGB", (img.width, img.height + top + line + 4))
    im.paste(img, (0, top))
    draw = ImageDraw.Draw(im)

    def label(xy: tuple[float, float], text: str, colour: tuple[int, int, int]) -> None:
        """Text on a dark box: legible on bright tissue."""
        x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
        draw.rectangle([x0 - 2, y0 - 1, x1 + 2, y1 + 1], fill=(0, 0, 0))
        draw.text(xy, text, fill=colour, font=font)

    for i, (text, colour) in enumerate(head):
        draw.text((4, 3 + line * i), text, fill=colour, font=font)
    if seg is not None:
        draw_measurement_lines(draw, seg, v, scale, top)
    colors = label_colors()
    graded = {x.level: x for x in f.vertebrae} if f is not None else {}
    discs = {d.level: d for d in f.discs} if f is not None else {}
    drawn = {}  # level -> its box on the key image (scaled, stored pixels, below the header)
    for t in result.vertebrae:
        b = t.box_on(k)
        if b is None:
            continue
        r0, c0, r1, c1 = (float(x) * scale for x in v.inplane.box_to_source(b))
        r0, r1 = r0 + top, r1 + top
        drawn[t.level] = (r0, c0, r1, c1)
        g = graded.get(t.level)
        if g is None:  # not graded: level colour
            col, text = colors.get(t.level, (255, 255, 0)), f"{t.level} {t.name_confidence:.2f}"
        else:  # findings: red pathological, green healthy
            col = FINDING_COLOURS[g.label]
            text = f"{t.level} {'PATH' if g.label == 'pathological' else 'ok'} {g.probability:.2f}"
        if result.review is not None and result.review.vertebra(t, result).needs_review:
            text += " ?review"
        draw.rectangle([c0, r0, c1, r1], outline=col, width=3 if g is not None and g.label == "pathological" else 2)
        label((c1 + 4, (r0 + r1) / 2 - FONT_PX / 2), text, col)
    deg = {g.level: g for g in f.degeneration} if f is not None else {}
    for lv in sorted(set(discs) | set(deg), key=lambda x: DISC_LEVELS.index(x) if x in DISC_LEVELS else -1):
        a, b_ = lv.split("-")
        if b_ not in drawn or (a not in drawn and lv not in deg):
            continue
        br0, bc0, br1, bc1 = drawn[b_]
        # an edge disc whose upper vertebra is out of view: just above the lower body
        ar0, ac0, ar1, ac1 = drawn.get(a, (br0 - 0.4 * (br1 - br0), bc0, br0, bc1))
        text, colour = disc_label(lv, discs.get(lv), deg.get(lv))
        if result.review is not None and lv in result.review.discs and result.review.discs[lv].needs_review:
            text += " ?"
        width = draw.textlength(text, font=font)
        if v.inplane.transpose:  # the spine runs across the image: below the bodies, between their centres
            col = (ac0 + ac1 + bc0 + bc1) / 4 - width / 2
            row = max(ar1, br1) + 8
        else:  # beside the bodies, so that disc and vertebra labels never overlap
            row = (ar0 + ar1 + br0 + br1) / 4
            col = max(2.0, min(ac0, bc0) - 6 - width)
        label((col, row - FONT_PX / 2), text, colour)
    draw.text((4, im.height - line), f"slice {k + 1}/{v.pixels.shape[0]}  spinepath {__version__}",
              fill=(255, 255, 255), font=font)
    im.save(path)
    return k

