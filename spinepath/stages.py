"""The one orchestration of a study: load -> detect -> name -> grade -> fuse -> review (no output writing).

Every adapter runs a study through these functions: the MONAI Deploy app (one operator per stage), the MONAI
bundle and the CLI (:func:`spinepath.run.run_study`), the MONAI Label infer task
(:func:`spinepath.labeling.labelmap.label_study`) and the evaluation. A new stage gets its implementation in
its own subpackage (as ``detection/`` and ``grading/``) and one function here, called after the stage it needs.
"""

from __future__ import annotations

import time
from pathlib import Path

from spinepath.core.geometry import SeriesVolume
from spinepath.core.paths import default_device, resolve_grader_path, resolve_model_path
from spinepath.core.results import DetectionResult, SliceScores
from spinepath.detection.grouping import group_and_name_with_evidence
from spinepath.detection.predictor import VertebraDetector
from spinepath.grading.grader import Grader
from spinepath.grading.inference import classify_detections, fuse_detections
from spinepath.io.dicom import load_study
from spinepath.review import Review
from spinepath.review import review as review_result


def load_models(
    model: VertebraDetector | str | Path | None = None,
    grader: Grader | str | Path | None = None,
    device: str | None = None,
) -> tuple[VertebraDetector, Grader]:
    """The detector and the grading model, loaded unless given loaded.

    Args:
        model: Detector weights (file or folder; :func:`spinepath.core.paths.resolve_model_path`) or a detector.
        grader: Grading model (file or folder) or a grader; by default the one beside a detector given as a
            path, else :func:`spinepath.core.paths.resolve_grader_path`'s default.
        device: Device of the detector; default :func:`spinepath.core.paths.default_device` (CUDA when present).

    Raises:
        FileNotFoundError: If a model file is missing.
        ValueError: If a file is not a spinepath model.

    """
    if not isinstance(grader, Grader):
        near = None  # a detector given as a path: the grader beside it
        if isinstance(model, str | Path):
            near = Path(model).parent if Path(model).is_file() else model
        grader = Grader.load(resolve_grader_path(grader or near))
    if not isinstance(model, VertebraDetector):
        model = VertebraDetector.load(resolve_model_path(model), device=device or default_device())
    return model, grader


def load(input_dir: str | Path) -> SeriesVolume:
    """Load stage: scan a DICOM study folder, select its sagittal T2 series and read it.

    Raises:
        StudyError: If the study cannot be processed (the message names the reason).

    """
    return load_study(input_dir)


def detect_series(volume: SeriesVolume, model: VertebraDetector, batch_size: int = 8) -> DetectionResult:
    """Detection and naming stages: detect the bodies per slice, group them into vertebrae and name them."""
    t0 = time.perf_counter()
    dets = model.predict(list(volume.pixels), volume.spacing, batch_size=batch_size)
    t1 = time.perf_counter()
    verts, naming = group_and_name_with_evidence(dets, volume.pixels.shape[1:])
    t2 = time.perf_counter()
    return DetectionResult(verts, volume, {"detection": t1 - t0, "grouping": t2 - t1}, naming=naming)


def classify(result: DetectionResult, grader: Grader, spacing_known: bool = True, views: int = 1) -> SliceScores:
    """Grading stage: classify every detected vertebra and disc on every slice of its central slab.

    See :func:`spinepath.grading.inference.classify_detections`.
    """
    return classify_detections(result, grader, spacing_known, views)


def fuse(result: DetectionResult, scores: SliceScores, grader: Grader) -> DetectionResult:
    """Fusion stage: one decision per vertebra and one grade per disc; sets ``result.findings``."""
    result.findings = fuse_detections(result, scores, grader)
    return result


def grade(result: DetectionResult, grader: Grader, spacing_known: bool = True, views: int = 1) -> DetectionResult:
    """Grading and fusion stages (:func:`classify` then :func:`fuse`); sets ``result.findings``."""
    return fuse(result, classify(result, grader, spacing_known, views), grader)


def review(result: DetectionResult) -> Review:
    """Review stage: ``needs_review`` with reasons for the study and every finding; sets ``result.review``.

    See :func:`spinepath.review.review`.
    """
    return review_result(result)


def analyse(volume: SeriesVolume, detector: VertebraDetector, grader: Grader | None = None) -> DetectionResult:
    """All stages after loading: detect and name, then (with a grader) grade and fuse, then review."""
    result = detect_series(volume, detector)
    if grader is not None:
        grade(result, grader)
    review(result)
    return result
