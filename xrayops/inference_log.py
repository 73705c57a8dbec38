"""The inference log: `InferenceLogRecord`s written by serving, read by monitoring.

The log is a directory of parquet parts. Every append writes one new part named by
UTC time and a uuid, so concurrent writers (several server workers, several
processes) never touch the same file and a reader never sees half a part: each part
is written under a hidden temporary name and renamed into place.
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xrayops.contracts import InferenceLogRecord, InferenceResponse

PART_PREFIX = "part-"

# One schema for every part, so parts written with all-null or empty columns
# (no pixel spacing, no OOD score, no embedding) still concatenate cleanly.
LOG_SCHEMA = pa.schema(
    [
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("request_id", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("image_id", pa.string()),
        ("manufacturer", pa.string()),
        ("photometric_interpretation", pa.string()),
        ("pixel_spacing", pa.float64()),
        ("pixel_mean", pa.float64()),
        ("pixel_std", pa.float64()),
        ("region", pa.string()),
        ("confidence", pa.float64()),
        ("dicom_region", pa.string()),
        ("label_disagreement", pa.bool_()),
        ("ood_score", pa.float64()),
        ("embedding", pa.list_(pa.float32())),
    ]
)


def records_for_arrays(
    responses: list[InferenceResponse],
    arrays: list[np.ndarray] | np.ndarray,
    embeddings: np.ndarray,
    request_id: str,
    timestamp: datetime | None = None,
) -> list[InferenceLogRecord]:
    """Log records for images that arrived already preprocessed: there is no DICOM header,
    so no image id, manufacturer or tag label, only the pixels' statistics and the answer."""
    from xrayops.dicom.pixels import image_statistics

    timestamp = timestamp or datetime.now(timezone.utc)
    records = []
    for response, array, embedding in zip(responses, arrays, embeddings):
        pixel_mean, pixel_std = image_statistics(array)
        records.append(
            InferenceLogRecord(
                timestamp=timestamp,
                request_id=request_id,
                model_name=response.model_name,
                model_version=response.model_version,
                pixel_mean=pixel_mean,
                pixel_std=pixel_std,
                region=response.region,
                confidence=response.confidence,
                dicom_region=response.dicom_region,
                label_disagreement=response.label_disagreement,
                ood_score=response.ood_score,
                embedding=[float(v) for v in embedding],
            )
        )
    return records


def records_to_table(records: list[InferenceLogRecord]) -> pa.Table:
    rows = [r.model_dump() for r in records]
    for row in rows:
        ts = row["timestamp"]
        # Naive timestamps are taken as UTC so that every part carries the same zone.
        row["timestamp"] = ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    return pa.Table.from_pylist(rows, schema=LOG_SCHEMA)


def append_records(path: str | Path, records: list[InferenceLogRecord]) -> Path | None:
    """Append records to the log directory `path` as one new parquet part.

    Returns the part written, or None when there was nothing to write.
    """
    if not records:
        return None
    log_dir = Path(path)
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"{PART_PREFIX}{stamp}-{uuid.uuid4().hex}.parquet"
    tmp = log_dir / f".{name}.tmp"
    pq.write_table(records_to_table(records), tmp)
    final = log_dir / name
    os.replace(tmp, final)
    return final


def log_parts(path: str | Path) -> list[Path]:
    log_dir = Path(path)
    if not log_dir.is_dir():
        return []
    return sorted(log_dir.glob(f"{PART_PREFIX}*.parquet"))


def read_log(path: str | Path, since: datetime | None = None) -> pd.DataFrame:
    """All records of the log at `path` as a DataFrame, oldest first.

    Columns are the `InferenceLogRecord` fields; `embedding` stays a list column.
    A missing or empty log gives an empty frame with the same columns.
    `since` keeps only records at or after that time (naive means UTC).
    """
    parts = log_parts(path)
    tables = [pq.read_table(p, schema=LOG_SCHEMA) for p in parts]
    table = pa.concat_tables(tables) if tables else LOG_SCHEMA.empty_table()
    df = table.to_pandas()
    if since is not None:
        since_utc = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
        df = df[df["timestamp"] >= pd.Timestamp(since_utc)]
    return df.sort_values("timestamp", kind="stable").reset_index(drop=True)
