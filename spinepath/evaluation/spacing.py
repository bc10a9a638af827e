"""Pixel spacing of evaluation cases whose folder does not give it.

The spider formats allow a null ``pixel_spacing_mm`` (the spacing is unknown). The networks need a scale to
resample a slice to their grids, so the evaluations estimate it from the anatomy the detector finds
(:func:`spinepath.stages.estimate_spacing`); measurements in millimetres are not scored on such a case. Where
no spine is found to scale by, the field-of-view guess stands and a warning names the case: one image does
not stop an evaluation (its structures then count as not found, as the contracts count them).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from spinepath import stages
from spinepath.core.geometry import spark_fov_spacing
from spinepath.data.spider import SpiderSegCase, SpiderStudy
from spinepath.detection.predictor import VertebraDetector

log = logging.getLogger(__name__)


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
    """The spider_seg case with a spacing: its own, else estimated on its slices as one series (:func:`estimated`)."""
    if case.spacing is not None:
        return case
    sp = estimated([case.load(i)[0] for i in range(len(case.slices))], detector, 2 * case.thickness,
                   f"{case.root.name}/{case.patient}")
    return replace(case, spacing=(sp, sp), spacing_estimated=True)


def study_with_spacing(study: SpiderStudy, detector: VertebraDetector | DetectorSource,
                       sequences: tuple[str, ...] = ("t1", "t2")) -> SpiderStudy:
    """The spider_midsag study with a spacing for each of ``sequences`` it has: its own, else :func:`estimated`."""
    missing = [q for q in sequences if q in study.sequences and not study.spacing.get(q)]
    if not missing:
        return study
    spacing = dict(study.spacing)
    for q in missing:
        sp = estimated([study.load_image(q)], detector, 4.0, f"{study.root.name}/{study.patient} {q}")
        spacing[q] = (sp, sp)
    return replace(study, spacing=spacing)


def estimated(slices: list[np.ndarray], detector: VertebraDetector | DetectorSource, slice_mm: float,
              name: str) -> float:
    """The slices' spacing from their anatomy (:func:`spinepath.stages.estimate_spacing`).

    Where no spine is found to scale by, the field-of-view guess, with a warning naming ``name``.
    """
    det = detector() if isinstance(detector, DetectorSource) else detector
    try:
        return stages.estimate_spacing(slices, det, slice_mm)
    except ValueError as exc:
        guess = spark_fov_spacing(slices[0].shape)
        log.warning("%s: %s; the field-of-view guess (%.3f mm) stands", name, exc, guess)
        return guess
