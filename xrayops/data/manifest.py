"""data/manifest.parquet: one ManifestRow per input file, with a fixed schema and stable bytes.

Rows are sorted by source_name and the Arrow schema is built from ManifestRow (no pandas
metadata, no timestamps), so re-ingesting identical input writes an identical file.
"""
from __future__ import annotations

import hashlib
import types
import typing
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xrayops.contracts import ManifestRow

# Langer et al. 2024: 31,011 / 7,677 / 9,746 images = 64 / 16 / 20 percent.
SPLIT_PERCENT = (("train", 64), ("val", 16), ("test", 20))


def manifest_schema() -> pa.Schema:
    """Arrow schema with one column per ManifestRow field, in field order."""
    return pa.schema([pa.field(name, *_arrow_type(info.annotation)) for name, info in ManifestRow.model_fields.items()])


def write_manifest(rows: list[ManifestRow], path: Path) -> Path:
    """Write rows sorted by (source_name, frame, image_id) as parquet with the fixed schema."""
    ordered = sorted(rows, key=lambda r: (r.source_name, r.frame, r.image_id))
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
    # Columns added after a dataset was written come back with their ManifestRow default, so an
    # older DVC version still reads; a column without a default is a broken manifest.
    required = {name for name in missing if ManifestRow.model_fields[name].is_required()}
    if required:
        raise ValueError(f"{path}: manifest lacks columns {sorted(required)}")
    for name in sorted(missing):
        default = ManifestRow.model_fields[name].default
        table = table.append_column(schema.field(name), pa.array([default] * table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema).to_pandas()


def preferred_copies(entries: Iterable[tuple[str, int, ManifestRow]]) -> dict[str, tuple[str, int, ManifestRow]]:
    """For each SOP Instance (image_id) held by more than one ok entry, the copy to keep.

    A lossless copy beats a lossy one (a re-export through a lossy gateway is the usual second copy);
    between equals the first in sorted order wins, so a re-run keeps the same one.
    """
    best: dict[str, tuple[str, int, ManifestRow]] = {}
    counts: Counter = Counter()
    for key, index, row in entries:
        if row.status != "ok" or not row.image_id:
            continue
        counts[row.image_id] += 1
        current = best.get(row.image_id)
        if current is None or (current[2].lossy_compression and not row.lossy_compression):
            best[row.image_id] = (key, index, row)
    return {image_id: copy for image_id, copy in best.items() if counts[image_id] > 1}


def kept_copy_detail(kept: ManifestRow) -> str:
    """The quarantine detail of a copy that lost to `kept`."""
    quality = "lossy" if kept.lossy_compression else "lossless"
    return f"another copy of this instance was kept ({quality}: {kept.source_name})"


def merge_manifests(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate manifests of batches that ingested disjoint, sorted slices of one source.

    Pure: shard names are prefixed by the caller; this only re-applies the dataset-wide rules
    that a batch cannot see alone: an image already kept by an earlier batch (same SOP UID
    pseudonym, or same decoded pixels) becomes a quarantined duplicate, as in a serial run.
    """
    if not frames:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in manifest_schema().names})
    merged = pd.concat(frames, ignore_index=True).sort_values(["source_name", "frame", "image_id"], kind="stable")
    records = merged.to_dict("records")
    rows = [ManifestRow.model_validate({k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()})
            for r in records]
    kept = preferred_copies((str(i), 0, row) for i, row in enumerate(rows))  # the same copy a serial run keeps
    dedup = Deduplicator()
    for i, record in enumerate(records):
        if record["status"] != "ok":
            continue
        winner = kept.get(record["image_id"])
        if winner is not None and winner[0] != str(i):
            same = winner[2].source_sha256 == record["source_sha256"]
            reason = "duplicate_file" if same else "duplicate_sop_instance_uid"
        else:
            reason = dedup.check(record["image_id"], record["pixel_sha256"], record["source_sha256"])
        if reason:
            record.update(status="quarantined", reason=reason, shard="", shard_index=-1, split="")
    return pd.DataFrame.from_records(records, columns=manifest_schema().names).reset_index(drop=True)


class Deduplicator:
    """Remembers kept images; `check` names why a later image is a duplicate ("" when it is new).

    Same file bytes: duplicate_file; same SOP Instance UID (pseudonym) with other bytes, e.g. a
    re-export: duplicate_sop_instance_uid; same decoded pixels under another UID: duplicate_pixels.
    The hashes compared are keyed HMACs (xrayops.dicom.deid.keyed_hash) of one dataset's key, so
    equal content still compares equal while nobody without the key can match a file to a row.
    """

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}  # image_id -> source sha256
        self._pixels: set[str] = set()

    def check(self, image_id: str, pixel_sha256: str, source_sha256: str) -> str:
        if image_id in self._ids:
            return "duplicate_file" if self._ids[image_id] == source_sha256 else "duplicate_sop_instance_uid"
        if pixel_sha256 and pixel_sha256 in self._pixels:
            return "duplicate_pixels"
        self._ids[image_id] = source_sha256
        if pixel_sha256:
            self._pixels.add(pixel_sha256)
        return ""


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
