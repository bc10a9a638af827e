"""Evaluation against the shared-data references: box matching, detection metrics, grading metrics."""
