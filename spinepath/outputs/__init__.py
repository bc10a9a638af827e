"""DICOM outputs: structured report (TID 1500), segmentation and encapsulated PDF report."""
