"""The synthetic ground-truth sidecar (truth.csv), keyed like the manifest's source_name."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_truth(path: Path) -> dict[str, str]:
    """Map file name -> true region ("unknown" for out-of-domain images)."""
    frame = pd.read_csv(path)
    return dict(zip(frame["file"].astype(str), frame["true_region"].astype(str)))
