"""Operator: named vertebrae -> per-slice classifier scores (spinepath.stages.classify)."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from spinepath import stages
from spinepath.core.paths import default_device
from spinepath.grading.grader import Grader


class VertebraClassificationOperator(Operator):
    """Crop every detected vertebra and disc on every slice and run the ConvNeXt classifiers.

    The grading model (classifiers + fusion) is loaded once, when the operator is created, and shared with
    the fusion operator.

    Named input:
        result: :class:`spinepath.core.results.DetectionResult`.
    Named outputs:
        result: the same detection result.
        scores: :class:`spinepath.core.results.SliceScores`.
    """

    def __init__(self, fragment: Fragment, *args, grader: Grader | Path, **kwargs) -> None:
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.grader = grader if isinstance(grader, Grader) else Grader.load(grader, device=default_device())
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare ports."""
        spec.input("result")
        spec.output("result")
        spec.output("scores")

    def compute(self, op_input, op_output, context) -> None:
        """Classify the structures of the received detection result."""
        result = op_input.receive("result")
        scores = stages.classify(result, self.grader)
        self.logger.info("classified %d vertebra and %d disc crops", len(scores.vertebra), len(scores.disc))
        op_output.emit(result, "result")
        op_output.emit(scores, "scores")
