"""Annotation (MONAI Label): label maps, corrections as training data, retraining rounds, active learning."""
