"""Operator: series volume -> named vertebrae (spinepath.stages.detect_series)."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from spinepath import stages
from spinepath.core.paths import default_device
from spinepath.detection.predictor import VertebraDetector


class VertebraDetectionOperator(Operator):
    """Detect vertebral bodies on every slice, group them in 3D and name them.

    The model is loaded once, when the operator is created, on ``device`` (default: CUDA when present, else the
    CPU, as the bundle and the CLI choose it).

    Named input:
        volume: :class:`spinepath.core.geometry.SeriesVolume`.
    Named output:
        result: :class:`spinepath.core.results.DetectionResult`.
    """

    def __init__(self, fragment: Fragment, *args, model_path: Path, device: str | None = None, **kwargs) -> None:
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.model = VertebraDetector.load(model_path, device=device or default_device())
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare ports."""
        spec.input("volume")
        spec.output("result")

    def compute(self, op_input, op_output, context) -> None:
        """Run detection + grouping on the received volume."""
        volume = op_input.receive("volume")
        result = stages.detect_series(volume, self.model)
        self.logger.info("found %d vertebrae: %s", len(result.vertebrae), [v.level for v in result.vertebrae])
        op_output.emit(result, "result")
