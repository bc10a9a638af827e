"""The grade boundaries of the measured findings, in one home (README "Measurements").

``measurements`` grades its values with them, ``SpineSegmentation.flags`` reports the findings they make and
``review`` flags a finding whose value lies near one of them.
"""

from __future__ import annotations

from collections.abc import Callable

from spinepath.core.levels import DISC_LEVELS

#: Genant's height-loss fractions between grades 0-1, 1-2 and 2-3.
GENANT_LOSS = (0.20, 0.25, 0.40)
#: The sagittal canal diameters (mm) below which a canal is absolutely / relatively stenotic.
STENOSIS_MM = (10.0, 12.0)
#: A disc is narrowed below this fraction of its measured neighbours' mean middle height.
NARROWING_FRACTION = 0.75
#: The discs whose narrowing is graded: L1-L2 to L5-S1. Above, the discs grow taller towards the lumbar spine, so a
#: disc is shorter than its neighbours' mean without being narrowed: on the spider_midsag training + selection T2,
#: 3 of the 20 flags from T9-T10 to T12-L1 were narrowed discs, against 84 of 101 below
#: (``scripts/narrowing_by_level.py``).
NARROWING_LEVELS = frozenset(DISC_LEVELS[DISC_LEVELS.index("L1-L2"):])
#: A body is wedged below this anterior / posterior height ratio.
WEDGE_RATIO = 0.80
#: A slip is a listhesis from this offset (mm).
LISTHESIS_MM = 3.0
#: The canal grades that are findings (``canal_stenosis``; lumbar levels only, ``measurements.spine``).
STENOSIS_GRADES = ("absolute", "relative")


def genant_grade(loss: float) -> int:
    """Genant's semi-quantitative grade of a height loss fraction: 0 below 0.20, 1 below 0.25, 2 below 0.40, 3."""
    return sum(loss >= b for b in GENANT_LOSS)


def canal_stenosis(ap_mm: float) -> str:
    """The usual sagittal canal thresholds: ``"absolute"`` below 10 mm, ``"relative"`` 10-12 mm, else ``"none"``."""
    return "absolute" if ap_mm < STENOSIS_MM[0] else "relative" if ap_mm <= STENOSIS_MM[1] else "none"


def graded_slip(slip: dict | None) -> bool:
    """Whether a measured slip is graded: flagged, reviewed and evidence for spondylolisthesis.

    Only a slip measured against the body below (``against``: ``body``). At L5-S1 without a segmented S1 body
    (the segmentation learns SPIDER's masks, where the sacrum is background: S1 is a body in 14 of 118
    spider_midsag T2) the slip is measured against the L5-S1 disc's posterior corner, which bulges and
    herniates: on the training + selection T2 those slips did not rank SPIDER's spondylolisthesis label (AUC
    0.51, 106 discs, 4 positive; ``scripts/fit_listhesis_decision.py``). Such a slip is reported only.
    """
    return slip is not None and slip.get("against", "body") == "body"


#: The boundaries each graded measurement is graded against.
GRADE_BOUNDARIES: dict[str, tuple[float, ...]] = {
    "height_loss": GENANT_LOSS,
    "wedge_ratio": (WEDGE_RATIO,),
    "narrowing_ratio": (NARROWING_FRACTION,),
    "canal_ap_mm": STENOSIS_MM,
    "listhesis_mm": (LISTHESIS_MM,),
}

#: Each graded measurement's grade (a slip: of its absolute offset).
GRADE: dict[str, Callable[[float], int | bool | str]] = {
    "height_loss": genant_grade,
    "wedge_ratio": lambda v: v < WEDGE_RATIO,
    "narrowing_ratio": lambda v: v < NARROWING_FRACTION,
    "canal_ap_mm": canal_stenosis,
    "listhesis_mm": lambda v: v >= LISTHESIS_MM,
}
#: Whether a graded measurement's value is a reported finding (its grade is one).
POSITIVE: dict[str, Callable[[float], bool]] = {
    k: (lambda v, g=g: g(v) not in (0, False, "none")) for k, g in GRADE.items()
}
