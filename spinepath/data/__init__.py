"""The shared training data: dataset loaders (reference boxes per slice) and the one patient split."""
