"""Data drift of a current window against the training reference, with Evidently.

The reference is the training manifest (one row per ingested image); the current window
is the inference log (one row per served image) or another manifest. Both carry the same
image statistics and DICOM header fields, so `frame_for_drift` brings either to one set of
columns, and Evidently's `DataDriftPreset` tests each column (K-S / chi-square / Z-test
p-values on small samples, Wasserstein / Jensen-Shannon distances on large ones).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field

from xrayops.logs import get_logger

log = get_logger(__name__)

NUMERICAL_COLUMNS = ("pixel_mean", "pixel_std", "pixel_spacing", "confidence")
CATEGORICAL_COLUMNS = ("manufacturer", "photometric_interpretation", "dicom_region", "predicted_region")
DRIFT_COLUMNS = NUMERICAL_COLUMNS + CATEGORICAL_COLUMNS

HTML_NAME = "drift_report.html"
JSON_NAME = "drift_report.json"


class DriftResult(BaseModel):
    drift_share: float  # share of compared columns Evidently found drifted
    drifted_columns: list[str]
    columns: list[str]  # the columns compared
    skipped_columns: list[str] = Field(default_factory=list)  # shared but empty on one side
    column_scores: dict[str, float]  # p-value or distance, see column_methods
    column_methods: dict[str, str]
    column_thresholds: dict[str, float]
    n_reference: int
    n_current: int
    html_path: Path
    json_path: Path


def is_inference_log(df: pd.DataFrame) -> bool:
    # Only the log carries both the model's answer and the file's own tag label.
    return "dicom_region" in df.columns and "confidence" in df.columns


def frame_for_drift(df: pd.DataFrame) -> pd.DataFrame:
    """The drift columns of a manifest or an inference log, under shared names.

    In a manifest `region` is the label normalised from BodyPartExamined, which the log
    calls `dicom_region`; in the log `region` is the prediction (`predicted_region`).
    Quarantined manifest rows have no pixels and are left out.
    """
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    if is_inference_log(df):
        df = df.rename(columns={"region": "predicted_region"})
    elif "region" in df.columns and "dicom_region" not in df.columns:
        df = df.rename(columns={"region": "dicom_region"})
    out = pd.DataFrame(index=df.index)
    for col in NUMERICAL_COLUMNS:
        if col in df.columns:
            out[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in CATEGORICAL_COLUMNS:
        if col in df.columns:
            # Blank header fields are a category of their own (a vendor that omits the tag).
            out[col] = df[col].fillna("").astype(str)
    return out.reset_index(drop=True)


def comparable_columns(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(columns to compare, shared columns skipped because one side has no values)."""
    shared = [c for c in DRIFT_COLUMNS if c in reference.columns and c in current.columns]
    usable = [c for c in shared if reference[c].notna().any() and current[c].notna().any()]
    return usable, [c for c in shared if c not in usable]


def _status_name(status) -> str:
    return str(getattr(status, "value", status)).upper()


def parse_snapshot(snapshot: dict) -> tuple[dict[str, float], dict[str, str], dict[str, float], list[str]]:
    """Per-column scores, methods, thresholds and the drifted columns from a snapshot dict."""
    # A test we chose is stored by its short name; show it as Evidently shows its own choices.
    display = {t.name: t.display_name for t in small_sample_tests().values()}
    scores, methods, thresholds = {}, {}, {}
    for metric in snapshot["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith(":ValueDrift"):
            column = config["column"]
            scores[column] = float(metric["value"])
            method = str(config.get("method", ""))
            methods[column] = display.get(method, method)
            thresholds[column] = float(config.get("threshold", float("nan")))
    drifted = []
    for test in snapshot["tests"]:
        params = test.get("metric_config", {}).get("params", {})
        if params.get("type", "").endswith(":ValueDrift") and _status_name(test["status"]) == "FAIL":
            drifted.append(params["column"])
    return scores, methods, thresholds, drifted


# Evidently picks distances (Wasserstein, Jensen-Shannon; threshold 0.1) once the REFERENCE has
# more than 1,000 rows. A monitoring window is often far smaller than the training manifest, and
# a distance between 1,400 training rows and 120 served ones drifts by sampling noise alone
# (calm windows crossed 0.1 on pixel statistics). So the sample-size rule looks at the smaller side.
SMALL_SAMPLE_ROWS = 1000


def small_sample_tests() -> dict:
    """The p-value tests (K-S, chi-square) as DataDriftPreset's num_method / cat_method."""
    from evidently.legacy.calculations.stattests import chi_stat_test, ks_stat_test

    return {"num_method": ks_stat_test, "cat_method": chi_stat_test}


def drift_methods(n_reference: int, n_current: int) -> dict:
    """Per-type tests: p-value tests while either side is small, Evidently's defaults otherwise."""
    return small_sample_tests() if min(n_reference, n_current) <= SMALL_SAMPLE_ROWS else {}


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, out_dir: str | Path) -> DriftResult:
    """Evidently data-drift report of `current` against `reference`, written as HTML and JSON
    under `out_dir`. Either frame may be a manifest or an inference log."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    ref, cur = frame_for_drift(reference), frame_for_drift(current)
    if len(ref) == 0 or len(cur) == 0:
        raise ValueError(f"drift needs rows on both sides: reference has {len(ref)}, current has {len(cur)}")
    columns, skipped = comparable_columns(ref, cur)
    if not columns:
        raise ValueError(f"no drift column has values on both sides (looked for {', '.join(DRIFT_COLUMNS)})")
    definition = DataDefinition(
        numerical_columns=[c for c in columns if c in NUMERICAL_COLUMNS],
        categorical_columns=[c for c in columns if c in CATEGORICAL_COLUMNS],
    )
    report = Report([DataDriftPreset(columns=columns, **drift_methods(len(ref), len(cur)))], include_tests=True)
    with warnings.catch_warnings():
        # A category absent from the reference makes scipy's chi-square divide by a zero
        # expected count; the p-value it returns (0) is the right answer.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(
            Dataset.from_pandas(cur[columns], data_definition=definition),
            Dataset.from_pandas(ref[columns], data_definition=definition),
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / HTML_NAME, out / JSON_NAME
    snapshot.save_html(str(html_path))
    snapshot.save_json(str(json_path))

    scores, methods, thresholds, drifted = parse_snapshot(snapshot.dict())
    result = DriftResult(
        drift_share=len(drifted) / len(columns),
        drifted_columns=[c for c in columns if c in drifted],
        columns=columns,
        skipped_columns=skipped,
        column_scores=scores,
        column_methods=methods,
        column_thresholds=thresholds,
        n_reference=len(ref),
        n_current=len(cur),
        html_path=html_path,
        json_path=json_path,
    )
    log.info(
        "drift report", drift_share=round(result.drift_share, 3), drifted=result.drifted_columns, html=str(html_path)
    )
    return result
