"""Operator: the named, graded result -> SPIDER degenerative grades per disc (spinepath.stages.grade_degeneration)."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from spinepath import stages
from spinepath.core.paths import default_device
from spinepath.detection.predictor import VertebraDetector
from spinepath.grading.spider import SpiderGrader


class DegenerationGradingOperator(Operator):
    """Grade every disc's degeneration on the T2's mid-sagittal slice and on the study's sagittal T1, by level.

    Pfirrmann, Modic, endplate changes, listhesis, herniation, narrowing and bulging.

    The SPIDER grader is loaded once, when the operator is created; the detector (shared with the detection
    operator) finds the vertebrae on the T1.

    Named input:
        result: :class:`spinepath.core.results.DetectionResult` with findings.
    Named output:
        result: the same result with ``findings.degeneration`` set.
    """

    def __init__(self, fragment: Fragment, *args, grader: SpiderGrader | Path, detector: VertebraDetector,
                 **kwargs) -> None:
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.grader = grader if isinstance(grader, SpiderGrader) else SpiderGrader.load(grader, device=default_device())
        self.detector = detector
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare ports."""
        spec.input("result")
        spec.output("result")

    def compute(self, op_input, op_output, context) -> None:
        """Grade the discs of the received result."""
        result = stages.grade_degeneration(op_input.receive("result"), self.grader, self.detector)
        self.logger.info("degenerative grades of %d discs from %s", len(result.findings.degeneration),
                         "+".join(result.findings.degeneration_model.get("sequences", [])) or "no sequence")
        self.logger.info("per-vertebra decision: %s", {v.level: v.label for v in result.findings.vertebrae})
        op_output.emit(result, "result")
