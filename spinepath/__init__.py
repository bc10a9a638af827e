"""spinepath: lumbar spine MRI vertebra detection, level naming and pathology assessment.

Research software. NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

__version__ = "0.5.20"

DISCLAIMER = "Research prototype - NOT FOR DIAGNOSTIC USE. Findings must be reviewed by a qualified radiologist."

__all__ = ["DISCLAIMER", "__version__"]
