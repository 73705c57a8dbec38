"""Metrics and evaluation reports. `metrics` is torch-free (monitoring imports it)."""
from xrayops.evaluate.metrics import classification_metrics, expected_calibration_error

__all__ = ["classification_metrics", "expected_calibration_error"]
