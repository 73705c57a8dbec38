"""data/manifest.parquet: one ManifestRow per input file, with a fixed schema and stable bytes.

Rows are sorted by source_name and the Arrow schema is built from ManifestRow (no pandas
metadata, no timestamps), so re-ingesting identical input writes an identical file.
"""
from __future__ import annotations

import hashlib
import types
import typing
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xrayops.contracts import ManifestRow

# paper 000: 31,011 / 7,677 / 9,746 images = 64 / 16 / 20 percent.
SPLIT_PERCENT = (("train", 64), ("val", 16), ("test", 20))


def manifest_schema() -> pa.Schema:
    """Arrow schema with one column per ManifestRow field, in field order."""
    return pa.schema([pa.field(name, *_arrow_type(info.annotation)) for name, info in ManifestRow.model_fields.items()])


def write_manifest(rows: list[ManifestRow], path: Path) -> Path:
    """Write rows sorted by (source_name, image_id) as parquet with the fixed schema."""
    ordered = sorted(rows, key=lambda r: (r.source_name, r.image_id))
    table = pa.Table.from_pylist([r.model_dump() for r in ordered], schema=manifest_schema())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return path


def read_manifest(path: Path) -> pd.DataFrame:
    """The manifest as a DataFrame, checked against (and cast to) the fixed schema."""
    table = pq.read_table(path)
    schema = manifest_schema()
    missing = set(schema.names) - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    return table.select(schema.names).cast(schema).to_pandas()


def assign_split(patient_id: str) -> str:
    """train/val/test from a hash of the (pseudonymised) patient id, so a patient sits in one split."""
    bucket = int.from_bytes(hashlib.sha256(patient_id.encode("utf-8")).digest()[:8], "big") % 100
    edge = 0
    for split, percent in SPLIT_PERCENT[:-1]:
        edge += percent
        if bucket < edge:
            return split
    return SPLIT_PERCENT[-1][0]


def _arrow_type(annotation: object) -> tuple[pa.DataType, bool]:
    """(type, nullable) for the annotations ManifestRow uses: str, int, float | None, Literal[str]."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _arrow_type(inner)[0], True
    if typing.get_origin(annotation) is typing.Literal:
        return pa.string(), False
    types_by_python = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    if annotation not in types_by_python:
        raise TypeError(f"no Arrow type for ManifestRow annotation {annotation!r}")
    return types_by_python[annotation], False
