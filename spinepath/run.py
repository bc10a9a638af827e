"""One study from a folder to the output folder: the stages of :mod:`spinepath.stages`, then the writer.

Used by ``spinepath run`` and the MONAI bundle's ``run``; the MONAI Deploy app wires the same stages as
operators.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from spinepath import stages
from spinepath.core.errors import StudyError
from spinepath.core.paths import SHARED_EXAMPLES
from spinepath.detection.predictor import VertebraDetector
from spinepath.grading.grader import Grader
from spinepath.grading.spider import SpiderGrader
from spinepath.io.phantom import write_phantom_study
from spinepath.outputs.process import write_outputs
from spinepath.outputs.status import write_status


def default_input(work_dir: str | Path) -> tuple[Path, str]:
    """Return the embedded default input.

    A real example series when ``../shared/data/dicom_examples`` exists, otherwise the synthetic phantom study
    written into ``work_dir``.

    Returns:
        ``(folder, kind)`` with kind ``"real example (chu_t2_02)"`` or ``"synthetic phantom"``.

    """
    real = SHARED_EXAMPLES / "chu_t2_02"
    if real.is_dir() and any(real.glob("*.dcm")):
        return real, "real example (dicom_examples/chu_t2_02)"

    return write_phantom_study(Path(work_dir) / "phantom"), "synthetic phantom"


def run_study(
    input_dir: str | Path,
    output_dir: str | Path,
    model: VertebraDetector | str | Path | None = None,
    input_kind: str = "dicom",
    grader: Grader | str | Path | None = None,
    spider_grader: SpiderGrader | str | Path | None = None,
    segmenter: nn.Module | str | Path | None = None,
    uid_seed: str | None = None,
) -> dict:
    """Read a DICOM study, run it through :mod:`spinepath.stages` and write the outputs.

    ``model``, ``grader``, ``spider_grader`` and ``segmenter`` are loaded models or paths
    (:func:`spinepath.stages.load_models`, :func:`spinepath.stages.load_spider_grader`,
    :func:`spinepath.stages.load_segmenter`; by default the bundle's, the models beside the detector).
    ``uid_seed``: derive the DICOM outputs' UIDs from it (:func:`spinepath.outputs.writer.write_outputs`). The
    outputs are written by the writer process when this process started one
    (:func:`spinepath.outputs.process.start_writer_process`).

    Writes ``vertebrae.json``, ``key_image.png``, the DICOM outputs and ``status.json``. On a refused study only
    ``status.json`` (``ok: false``) is written and the error re-raised.

    Returns:
        The JSON result.

    """
    near = model if isinstance(model, str | Path) else None
    model, grader = stages.load_models(model, grader)
    if not isinstance(spider_grader, SpiderGrader):
        spider_grader = stages.load_spider_grader(spider_grader, near)
    if not isinstance(segmenter, nn.Module):
        segmenter = stages.load_segmenter(segmenter, near)
    t0 = time.perf_counter()
    try:
        volume = stages.load(input_dir)
    except StudyError as exc:
        write_status(output_dir, False, str(exc))
        raise
    t1 = time.perf_counter()
    result = stages.detect_series(volume, model)
    result.input_kind = input_kind
    result.timings = {"load": t1 - t0, **result.timings}
    stages.grade(result, grader)
    stages.grade_degeneration(result, spider_grader, model)
    stages.segment(result, segmenter)
    stages.review(result)
    return write_outputs(result, output_dir, uid_seed=uid_seed)
