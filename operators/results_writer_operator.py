"""Operator: graded result -> JSON, key image, DICOM SR/SEG/PDF (spinepath.outputs.writer.write_outputs).

In the writer process of a one-study process when one was started (:mod:`spinepath.outputs.process`).
"""

from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from spinepath.outputs.process import write_outputs


class ResultsWriterOperator(Operator):
    """Write the JSON findings, the key image and the DICOM outputs atomically, then ``status.json``.

    DICOM outputs: ``dicom/sr.dcm`` (TID 1500 SR), ``dicom/seg.dcm``, ``dicom/report.dcm`` (Encapsulated PDF).

    Named input:
        result: :class:`spinepath.core.results.DetectionResult`.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, input_kind: str = "dicom", **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.input_kind = input_kind
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare the input port."""
        spec.input("result")

    def compute(self, op_input, op_output, context) -> None:
        """Write the outputs."""
        result = op_input.receive("result")
        result.input_kind = self.input_kind
        write_outputs(result, self.output_folder)
