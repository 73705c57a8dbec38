"""The synthetic ground-truth sidecar (truth.csv), keyed like the manifest's source_name."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_truth(path: Path) -> dict[str, str]:
    """Map file name -> true region ("unknown" for out-of-domain images)."""
    frame = pd.read_csv(path)
    return dict(zip(frame["file"].astype(str), frame["true_region"].astype(str)))


def export_truth(dicom_dir: Path | None) -> tuple[dict[str, str] | None, dict[str, float] | None]:
    """The true regions and angles of a DICOM export that carries a truth.csv (synth), else
    (None, None): a PACS export is scored against its tags."""
    from xrayops.data.dataset import read_truth_angles

    path = Path(dicom_dir) / "truth.csv" if dicom_dir is not None else None
    if path is None or not path.exists():
        return None, None
    return read_truth(path), read_truth_angles(path)
