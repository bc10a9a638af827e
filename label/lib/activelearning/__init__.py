"""Active-learning strategies."""
