"""Measurements on sagittal masks (issue 14, item 3): chords, heights, endplates, offsets and angles.

Every function works on one 2D binary mask (rows superior -> inferior, columns anterior -> posterior, the
canonical orientation) with its pixel spacing ``(row_mm, col_mm)`` and returns millimetres together with the
line it was measured on (pixel coordinates ``(row, col)``, pixel centres), so that every number can be drawn
and checked.

* A structure's axes come from its own shape: ``ap`` is first the principal axis of the mask in millimetres
  for a clearly elongated shape (a disc), else a side of its minimum-area enclosing rectangle (a body as deep
  as it is tall, as on a lateral slice, has no stable principal axis), then the mean direction of its two
  endplates; oriented towards posterior; ``si`` is perpendicular to it, oriented towards inferior.
* A *height* at a fraction ``f`` of the structure's anteroposterior extent is the mean length of the mask's
  runs along ``si`` through the points at ``f - 0.10 ... f + 0.10`` (nine, 0 anterior, 1 posterior) on the
  ``ap`` line through the centroid: anterior, middle and posterior heights at 0.15, 0.5 and 0.85 (their
  positions inside the rounded corners; the outer bands reach 0.05 and 0.95). One run would read a mask's
  pixel steps and the ragged outline of a partial section; the band's mean is the same height, measured
  robustly (its line is drawn through ``f``, as long as the mean).
* An *endplate line* is the straight line fitted (least squares, in mm) to the superior (or inferior) boundary
  of the mask over the central 80% of its anteroposterior extent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Positions of the anterior, middle and posterior heights along the anteroposterior extent.
HEIGHT_POSITIONS = {"anterior": 0.15, "middle": 0.5, "posterior": 0.85}
#: Half-width of the band of runs averaged into a height (fraction of the extent) and the number of runs (odd:
#: the run through the position is one of them).
HEIGHT_BAND, HEIGHT_RUNS = 0.10, 9
#: A shape this many times longer than wide (ratio of its principal standard deviations) keeps its principal axis.
PRINCIPAL = 2.0
#: A structure whose enclosing rectangle is this much longer than wide has its ``ap`` along the longer side.
ELONGATED = 1.3


@dataclass
class Line:
    """A measured segment: end points ``(row, col)`` in pixels and its length in mm."""

    start: tuple[float, float]
    end: tuple[float, float]
    mm: float


@dataclass
class Axes:
    """A structure's centroid (pixels) and unit axes in mm space ``(row_mm, col_mm)`` components."""

    centre: tuple[float, float]
    ap: np.ndarray  # towards posterior
    si: np.ndarray  # towards inferior


def _points_mm(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    r, c = np.nonzero(mask)
    return np.stack([r * spacing[0], c * spacing[1]], 1).astype(np.float64)


def structure_axes(mask: np.ndarray, spacing: tuple[float, float], spine: np.ndarray | None = None) -> Axes:
    """Centroid and axes of a mask: ``ap`` along its endplates (pointing posterior), ``si`` across them.

    The principal (longer) axis first; then ``ap`` becomes the mean direction of the superior and inferior
    boundary lines fitted on those axes (:func:`endplate_line`), as heights are read between the endplates:
    the principal axes of a trapezoid, a square-ish body or flared corners tilt. ``spine``: the spine's local
    direction at the structure (mm, e.g. through the neighbouring bodies' centres): a first guess nearer that
    direction than across it is turned by 90 degrees (a body taller than deep, or a partial mask, is longer
    along the spine, and its long side is not its endplates).

    Raises:
        ValueError: For an empty mask.

    """
    pts = _points_mm(mask, spacing)
    if len(pts) < 3:
        raise ValueError("empty mask")
    c = pts.mean(0)
    w, v = np.linalg.eigh(np.cov((pts - c).T))
    # a clearly elongated shape (a disc, most bodies) has its principal axis; a square-ish one its rectangle's
    ap = v[:, int(np.argmax(w))] if w.max() > PRINCIPAL**2 * max(w.min(), 1e-9) else _rectangle_ap(pts - c)
    if spine is not None and np.linalg.norm(spine) > 0:
        s = np.asarray(spine, float) / np.linalg.norm(spine)
        if abs(float(ap @ s)) > abs(float(_si(ap) @ s)):  # along the spine: that is the height, not the depth
            ap = _si(ap)
    ap = ap if ap[1] >= 0 else -ap
    first = Axes((c[0] / spacing[0], c[1] / spacing[1]), ap, _si(ap))
    plates = [endplate_line(mask, spacing, side, first) for side in ("superior", "inferior")]
    if all(p is not None for p in plates):
        mean = plates[0][0] + plates[1][0]
        if np.linalg.norm(mean) > 1e-6:
            ap = mean / np.linalg.norm(mean)
    ap = ap if ap[1] >= 0 else -ap  # columns run anterior -> posterior
    return Axes((c[0] / spacing[0], c[1] / spacing[1]), ap, _si(ap))


def _rectangle_ap(pts: np.ndarray) -> np.ndarray:
    """The first ``ap`` guess of centred mm points: a side of their minimum-area enclosing rectangle.

    The rectangle's sides follow a body's endplates and walls whatever its aspect (the principal axis of a
    square-ish body, as on a lateral slice, points anywhere). ``ap`` is the longer side when the rectangle is
    clearly elongated (:data:`ELONGATED`), else the side nearer the image's anteroposterior (column) axis.
    Extents are the 1st-99th percentiles (a spur does not turn the rectangle).
    """
    t = np.radians(np.arange(0.0, 90.0, 1.0))
    us = np.stack([np.sin(t), np.cos(t)], 1)  # one side per degree; the other side is across it
    vs = np.stack([np.cos(t), -np.sin(t)], 1)
    lo, hi = np.percentile(pts @ np.concatenate([us, vs]).T, [1, 99], axis=0)
    ext = (hi - lo).reshape(2, len(t))
    i = int(np.argmin(ext[0] * ext[1]))
    u, v, eu, ev = us[i], vs[i], ext[0, i], ext[1, i]
    if max(eu, ev) > ELONGATED * min(eu, ev):
        ap = u if eu > ev else v
    else:
        ap = u if abs(u[1]) >= abs(v[1]) else v
    return ap if ap[1] >= 0 else -ap


def _si(ap: np.ndarray) -> np.ndarray:
    """The unit direction across ``ap``, pointing inferior (rows run superior -> inferior)."""
    si = np.array([ap[1], -ap[0]])
    return si if si[0] >= 0 else -si


def chord(mask: np.ndarray, spacing: tuple[float, float], through: tuple[float, float], direction: np.ndarray,
          step_mm: float = 0.1, max_mm: float = 200.0) -> Line | None:
    """The mask's run along ``direction`` (mm components) through the pixel point ``through``.

    The run is the contiguous stretch of mask containing the point nearest ``through`` (so a neighbouring
    structure on the same line is not added); None when the line misses the mask.
    """
    d = np.asarray(direction, float) / max(float(np.linalg.norm(direction)), 1e-9)
    t = np.arange(-max_mm / 2, max_mm / 2 + step_mm, step_mm)
    rows = through[0] + t * d[0] / spacing[0]
    cols = through[1] + t * d[1] / spacing[1]
    ri, ci = np.rint(rows).astype(int), np.rint(cols).astype(int)
    inside = (ri >= 0) & (ri < mask.shape[0]) & (ci >= 0) & (ci < mask.shape[1])
    on = np.zeros(len(t), bool)
    on[inside] = mask[ri[inside], ci[inside]] > 0
    if not on.any():
        return None
    idx = np.flatnonzero(on)
    centre = idx[np.argmin(np.abs(t[idx]))]
    off = np.flatnonzero(~on)
    before, after = off[off < centre], off[off > centre]
    lo = int(before[-1]) + 1 if len(before) else 0
    hi = int(after[0]) - 1 if len(after) else len(t) - 1
    # the run's ends are the pixel edges: half a sample beyond the first and last sample inside
    a, b = t[lo] - step_mm / 2, t[hi] + step_mm / 2
    start = (through[0] + a * d[0] / spacing[0], through[1] + a * d[1] / spacing[1])
    end = (through[0] + b * d[0] / spacing[0], through[1] + b * d[1] / spacing[1])
    return Line(start, end, float(b - a))


def heights(mask: np.ndarray, spacing: tuple[float, float], axes: Axes | None = None,
            band: float = HEIGHT_BAND) -> dict[str, Line | None]:
    """Anterior, middle and posterior heights (:data:`HEIGHT_POSITIONS`) along the structure's ``si`` axis.

    Args:
        mask: The structure.
        spacing: Pixel spacing ``(row_mm, col_mm)``.
        axes: Default: the mask's own (:func:`structure_axes`); a disc may pass its neighbours' axes.
        band: Half-width of the band of :data:`HEIGHT_RUNS` runs whose mean length is the height (fraction of
            the anteroposterior extent); 0: the single run through the position.

    Returns:
        Per position the height as a :class:`Line` through the position, centred on its run and as long as the
        band's mean; None where the run through the position misses the mask.

    """
    ax = axes or structure_axes(mask, spacing)
    depth = chord(mask, spacing, ax.centre, ax.ap)
    if depth is None:
        return dict.fromkeys(HEIGHT_POSITIONS)
    s = np.array([depth.start[0] * spacing[0], depth.start[1] * spacing[1]])
    sp = np.asarray(spacing, float)

    def run(f: float) -> Line | None:
        p = (s + ax.ap * f * depth.mm) / sp
        return chord(mask, spacing, (p[0], p[1]), ax.si)

    out: dict[str, Line | None] = {}
    for name, f in HEIGHT_POSITIONS.items():
        centre = run(f)
        if centre is None or band <= 0:
            out[name] = centre
            continue
        grid = np.linspace(f - band, f + band, HEIGHT_RUNS)
        runs = [centre if i == HEIGHT_RUNS // 2 else run(g) for i, g in enumerate(grid)]  # odd: centre in the middle
        lengths = [ln.mm for ln in runs if ln is not None]
        mid = (np.asarray(centre.start) + np.asarray(centre.end)) / 2 * sp
        half = ax.si * float(np.mean(lengths)) / 2
        a, b = (mid - half) / sp, (mid + half) / sp
        out[name] = Line((float(a[0]), float(a[1])), (float(b[0]), float(b[1])), float(np.mean(lengths)))
    return out


def _edge_points(mask: np.ndarray, spacing: tuple[float, float], centre: tuple[float, float], across: np.ndarray,
                 along: np.ndarray, end: str) -> np.ndarray:
    """Where the mask's runs along ``along`` start (``end="start"``) or end (mm points).

    Sampled over the central 80% of the mask's extent across, through ``centre``.
    """
    span = chord(mask, spacing, centre, across)
    if span is None:
        return np.zeros((0, 2))
    s0 = np.array([span.start[0] * spacing[0], span.start[1] * spacing[1]])
    pts = []
    for f in np.linspace(0.1, 0.9, 33):
        p = s0 + across * f * span.mm
        ln = chord(mask, spacing, (p[0] / spacing[0], p[1] / spacing[1]), along)
        if ln is not None:
            q = ln.start if end == "start" else ln.end
            pts.append((q[0] * spacing[0], q[1] * spacing[1]))
    return np.asarray(pts, float).reshape(-1, 2)


def _fit_line(pts: np.ndarray, towards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line through mm points: ``(centroid, unit direction oriented like towards)``."""
    c = pts.mean(0)
    _, _, vt = np.linalg.svd(pts - c)
    return c, (vt[0] if vt[0] @ towards >= 0 else -vt[0])


def endplate_line(mask: np.ndarray, spacing: tuple[float, float], side: str = "superior",
                  axes: Axes | None = None) -> tuple[np.ndarray, Line] | None:
    """The superior or inferior endplate of a mask as a fitted line.

    Returns:
        ``(unit direction in mm towards posterior, the segment over the fitted extent)``; None when fewer than
        3 boundary points.

    """
    ax = axes or structure_axes(mask, spacing)
    pts = _edge_points(mask, spacing, ax.centre, ax.ap, ax.si, "start" if side == "superior" else "end")
    if len(pts) < 3:
        return None
    c, d = _fit_line(pts, ax.ap)
    proj = (pts - c) @ d
    a, b = c + d * proj.min(), c + d * proj.max()
    return d, Line((a[0] / spacing[0], a[1] / spacing[1]), (b[0] / spacing[0], b[1] / spacing[1]),
                   float(proj.max() - proj.min()))


def angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    """Signed angle (degrees) from direction ``u`` to ``v`` in the sagittal plane (mm components)."""
    return float(np.degrees(np.arctan2(u[0] * v[1] - u[1] * v[0], u @ v)))


def corner(mask: np.ndarray, spacing: tuple[float, float], side: str, axes: Axes | None = None
           ) -> tuple[float, float]:
    """The posterior-superior (``side="superior"``) or posterior-inferior corner of a body, in pixels.

    Its mask point furthest along ``ap - si`` (or ``ap + si``).
    """
    ax = axes or structure_axes(mask, spacing)
    pts = _points_mm(mask, spacing)
    k = int(np.argmax(pts @ (ax.ap + (ax.si if side == "inferior" else -ax.si))))
    return (pts[k, 0] / spacing[0], pts[k, 1] / spacing[1])


def canal_ap(canal: np.ndarray, spacing: tuple[float, float], axes: Axes) -> Line | None:
    """The canal's anteroposterior chord at a structure (a disc or a body), along its AP axis.

    Through the canal point posterior of the structure's centre nearest that line (within 2 mm of it).
    """
    rows, cols = np.nonzero(canal)
    if not len(rows):
        return None
    pts = np.stack([rows * spacing[0], cols * spacing[1]], 1).astype(float)
    rel = pts - np.array([axes.centre[0] * spacing[0], axes.centre[1] * spacing[1]])
    along, across = rel @ axes.ap, np.abs(rel @ axes.si)
    ok = (along > 0) & (across < 2.0)
    if not ok.any():
        return None
    start = pts[ok][np.argmin(along[ok])]
    return chord(canal, spacing, (start[0] / spacing[0], start[1] / spacing[1]), axes.ap)


def listhesis(upper: np.ndarray, lower: np.ndarray, spacing: tuple[float, float],
              upper_axes: Axes | None = None, lower_axes: Axes | None = None) -> dict | None:
    """Slip of the upper body over the lower one (Meyerding).

    The offset of the upper body's posterior-inferior corner from the lower body's posterior-superior corner,
    measured across the bisector of the two bodies' posterior walls (each wall the line through its body's two
    posterior corners: an anterior wedge or a sloped endplate does not tilt it; positive = the upper corner lies
    anterior: an anterolisthesis), in mm and in % of the lower body's superior endplate length, with the
    Meyerding grade (0 below 1%, then I <= 25%, II <= 50%, III <= 75%, IV <= 100%, V beyond). The bisector, not
    the lower wall alone: the posterior walls of a lordotic segment meet at an angle in the disc (a median 12
    degrees at L4-L5, 19 at L5-S1 on spider_midsag), and across the lower wall alone the upper corner of an
    aligned segment reads as a backward slip (bent 20 degrees about the middle of a 10 mm posterior disc height:
    1.7 mm; healthy L4-L5 discs read a median -2.2 mm, across the bisector -1.2). The line runs from the upper
    corner by the offset.
    ``upper_axes`` / ``lower_axes``: the bodies' :func:`structure_axes` when already known.
    """
    lax = lower_axes or structure_axes(lower, spacing)
    ep = endplate_line(lower, spacing, "superior", lax)
    if ep is None or ep[1].mm <= 0:
        return None
    pa, top_up = (np.array(corner(upper, spacing, side, upper_axes)) * spacing for side in ("inferior", "superior"))
    pb, bottom_lo = (np.array(corner(lower, spacing, side, lax)) * spacing for side in ("superior", "inferior"))
    walls = [w / n for w in (pa - top_up, bottom_lo - pb) if (n := np.linalg.norm(w)) > 1e-6]
    wall = np.sum(walls, axis=0) if walls else np.zeros(2)
    d = np.array([-wall[1], wall[0]]) if np.linalg.norm(wall) > 1e-6 else lax.ap  # across the walls' bisector
    d = d / np.linalg.norm(d)
    d = d if d @ lax.ap >= 0 else -d  # towards posterior
    return _slip(pa, pb, d, ep[1].mm, spacing)


def listhesis_over_disc(upper: np.ndarray, disc: np.ndarray, spacing: tuple[float, float],
                        upper_axes: Axes | None = None) -> dict | None:
    """Slip of the upper body over the disc below it, where the lower body itself was not segmented (S1).

    The disc's inferior boundary is the lower body's superior endplate: the offset of the upper body's
    posterior-inferior corner from the disc's posterior-inferior corner, along that endplate (towards
    posterior), in mm and in % of the endplate's fitted length, with the Meyerding grade; as
    :func:`listhesis` otherwise (positive = anterolisthesis).
    """
    dax = structure_axes(disc, spacing)
    ep = endplate_line(disc, spacing, "inferior", dax)
    if ep is None or ep[1].mm <= 0:
        return None
    a = corner(upper, spacing, "inferior", upper_axes)
    b = corner(disc, spacing, "inferior", dax)
    pa = np.array([a[0] * spacing[0], a[1] * spacing[1]])
    pb = np.array([b[0] * spacing[0], b[1] * spacing[1]])
    return _slip(pa, pb, ep[0], ep[1].mm, spacing)


def _slip(pa: np.ndarray, pb: np.ndarray, d: np.ndarray, plate_mm: float, spacing: tuple[float, float]) -> dict:
    """The slip of corner ``pa`` (mm) from ``pb`` along the unit direction ``d`` (towards posterior)."""
    mm = float((pb - pa) @ d)  # d points posterior: positive when the upper corner is anterior
    end = pa + d * mm
    pct = 100.0 * mm / plate_mm
    m = abs(pct)
    grade = 0 if m < 1 else 1 if m <= 25 else 2 if m <= 50 else 3 if m <= 75 else 4 if m <= 100 else 5
    a = (pa[0] / spacing[0], pa[1] / spacing[1])
    return {"offset_mm": mm, "percent": pct, "meyerding": grade,
            "line": Line(a, (end[0] / spacing[0], end[1] / spacing[1]), abs(mm))}
