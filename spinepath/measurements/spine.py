"""The measurements of one sagittal slice, level by level (issue 14, item 3), from named instance masks.

Inputs are the masks of the named vertebral bodies and discs and of the spinal canal on one slice (the
mid-sagittal slice of the spine), with the pixel spacing and, for the signal ratio, the T2 image. Definitions
(:mod:`spinepath.measurements.shape` for the geometry):

* vertebral body: anterior / middle / posterior height; wedge ratio = anterior / posterior; biconcavity ratio =
  middle / posterior; height loss = the largest relative shortfall of its three heights against the mean of
  the same heights of its named neighbours, graded as Genant's (>= 20 / 25 / 40 %). S1's body is not
  measured (:data:`SACRAL_BODIES`): the sacrum's first segment is fused with S2, its lower boundary is no
  endplate (the mask runs into S2 or stops short of it), and Genant's method grades vertebrae, not the
  sacrum; its superior endplate and posterior wall still serve the lordosis and the L5-S1 slip, unless its
  axes are unclear (:data:`SACRAL_AXES_MAX_DEG`: then neither is measured, nor the canal at its mid-body, and
  ``not_measured`` says why);
* disc: anterior / middle / posterior height along the mean axis of its two bodies; disc height index =
  middle height / mean middle height of the two bodies (L5 alone at L5-S1); T2 signal ratio = median disc
  intensity (mask eroded by one pixel) / median canal (CSF) intensity over the disc's rows;
* canal: anteroposterior diameter through each disc's centre and each body's centre, along that structure's
  AP axis, flagged < 10 mm absolute, 10-12 mm relative stenosis at the lumbar levels (L1 to L5-S1: the
  thresholds are the lumbar canal's; above, the canal holds the cord and the diameter is measured but
  ``"not graded"``; a cross-sectional area needs axial images);
* listhesis: the upper body's posterior-inferior corner against the lower body's posterior-superior corner,
  across the bisector of the two bodies' posterior walls (mm, % of the lower body's superior endplate,
  Meyerding grade; :func:`~spinepath.measurements.shape.listhesis`); at L5-S1 without a segmented S1 body (the
  sacrum is rarely segmented), against the L5-S1 disc's posterior-inferior corner along the disc's inferior
  boundary, which is S1's superior endplate (``against``: ``body`` or ``disc``; only a slip against the body is
  flagged or decides spondylolisthesis);
* lumbar lordosis: the angle between the L1 superior endplate and the S1 superior endplate (the S1 body's,
  else the inferior boundary of the L5-S1 disc).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS
from spinepath.core.thresholds import canal_stenosis, genant_grade
from spinepath.measurements.shape import (
    Axes,
    Line,
    angle_deg,
    canal_ap,
    endplate_line,
    heights,
    listhesis,
    listhesis_over_disc,
    structure_axes,
)

POSITIONS = ("anterior", "middle", "posterior")
#: Levels whose canal diameter is graded against the stenosis thresholds: the lumbar canal, L1 to L5-S1.
STENOSIS_LEVELS = frozenset(("L1", "L2", "L3", "L4", "L5", *DISC_LEVELS[DISC_LEVELS.index("L1-L2"):]))
#: The stenosis grade of a canal diameter measured above the lumbar canal.
NOT_GRADED = "not graded"
#: Bodies without heights (so no ratios, height loss, or part in a neighbour's height loss or a disc's height
#: index): S1, fused with the sacrum below it.
SACRAL_BODIES = frozenset(("S1",))
#: Why a named body was not measured (``measurements["not_measured"]``, set by the segmentation stage).
CUT, PARTIAL = "cut by the field of view", "partly segmented"
#: Why a sacral body takes no part in the lordosis or the slip above it (:data:`SACRAL_AXES_MAX_DEG`).
UNCLEAR_ENDPLATE = "superior endplate not told from a wall"
#: A sacral body whose axes found with and without the spine's direction differ by more than this many degrees is
#: left out of the lordosis and of the slip above it. The spine bends at the lumbosacral junction: on a steep
#: sacrum the direction from L5's centre to S1's lies nearer S1's endplate than across it, and S1's superior
#: endplate was fitted on its anterior wall (SPIDER patients 19, 64, 156 with the v0.5.10 segmentation: lordosis
#: 53-64 degrees where the endplate gives 11-39); its shape alone is no safer (an S1 merged with S2 is longest
#: along the sacrum). Of 14 training + selection T2 with L5 and S1 bodies, the 4 beyond this limit were those.
SACRAL_AXES_MAX_DEG = 45.0


def _spine_direction(centres: dict[str, np.ndarray], level: str) -> np.ndarray | None:
    """The spine's direction at a body: from the centre of the named body above to the one below (mm).

    A missing neighbour's place is taken by the body's own centre; None without either neighbour.
    """
    i = VERTEBRA_LEVELS.index(level)
    above, below = (centres.get(VERTEBRA_LEVELS[j], centres[level]) if 0 <= j < len(VERTEBRA_LEVELS)
                    else centres[level] for j in (i - 1, i + 1))
    d = below - above
    return d if np.linalg.norm(d) > 0 else None


def _turned_deg(a: Axes, b: Axes) -> float:
    """The angle between two structures' AP axes (degrees, 0-90)."""
    return float(np.degrees(np.arccos(min(abs(float(a.ap @ b.ap)), 1.0))))


def _line(ln: Line | None) -> dict | None:
    return None if ln is None else {"mm": round(ln.mm, 2), "points": [list(map(float, ln.start)),
                                                                        list(map(float, ln.end))]}


def _mean_axes(a: Axes, b: Axes, centre: tuple[float, float]) -> Axes:
    ap = a.ap + b.ap
    ap = ap / max(float(np.linalg.norm(ap)), 1e-9)
    si = np.array([ap[1], -ap[0]])
    return Axes(centre, ap, si if si[0] >= 0 else -si)


def measure_spine(bodies: dict[str, np.ndarray], discs: dict[str, np.ndarray], canal: np.ndarray | None,
                  spacing: tuple[float, float], image: np.ndarray | None = None) -> dict:
    """Measurements per level (see the module docstring); every value with the line(s) it was measured on.

    Returns:
        ``{"vertebrae": {level: {...}}, "discs": {level: {...}}, "listhesis": {"L4-L5": {...}},
        "lordosis_deg": float | None, "lordosis_lines": {...}}``, with ``"not_measured": {"S1":
        UNCLEAR_ENDPLATE}`` where S1's axes are unclear (the segmentation stage adds its own reasons).

    """
    out: dict = {"vertebrae": {}, "discs": {}, "listhesis": {}, "lordosis_deg": None, "lordosis_lines": None}
    order = sorted(bodies, key=VERTEBRA_LEVELS.index)
    centres = {lv: np.asarray(ndi.center_of_mass(m)) * np.asarray(spacing, float) for lv, m in bodies.items()
               if m.any()}
    axes = {lv: structure_axes(m, spacing, _spine_direction(centres, lv)) for lv, m in bodies.items() if m.sum() >= 3}
    unclear = {lv for lv in SACRAL_BODIES & set(axes)
               if _turned_deg(axes[lv], structure_axes(bodies[lv], spacing)) > SACRAL_AXES_MAX_DEG}
    if unclear:
        out["not_measured"] = dict.fromkeys(unclear, UNCLEAR_ENDPLATE)
    hts = {lv: heights(bodies[lv], spacing, axes[lv]) for lv in axes if lv not in SACRAL_BODIES}
    for lv in order:
        if lv not in axes:
            continue
        h = hts.get(lv, dict.fromkeys(POSITIONS))
        e: dict = {p: _line(h[p]) for p in POSITIONS if lv not in SACRAL_BODIES}
        if all(h[p] is not None for p in POSITIONS):
            e["wedge_ratio"] = round(h["anterior"].mm / h["posterior"].mm, 3)
            e["biconcavity_ratio"] = round(h["middle"].mm / h["posterior"].mm, 3)
            i = VERTEBRA_LEVELS.index(lv)
            nb = [hts[n] for n in (VERTEBRA_LEVELS[i - 1] if i else None, VERTEBRA_LEVELS[i + 1]
                                   if i + 1 < len(VERTEBRA_LEVELS) else None) if n in hts]
            nb = [n for n in nb if all(n[p] is not None for p in POSITIONS)]
            if nb:
                loss = max(1 - h[p].mm / np.mean([n[p].mm for n in nb]) for p in POSITIONS)
                e.update(graded_height_loss(float(loss)))
        if canal is not None and lv not in unclear:  # across unclear axes the "AP" diameter is no diameter
            e["canal_ap_mid_body"] = _canal(canal, spacing, axes[lv], lv)
        if lv not in SACRAL_BODIES or any(v is not None for v in e.values()):
            out["vertebrae"][lv] = e
    for lv, m in discs.items():
        if m.sum() < 3:
            continue
        a, b = lv.split("-")
        own = structure_axes(m, spacing)
        ax = _mean_axes(axes[a], axes[b], own.centre) if a in axes and b in axes else own
        h = heights(m, spacing, ax)
        e = {p: _line(h[p]) for p in POSITIONS}
        mids = [hts[n]["middle"].mm for n in (a, b) if n in hts and hts[n]["middle"] is not None]
        if h["middle"] is not None and mids:
            e["disc_height_index"] = round(h["middle"].mm / float(np.mean(mids)), 3)
        if canal is not None:
            e["canal_ap"] = _canal(canal, spacing, ax, lv)
            if image is not None:
                e["t2_signal_ratio"] = _signal_ratio(image, m, canal)
        out["discs"][lv] = e
    for up, lo in zip(order[:-1], order[1:]):
        if VERTEBRA_LEVELS.index(lo) - VERTEBRA_LEVELS.index(up) != 1 or lo in unclear:
            continue
        r = listhesis(bodies[up], bodies[lo], spacing, axes.get(up), axes.get(lo))
        if r is not None:
            out["listhesis"][f"{up}-{lo}"] = _slip_entry(r, "body")
    if "L5" in bodies and "S1" not in bodies and discs.get("L5-S1") is not None and discs["L5-S1"].sum() >= 3:
        # the sacrum is rarely segmented: S1's superior endplate is the L5-S1 disc's inferior boundary
        r = listhesis_over_disc(bodies["L5"], discs["L5-S1"], spacing, axes.get("L5"))
        if r is not None:
            out["listhesis"]["L5-S1"] = _slip_entry(r, "disc")
    l1 = endplate_line(bodies["L1"], spacing, "superior", axes.get("L1")) if "L1" in bodies else None
    if "S1" in unclear:  # the disc's own axes are no safer at L5-S1 (thin, wedge-shaped)
        s1 = None
    elif "S1" in bodies:
        s1 = endplate_line(bodies["S1"], spacing, "superior", axes.get("S1"))
    elif "L5-S1" in discs:
        s1 = endplate_line(discs["L5-S1"], spacing, "inferior")
    else:
        s1 = None
    if l1 is not None and s1 is not None:
        out["lordosis_deg"] = round(abs(angle_deg(l1[0], s1[0])), 1)
        out["lordosis_lines"] = {"L1_superior": _line(l1[1]), "S1_superior": _line(s1[1])}
    return out


def _slip_entry(r: dict, lower: str) -> dict:
    """A listhesis measurement for the JSON; ``lower``: what the slip was measured against (``body`` / ``disc``)."""
    return {"offset_mm": round(r["offset_mm"], 2), "percent": round(r["percent"], 1), "meyerding": r["meyerding"],
            "line": _line(r["line"]), "against": lower}


def graded_height_loss(loss: float) -> dict:
    """A body's height loss as stored (``height_loss``, 3 decimals, 0 for a taller body) with its Genant grade.

    The grade is the stored value's (``genant_grade``): grading the stored value again gives the same grade.
    """
    stored = round(max(loss, 0.0), 3)
    return {"height_loss": stored, "genant_grade": genant_grade(stored)}


def graded_canal(ln: Line, level: str) -> dict:
    """A canal diameter line as stored (mm to 2 decimals) with the stored value's stenosis grade.

    :data:`NOT_GRADED` above the lumbar canal.
    """
    d = _line(ln)
    return {**d, "stenosis": canal_stenosis(d["mm"]) if level in STENOSIS_LEVELS else NOT_GRADED}


def _canal(canal: np.ndarray, spacing: tuple[float, float], ax: Axes, level: str) -> dict | None:
    """:func:`canal_ap` with its stenosis grade (:func:`graded_canal`)."""
    ln = canal_ap(canal, spacing, ax)
    return None if ln is None else graded_canal(ln, level)


def _signal_ratio(image: np.ndarray, disc: np.ndarray, canal: np.ndarray) -> float | None:
    """Median disc intensity (eroded mask) over median CSF intensity in the canal rows of the disc."""
    core = ndi.binary_erosion(disc)
    rows = np.flatnonzero(disc.any(1))
    csf = canal.copy()
    csf[: rows.min()] = False
    csf[rows.max() + 1:] = False
    if not core.any() or not csf.any():
        return None
    den = float(np.median(image[csf]))
    return round(float(np.median(image[core])) / den, 3) if den > 0 else None
