"""The ingest stage: a folder of DICOM files to a versionable dataset directory.

    data_dir/manifest.parquet          one ManifestRow per input file (ok or quarantined)
    data_dir/shards/shard-NNNNN.npy    preprocessed pixels of the ok rows
    data_dir/preprocessing.json        the PreprocessingSpec used
    data_dir/quarantine.csv            quarantined files with reason and detail
    data_dir/unmapped_body_parts.csv   BodyPartExamined values that map to no region

Every file gives exactly one row; a bad file is quarantined with a reason and the run goes on.
Files are processed in sorted order and nothing time-dependent is written, so ingesting the same
input twice gives byte-identical files. PHI stays here: rows, files and logs carry pseudonyms,
file names and technical tags only.
"""
from __future__ import annotations

import hashlib
import multiprocessing
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from xrayops.contracts import ManifestRow, PreprocessingSpec
from xrayops.data.manifest import assign_split, write_manifest
from xrayops.data.shards import SHARD_GLOB, ShardWriter
from xrayops.dicom.decode import MAX_FILE_BYTES, DicomError, read_dicom
from xrayops.dicom.deid import pseudonymize, safe_metadata
from xrayops.dicom.labels import default_synonyms, load_synonyms, region_from_dataset, unmapped_report
from xrayops.dicom.pixels import image_statistics, preprocess
from xrayops.logs import get_logger
from xrayops.progress import track

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
QUARANTINE_COLUMNS = ["source_name", "image_id", "reason", "detail"]

log = get_logger(__name__)


class IngestSummary(BaseModel):
    """What one ingest run produced."""

    n_files: int
    n_ok: int
    n_quarantined: int
    reasons: dict[str, int]  # quarantine reason -> files
    regions: dict[str, int]  # region -> ok images
    splits: dict[str, int]  # split -> ok images
    data_dir: Path
    manifest_path: Path
    shards_dir: Path
    preprocessing_path: Path
    quarantine_path: Path
    unmapped_path: Path


@dataclass
class FileResult:
    """One file's row plus, for ok rows, its pixels. `from_uid`: image_id is a SOP Instance UID pseudonym."""

    row: ManifestRow
    pixels: np.ndarray | None
    detail: str = ""
    from_uid: bool = False


def ingest(
    source_dir: Path,
    data_dir: Path,
    spec: PreprocessingSpec,
    key: str | bytes,
    workers: int = 1,
    synonyms_path: Path | None = None,
    shard_size: int = 1024,
) -> IngestSummary:
    """Ingest every DICOM file under `source_dir` into `data_dir` (see module docstring)."""
    source_dir, data_dir = Path(source_dir), Path(data_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source folder {source_dir} does not exist")
    synonyms = load_synonyms(synonyms_path) if synonyms_path else dict(default_synonyms())
    paths = find_dicom_files(source_dir, exclude=data_dir)
    log.info("ingest.start", files=len(paths), workers=workers, size=spec.size)

    names = [p.relative_to(source_dir).as_posix() for p in paths]
    results = _process_all(paths, names, spec, key, synonyms, workers)
    rows, pixels, details = _deduplicate_and_split(track(results, "ingest", total=len(paths)))

    shards_dir = data_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    for stale in shards_dir.glob(SHARD_GLOB):  # a previous, larger run must not leave shards behind
        stale.unlink()
    with ShardWriter(shards_dir, shard_size) as writer:
        for i, image in enumerate(pixels):
            if image is not None:  # only ok rows keep their pixels
                shard, index = writer.add(image)
                rows[i] = rows[i].model_copy(update={"shard": shard, "shard_index": index})

    manifest_path = write_manifest(rows, data_dir / "manifest.parquet")
    preprocessing_path = data_dir / "preprocessing.json"
    preprocessing_path.write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    quarantine_path = _write_csv(_quarantine_table(rows, details), data_dir / "quarantine.csv")
    ok_raw = [r.body_part_raw for r in rows if r.status == "ok"]
    unmapped_path = _write_csv(unmapped_report(ok_raw, synonyms), data_dir / "unmapped_body_parts.csv")

    ok = [r for r in rows if r.status == "ok"]
    summary = IngestSummary(
        n_files=len(rows),
        n_ok=len(ok),
        n_quarantined=len(rows) - len(ok),
        reasons=dict(sorted(Counter(r.reason for r in rows if r.status != "ok").items())),
        regions=dict(sorted(Counter(r.region for r in ok).items())),
        splits=dict(sorted(Counter(r.split for r in ok).items())),
        data_dir=data_dir,
        manifest_path=manifest_path,
        shards_dir=shards_dir,
        preprocessing_path=preprocessing_path,
        quarantine_path=quarantine_path,
        unmapped_path=unmapped_path,
    )
    log.info("ingest.done", ok=summary.n_ok, quarantined=summary.n_quarantined, reasons=summary.reasons)
    return summary


def find_dicom_files(source_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Candidate files, sorted: .dcm/.dicom/.dic or no extension (UID-style names count as none).

    Skips DICOMDIR (an index, not an image), hidden files, and anything under `exclude`.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found = []
    for path in source_dir.rglob("*"):
        if not path.is_file() or path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        suffix = path.suffix.lower()
        if suffix and suffix not in DICOM_SUFFIXES and not suffix[1:].isdigit():
            continue
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(source_dir).as_posix())


def process_file(
    path: Path, source_name: str, spec: PreprocessingSpec, key: str | bytes, synonyms: Mapping[str, str]
) -> FileResult:
    """One file to one row; never raises (a failure becomes a quarantined row)."""
    try:
        data, sha = _read_and_hash(path)
    except OSError as exc:
        row = ManifestRow(image_id="", study_id="", patient_id="", source_sha256="", source_name=source_name)
        return _quarantine(row, "unreadable", f"cannot read file ({type(exc).__name__})")
    fallback_id = pseudonymize(sha, key, "img-")
    row = ManifestRow(image_id=fallback_id, study_id="", patient_id="", source_sha256=sha, source_name=source_name)
    if data is None:
        return _quarantine(row, "too_large", f"file exceeds {MAX_FILE_BYTES} bytes")
    try:
        ds = read_dicom(data)
        meta = safe_metadata(ds, key)
        from_uid = bool(meta["image_id"])
        meta["image_id"] = meta["image_id"] or fallback_id
        _, region = region_from_dataset(ds, synonyms)
        row = row.model_copy(update={**meta, "region": region})
        pixels = preprocess(ds, spec)
    except DicomError as exc:
        return _quarantine(row, exc.reason, exc.detail)
    except Exception as exc:  # a bug or an exotic file must cost one row, not the run
        return _quarantine(row, "internal_error", type(exc).__name__)
    mean, std = image_statistics(pixels)
    if not std > 0:
        return _quarantine(row.model_copy(update={"pixel_mean": mean, "pixel_std": std}), "blank_image", "")
    return FileResult(row.model_copy(update={"pixel_mean": mean, "pixel_std": std}), pixels, from_uid=from_uid)


def _process_all(
    paths: list[Path],
    names: list[str],
    spec: PreprocessingSpec,
    key: str | bytes,
    synonyms: Mapping[str, str],
    workers: int,
) -> Iterator[FileResult]:
    if workers <= 1 or len(paths) <= 1:
        for path, name in zip(paths, names):
            yield process_file(path, name, spec, key, synonyms)
        return
    # spawn: forking a parent that holds torch/BLAS threads can deadlock the children.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(
            process_file, paths, names, repeat(spec), repeat(key), repeat(synonyms)
        )


def _deduplicate_and_split(
    results: Iterator[FileResult],
) -> tuple[list[ManifestRow], list[np.ndarray | None], list[str]]:
    """Quarantine later ok copies of an image already seen; give ok rows their patient's split."""
    rows, pixels, details = [], [], []
    seen: set[str] = set()
    for result in results:
        row, detail = result.row, result.detail
        if row.status == "ok" and row.image_id in seen:
            reason = "duplicate_sop_instance_uid" if result.from_uid else "duplicate_file"
            result = _quarantine(row, reason, "an earlier file (in sorted order) holds the same image")
            row, detail = result.row, result.detail
        if row.status == "ok":
            seen.add(row.image_id)
            row = row.model_copy(update={"split": assign_split(row.patient_id or row.image_id)})
            log.debug("ingest.ok", file=row.source_name, image_id=row.image_id, region=row.region)
        else:
            log.warning("ingest.quarantined", file=row.source_name, image_id=row.image_id, reason=row.reason)
        rows.append(row)
        pixels.append(result.pixels)
        details.append(detail)
    return rows, pixels, details


def _quarantine(row: ManifestRow, reason: str, detail: str) -> FileResult:
    update = {"status": "quarantined", "reason": reason, "shard": "", "shard_index": -1, "split": ""}
    return FileResult(row.model_copy(update=update), None, detail)


def _read_and_hash(path: Path) -> tuple[bytes | None, str]:
    """File bytes and sha256; bytes is None for a file too large to read whole (hashed in chunks)."""
    if path.stat().st_size > MAX_FILE_BYTES:
        with path.open("rb") as handle:
            return None, hashlib.file_digest(handle, "sha256").hexdigest()
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _quarantine_table(rows: list[ManifestRow], details: list[str]) -> pd.DataFrame:
    records = [
        (r.source_name, r.image_id, r.reason, d) for r, d in zip(rows, details) if r.status != "ok"
    ]
    records.sort()
    return pd.DataFrame(records, columns=QUARANTINE_COLUMNS)


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, lineterminator="\n")
    return path
