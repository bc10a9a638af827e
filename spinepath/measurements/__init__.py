"""Measurements per level from the segmentation masks (issue 14, item 3)."""
