"""Kept for imports written before the move: the metric functions live in :mod:`normlab.metrics`."""

from normlab.metrics import most_confused_pairs, per_class_accuracy, quantiles, scores_from_confusion

__all__ = ["most_confused_pairs", "per_class_accuracy", "quantiles", "scores_from_confusion"]
