"""Operator: the named result -> bodies, discs and canal segmented and measured (spinepath.stages.segment)."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec
from torch import nn

from spinepath import stages


class SpineSegmentationOperator(Operator):
    """Segment vertebral bodies, discs and the spinal canal on the key slice, name them, measure them.

    The segmentation network is loaded once, when the operator is created.

    Named input:
        result: :class:`spinepath.core.results.DetectionResult` (named vertebrae).
    Named output:
        result: the same result with ``segmentation`` (masks and measurements) set.
    """

    def __init__(self, fragment: Fragment, *args, model: nn.Module | Path, **kwargs) -> None:
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.model = model if isinstance(model, nn.Module) else stages.load_segmenter(model)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare ports."""
        spec.input("result")
        spec.output("result")

    def compute(self, op_input, op_output, context) -> None:
        """Segment and measure the received result."""
        result = stages.segment(op_input.receive("result"), self.model)
        m = result.segmentation.measurements
        self.logger.info("segmented and measured %d bodies and %d discs", len(m["vertebrae"]), len(m["discs"]))
        op_output.emit(result, "result")
