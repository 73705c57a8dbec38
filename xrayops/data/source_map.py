"""The source map: which input file each `src-` pseudonym stands for. PHI, written only when asked.

The dataset names a file by its pseudonym only (`xrayops.dicom.deid.source_pseudonym`). An operator
who must find a quarantined file again asks ingestion for this map (`xrayops ingest --source-map
PATH`): a CSV of source_name -> path relative to the source root, created readable by its owner
only (0600). The relative paths hold whatever the export put in its folder and file names
(patient names, IDs, accession numbers, dates), so the map is PHI: it is refused inside the
dataset or its journal (DVC would track it) and belongs with the source files, under the same
access control.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

COLUMNS = ("source_name", "relative_path")


def check_source_map_path(path: Path, forbidden: list[Path]) -> Path:
    """`path` resolved, or ValueError when it lies inside one of the `forbidden` folders."""
    resolved = Path(path).resolve()
    for folder in forbidden:
        if resolved.is_relative_to(Path(folder).resolve()):
            raise ValueError("the source map holds PHI and must not be written inside the dataset or its journal")
    return resolved


def write_source_map(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """Write (source_name, relative path) rows, sorted, to a file only its owner can read (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.chmod(tmp, 0o600)  # an earlier tmp may have had another mode
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(sorted(pairs))
    os.replace(tmp, path)
    return path


def read_source_map(path: Path) -> dict[str, str]:
    """source_name -> relative path."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return {row["source_name"]: row["relative_path"] for row in csv.DictReader(handle)}
