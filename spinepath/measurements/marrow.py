"""The marrow signal next to each endplate, on the segmented bodies of a T2 slice (evidence for Modic changes).

Modic changes are signal changes of the vertebral marrow next to an endplate: type 1 (oedema) and type 2 (fat)
are bright on a T2 TSE, type 3 (sclerosis) dark. For each body mask, per image column of its central 80 % (the
cortical walls left out), the *band* is the marrow :data:`BAND_MM` inside its upper or lower endplate (at most
:data:`BAND_MAX_SHARE` of that column's height) and the *core* the pixels more than :data:`CORE_SHARE` of the
height from both endplates. A band's signal is its :data:`PERCENTILE` th percentile (a patch need not fill the
band), reported against the body's own core and against the median core of all the slice's bodies. Each disc
gets the band facing it above (the lower band of the body above) and below (the upper band of the body below).

Studied as evidence for the any-Modic decision beside the grader's probability (``scripts/marrow_evidence.py``,
out of fold on the spider_midsag training + selection patients): the gain's interval reached below 0, so the
product does not use it yet (model card, "Where the error comes from").
"""

from __future__ import annotations

import numpy as np

from spinepath.core.levels import VERTEBRA_LEVELS

#: Depth of the band inside an endplate (mm from the body's outline, along the image rows).
BAND_MM = (1.0, 5.0)
#: A band never reaches further into the body than this share of the column's height.
BAND_MAX_SHARE = 0.4
#: The core: pixels further than this share of the column's height from both endplates.
CORE_SHARE = 0.3
#: The band's signal: this percentile of its pixels.
PERCENTILE = 90.0
#: Fewest pixels in a band or a core for a value.
MIN_PIXELS = 10


def endplate_bands(image: np.ndarray, body: np.ndarray, row_mm: float, band_mm: tuple[float, float] = BAND_MM,
                   max_share: float = BAND_MAX_SHARE, percentile: float = PERCENTILE) -> dict[str, float] | None:
    """The upper and lower bands' signal and the core's median of one body mask.

    Args:
        image: The slice's intensities.
        body: The body's mask on the same pixels.
        row_mm: Pixel spacing along the rows (superior-inferior) in mm.
        band_mm: The band's depth inside the endplate, ``(from, to)`` mm.
        max_share: The band's largest share of a column's height.
        percentile: The band's statistic.

    Returns:
        ``{"upper", "lower", "core"}`` intensities, or None where the mask is too small for all three.

    """
    rows, cols = np.nonzero(body)
    if len(rows) < 3 * MIN_PIXELS:
        return None
    top, bottom = np.full(body.shape[1], body.shape[0]), np.full(body.shape[1], -1)
    np.minimum.at(top, cols, rows)  # each column's first and last row of the body
    np.maximum.at(bottom, cols, rows)
    d_top, d_bottom = (rows - top[cols]) * row_mm, (bottom[cols] - rows) * row_mm
    height = (bottom[cols] - top[cols]) * row_mm
    c0, c1 = np.percentile(cols, [10, 90])
    central = (cols >= c0) & (cols <= c1)
    v = np.asarray(image, float)[rows, cols]
    core = v[central & (d_top > CORE_SHARE * height) & (d_bottom > CORE_SHARE * height)]
    lo, hi = band_mm
    upper = v[central & (d_top >= lo) & (d_top < hi) & (d_top < max_share * height)]
    lower = v[central & (d_bottom >= lo) & (d_bottom < hi) & (d_bottom < max_share * height)]
    if min(len(core), len(upper), len(lower)) < MIN_PIXELS:
        return None
    return {"upper": float(np.percentile(upper, percentile)), "lower": float(np.percentile(lower, percentile)),
            "core": float(np.median(core))}


def marrow_signal(image: np.ndarray, bodies: dict[str, np.ndarray], row_mm: float, **band) -> dict[str, dict]:
    """Per disc level between two named vertebrae: the marrow signal facing it above and below.

    Args:
        image: The slice's intensities.
        bodies: Body masks by vertebra level (S1 where segmented).
        row_mm: Pixel spacing along the rows in mm.
        **band: :func:`endplate_bands` settings (the defaults are the product's).

    Returns:
        ``{"L4-L5": {"above": {"band_to_core", "band_to_bodies"} | None, "below": ... | None}}`` for each
        disc with at least one side measured; ratios of intensities (+1 each, so that a black band stays finite).

    """
    b = {lv: r for lv, m in bodies.items() if (r := endplate_bands(image, m, row_mm, **band)) is not None}
    if not b:
        return {}
    ref = float(np.median([r["core"] for r in b.values()]))

    def side(level: str, which: str) -> dict[str, float] | None:
        if level not in b:
            return None
        q = b[level][which] + 1.0
        return {"band_to_core": round(q / (b[level]["core"] + 1.0), 4), "band_to_bodies": round(q / (ref + 1.0), 4)}

    out = {}
    for upper, lower in zip(VERTEBRA_LEVELS[:-1], VERTEBRA_LEVELS[1:]):
        e = {"above": side(upper, "lower"), "below": side(lower, "upper")}
        if e["above"] or e["below"]:
            out[f"{upper}-{lower}"] = e
    return out


#: The features of one disc's :func:`marrow_signal` entry: log ratios of the band facing it above and below, to the
#: body's core and to the slice's bodies, then whether each side was not measured.
MARROW_FEATURES = ("above_band_to_core", "above_band_to_bodies", "below_band_to_core", "below_band_to_bodies",
                   "above_missing", "below_missing")


def marrow_features(entry: dict | None) -> np.ndarray:
    """:data:`MARROW_FEATURES` of one disc's :func:`marrow_signal` entry (None: neither side measured)."""
    out = np.zeros(len(MARROW_FEATURES))
    for k, side in enumerate(("above", "below")):
        e = (entry or {}).get(side)
        if e is None:
            out[4 + k] = 1.0
        else:
            out[2 * k:2 * k + 2] = np.log([e["band_to_core"], e["band_to_bodies"]])
    return out
