"""The ingest stage: a folder of DICOM files to a versionable dataset directory.

    data_dir/manifest.parquet          one ManifestRow per input file (ok or quarantined)
    data_dir/shards/shard-NNNNN.npy    preprocessed pixels of the ok rows
    data_dir/preprocessing.json        the PreprocessingSpec used
    data_dir/quarantine.csv            quarantined files with reason and detail
    data_dir/unmapped_body_parts.csv   BodyPartExamined values that map to no region, with counts

Every file gives exactly one row (one per frame with the "all" frame policy); a bad file is
quarantined with a reason and the run goes on. Files are processed in sorted order and nothing
time-dependent is written, so ingesting the same input twice gives byte-identical files.

Re-runs are incremental and a killed run resumes: finished batches are recorded in a journal
(xrayops.data.journal) next to the dataset, and only files not yet in it are decoded. The
dataset files are then assembled from the journal, streaming pixels into shards, so memory
holds one batch of images per worker plus the (small) manifest rows, whatever the dataset size.

PHI stays here: rows, files and logs carry keyed pseudonyms (of UIDs, patient IDs and of the
files' relative paths: source_name is `src-<HMAC>.dcm`, never a folder or file name), keyed hashes
and VR-bounded technical tags only. Files are processed in the order of their pseudonyms.
"""
from __future__ import annotations

import errno
import multiprocessing
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydantic import BaseModel

from xrayops.contracts import ManifestRow, PreprocessingSpec
from xrayops.data.journal import Journal, JournalEntry, file_key, journal_fingerprint
from xrayops.data.manifest import Deduplicator, assign_split, kept_copy_detail, preferred_copies, write_manifest
from xrayops.data.shards import SHARD_GLOB, ShardWriter
from xrayops.dicom.admission import REASONS as ADMISSION_REASONS
from xrayops.dicom.admission import admit
from xrayops.dicom.codec_messages import captured_stderr
from xrayops.dicom.decode import MAX_FILE_BYTES, DicomError, check_pixel_module, frame_indices, is_lossy, quiet_pydicom, read_dicom
from xrayops.dicom.deid import keyed_hash, keyed_hasher, pseudonymize, safe_metadata, source_pseudonym
from xrayops.dicom.labels import default_synonyms, load_synonyms, region_from_dataset, unmapped_report
from xrayops.dicom.pixels import decode_for_spec, image_statistics, preprocess_array
from xrayops.logs import get_logger
from xrayops.progress import track
from xrayops.regions import UNKNOWN

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
QUARANTINE_COLUMNS = ["source_name", "image_id", "reason", "detail"]
JOURNAL_VERSION = "2"  # bump when process_file's output changes for the same input
# Quality flags (kept rows, for filtering downstream). A radiograph's short side is >= 1000 px;
# below 256 it is a thumbnail or a secondary capture. Long-leg and whole-spine stitches reach
# about 1:3; beyond that it is a strip, a ruler or a cropped label.
TINY_SIDE = 256
EXTREME_ASPECT = 3.0
LOW_CONTRAST_STD = 0.02  # std of the preprocessed image on [0, 1]

log = get_logger(__name__)


class IngestSummary(BaseModel):
    """What one ingest run produced."""

    n_files: int
    n_ok: int
    n_quarantined: int
    n_processed: int = 0  # files decoded in this run
    n_reused: int = 0  # files taken from the journal of an earlier (or killed) run
    reasons: dict[str, int]  # quarantine reason -> rows
    refused: dict[str, int] = {}  # the reasons that are the admission policy's (not for this model)
    skipped: dict[str, int] = {}  # files passed over before decoding (hidden, foreign extension, bad link)
    regions: dict[str, int]  # region -> ok images
    splits: dict[str, int]  # split -> ok images
    quality_flags: dict[str, int] = {}  # flag -> ok images
    data_dir: Path
    manifest_path: Path
    shards_dir: Path
    preprocessing_path: Path
    quarantine_path: Path
    unmapped_path: Path


def default_journal_dir(data_dir: Path) -> Path:
    """Beside the dataset, not inside it, so DVC never tracks it: data/ -> .data.ingest-journal/."""
    data_dir = Path(data_dir)
    return data_dir.parent / f".{data_dir.name}.ingest-journal"


def ingest(
    source_dir: Path,
    data_dir: Path,
    spec: PreprocessingSpec,
    key: str | bytes,
    workers: int = 1,
    synonyms_path: Path | None = None,
    shard_size: int = 1024,
    batch_size: int = 64,
    journal_dir: Path | None = None,
    part: tuple[int, int] | None = None,
    source_map: Path | None = None,
) -> IngestSummary:
    """Ingest every DICOM file under `source_dir` into `data_dir` (see module docstring).

    `part=(i, n)` ingests only the i-th of n contiguous slices of the sorted file list (the
    fan-out of pipelines/ingestion.py; xrayops.data.merge joins the slices). `source_map` also
    writes the pseudonym -> relative path map there (PHI: xrayops.data.source_map).
    """
    source_dir, data_dir = Path(source_dir), Path(data_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source folder {source_dir} does not exist")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    synonyms = load_synonyms(synonyms_path) if synonyms_path else dict(default_synonyms())
    journal_dir = Path(journal_dir) if journal_dir else default_journal_dir(data_dir)
    scan = scan_source(source_dir, exclude=[data_dir, journal_dir])
    paths = scan.paths
    if scan.skipped:  # once per run, by reason: the names themselves may hold identifiers
        log.info("ingest.skipped", skipped=scan.skipped)
    if part is not None:
        paths = slice_for_part(paths, *part)
    relatives = [p.relative_to(source_dir).as_posix() for p in paths]
    names = [source_pseudonym(r, key) for r in relatives]
    # Files go in the order of their pseudonyms, the manifest's order: a serial run and the merge
    # of a fan-out (xrayops.data.merge) then keep the same copy of a duplicate.
    order = sorted(range(len(paths)), key=lambda i: names[i])
    paths, names, relatives = [paths[i] for i in order], [names[i] for i in order], [relatives[i] for i in order]
    if source_map is not None:
        from xrayops.data.source_map import check_source_map_path, write_source_map

        check_source_map_path(source_map, [data_dir, journal_dir])
        write_source_map(source_map, list(zip(names, relatives)))
    keys = [file_key(n, p) for n, p in zip(names, paths)]

    fingerprint = journal_fingerprint(
        JOURNAL_VERSION, spec.model_dump_json(), pseudonymize("journal", key), sorted(synonyms.items())
    )
    journal = Journal(journal_dir, fingerprint)
    todo = [(p, n, k) for p, n, k in zip(paths, names, keys) if k not in journal.done]
    log.info("ingest.start", files=len(paths), to_process=len(todo), workers=workers, size=spec.size)
    batch: list[tuple[str, list[JournalEntry]]] = []
    for (_, _, k), entries in track(
        _process_all(todo, spec, key, synonyms, workers), "ingest", total=len(todo)
    ):
        batch.append((k, entries))
        if len(batch) >= batch_size:
            journal.write_part(batch)
            batch = []
    if batch:
        journal.write_part(batch)
    return _assemble(journal, keys, data_dir, spec, synonyms, shard_size, n_processed=len(todo), skipped=scan.skipped)


def write_contact_sheet(data_dir: Path, path: Path, limit: int = 64, columns: int = 8) -> Path:
    """A PNG grid of the first `limit` ok images of a dataset, captioned with their region.

    For eyeballing what the pixel pipeline did (inversion, windowing, borders). Captions hold
    technical tags only (region, transfer syntax, "M1" for inverted MONOCHROME1), never names or ids.
    """
    from xrayops.data.manifest import read_manifest
    from xrayops.data.shards import load_shards
    from xrayops.dicom.contact_sheet import contact_sheet

    frame = read_manifest(Path(data_dir) / "manifest.parquet")
    ok = frame[frame.status == "ok"].head(limit)
    if ok.empty:
        raise ValueError(f"{data_dir} has no ok images for a contact sheet")
    shards = load_shards(data_dir)
    arrays = [np.asarray(shards[r.shard][r.shard_index]) for r in ok.itertuples()]
    captions = [_caption(r.region, r.transfer_syntax, r.photometric_interpretation) for r in ok.itertuples()]
    return contact_sheet(arrays, captions, path, columns=columns)


def _caption(region: str, transfer_syntax: str, photometric: str) -> str:
    syntax = pydicom.uid.UID(transfer_syntax).keyword if transfer_syntax else ""
    return " ".join(t for t in (region, syntax or transfer_syntax, "M1" if photometric == "MONOCHROME1" else "") if t)


def plan_parts(source_dir: Path, files_per_part: int) -> tuple[int, int]:
    """(number of files, number of parts) to ingest `source_dir` in parts of <= files_per_part files."""
    if files_per_part < 1:
        raise ValueError(f"files_per_part must be positive, got {files_per_part}")
    n_files = len(find_dicom_files(Path(source_dir)))
    return n_files, max(1, -(-n_files // files_per_part))


def slice_for_part(items: list, index: int, n_parts: int) -> list:
    """The index-th of n_parts contiguous, near-equal slices (sorted order kept across parts)."""
    if not 0 <= index < n_parts:
        raise ValueError(f"part index {index} is not in [0, {n_parts})")
    bounds = [round(i * len(items) / n_parts) for i in range(n_parts + 1)]
    return items[bounds[index] : bounds[index + 1]]


def _assemble(
    journal: Journal,
    keys: list[str],
    data_dir: Path,
    spec: PreprocessingSpec,
    synonyms: Mapping[str, str],
    shard_size: int,
    n_processed: int,
    skipped: dict[str, int] | None = None,
) -> IngestSummary:
    """Journal entries of `keys`, in order, to the dataset files: dedup, splits, shards, tables."""
    shards_dir = data_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    for stale in shards_dir.glob(SHARD_GLOB):  # a previous, larger run must not leave shards behind
        stale.unlink()
    rows: list[ManifestRow] = []
    details: list[str] = []
    dedup = Deduplicator()
    kept = preferred_copies((k, j, e.row) for k in keys for j, e in enumerate(journal.read(k)))
    with ShardWriter(shards_dir, shard_size) as writer:
        for k in keys:
            for j, entry in enumerate(journal.read(k)):
                row, detail = entry.row, entry.detail
                winner = kept.get(row.image_id) if row.status == "ok" else None
                if winner is not None and winner[:2] != (k, j):
                    reason = "duplicate_file" if winner[2].source_sha256 == row.source_sha256 else "duplicate_sop_instance_uid"
                    row, detail = _quarantined_row(row, reason), kept_copy_detail(winner[2])
                elif row.status == "ok":
                    reason = dedup.check(row.image_id, row.pixel_sha256, row.source_sha256)
                    if reason:
                        row, detail = _quarantined_row(row, reason), "an earlier file (in sorted order) holds the same image"
                if row.status == "ok":
                    shard, index = writer.add(entry.pixels)
                    split = assign_split(row.patient_id or row.image_id)
                    row = row.model_copy(update={"shard": shard, "shard_index": index, "split": split})
                    log.debug("ingest.ok", file=row.source_name, image_id=row.image_id, region=row.region)
                else:
                    log.warning("ingest.quarantined", file=row.source_name, image_id=row.image_id, reason=row.reason)
                rows.append(row)
                details.append(detail)

    manifest_path = write_manifest(rows, data_dir / "manifest.parquet")
    preprocessing_path = data_dir / "preprocessing.json"
    preprocessing_path.write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    quarantine_path = _write_csv(_quarantine_table(rows, details), data_dir / "quarantine.csv")
    ok = [r for r in rows if r.status == "ok"]
    unmapped_path = _write_csv(unmapped_values(ok, synonyms), data_dir / "unmapped_body_parts.csv")
    summary = IngestSummary(
        n_files=len(keys),
        n_processed=n_processed,
        n_reused=len(keys) - n_processed,
        skipped=skipped or {},
        **row_counts(rows),
        data_dir=data_dir,
        manifest_path=manifest_path,
        shards_dir=shards_dir,
        preprocessing_path=preprocessing_path,
        quarantine_path=quarantine_path,
        unmapped_path=unmapped_path,
    )
    log.info("ingest.done", ok=summary.n_ok, quarantined=summary.n_quarantined, reasons=summary.reasons,
             refused=summary.refused, skipped=summary.skipped, processed=n_processed, reused=summary.n_reused)  # fmt: skip
    return summary


class SourceScan(BaseModel):
    """The candidate files of a source folder, and what was passed over before decoding, by reason."""

    paths: list[Path]
    skipped: dict[str, int] = {}  # hidden, not_dicom_extension, dangling_link, symlink_loop, folder_link, ...


def scan_source(source_dir: Path, exclude: Path | list[Path] | None = None) -> SourceScan:
    """Candidate files, sorted: .dcm/.dicom/.dic or no extension (UID-style names count as none),
    plus every file a DICOMDIR references, whatever its name.

    Hidden files, known non-DICOM extensions, dangling links and symlink loops are passed over and
    counted by reason (never listed by name: names can hold identifiers); links to folders are not
    followed (counted as folder_link). A DICOMDIR is an index, not an image: it is followed, and only listed itself (to be
    quarantined with a reason) when it cannot be read. A referenced file that is absent is listed
    too, so it gets a "missing_file" row.
    """
    excluded = [Path(e).resolve() for e in ([] if exclude is None else [exclude] if isinstance(exclude, Path) else exclude)]
    source_dir = Path(source_dir)
    found: set[Path] = set()
    skipped: Counter = Counter()

    def on_error(_: OSError) -> None:
        skipped["unreadable_folder"] += 1

    for folder, dirnames, filenames in os.walk(source_dir, onerror=on_error):
        folder_path = Path(folder)
        keep = []
        for name in sorted(dirnames):
            child = folder_path / name
            if name.startswith("."):
                skipped["hidden"] += 1
            elif child.is_symlink():  # not followed: a link can loop, or list a folder twice
                skipped[_link_reason(child) or "folder_link"] += 1
            elif not any(child.resolve().is_relative_to(e) for e in excluded):
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            path = folder_path / name
            reason = _skip_reason(path)
            if reason is None and any(path.resolve().is_relative_to(e) for e in excluded):
                continue
            if reason is not None:
                skipped[reason] += 1
                continue
            if name.upper() == "DICOMDIR":
                referenced = dicomdir_files(path)
                found.update(referenced if referenced is not None else [path])
                continue
            found.add(path)
    paths = sorted(found, key=lambda p: p.relative_to(source_dir).as_posix())
    return SourceScan(paths=paths, skipped=dict(sorted(skipped.items())))


def _skip_reason(path: Path) -> str | None:
    if path.name.startswith("."):
        return "hidden"
    if path.is_symlink() and (reason := _link_reason(path)):
        return reason
    if not path.is_file():
        return "not_a_file"
    suffix = path.suffix.lower()
    if suffix and suffix not in DICOM_SUFFIXES and not suffix[1:].isdigit() and path.name.upper() != "DICOMDIR":
        return "not_dicom_extension"
    return None


def _link_reason(path: Path) -> str | None:
    """Why a symbolic link cannot be read: it loops, or points at nothing; None when it resolves."""
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return "symlink_loop"
    except OSError as exc:
        return "symlink_loop" if exc.errno == errno.ELOOP else "dangling_link"
    return None


def find_dicom_files(source_dir: Path, exclude: Path | list[Path] | None = None) -> list[Path]:
    """The candidate files of `scan_source`, sorted."""
    return scan_source(source_dir, exclude).paths


def dicomdir_files(dicomdir: Path) -> list[Path] | None:
    """Files referenced by a DICOMDIR's directory records (Referenced File ID), or None if unreadable."""
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(dicomdir, force=True)
            records = ds.DirectoryRecordSequence
    except Exception:
        return None
    files = []
    for record in records:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        components = [str(c) for c in file_id] if isinstance(file_id, (list, tuple, pydicom.multival.MultiValue)) else str(file_id).split("\\")
        files.append(_resolve_case(dicomdir.parent, components))
    return files


def _resolve_case(root: Path, components: list[str]) -> Path:
    """File IDs are upper case on the medium; a copy on a case-sensitive disk may be lower case."""
    path = root
    for component in components:
        candidate = path / component
        if not candidate.exists() and path.is_dir():
            match = next((c for c in path.iterdir() if c.name.upper() == component.upper()), None)
            candidate = match if match is not None else candidate
        path = candidate
    return path


def process_file(
    path: Path, source_name: str, spec: PreprocessingSpec, key: str | bytes, synonyms: Mapping[str, str]
) -> list[JournalEntry]:
    """One file to its entries (one per kept frame); never raises (a failure is one quarantined entry).

    What a C codec prints on stderr while the file decodes is logged once, naming the image by its
    pseudonym (the codecs themselves name no file).
    """
    with captured_stderr() as codec_lines:
        entries = _process_file(path, source_name, spec, key, synonyms)
    if codec_lines:
        image_id = entries[0].row.image_id if entries else ""
        log.warning("decode.codec_message", image_id=image_id, file=source_name, messages=codec_lines)
    return entries


def _process_file(
    path: Path, source_name: str, spec: PreprocessingSpec, key: str | bytes, synonyms: Mapping[str, str]
) -> list[JournalEntry]:
    try:
        data, sha = _read_and_hash(path, key)
    except FileNotFoundError:
        row = ManifestRow(image_id="", study_id="", patient_id="", source_sha256="", source_name=source_name)
        return [_quarantine(row, "missing_file", "listed (e.g. in a DICOMDIR) but not on disk")]
    except OSError as exc:
        row = ManifestRow(image_id="", study_id="", patient_id="", source_sha256="", source_name=source_name)
        return [_quarantine(row, "unreadable", f"cannot read file ({type(exc).__name__})")]
    fallback_id = pseudonymize(sha, key, "img-")
    row = ManifestRow(image_id=fallback_id, study_id="", patient_id="", source_sha256=sha, source_name=source_name)
    if path.name.upper() == "DICOMDIR":  # find_dicom_files lists one only when it cannot be followed
        return [_quarantine(row, "invalid_dicomdir", "a DICOMDIR without readable directory records")]
    if data is None:
        return [_quarantine(row, "too_large", f"file exceeds {MAX_FILE_BYTES} bytes")]
    try:
        ds = read_dicom(data)
        del data  # the Dataset holds what it needs; do not keep a second copy of a large file
        meta = safe_metadata(ds, key)
        sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        meta["image_id"] = meta["image_id"] or fallback_id
        region = region_from_dataset(ds, synonyms).manifest_fields()
        row = row.model_copy(update={**meta, **region, "lossy_compression": is_lossy(ds)})
        admission = admit(ds, spec.admission, "training")
        if not admission.admitted:  # never a region label for what the model is not for
            return [_quarantine(row.model_copy(update={"region": UNKNOWN}), admission.reason, admission.detail)]
        check_pixel_module(ds)  # no pixels is the reason, whatever the frame policy
        indices = frame_indices(ds, spec.multiframe)
        entries = []
        for index in indices:
            frame_row = row
            if len(indices) > 1:  # "all": each frame is an image with its own id
                frame_id = pseudonymize(f"{sop_uid or sha}#{index}", key, "img-")
                frame_row = row.model_copy(update={"image_id": frame_id, "frame": index})
            elif index is not None:
                frame_row = row.model_copy(update={"frame": index})
            entries.append(_process_frame(ds, index, frame_row, spec, key))
        return entries
    except DicomError as exc:
        return [_quarantine(row, exc.reason, exc.detail)]
    except Exception as exc:  # a bug or an exotic file must cost one row, not the run
        return [_quarantine(row, "internal_error", type(exc).__name__)]


def _process_frame(
    ds: pydicom.Dataset, index: int | None, row: ManifestRow, spec: PreprocessingSpec, key: str | bytes
) -> JournalEntry:
    """Decode once, hash the decoded frame (duplicate pixels under another UID), preprocess, flag.

    The pixel hash is keyed (HMAC): an unkeyed one would let anyone holding the image find its row.

    The hash is of the frame as decoded: with spec.reduce_early a JPEG 2000 frame is decoded at
    reduced resolution, so its lossless copy in another syntax is not matched by pixels (by SOP
    UID it still is). reduce_early=False compares full-resolution pixels across all syntaxes.
    """
    frame = decode_for_spec(ds, spec, index)  # the one decode (maybe at reduced resolution)
    digest = keyed_hash(key, "pixels", [f"{frame.shape}{frame.dtype.str}".encode(), np.ascontiguousarray(frame).data])
    pixels = preprocess_array(frame, ds, spec)
    del frame
    mean, std = image_statistics(pixels)
    row = row.model_copy(update={"pixel_mean": mean, "pixel_std": std, "pixel_sha256": digest})
    if not std > 0:
        return _quarantine(row, "blank_image", "every preprocessed pixel has the same value")
    return JournalEntry(row.model_copy(update={"quality_flags": ",".join(quality_flags(row, std))}), "", pixels)


def row_counts(rows: list[ManifestRow]) -> dict:
    """The summary's tallies of manifest rows: outcomes, quarantine reasons, regions, splits, flags."""
    ok = [r for r in rows if r.status == "ok"]
    flags = Counter(flag for r in ok for flag in r.quality_flags.split(",") if flag)
    return {
        "n_ok": len(ok),
        "n_quarantined": len(rows) - len(ok),
        "reasons": dict(sorted(Counter(r.reason for r in rows if r.status != "ok").items())),
        "refused": dict(sorted(Counter(r.reason for r in rows if r.reason in ADMISSION_REASONS).items())),
        "regions": dict(sorted(Counter(r.region for r in ok).items())),
        "splits": dict(sorted(Counter(r.split for r in ok).items())),
        "quality_flags": dict(sorted(flags.items())),
    }


def unmapped_values(ok: list[ManifestRow], synonyms: Mapping[str, str]) -> pd.DataFrame:
    """BodyPartExamined values (with counts) of the kept images whose region is unknown.

    Images that a description mapped to a region are not counted. Only BodyPartExamined is
    reported: descriptions and protocol names are free text that PS3.15 removes (action X).
    """
    return unmapped_report([r.body_part_raw for r in ok if r.region == UNKNOWN], synonyms)


def quality_flags(row: ManifestRow, std: float) -> list[str]:
    """Flags for a kept image: tiny, extreme_aspect, low_contrast (thresholds above)."""
    flags = []
    short, long = sorted((row.original_rows, row.original_cols))
    if short < TINY_SIDE:
        flags.append("tiny")
    if short > 0 and long / short > EXTREME_ASPECT:
        flags.append("extreme_aspect")
    if std < LOW_CONTRAST_STD:
        flags.append("low_contrast")
    return flags


_WORKER_ARGS: tuple = ()


def _init_worker(spec: PreprocessingSpec, key: str | bytes, synonyms: Mapping[str, str], parent: int) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = (spec, key, synonyms)
    die_with_parent(parent)


def die_with_parent(parent: int, poll_seconds: float = 1.0) -> None:
    """End this worker when the ingest process that started it dies, even by SIGKILL.

    A killed parent cannot shut its pool down, and a decode worker holds hundreds of MB. Linux's
    parent-death signal covers it at once; a watchdog thread covers other systems (and a parent
    thread that exits before the process does).
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _worker_process(path: Path, name: str) -> list[JournalEntry]:
    return process_file(path, name, *_WORKER_ARGS)


# Results come back in job order; a deeper queue keeps workers busy while one slow file (a full
# JPEG 2000 lossless decode) holds the head. Each in-flight job holds one decoded frame at most.
IN_FLIGHT_PER_WORKER = 6


def _process_all(
    todo: list[tuple[Path, str, str]],
    spec: PreprocessingSpec,
    key: str | bytes,
    synonyms: Mapping[str, str],
    workers: int,
) -> Iterator[tuple[tuple[Path, str, str], list[JournalEntry]]]:
    """(job, entries) in job order. At most IN_FLIGHT_PER_WORKER x workers files are in flight, so memory stays flat."""
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            yield job, process_file(job[0], job[1], spec, key, synonyms)
        return
    # spawn: forking a parent that holds torch/BLAS threads can deadlock the children.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(spec, key, dict(synonyms), os.getpid())) as pool:  # fmt: skip
        pending: deque = deque()
        for job in todo:
            pending.append((job, pool.submit(_worker_process, job[0], job[1])))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                done_job, future = pending.popleft()
                yield done_job, future.result()
        while pending:
            done_job, future = pending.popleft()
            yield done_job, future.result()


def _quarantined_row(row: ManifestRow, reason: str) -> ManifestRow:
    return row.model_copy(update={"status": "quarantined", "reason": reason, "shard": "", "shard_index": -1, "split": ""})


def _quarantine(row: ManifestRow, reason: str, detail: str) -> JournalEntry:
    return JournalEntry(_quarantined_row(row, reason), detail, None)


def _read_and_hash(path: Path, key: str | bytes) -> tuple[bytes | None, str]:
    """File bytes and their keyed hash (HMAC-SHA256: an unkeyed hash of a hospital's file would let
    anyone holding the file find its row); bytes is None for a file too large to read whole."""
    if path.stat().st_size > MAX_FILE_BYTES:
        hasher = keyed_hasher(key, "file")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
        return None, hasher.hexdigest()
    data = path.read_bytes()
    return data, keyed_hash(key, "file", [data])


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
