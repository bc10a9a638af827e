"""Operator: graded result -> needs_review with reasons for the study and every finding (spinepath.stages.review)."""

from __future__ import annotations

import logging

from monai.deploy.core import Fragment, Operator, OperatorSpec

from spinepath import stages


class FindingsReviewOperator(Operator):
    """Flag the study and each finding a radiologist must check, with the reasons.

    Named input:
        result: :class:`spinepath.core.results.DetectionResult` (graded).
    Named output:
        result: the detection result with ``review`` set.
    """

    def __init__(self, fragment: Fragment, *args, **kwargs) -> None:
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare ports."""
        spec.input("result")
        spec.output("result")

    def compute(self, op_input, op_output, context) -> None:
        """Review and attach the flags."""
        result = op_input.receive("result")
        rev = stages.review(result)
        self.logger.info("review: study %s (%d reasons)", "flagged" if rev.study.needs_review else "not flagged",
                         len(rev.study.reasons))
        op_output.emit(result, "result")
