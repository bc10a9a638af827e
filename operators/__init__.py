"""MONAI Deploy operators: thin adapters over the spinepath core package."""

from .classification_operator import VertebraClassificationOperator
from .degeneration_operator import DegenerationGradingOperator
from .detection_operator import VertebraDetectionOperator
from .fusion_operator import FindingsFusionOperator
from .results_writer_operator import ResultsWriterOperator
from .review_operator import FindingsReviewOperator
from .segmentation_operator import SpineSegmentationOperator
from .study_loader_operator import StudyLoaderOperator

__all__ = [
    "DegenerationGradingOperator",
    "FindingsFusionOperator",
    "FindingsReviewOperator",
    "ResultsWriterOperator",
    "SpineSegmentationOperator",
    "StudyLoaderOperator",
    "VertebraClassificationOperator",
    "VertebraDetectionOperator",
]
