"""MONAI Deploy operators: thin adapters over the spinepath core package."""

from .detection_operator import VertebraDetectionOperator
from .results_writer_operator import ResultsWriterOperator
from .study_loader_operator import StudyLoaderOperator

__all__ = ["ResultsWriterOperator", "StudyLoaderOperator", "VertebraDetectionOperator"]
