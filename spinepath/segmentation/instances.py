"""Instances per level (issue 14, item 2): the semantic masks of one slice split and named by the detector's chain.

A vertebral body is the connected component of the body class that overlaps the named vertebra's box most
(at least :data:`MIN_BOX_OVERLAP` of the component inside the box), else the part inside the box of a larger
component that fills :data:`MIN_BOX_FILL` of it (S1 in a sacrum segmented as one piece); a disc ``A-B`` is the
disc component nearest the midpoint of the two named bodies (a box centre for a level without a body) and lying
between them along the spine; the canal is one
structure (its largest component). Every mask is on the grid of the class map it came from.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from spinepath.core.levels import DISC_LEVELS
from spinepath.segmentation.partial import CLASSES

#: A body component must have at least this fraction of its pixels inside the named box.
MIN_BOX_OVERLAP = 0.5
#: Else a larger component filling this fraction of the box gives the box's part of it (a fused sacrum).
MIN_BOX_FILL = 0.4


def components(mask: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """Connected components of a binary mask with at least ``min_pixels`` pixels (smaller ones are fragments)."""
    lab, n = ndi.label(mask)
    return [lab == i for i in range(1, n + 1) if (lab == i).sum() >= min_pixels]


def largest_component(mask: np.ndarray | None, min_pixels: int) -> np.ndarray | None:
    """A mask's largest component of at least ``min_pixels`` (the canal: one structure), None when none."""
    comps = components(mask, min_pixels) if mask is not None else []
    return max(comps, key=lambda m: int(m.sum())) if comps else None


def level_instances(classes: np.ndarray, boxes: dict[str, tuple[float, float, float, float]],
                    min_pixels: int = 30) -> dict:
    """Named instances of one slice's class map.

    Args:
        classes: ``(H, W)`` class indices (:data:`CLASSES`).
        boxes: Named vertebra -> ``(r0, c0, r1, c1)`` box on the same grid (the detector's, scaled), top-down.
        min_pixels: Smaller components are fragments.

    Returns:
        ``{"bodies": {level: mask}, "discs": {"A-B": mask}, "canal": mask | None}``.

    """
    bodies: dict[str, np.ndarray] = {}
    comps = components(classes == CLASSES.index("vertebral_body"), min_pixels)
    used: set[int] = set()
    for lv, (r0, c0, r1, c1) in boxes.items():
        inbox = np.zeros(classes.shape, bool)
        inbox[max(int(r0), 0):int(np.ceil(r1)), max(int(c0), 0):int(np.ceil(c1))] = True
        best, frac = None, MIN_BOX_OVERLAP
        for i, c in enumerate(comps):
            f = float((c & inbox).sum()) / float(c.sum())
            if i not in used and f >= frac:
                best, frac = i, f
        if best is not None:
            used.add(best)
            bodies[lv] = comps[best]
            continue
        # a body fused with others (the sacrum's S1 with S2-S5): its part inside the box, when it fills it
        over = [(float((c & inbox).sum()), i) for i, c in enumerate(comps) if i not in used]
        if over and max(over)[0] >= MIN_BOX_FILL * inbox.sum():
            bodies[lv] = comps[max(over)[1]] & inbox
    discs: dict[str, np.ndarray] = {}
    dcomps = components(classes == CLASSES.index("disc"), min_pixels)
    # a level without a body keeps its box centre: the disc next to it can still be found
    cents = {lv: np.array([(r0 + r1) / 2, (c0 + c1) / 2]) for lv, (r0, c0, r1, c1) in boxes.items()}
    cents.update({lv: np.array(ndi.center_of_mass(m)) for lv, m in bodies.items()})
    names = list(boxes)
    for a, b in zip(names[:-1], names[1:]):
        lv = f"{a}-{b}"
        if lv not in DISC_LEVELS or not (a in bodies or b in bodies) or not dcomps:
            continue
        axis = cents[b] - cents[a]
        length = float(np.linalg.norm(axis))
        mid = (cents[a] + cents[b]) / 2
        best, dist = None, np.inf
        for i, c in enumerate(dcomps):
            p = np.array(ndi.center_of_mass(c))
            t = float((p - cents[a]) @ axis) / max(length**2, 1e-9)
            d = float(np.linalg.norm(p - mid))
            if 0.15 < t < 0.85 and d < dist:
                best, dist = i, d
        if best is not None:
            discs[lv] = dcomps[best]
    canal = largest_component(classes == CLASSES.index("spinal_canal"), min_pixels)
    return {"bodies": bodies, "discs": discs, "canal": canal}
