"""Operator: series volume -> named vertebrae (spinepath.pipeline.detect_series)."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from spinepath.detection import VertebraDetector
from spinepath.pipeline import detect_series


class VertebraDetectionOperator(Operator):
    """Detect vertebral bodies on every slice, group them in 3D and name them.

    The model is loaded once, when the operator is created.

    Named input:
        volume: :class:`spinepath.dicom_io.SeriesVolume`.
    Named output:
        result: :class:`spinepath.pipeline.DetectionResult`.
    """

    def __init__(self, fragment: Fragment, *args, model_path: Path, device: str = "cpu", **kwargs) -> None:
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.model = VertebraDetector.load(model_path, device=device)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare ports."""
        spec.input("volume")
        spec.output("result")

    def compute(self, op_input, op_output, context) -> None:
        """Run detection + grouping on the received volume."""
        volume = op_input.receive("volume")
        result = detect_series(volume, self.model)
        self.logger.info("found %d vertebrae: %s", len(result.vertebrae), [v.level for v in result.vertebrae])
        op_output.emit(result, "result")
