"""Pixel spacing of evaluation cases whose folder does not give it.

The spider formats allow a null ``pixel_spacing_mm`` (the spacing is unknown). The networks need a scale to
resample a slice to their grids, so the evaluations estimate it from the anatomy the detector finds
(:func:`spinepath.stages.estimate_spacing`); measurements in millimetres are not scored on such a case.
"""

from __future__ import annotations

from dataclasses import replace

from spinepath import stages
from spinepath.data.spider import SpiderSegCase, SpiderStudy
from spinepath.detection.predictor import VertebraDetector


class DetectorSource:
    """The detector that estimates unknown spacings: the given one, else the bundle's, loaded on first use."""

    def __init__(self, detector: VertebraDetector | None = None) -> None:
        self._detector = detector

    def __call__(self) -> VertebraDetector:
        """The detector (loading the bundle's the first time when none was given)."""
        if self._detector is None:
            from spinepath.core.paths import resolve_model_path  # only where a case lacks its spacing

            self._detector = VertebraDetector.load(resolve_model_path(None))
        return self._detector


def seg_case_with_spacing(case: SpiderSegCase, detector: VertebraDetector | DetectorSource) -> SpiderSegCase:
    """The spider_seg case with a spacing: its own, else estimated on its slices as one series.

    Raises:
        ValueError: If the spacing is unknown and cannot be estimated (fewer than two vertebrae found).

    """
    if case.spacing is not None:
        return case
    det = detector() if isinstance(detector, DetectorSource) else detector
    try:
        sp = stages.estimate_spacing([case.load(i)[0] for i in range(len(case.slices))], det, 2 * case.thickness)
    except ValueError as exc:
        raise ValueError(f"{case.root.name}/{case.patient}: {exc}") from None
    return replace(case, spacing=(sp, sp), spacing_estimated=True)


def study_with_spacing(study: SpiderStudy, detector: VertebraDetector | DetectorSource,
                       sequences: tuple[str, ...] = ("t1", "t2")) -> SpiderStudy:
    """The spider_midsag study with a spacing for each of ``sequences`` it has: its own, else estimated.

    Raises:
        ValueError: If a spacing is unknown and cannot be estimated (fewer than two vertebrae found).

    """
    missing = [q for q in sequences if q in study.sequences and not study.spacing.get(q)]
    if not missing:
        return study
    det = detector() if isinstance(detector, DetectorSource) else detector
    spacing = dict(study.spacing)
    for q in missing:
        try:
            sp = stages.estimate_spacing([study.load_image(q)], det, 4.0)
        except ValueError as exc:
            raise ValueError(f"{study.root.name}/{study.patient} {q}: {exc}") from None
        spacing[q] = (sp, sp)
    return replace(study, spacing=spacing)
