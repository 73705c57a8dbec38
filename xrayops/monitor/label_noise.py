"""Online label-noise rate: the share of confident predictions whose image carries a known
DICOM region tag that disagrees with them, from inference-log dataframes.

Langer et al. 2024: 116 of its 328 test errors were wrong PACS labels, and for 98 of those the model
was right; so a confident prediction is the reference each tag is checked against. Images
with an unknown tag cannot disagree and are not counted ("judged" = confident and tagged).

Pure functions over dataframes: the same code serves one monitoring window, a time series
of windows, and breakdowns per site and per vendor (manufacturer).
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from pydantic import BaseModel, Field

from xrayops.regions import REGIONS

REQUIRED_COLUMNS = ("region", "dicom_region", "confidence")
# Breakdowns asked of the online rate; a column the log lacks is reported as missing.
DEFAULT_GROUPINGS: tuple[tuple[str, ...], ...] = (("site",), ("manufacturer",))
COUNT_COLUMNS = ["n_predictions", "n_judged", "n_disagreeing", "rate"]


class NoiseBreakdown(BaseModel):
    by: list[str]
    rows: list[dict]  # one per group: the group's values, n_predictions, n_judged, n_disagreeing, rate


class LabelNoiseReport(BaseModel):
    min_confidence: float
    n_predictions: int
    n_judged: int
    n_disagreeing: int
    rate: float | None  # None when no prediction was judged
    breakdowns: list[NoiseBreakdown] = Field(default_factory=list)
    missing_columns: list[str] = Field(default_factory=list)  # asked-for groupings the log cannot give


def _check(log_df: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in log_df.columns]
    if missing:
        raise ValueError(f"inference log lacks columns {missing}; needs {list(REQUIRED_COLUMNS)}")


def judged_mask(log_df: pd.DataFrame, min_confidence: float) -> pd.Series:
    """Rows whose tag is a known region and whose prediction is confident."""
    _check(log_df)
    return log_df["dicom_region"].isin(REGIONS) & (log_df["confidence"] >= min_confidence)


def disagreement_mask(log_df: pd.DataFrame, min_confidence: float) -> pd.Series:
    """Judged rows where the prediction and the tag name different regions."""
    return judged_mask(log_df, min_confidence) & (log_df["region"] != log_df["dicom_region"])


def _counts(frame: pd.DataFrame) -> pd.DataFrame:
    n_judged = frame["_judged"].sum()
    n_disagree = frame["_disagree"].sum()
    return pd.DataFrame({
        "n_predictions": [len(frame)],
        "n_judged": [int(n_judged)],
        "n_disagreeing": [int(n_disagree)],
        "rate": [float(n_disagree / n_judged) if n_judged else None],
    })


def label_noise_table(
    log_df: pd.DataFrame, min_confidence: float, by: Sequence[str] = (), window: str | None = None
) -> pd.DataFrame:
    """Counts and rate per group of `by` columns, and per time window when `window` is a
    pandas frequency ("1h", "1D"; windows start on the frequency's boundaries, UTC).

    Columns: [window_start] + by + n_predictions, n_judged, n_disagreeing, rate (None where
    nothing was judged). Blank group values (a vendor that omits the tag) are a group of their own.
    """
    by = list(by)
    missing = [c for c in by if c not in log_df.columns]
    if missing:
        raise ValueError(f"cannot group the label-noise rate by {missing}: the inference log has no such column")
    keys = (["window_start"] if window else []) + by
    if log_df.empty:
        return pd.DataFrame(columns=keys + COUNT_COLUMNS)
    frame = log_df.assign(
        _judged=judged_mask(log_df, min_confidence), _disagree=disagreement_mask(log_df, min_confidence)
    )
    for col in by:
        frame[col] = frame[col].fillna("").astype(str)
    if window:
        if "timestamp" not in frame.columns:
            raise ValueError("a windowed label-noise rate needs the log's timestamp column")
        frame["window_start"] = pd.to_datetime(frame["timestamp"], utc=True).dt.floor(window)
    if not keys:
        return _counts(frame)
    rows = []
    for values, group in frame.groupby(keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        counts = _counts(group).iloc[0].to_dict()
        rows.append({**dict(zip(keys, values)), **counts})
    table = pd.DataFrame(rows, columns=keys + COUNT_COLUMNS)
    return table.astype({"n_predictions": "int64", "n_judged": "int64", "n_disagreeing": "int64"})


def label_noise_report(
    log_df: pd.DataFrame,
    min_confidence: float,
    groupings: Sequence[Sequence[str]] = DEFAULT_GROUPINGS,
) -> LabelNoiseReport:
    """The window's overall rate plus one breakdown per grouping the log can give."""
    overall = label_noise_table(log_df, min_confidence).iloc[0] if not log_df.empty else None
    breakdowns, missing = [], []
    for by in groupings:
        absent = [c for c in by if c not in log_df.columns]
        if absent:
            missing.extend(c for c in absent if c not in missing)
            continue
        table = label_noise_table(log_df, min_confidence, by)
        breakdowns.append(NoiseBreakdown(by=list(by), rows=_records(table)))
    return LabelNoiseReport(
        min_confidence=min_confidence,
        n_predictions=len(log_df),
        n_judged=int(overall["n_judged"]) if overall is not None else 0,
        n_disagreeing=int(overall["n_disagreeing"]) if overall is not None else 0,
        rate=None if overall is None or pd.isna(overall["rate"]) else float(overall["rate"]),
        breakdowns=breakdowns,
        missing_columns=missing,
    )


def _records(table: pd.DataFrame) -> list[dict]:
    out = []
    for row in table.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and pd.isna(v) else v) for k, v in row.items()})
    return out
