"""One monitoring pass: a current window (inference log or manifest) against the training
manifest, giving the drift report, the online rates and the retrain decision."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import BaseModel

from xrayops.config import Settings, get_settings
from xrayops.contracts import ModelBundleMeta
from xrayops.inference_log import read_log
from xrayops.monitor.decision import RetrainDecision, decide_retrain, label_noise_rate, ood_rate
from xrayops.monitor.drift import DriftResult, drift_report, is_inference_log
from xrayops.monitor.label_noise import LabelNoiseReport, label_noise_report
from xrayops.monitor.workspace import WindowSnapshot, log_window, window_signals

RESULT_NAME = "monitor.json"
# Without the served bundle at hand, judge tags against the bundle default for "confident".
DEFAULT_MIN_CONFIDENCE = ModelBundleMeta.model_fields["confidence_threshold"].default


class MonitorResult(BaseModel):
    drift: DriftResult
    label_noise_rate: float | None = None
    # The same rate broken down per site and per vendor (manufacturer), inference logs only.
    label_noise: LabelNoiseReport | None = None
    ood_rate: float | None = None
    decision: RetrainDecision
    result_path: Path
    snapshot: WindowSnapshot | None = None  # the window's Evidently workspace snapshot, when one was logged


def read_window(path: str | Path) -> pd.DataFrame:
    """An inference log folder, or a manifest / log parquet file."""
    path = Path(path)
    if path.is_dir():
        return read_log(path)
    if path.is_file():
        return pd.read_parquet(path)
    raise FileNotFoundError(f"no inference log or manifest at {path}")


def monitor_window(
    reference: str | Path,
    current: str | Path,
    out_dir: str | Path,
    settings: Settings | None = None,
    bundle_meta: ModelBundleMeta | None = None,
    workspace: str | Path | None = None,
    embedding_reference: str | Path | None = None,
) -> MonitorResult:
    """Drift of `current` against the `reference` manifest, plus the label-noise and OOD
    rates when `current` is an inference log, and the retrain decision; also written to
    `out_dir/monitor.json`. `bundle_meta` (the served bundle) supplies the confidence and
    OOD thresholds; without it the OOD rate is not measured.

    With `workspace`, the window is also added as a snapshot to that Evidently workspace (the
    quality officers' dashboard, `xrayops dashboard`); `embedding_reference` (an inference log)
    is the baseline for embedding drift, else the first window logged for the model version."""
    settings = settings or get_settings()
    ref_df, cur_df = read_window(reference), read_window(current)
    drift = drift_report(ref_df, cur_df, out_dir)
    noise = ood = noise_report = None
    if is_inference_log(cur_df):
        min_confidence = bundle_meta.confidence_threshold if bundle_meta else DEFAULT_MIN_CONFIDENCE
        noise = label_noise_rate(cur_df, min_confidence)
        noise_report = label_noise_report(cur_df, min_confidence)
        if bundle_meta is not None and bundle_meta.ood_threshold is not None:
            ood = ood_rate(cur_df, bundle_meta.ood_threshold)
    decision = decide_retrain(drift, label_noise_rate=noise, ood_rate=ood, settings=settings)
    snapshot = None
    if workspace is not None:
        signals = window_signals(cur_df, drift.drift_share, drift.drifted_columns, noise, ood)
        baseline = read_window(embedding_reference) if embedding_reference is not None else None
        snapshot = log_window(workspace, ref_df, cur_df, signals, baseline, seed=settings.seed)
    result_path = Path(out_dir) / RESULT_NAME
    result = MonitorResult(
        drift=drift, label_noise_rate=noise, label_noise=noise_report, ood_rate=ood, decision=decision,
        result_path=result_path,
        snapshot=snapshot,
    )
    result_path.write_text(result.model_dump_json(indent=2))
    return result
