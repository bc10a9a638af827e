"""The key image PNG: the mid-sagittal slice with the vertebrae's boxes, level names and findings drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from spinepath import __version__
from spinepath.core.labels import label_colors
from spinepath.core.results import DetectionResult, key_slice

#: Key-image colours of vertebra findings and disc grades.
FINDING_COLOURS = {"pathological": (255, 48, 48), "healthy": (64, 220, 64)}


DISC_COLOURS = {"v1": (160, 200, 255), "v2": (255, 220, 64), "v3": (255, 150, 40), "v4": (255, 48, 48),
                "v5": (220, 120, 255)}


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
    scale = max(1, round(512 / max(sl.shape)))
    im = Image.fromarray((g * 255).astype(np.uint8)).convert("RGB")
    im = im.resize((sl.shape[1] * scale, sl.shape[0] * scale), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    colors = label_colors()
    f = result.findings
    graded = {x.level: x for x in f.vertebrae} if f is not None else {}
    discs = {d.level: d for d in f.discs} if f is not None else {}
    drawn = {}  # level -> its box on the key image (scaled, stored pixels)
    for t in result.vertebrae:
        b = t.box_on(k)
        if b is None:
            continue
        r0, c0, r1, c1 = (float(x) * scale for x in v.inplane.box_to_source(b))
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
        draw.text((c1 + 4, (r0 + r1) / 2 - 6), text, fill=col)
    for lv, d in discs.items():
        a, b_ = lv.split("-")
        if a in drawn and b_ in drawn:
            (ar0, ac0, ar1, ac1), (br0, bc0, br1, bc1) = drawn[a], drawn[b_]
            text = f"{lv} {d.grade_name}"
            if result.review is not None and lv in result.review.discs and result.review.discs[lv].needs_review:
                text += " ?"
            if v.inplane.transpose:  # the spine runs across the image: below the bodies, between their centres
                col = (ac0 + ac1 + bc0 + bc1) / 4 - draw.textlength(text) / 2
                row = max(ar1, br1) + 8
            else:  # beside the bodies, so that disc and vertebra labels never overlap
                row = (ar0 + ar1 + br0 + br1) / 4
                col = max(2.0, min(ac0, bc0) - 6 - draw.textlength(text))
            draw.text((col, row - 6), text, fill=DISC_COLOURS[d.grade])
    if f is not None:
        draw.text((4, 18), "boxes: red = pathological, green = healthy; discs: grade", fill=(255, 255, 255))
    draw.text((4, 4), "NOT FOR DIAGNOSTIC USE", fill=(255, 170, 0))
    if result.review is not None and result.review.study.needs_review:
        first = result.review.study.reasons[0]
        draw.text((4, 32), "NEEDS REVIEW: " + (first if len(first) <= 70 else first[:67] + "..."), fill=(255, 220, 0))
    draw.text((4, im.height - 14), f"slice {k + 1}/{v.pixels.shape[0]}  spinepath {__version__}", fill=(255, 255, 255))
    im.save(path)
    return k

