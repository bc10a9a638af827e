"""Operator: DICOM study folder -> selected sagittal T2 series volume (spinepath.stages.load)."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec

from spinepath import stages


class StudyLoaderOperator(Operator):
    """Scan a study folder, select the sagittal T2 series by ``configs/series_selection.json`` and read it.

    The series selection needs the imaging plane from ImageOrientationPatient and exclusion rules, and the
    same reader must run without Holoscan (training, MONAI Label), so the core reader is used rather than the
    SDK's DICOMDataLoader/SeriesSelector/SeriesToVolume chain.

    Named output:
        volume: a :class:`spinepath.core.geometry.SeriesVolume`.
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare the output port."""
        spec.output("volume").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context) -> None:
        """Read the study and emit the selected series volume."""
        op_output.emit(stages.load(self.input_folder), "volume")
