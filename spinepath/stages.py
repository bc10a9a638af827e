"""The one orchestration of a study: load -> detect -> name -> grade -> fuse -> degeneration -> segment -> review.

No output writing.

Every adapter runs a study through these functions: the MONAI Deploy app (one operator per stage), the MONAI
bundle and the CLI (:func:`spinepath.run.run_study`), the MONAI Label infer task
(:func:`spinepath.labeling.labelmap.label_study`) and the evaluation. A new stage gets its implementation in
its own subpackage (as ``detection/`` and ``grading/``) and one function here, called after the stage it needs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from torch import nn

from spinepath.core.exported import export_meta
from spinepath.core.geometry import SeriesVolume, series_from_slices, spacing_from_gap, spark_fov_spacing
from spinepath.core.levels import VERTEBRA_LEVELS
from spinepath.core.paths import (
    default_device,
    model_files,
    resolve_grader_path,
    resolve_model_path,
    resolve_segmentation_path,
    resolve_spider_grader_path,
)
from spinepath.core.results import DetectionResult, Findings, SliceScores, Vertebra
from spinepath.detection.grouping import group_and_name_with_evidence
from spinepath.detection.predictor import VertebraDetector
from spinepath.grading.grader import Grader
from spinepath.grading.inference import classify_detections, fuse_detections
from spinepath.grading.spider import SpiderGrader
from spinepath.grading.spider_inference import attach_listhesis_evidence, attach_vertebra_evidence
from spinepath.grading.spider_inference import grade_degeneration as grade_spider_discs
from spinepath.io.dicom import load_companion, load_study
from spinepath.review import Review
from spinepath.review import review as review_result
from spinepath.segmentation.inference import export_segmenter, segment_study
from spinepath.segmentation.inference import load_segmenter as load_segmentation_model


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
        device: Device of both; default :func:`spinepath.core.paths.default_device` (CUDA when present).

    Raises:
        FileNotFoundError: If a model file is missing.
        ValueError: If a file is not a spinepath model.

    """
    if not isinstance(grader, Grader):
        near = None  # a detector given as a path: the grader beside it
        if isinstance(model, str | Path):
            near = Path(model).parent if Path(model).is_file() else model
        grader = Grader.load(resolve_grader_path(grader or near), device=device or default_device())
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


#: The levels whose centre gaps scale an image of unknown spacing (:func:`estimate_spacing`): the lumbar ones,
#: where the 37 mm mean gap was measured (chu_t2).
SPACING_LEVELS = ("L1", "L2", "L3", "L4", "L5")


def named_level_gap_px(vertebrae: list[Vertebra]) -> float:
    """Median distance (pixels) between the centres of named vertebrae per level step; NaN with fewer than two.

    The lumbar vertebrae (:data:`SPACING_LEVELS`) where two are named, else every named body above the sacrum.
    """
    named = [v for v in vertebrae if v.level in VERTEBRA_LEVELS and v.level != "S1"]
    lumbar = [v for v in named if v.level in SPACING_LEVELS]
    use = sorted(lumbar if len(lumbar) >= 2 else named, key=lambda v: VERTEBRA_LEVELS.index(v.level))
    step = [VERTEBRA_LEVELS.index(v.level) for v in use]
    gaps = [float(np.linalg.norm(a.centre - b.centre)) / (j - i)
            for a, b, i, j in zip(use[:-1], use[1:], step[:-1], step[1:]) if j > i]
    return float(np.median(gaps)) if gaps else float("nan")


def estimate_spacing(slices: list[np.ndarray], model: VertebraDetector, slice_mm: float, rounds: int = 2) -> float:
    """Pixel size (mm) of sagittal slices whose spacing is unknown, from the vertebrae the detector finds.

    Detection runs first at the field-of-view guess (:func:`~spinepath.core.geometry.spark_fov_spacing`), then,
    ``rounds`` times, at the spacing that makes the median gap between neighbouring named vertebrae
    (:func:`named_level_gap_px`) the mean lumbar gap (:func:`~spinepath.core.geometry.spacing_from_gap`). On
    the 23 training + selection spider_seg patients (header spacing 0.469 mm) the estimate was 0.96 to 1.30
    times the header's (median 1.04): a scale to resample the images to the networks' grids, not one to
    measure in millimetres.

    Args:
        slices: The series' sagittal slices ``(rows, cols)``, lateral order.
        model: The detector.
        slice_mm: Distance between neighbouring slices (mm).
        rounds: Detections after the first.

    Raises:
        ValueError: If fewer than two named vertebrae are found (nothing to scale the image by).

    """
    sp = spark_fov_spacing(slices[0].shape)
    for _ in range(rounds):
        gap = named_level_gap_px(detect_series(series_from_slices(slices, (sp, sp), slice_mm), model).vertebrae)
        if not np.isfinite(gap) or gap <= 1:
            raise ValueError("the pixel spacing is unknown and fewer than two named vertebrae were found to "
                             "estimate it")
        sp = spacing_from_gap(gap)
    return sp


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


def load_spider_grader(path: str | Path | None = None, near: str | Path | None = None,
                       device: str | None = None) -> SpiderGrader:
    """The SPIDER degenerative grader: ``path``, else the one beside ``near`` (a detector path), else the bundle's.

    On ``device`` (default :func:`spinepath.core.paths.default_device`: CUDA when present).

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a SPIDER grader.

    """
    return SpiderGrader.load(resolve_spider_grader_path(path or _beside(near, "spider_grader.pt")),
                             device=device or default_device())


def grade_degeneration(result: DetectionResult, grader: SpiderGrader, detector: VertebraDetector,
                       use_t1: bool = True) -> DetectionResult:
    """Degenerative grading stage: SPIDER grades per disc on the T2's key slice and the study's T1.

    The T1 (``result.volume.companions``) is read here, when there is one and ``use_t1``; a T1 that cannot be
    read is logged and recorded, and the T2 is graded alone. Needs the findings of :func:`grade` (or sets
    empty ones).
    """
    t1 = load_companion(result.volume) if use_t1 else None
    found, summary = grade_spider_discs(result, grader, detector, t1)
    if result.findings is None:
        result.findings = Findings([], [], {})
    result.findings.degeneration = found
    result.findings.degeneration_model = summary
    attach_vertebra_evidence(result.findings, grader)
    result.findings.timings["degeneration"] = summary.get("seconds", 0.0)
    return result


def load_segmenter(path: str | Path | None = None, near: str | Path | None = None,
                   device: str | None = None) -> nn.Module:
    """The segmentation network: ``path``, else the one beside ``near`` (a detector path), else the bundle's.

    On ``device`` (default :func:`spinepath.core.paths.default_device`: CUDA when present).

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a segmentation model.

    """
    return load_segmentation_model(resolve_segmentation_path(path or _beside(near, "segmentation.pt")),
                                   device=device or default_device())


def load_all_models(model: str | Path | None = None, grader: str | Path | None = None,
                    spider_grader: str | Path | None = None, segmenter: str | Path | None = None
                    ) -> tuple[VertebraDetector, Grader, SpiderGrader, nn.Module]:
    """The four models of a long-running process: detector, grader, SPIDER grader, segmentation network.

    Each path as in :func:`load_models`, :func:`load_spider_grader` and :func:`load_segmenter` (the models
    beside the detector ``model``, a file or folder, when not given; else the bundle's).
    """
    detector, g = load_models(model, grader)
    return detector, g, load_spider_grader(spider_grader, model), load_segmenter(segmenter, model)


def export_models(model_dir: str | Path | None = None, force: bool = False) -> dict[str, str]:
    """Export the four networks of a model folder to TorchScript beside their weights (``spinepath export``).

    Each ``<name>.pt`` gets ``<name>.ts`` (:mod:`spinepath.core.exported`); a current export is kept unless
    ``force``. The loaders then use the exports (a cold start without MONAI's networks, torchvision or timm).

    Args:
        model_dir: The folder of ``model.pt``, ``grader.pt``, ``spider_grader.pt`` and ``segmentation.pt``;
            default: the bundle's (:mod:`spinepath.core.paths`).
        force: Export again even when the export is current.

    Returns:
        ``{file name: "exported" | "current"}``.

    Raises:
        FileNotFoundError: If a model file is missing.

    """
    paths = model_files(model_dir)
    loaders = [
        lambda p: VertebraDetector.load(p, exported=False).export(p),
        lambda p: Grader.load(p, exported=False).export(p),
        lambda p: SpiderGrader.load(p, exported=False).export(p),
        lambda p: export_segmenter(load_segmentation_model(p, exported=False), p),
    ]
    done = {}
    for path, export in zip(paths, loaders):
        current = export_meta(path) is not None
        if force or not current:
            export(path)
        done[path.name] = "current" if current and not force else "exported"
    return done


def _beside(near: str | Path | None, name: str) -> Path | None:
    """The file ``name`` in the folder of ``near`` (a model file or folder), when it is there."""
    if near is None:
        return None
    folder = Path(near).parent if Path(near).is_file() else Path(near)
    return folder / name if (folder / name).is_file() else None


def segment(result: DetectionResult, segmenter: nn.Module) -> DetectionResult:
    """Segmentation and measurement stage: bodies, discs and canal named by level, measured on the key slice.

    Sets ``result.segmentation`` (:func:`spinepath.segmentation.inference.segment_study`). Where the discs
    carry degenerative grades, each disc's spondylolisthesis is then decided from its image probability and
    the slip measured there (:func:`spinepath.grading.spider_inference.attach_listhesis_evidence`).
    """
    seg = segment_study(result, segmenter)
    result.timings["segmentation"] = seg.seconds
    attach_listhesis_evidence(result.findings, seg.measurements.get("listhesis", {}))
    return result


def review(result: DetectionResult) -> Review:
    """Review stage: ``needs_review`` with reasons for the study and every finding; sets ``result.review``.

    See :func:`spinepath.review.review`.
    """
    return review_result(result)


def analyse(volume: SeriesVolume, detector: VertebraDetector, grader: Grader | None = None,
            spider_grader: SpiderGrader | None = None, segmenter: nn.Module | None = None) -> DetectionResult:
    """All stages after loading: detect and name, then (with the models given) grade, fuse, segment, review."""
    result = detect_series(volume, detector)
    if grader is not None:
        grade(result, grader)
    if spider_grader is not None:
        grade_degeneration(result, spider_grader, detector)
    if segmenter is not None:
        segment(result, segmenter)
    review(result)
    return result
