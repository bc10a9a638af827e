"""Locating the graded discs of spider_midsag: which labelled discs the product finds, counted as it counts.

spider_midsag gives no locations, only grades per disc numbered from the bottom (``index_from_bottom``,
1 = the lumbosacral disc). The product names its discs between neighbouring named vertebrae; a disc named
``X-Y`` is ``index_from_bottom`` = its distance from ``L5-S1`` in :data:`spinepath.core.levels.DISC_LEVELS`
plus one, so a missed sacrum (the lowest vertebra taken as L5) shifts every index, exactly as it would shift
the grades. A labelled disc is *located* when the product names a disc at its index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from spinepath.core.geometry import series_from_slices
from spinepath.core.levels import DISC_LEVELS, VERTEBRA_LEVELS
from spinepath.data.spider import SpiderStudy, load_spider_midsag
from spinepath.stages import detect_series

#: The lumbosacral disc, ``index_from_bottom`` 1.
LUMBOSACRAL = DISC_LEVELS.index("L5-S1")


def disc_index_from_bottom(level: str) -> int:
    """``index_from_bottom`` of a disc level name (``"L5-S1"`` -> 1, ``"L4-L5"`` -> 2, ...)."""
    return LUMBOSACRAL - DISC_LEVELS.index(level) + 1


@dataclass
class LocatedDiscs:
    """The product's discs on one spider_midsag image."""

    patient: str
    sequence: str
    anchor: str | None
    found: dict[int, tuple[float, float]]  # index_from_bottom -> disc centre (row, col), midway between bodies
    labelled: list[int]

    @property
    def located(self) -> list[int]:
        """Labelled disc indices the product found."""
        return [i for i in self.labelled if i in self.found]


def locate_discs(study: SpiderStudy, sequence: str, detector) -> LocatedDiscs:
    """Detect and name the vertebrae of one sequence's image and list the discs between named neighbours.

    The image is one slice with its DICOM pixel spacing (a single-slice series, as the product reads a 2D
    input).
    """
    img = study.load_image(sequence)
    spacing = study.spacing.get(sequence) or (1.0, 1.0)
    res = detect_series(series_from_slices([img], spacing, 4.0), detector)
    named = [t for t in res.vertebrae if t.level in VERTEBRA_LEVELS]
    found: dict[int, tuple[float, float]] = {}
    for a, b in zip(named, named[1:]):
        level = f"{a.level}-{b.level}"
        if level in DISC_LEVELS:
            ca, cb = a.centre, b.centre
            found[disc_index_from_bottom(level)] = (float(ca[0] + cb[0]) / 2, float(ca[1] + cb[1]) / 2)
    return LocatedDiscs(study.patient, sequence, res.naming.anchor if res.naming else None, found,
                        [int(d["index_from_bottom"]) for d in study.discs])


def located_fraction(root: str | Path, detector, cases: list[str] | None = None,
                     sequences: tuple[str, ...] = ("t1", "t2"), progress: bool = True) -> dict:
    """Per sequence: located labelled discs / labelled discs, and the fraction of images anchored on S1.

    Returns:
        ``{sequence: {"n_images", "n_discs", "located_fraction", "anchored_fraction"}, "per_image": [...]}``.

    """
    studies = [s for s in load_spider_midsag(root) if cases is None or s.patient in cases]
    out: dict = {"per_image": []}
    for seq in sequences:
        rows = [locate_discs(s, seq, detector) for s in tqdm(studies, desc=seq, disable=not progress)
                if seq in s.sequences]
        n = sum(len(r.labelled) for r in rows)
        out[seq] = {"n_images": len(rows), "n_discs": n,
                    "located_fraction": sum(len(r.located) for r in rows) / max(n, 1),
                    "anchored_fraction": sum(r.anchor == "S1" for r in rows) / max(len(rows), 1)}
        out["per_image"] += [{"patient": r.patient, "sequence": seq, "anchor": r.anchor,
                              "labelled": len(r.labelled), "located": len(r.located)} for r in rows]
    return out
