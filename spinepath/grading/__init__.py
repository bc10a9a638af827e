"""Grading: crops, ConvNeXt classifiers, LightGBM fusion, the grader, inference, pretraining, training."""
