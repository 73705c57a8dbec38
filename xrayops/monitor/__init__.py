"""Monitoring: Evidently drift against the training reference, online label-noise and OOD
rates from the inference log, and the retrain decision."""
from xrayops.monitor.decision import RetrainDecision, decide_retrain, label_noise_rate, ood_rate
from xrayops.monitor.drift import DriftResult, drift_report, frame_for_drift
from xrayops.monitor.window import MonitorResult, monitor_window

__all__ = [
    "DriftResult",
    "MonitorResult",
    "RetrainDecision",
    "decide_retrain",
    "drift_report",
    "frame_for_drift",
    "label_noise_rate",
    "monitor_window",
    "ood_rate",
]
