"""The inference log: `InferenceLogRecord`s written by serving, read by monitoring.

The log is a directory of parquet parts. Every append writes one new part named by
UTC time and a uuid, so concurrent writers (several server workers, several
processes) never touch the same file and a reader never sees half a part: each part
is written under a hidden temporary name and renamed into place.
"""
from __future__ import annotations

import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

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
        ("site", pa.string()),  # absent from older parts: read back as null
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


# The DICOM header fields a record carries (`xrayops.dicom.deid.safe_metadata` keys): pseudonyms
# and acquisition facts only, never PHI.
HEADER_FIELDS = ("image_id", "manufacturer", "photometric_interpretation", "pixel_spacing")
IMAGE_ID_PATTERN = re.compile(r"^img-[0-9a-f]{16}$")  # xrayops.dicom.deid.pseudonymize(uid, key, "img-")


class SanitizedMeta(NamedTuple):
    fields: dict  # the header fields that passed, ready for a record
    rejected: tuple[str, ...]  # names (never values) of the fields dropped


def sanitize_image_meta(meta: object) -> SanitizedMeta:
    """The header fields of one image's `image_meta` that are in a known format, and the names of
    those dropped. A client sends image_meta with a pixel request; only this reaches the log:

        image_id                    a pseudonym: "img-" + 16 lower-case hex digits
        manufacturer                a maker's name within VR LO (xrayops.dicom.deid.bounded)
        photometric_interpretation  a code string within VR CS
        pixel_spacing               a finite positive number (mm)

    Anything else (a UID, a name, a date, free text, another key) is dropped, and its value is
    never logged: the caller counts the field names only.
    """
    from xrayops.dicom.deid import bounded

    if not isinstance(meta, dict):
        return SanitizedMeta({}, ("image_meta",) if meta else ())
    fields: dict = {}
    rejected: list[str] = []
    for name, value in meta.items():
        if value is None or value == "":
            continue
        if name == "image_id":
            ok = isinstance(value, str) and bool(IMAGE_ID_PATTERN.fullmatch(value))
            clean = value
        elif name == "manufacturer":
            clean = bounded(value, "LO")
            ok = bool(clean)
        elif name == "photometric_interpretation":
            clean = bounded(value, "CS")
            ok = bool(clean)
        elif name == "pixel_spacing":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value)) and value > 0
            clean = float(value) if ok else None
        else:
            ok = False  # an unknown field: nothing else belongs in the log
            name = "other"
        if ok:
            fields[name] = clean
        else:
            rejected.append(name)
    return SanitizedMeta(fields, tuple(rejected))


def header_fields(meta: dict | None) -> dict:
    """The record's header fields from one image's `safe_metadata` (or the same keys sent over the
    wire by the DICOM transformer or a client): only values in a known format (`sanitize_image_meta`)."""
    return sanitize_image_meta(meta or {}).fields


def build_records(
    responses: list[InferenceResponse],
    arrays: list[np.ndarray] | np.ndarray,
    embeddings: np.ndarray | list,
    request_id: str,
    metas: list[dict] | None = None,
    timestamp: datetime | None = None,
    site: str | None = None,
) -> list[InferenceLogRecord]:
    """One `InferenceLogRecord` per image (docs/architecture.md, contract 5), the one place records are made:
    the answer, the preprocessed pixels' statistics, the embedding, and the pseudonymised header
    fields in `metas` (none for images that arrived as pixels). Used by in-process prediction,
    the model server and the cluster's payload-logger sink alike."""
    from xrayops.dicom.pixels import image_statistics

    n = len(responses)
    metas = list(metas) if metas is not None else [{}] * n
    if not (len(arrays) == len(embeddings) == len(metas) == n):
        raise ValueError(
            f"{n} responses, {len(arrays)} images, {len(embeddings)} embeddings, {len(metas)} header dicts"
        )
    timestamp = timestamp or datetime.now(timezone.utc)
    if site is None:  # the deployment's configured site (XRAYOPS_SITE_ID)
        from xrayops.config import get_settings

        site = get_settings().site_id
    records = []
    for response, array, embedding, meta in zip(responses, arrays, embeddings, metas):
        pixel_mean, pixel_std = image_statistics(array)
        records.append(
            InferenceLogRecord(
                timestamp=timestamp,
                request_id=request_id,
                site=site,
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
                **header_fields(meta),
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
