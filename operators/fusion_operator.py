"""Operator: per-slice scores -> one decision per vertebra and a grade per disc (spinepath.stages.fuse)."""

from __future__ import annotations

import logging

from monai.deploy.core import Fragment, Operator, OperatorSpec

from spinepath import stages
from spinepath.grading.grader import Grader


class FindingsFusionOperator(Operator):
    """Fuse the per-slice vertebra scores with LightGBM and average the disc grade probabilities.

    Named inputs:
        result: :class:`spinepath.core.results.DetectionResult`.
        scores: :class:`spinepath.core.results.SliceScores`.
    Named output:
        result: the detection result with ``findings`` set.
    """

    def __init__(self, fragment: Fragment, *args, grader: Grader, **kwargs) -> None:
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.grader = grader
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare ports."""
        spec.input("result")
        spec.input("scores")
        spec.output("result")

    def compute(self, op_input, op_output, context) -> None:
        """Fuse and attach the findings."""
        result = op_input.receive("result")
        result = stages.fuse(result, op_input.receive("scores"), self.grader)
        # one part of each vertebra's decision: the degeneration operator combines it with the endplate evidence
        self.logger.info("spark degenerative score above its threshold at: %s",
                         [v.level for v in result.findings.vertebrae if v.label == "pathological"] or "none")
        op_output.emit(result, "result")
