"""SR files on disk: PHI (they hold the patient's identifiers), so owner-only and named by the SR's
own instance UID, which is derived one-way from the source UIDs (xrayops.results.sr) and names no
patient, study or file of the hospital's."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from xrayops.results.sr import from_part10
from xrayops.sources import write_atomically


def sr_file_name(data: bytes) -> str:
    return f"sr-{from_part10(data).SOPInstanceUID}.dcm"


def write_srs(folder: Path, srs: Iterable[bytes]) -> list[Path]:
    """Write each SR (Part 10 bytes) atomically into `folder` (created 0700, files 0600)."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return [write_atomically(folder, sr_file_name(data), data) for data in srs]
