"""The ingest work journal: what has been processed, so a re-run or a killed run carries on.

Ingest processes files in batches; each finished batch becomes one *part*: `part-NNNNNN.npy`
(the batch's preprocessed images, stacked) and `part-NNNNNN.parquet` (one record per image or
quarantined file: the file key, the ManifestRow as JSON, the quarantine detail, the image's
position in the .npy). Both are written to a temporary name and renamed, the parquet last, so
a part exists whole or not at all: a run killed with SIGKILL loses at most the batch in flight.

A file's key is its (pseudonymised) source name, size and mtime, so a changed file is processed
again and an unchanged one is read from the journal without decoding. The journal belongs to one
configuration: a different spec, key or synonym table (its `fingerprint`) starts it afresh.
Everything in it is already de-identified (pseudonyms and pixels), like the dataset itself.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xrayops.contracts import ManifestRow

FINGERPRINT_FILE = "fingerprint.txt"
PART_GLOB = "part-*.parquet"
# Parts kept open (memory-mapped) at once while the dataset is assembled in sorted order.
OPEN_PARTS = 4
_SCHEMA = pa.schema([("file_key", pa.string()), ("row", pa.string()), ("detail", pa.string()), ("pixels", pa.int64())])


@dataclass
class JournalEntry:
    """One image (or one quarantined file) as processed: its row, detail and pixels (None if quarantined)."""

    row: ManifestRow
    detail: str
    pixels: np.ndarray | None


def file_key(source_name: str, path: Path) -> str:
    try:
        stat = path.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size, mtime = -1, -1
    return f"{source_name}\x00{size}\x00{mtime}"


class Journal:
    """Parts under `directory`; `done` maps each processed file key to its part."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        marker = self.directory / FINGERPRINT_FILE
        if self.directory.exists() and (not marker.exists() or marker.read_text() != fingerprint):
            shutil.rmtree(self.directory)  # another spec/key/table: nothing in it is valid
        self.directory.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            _atomic_write_bytes(marker, fingerprint.encode())
        self.done: dict[str, str] = {}
        for part in sorted(self.directory.glob(PART_GLOB)):
            if not part.with_suffix(".npy").exists():
                continue
            for key in pq.read_table(part, columns=["file_key"]).column("file_key").to_pylist():
                self.done[key] = part.stem
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self.directory.glob(PART_GLOB)), default=-1)
        self._open: OrderedDict[str, tuple[dict[str, list[tuple[str, str, int]]], np.ndarray]] = OrderedDict()

    def write_part(self, processed: Iterable[tuple[str, list[JournalEntry]]]) -> str:
        """Record a batch: (file key, its entries) in processing order. Returns the part's name."""
        records, images = [], []
        for key, entries in processed:
            for entry in entries:
                position = -1
                if entry.pixels is not None:
                    position = len(images)
                    images.append(entry.pixels)
                records.append({"file_key": key, "row": entry.row.model_dump_json(), "detail": entry.detail,
                                "pixels": position})  # fmt: skip
        name = f"part-{self._next:06d}"
        self._next += 1
        stack = np.stack(images) if images else np.zeros((0, 0, 0), dtype=np.uint8)
        tmp_npy = self.directory / f".{name}.npy.tmp"
        with tmp_npy.open("wb") as handle:
            np.save(handle, stack, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_npy, self.directory / f"{name}.npy")
        tmp_parquet = self.directory / f".{name}.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(records, schema=_SCHEMA), tmp_parquet)
        os.replace(tmp_parquet, self.directory / f"{name}.parquet")  # the commit point of the part
        for record in records:
            self.done[record["file_key"]] = name
        return name

    def read(self, key: str) -> list[JournalEntry]:
        """The entries recorded for `key` (which must be in `done`)."""
        index, stack = self._load(self.done[key])
        return [
            JournalEntry(ManifestRow.model_validate_json(row), detail, None if pos < 0 else np.asarray(stack[pos]))
            for row, detail, pos in index[key]
        ]

    def _load(self, name: str) -> tuple[dict[str, list[tuple[str, str, int]]], np.ndarray]:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        table = pq.read_table(self.directory / f"{name}.parquet").to_pylist()
        index: dict[str, list[tuple[str, str, int]]] = {}
        for record in table:
            index.setdefault(record["file_key"], []).append((record["row"], record["detail"], record["pixels"]))
        stack = np.load(self.directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        self._open[name] = (index, stack)
        while len(self._open) > OPEN_PARTS:
            self._open.popitem(last=False)
        return self._open[name]


def journal_fingerprint(*parts: object) -> str:
    """A stable text of everything that changes what a file's entries would be."""
    return json.dumps([str(p) for p in parts], sort_keys=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
