"""The stage-independent core: level names, geometry, boxes, the label map, the study result types.

Nothing in ``core`` imports another part of the package; every stage builds on it.
"""
