"""Segmentation of vertebral bodies, posterior elements, discs and the spinal canal (issue 14)."""
