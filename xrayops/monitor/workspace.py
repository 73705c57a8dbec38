"""Monitoring windows as Evidently snapshots in a local workspace, for `evidently ui`.

Each window adds one snapshot to the project "xrayops monitoring", stamped with the window's
time (its last logged request). A snapshot holds:

- Evidently's data-drift report of the window against the training manifest (acquisition
  metadata, image statistics, tag and prediction mix: the columns of `xrayops.monitor.drift`);
- Evidently's embedding drift (domain-classifier ROC AUC, `ModelDriftMethod`) of the window's
  embeddings against a baseline window of the same model version, when embeddings are logged;
- one `XrayopsSignal` per scalar the quality officers follow: drift share, label-noise rate,
  out-of-domain rate, prediction share per region, images and requests in the window.

The scalars are measured by xrayops on EVERY row of the window (the same functions the retrain
decision uses). Evidently's reports see a uniform random sample of at most `sample_rows` rows
per side: their tests compare distributions, and past tens of thousands of rows a larger
sample no longer changes what they decide (see `sample_rows`), while their cost and memory
grow with every row (benchmarks/README.md, "Monitoring").
"""
from __future__ import annotations

import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from xrayops.logs import get_logger
from xrayops.monitor.drift import (
    CATEGORICAL_COLUMNS,
    NUMERICAL_COLUMNS,
    comparable_columns,
    drift_methods,
    frame_for_drift,
)

log = get_logger(__name__)

PROJECT_NAME = "xrayops monitoring"
PROJECT_DESCRIPTION = "Drift, label noise, out-of-domain rate, prediction mix and volume per monitoring window."
# Evidently's tests on a sample of this size: for a share, the standard error is at most
# sqrt(0.25 / 50_000) = 0.0022; for Wasserstein / Jensen-Shannon (what Evidently picks past
# 1,000 rows) the sampling noise is far below their 0.1 thresholds. The reference (a training
# manifest: 31,011 train images in Langer et al. 2024) is of the same order, so it bounds the tests anyway.
DEFAULT_SAMPLE_ROWS = 50_000
# The domain classifier trains on both sides; 1,000 a side gives an AUC standard error near 0.013,
# well inside the 0.55 drift threshold, and keeps Evidently's t-SNE view of the embeddings
# (on up to 2,500 a side) from dominating the window's time.
DEFAULT_EMBEDDING_SAMPLE_ROWS = 1_000
EMBEDDING_PCA_COMPONENTS = 20
BASELINE_DIR = ".xrayops-baselines"  # not a project folder: Evidently skips folders without metadata.json


def _signal_metric_classes():
    """The Evidently metric that carries one xrayops-measured scalar (built lazily: evidently is heavy)."""
    global XrayopsSignal
    if "XrayopsSignal" in globals():
        return XrayopsSignal
    from evidently._pydantic_compat import PrivateAttr
    from evidently.core.metric_types import SingleValueCalculation, SingleValueMetric

    class XrayopsSignal(SingleValueMetric):  # noqa: F811 (module-level name set below)
        """A window scalar measured by xrayops on all rows; `signal` (and `region`) name the series.

        The value is private so it stays out of the metric's parameters: the dashboard keys a
        series on the parameters, and every window must land on the same series."""

        signal: str
        region: str | None = None
        _value: float = PrivateAttr(default=float("nan"))

        def with_value(self, value: float) -> "XrayopsSignal":
            self._value = float(value)
            return self

    class XrayopsSignalCalculation(SingleValueCalculation[XrayopsSignal]):
        def calculate(self, context, current_data, reference_data):
            return self.result(self.metric._value)

        def display_name(self) -> str:
            return f"{self.metric.signal}" + (f" ({self.metric.region})" if self.metric.region else "")

    globals()["XrayopsSignal"] = XrayopsSignal
    return XrayopsSignal


class WindowSignals(BaseModel):
    """The window's scalars, measured on all of its rows."""

    window_end: datetime
    n_images: int
    n_requests: int
    drift_share: float
    drifted_columns: list[str] = Field(default_factory=list)
    label_noise_rate: float | None = None
    ood_rate: float | None = None
    prediction_mix: dict[str, float] = Field(default_factory=dict)  # predicted region -> share of images


class WindowSnapshot(BaseModel):
    workspace: Path
    project_id: str
    snapshot_id: str
    timestamp: datetime
    signals: WindowSignals
    n_reference_sampled: int
    n_current_sampled: int
    embedding_drift: float | None = None  # domain-classifier ROC AUC; 0.5 = no drift
    embedding_baseline: str = ""  # where the embedding reference came from


def window_end(current: pd.DataFrame) -> datetime:
    """The window's time: its last logged request (UTC); now for a window without timestamps."""
    if "timestamp" in current.columns and current["timestamp"].notna().any():
        return pd.to_datetime(current["timestamp"], utc=True).max().to_pydatetime()
    return datetime.now(timezone.utc)


def prediction_mix(current: pd.DataFrame) -> dict[str, float]:
    """Share of the window's images per predicted region (inference logs only)."""
    if "confidence" not in current.columns or "region" not in current.columns or current.empty:
        return {}
    shares = current["region"].fillna("").astype(str).value_counts(normalize=True, sort=False)
    return {str(k): float(v) for k, v in sorted(shares.items())}


def window_signals(
    current: pd.DataFrame,
    drift_share: float,
    drifted_columns: list[str],
    label_noise_rate: float | None,
    ood_rate: float | None,
) -> WindowSignals:
    n_requests = int(current["request_id"].nunique()) if "request_id" in current.columns else len(current)
    return WindowSignals(
        window_end=window_end(current), n_images=len(current), n_requests=n_requests, drift_share=drift_share,
        drifted_columns=list(drifted_columns), label_noise_rate=label_noise_rate, ood_rate=ood_rate,
        prediction_mix=prediction_mix(current),
    )


def sample_rows(df: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """A uniform random sample of at most `n` rows (all rows when n is None or the frame is smaller)."""
    if n is None or len(df) <= n:
        return df
    index = np.random.default_rng(seed).choice(len(df), size=n, replace=False)
    return df.iloc[np.sort(index)]


def embedding_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The logged embeddings as one float column per dimension (rows without one left out)."""
    if "embedding" not in df.columns or df.empty:
        return pd.DataFrame()
    lengths = df["embedding"].map(lambda e: 0 if e is None else len(e))
    if not (lengths > 0).any():
        return pd.DataFrame()
    dim = int(lengths[lengths > 0].mode().iloc[0])
    rows = df["embedding"][lengths == dim]
    matrix = np.stack([np.asarray(e, dtype=np.float32) for e in rows])
    return pd.DataFrame(matrix, columns=[f"emb_{i:03d}" for i in range(dim)])


def _baseline_path(workspace: Path, model_version: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_version) or "unversioned"
    return workspace / BASELINE_DIR / f"embeddings-{safe}.parquet"


def embedding_baseline(
    workspace: Path, current: pd.DataFrame, explicit: pd.DataFrame | None, sample: int, seed: int
) -> tuple[pd.DataFrame | None, str]:
    """(reference embeddings, where from). The training manifest has no embeddings, so the
    reference is a logged window: the one given, else the first window logged for this model
    version (stored on first sight, like the trigger's label-noise reference)."""
    if explicit is not None:
        frame = embedding_frame(sample_rows(explicit, sample, seed))
        return (frame if not frame.empty else None), "given"
    versions = current["model_version"].dropna().unique() if "model_version" in current.columns else []
    path = _baseline_path(workspace, str(versions[0]) if len(versions) == 1 else "mixed")
    if path.exists():
        return pd.read_parquet(path), str(path)
    frame = embedding_frame(sample_rows(current, sample, seed))
    if not frame.empty:
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
        log.info("embedding baseline stored", path=str(path), rows=len(frame))
    return None, str(path)  # the baseline window itself: nothing to compare against yet


def open_project(workspace_dir: str | Path):
    """The local Evidently workspace and its "xrayops monitoring" project (created with its dashboard)."""
    from evidently.ui.workspace import Workspace

    from xrayops.monitor.dashboard import ensure_dashboard

    workspace = Workspace(str(workspace_dir))
    found = workspace.search_project(PROJECT_NAME)
    project = found[0] if found else workspace.create_project(PROJECT_NAME, description=PROJECT_DESCRIPTION)
    ensure_dashboard(project)
    return workspace, project


def signal_metrics(signals: WindowSignals) -> list:
    metric = _signal_metric_classes()
    out = [
        metric(signal="drift_share").with_value(signals.drift_share),
        metric(signal="n_images").with_value(signals.n_images),
        metric(signal="n_requests").with_value(signals.n_requests),
    ]
    # An unmeasured rate is left out: the dashboard shows a gap, never a made-up zero.
    if signals.label_noise_rate is not None:
        out.append(metric(signal="label_noise_rate").with_value(signals.label_noise_rate))
    if signals.ood_rate is not None:
        out.append(metric(signal="ood_rate").with_value(signals.ood_rate))
    if signals.prediction_mix:
        from xrayops.regions import REGIONS

        # Every region every window (0 when absent), so stacked bars line up across windows.
        for region in list(REGIONS) + sorted(set(signals.prediction_mix) - set(REGIONS)):
            out.append(metric(signal="prediction_share", region=region).with_value(signals.prediction_mix.get(region, 0.0)))
    return out


def _run(items: list, current: pd.DataFrame, reference: pd.DataFrame, definition, include_tests: bool, **kwargs):
    from evidently import Dataset, Report

    with warnings.catch_warnings():
        # chi-square on a category absent from the reference divides by zero; p = 0 is right.
        warnings.simplefilter("ignore", RuntimeWarning)
        return Report(items, include_tests=include_tests).run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition),
            **kwargs,
        )


def merge_snapshots(first, second):
    """One snapshot holding both reports' results (the first's name, time, tags and tests).

    The embedding drift runs as its own report because its two samples are other rows than the
    drift report's (the training manifest has no embeddings); one snapshot per window keeps
    the dashboard at one point per window."""
    from evidently.core.report import Snapshot

    a, b = first.to_snapshot_model(), second.to_snapshot_model()
    a.metric_results = {**a.metric_results, **b.metric_results}
    a.top_level_metrics = list(a.top_level_metrics) + [m for m in b.top_level_metrics if m not in a.top_level_metrics]
    a.widgets = list(a.widgets) + list(b.widgets)
    return Snapshot.load_model(a)


def window_snapshot(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    signals: WindowSignals,
    reference_embeddings: pd.DataFrame | None = None,
    sample: int | None = DEFAULT_SAMPLE_ROWS,
    embedding_sample: int = DEFAULT_EMBEDDING_SAMPLE_ROWS,
    seed: int = 0,
):
    """(Evidently Snapshot, reference rows, current rows sampled): the drift report, the
    embedding drift (when both sides have embeddings) and the window's signals."""
    from evidently import DataDefinition
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.presets import DataDriftPreset

    ref = frame_for_drift(sample_rows(reference, sample, seed))
    cur = frame_for_drift(sample_rows(current, sample, seed))
    columns, _ = comparable_columns(ref, cur)
    if not columns:
        raise ValueError("no drift column has values on both sides; nothing to report")
    definition = DataDefinition(
        numerical_columns=[c for c in columns if c in NUMERICAL_COLUMNS],
        categorical_columns=[c for c in columns if c in CATEGORICAL_COLUMNS],
    )
    # Evidently's UI compares snapshot times as naive datetimes (its own default is naive local
    # time); store naive UTC so every window sorts on one clock.
    timestamp = signals.window_end.astimezone(timezone.utc).replace(tzinfo=None)
    snapshot = _run(
        [DataDriftPreset(columns=columns, **drift_methods(len(ref), len(cur))), *signal_metrics(signals)],
        cur[columns], ref[columns], definition, True,
        timestamp=timestamp, tags=["xrayops", "monitoring-window"],
        metadata={"window_end": signals.window_end.isoformat(), "n_images": str(signals.n_images)},
        name=f"window {signals.window_end.isoformat(timespec='seconds')}",
    )
    if reference_embeddings is not None and not reference_embeddings.empty:
        cur_emb = embedding_frame(sample_rows(current, embedding_sample, seed))
        ref_emb = reference_embeddings.iloc[:embedding_sample]
        if len(cur_emb) >= 2 and list(cur_emb.columns) == list(ref_emb.columns):
            names = list(cur_emb.columns)
            # Evidently's domain classifier: ROC AUC of telling the window from the baseline
            # (0.5: indistinguishable; drifted above 0.55, Evidently's default), on PCA components.
            method = ModelDriftMethod(pca_components=min(EMBEDDING_PCA_COMPONENTS, len(cur_emb), len(ref_emb), len(names)))
            embedded = _run([EmbeddingsDrift(embeddings_name="image", drift_method=method)], cur_emb, ref_emb,
                            DataDefinition(numerical_columns=[], embeddings={"image": names}), False)
            snapshot = merge_snapshots(snapshot, embedded)
    return snapshot, len(ref), len(cur)


def embedding_drift_value(snapshot) -> float | None:
    for result in snapshot.metric_results.values():
        location = result.metric_value_location
        if location is not None and str(location.metric.params.get("type", "")).endswith(":EmbeddingsDrift"):
            return float(result.value)
    return None


def log_window(
    workspace_dir: str | Path,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    signals: WindowSignals,
    embedding_reference: pd.DataFrame | None = None,
    sample: int | None = DEFAULT_SAMPLE_ROWS,
    embedding_sample: int = DEFAULT_EMBEDDING_SAMPLE_ROWS,
    seed: int = 0,
) -> WindowSnapshot:
    """Add the window's snapshot to the workspace's "xrayops monitoring" project."""
    workspace_dir = Path(workspace_dir)
    workspace, project = open_project(workspace_dir)
    ref_emb, baseline = embedding_baseline(workspace_dir, current, embedding_reference, embedding_sample, seed)
    snapshot, n_ref, n_cur = window_snapshot(reference, current, signals, ref_emb, sample, embedding_sample, seed)
    ref = workspace.add_run(project.id, snapshot)
    result = WindowSnapshot(
        workspace=workspace_dir, project_id=str(project.id), snapshot_id=str(ref.id),
        timestamp=signals.window_end, signals=signals, n_reference_sampled=n_ref, n_current_sampled=n_cur,
        embedding_drift=embedding_drift_value(snapshot), embedding_baseline=baseline,
    )
    log.info("monitoring window logged", workspace=str(workspace_dir), snapshot=result.snapshot_id,
             window_end=signals.window_end.isoformat(), embedding_drift=result.embedding_drift)
    return result




def default_workspace(settings) -> Path:
    """The configured Evidently workspace (XRAYOPS_EVIDENTLY_WORKSPACE), else <output_dir>/evidently."""
    return Path(settings.evidently_workspace or Path(settings.output_dir) / "evidently")
