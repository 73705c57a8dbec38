"""The synthetic ground-truth sidecar (truth.csv): file names there, the manifest's source_name here.

truth.csv names files as synth wrote them (relative to the export's root); the manifest names
them by keyed pseudonym (`xrayops.dicom.deid.source_pseudonym`). The readers below translate with
the dataset's key (default: the configured one, `require_key`), so a lookup by source_name works.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import pandas as pd

T = TypeVar("T")


def _key(key: str | bytes | None) -> str | bytes:
    if key is not None:
        return key
    from xrayops.config import get_settings
    from xrayops.dicom.deid import require_key

    return require_key(get_settings())


def by_source_name(by_file: Mapping[str, T], key: str | bytes | None = None) -> dict[str, T]:
    """{relative file name: value} -> {source_name (pseudonym under `key`): value}."""
    from xrayops.dicom.deid import source_pseudonym

    key = _key(key)
    return {source_pseudonym(name, key): value for name, value in by_file.items()}


def read_truth_files(path: Path) -> dict[str, str]:
    """File name as synth wrote it -> true region ("unknown" for out-of-domain images)."""
    frame = pd.read_csv(path)
    return dict(zip(frame["file"].astype(str), frame["true_region"].astype(str)))


def read_truth(path: Path, key: str | bytes | None = None) -> dict[str, str]:
    """Manifest source_name -> true region ("unknown" for out-of-domain images)."""
    return by_source_name(read_truth_files(path), key)


def read_truth_table(path: Path, key: str | bytes | None = None) -> pd.DataFrame:
    """truth.csv as a table whose `file` column holds the manifest's source_name."""
    from xrayops.dicom.deid import source_pseudonym

    key = _key(key)
    frame = pd.read_csv(path)
    return frame.assign(file=[source_pseudonym(str(f), key) for f in frame["file"]])


def export_truth(
    dicom_dir: Path | None, key: str | bytes | None = None
) -> tuple[dict[str, str] | None, dict[str, float] | None]:
    """The true regions and angles (by source_name) of a DICOM export that carries a truth.csv
    (synth), else (None, None): a PACS export is scored against its tags."""
    from xrayops.data.dataset import read_truth_angles

    path = Path(dicom_dir) / "truth.csv" if dicom_dir is not None else None
    if path is None or not path.exists():
        return None, None
    from xrayops.dicom.deid import DeidKeyError

    try:
        key = _key(key)
    except DeidKeyError as exc:  # a task without the key cannot name files as the manifest does
        from xrayops.logs import get_logger

        get_logger(__name__).warning("truth.unjoinable", reason=str(exc).split(";")[0])
        return None, None
    return read_truth(path, key), read_truth_angles(path, key)
