"""Where DICOM comes from before ingestion: a DICOMweb server or a DICOM C-STORE sender.

Both land files in a *landing folder* that `xrayops.ingest.ingest` then reads like any export.
Landed files are named by the keyed pseudonym of their SOP Instance UID (`landing_name`), are
written to a hidden temporary name first and renamed, so ingestion never sees half a file and
no UID reaches the manifest through a file name.

A landing folder is PHI, like any export: it holds the instances as the hospital sent them (names,
dates, IDs in their tags). Its files and folders are created readable by their owner only, and
each instance lands without its private tags and its overlay (60xx) and curve (50xx) groups
(`strip_for_landing`): ingestion never reads them (PS3.15 Table E.1-1 removes them: X), and a
vendor's private tags and an overlay's text are where identifiers hide that no allow-list names.
A site that needs them in the landing folder opts in with XRAYOPS_LANDING_KEEP_PRIVATE=true.
Ingestion itself writes no DICOM: only preprocessed pixels and allow-listed, pseudonymised fields.
"""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from pydicom.dataset import Dataset

from xrayops.dicom.deid import pseudonymize

INCOMING = ".incoming"  # hidden: find_dicom_files skips it


def landing_name(sop_instance_uid: str, key: str | bytes) -> str:
    return pseudonymize(sop_instance_uid, key, "img-") + ".dcm"


def is_private_or_overlay(tag: int) -> bool:
    """A private tag (odd group), or an element of an overlay (60xx) or curve (50xx) group."""
    group = tag >> 16
    return group % 2 == 1 or 0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF


def strip_for_landing(ds: Dataset) -> int:
    """Remove private tags and overlay/curve groups from `ds` (top level: nested private tags go
    with their sequence's parent only when it is one of them); returns how many went."""
    doomed = [elem.tag for elem in ds if is_private_or_overlay(int(elem.tag))]
    for tag in doomed:
        del ds[tag]
    return len(doomed)


def landing_bytes(data: bytes, keep_private: bool = False) -> bytes:
    """A received Part 10 file as it lands: without private tags and overlay/curve groups unless
    `keep_private`. Pixel data and everything else stay as sent (no decode, no re-encode). A file
    pydicom cannot parse lands as received, so ingestion quarantines it with a reason."""
    if keep_private:
        return data
    from pydicom import dcmread
    from pydicom.filewriter import dcmwrite

    try:
        ds = dcmread(io.BytesIO(data), force=True)
        if not strip_for_landing(ds):
            return data
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=False)
        return buffer.getvalue()
    except Exception:  # unreadable here means quarantined by ingestion, not lost
        return data


def write_atomically(landing_dir: Path, name: str, data: bytes) -> Path:
    """Write `data` to landing_dir/name via a temporary file in landing_dir/.incoming and a rename.

    Folders are created 0700 and the file 0600: what lands is PHI.
    """
    landing_dir = Path(landing_dir)
    incoming = landing_dir / INCOMING
    landing_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    incoming.mkdir(mode=0o700, exist_ok=True)
    tmp = incoming / f"{uuid.uuid4().hex}.part"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        target = landing_dir / name
        os.replace(tmp, target)  # same file system: atomic
        return target
    finally:
        tmp.unlink(missing_ok=True)
