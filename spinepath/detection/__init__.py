"""Detection and naming: the RetinaNet network, the predictor, 3D grouping, level naming, training."""
