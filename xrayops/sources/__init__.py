"""Where DICOM comes from before ingestion: a DICOMweb server or a DICOM C-STORE sender.

Both land files in a *landing folder* that `xrayops.ingest.ingest` then reads like any export.
Landed files are named by the keyed pseudonym of their SOP Instance UID (`landing_name`), are
written to a hidden temporary name first and renamed, so ingestion never sees half a file and
no UID reaches the manifest through a file name.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from xrayops.dicom.deid import pseudonymize

INCOMING = ".incoming"  # hidden: find_dicom_files skips it


def landing_name(sop_instance_uid: str, key: str | bytes) -> str:
    return pseudonymize(sop_instance_uid, key, "img-") + ".dcm"


def write_atomically(landing_dir: Path, name: str, data: bytes) -> Path:
    """Write `data` to landing_dir/name via a temporary file in landing_dir/.incoming and a rename."""
    landing_dir = Path(landing_dir)
    incoming = landing_dir / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f"{uuid.uuid4().hex}.part"
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        target = landing_dir / name
        os.replace(tmp, target)  # same file system: atomic
        return target
    finally:
        tmp.unlink(missing_ok=True)
