"""The ingested dataset (manifest.parquet + shards/*.npy) as torch tensors.

Only rows with status "ok" are used. The label is the manifest's `region` (normalised from
the PACS tag, so noisy) as a class id of `xrayops.regions`; -1 where the region is
"unknown": such images still serve self-supervised pretraining.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from xrayops.errors import XrayopsError
from xrayops.contracts import PreprocessingSpec
from xrayops.regions import region_index


class DatasetError(XrayopsError, ValueError):
    """The data directory is missing, incomplete or inconsistent."""


def read_preprocessing(data_dir: Path) -> PreprocessingSpec:
    path = Path(data_dir) / "preprocessing.json"
    if not path.is_file():
        raise DatasetError(f"{path} not found: is {data_dir} an ingested data directory?")
    return PreprocessingSpec.model_validate_json(path.read_text())


def read_ok_rows(
    data_dir: Path,
    split: str | Sequence[str] | None = None,
    labelled_only: bool = False,
    labels: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Manifest rows with status "ok" (optionally one split or several), plus a `label` column.

    `labels` (image_id -> region, e.g. a feature-store training set where reviewers' corrections
    replace PACS tags) overrides the manifest's region for the images it names; "unknown"
    there takes an image out of labelled training.
    """
    path = Path(data_dir) / "manifest.parquet"
    if not path.is_file():
        raise DatasetError(f"{path} not found: is {data_dir} an ingested data directory?")
    frame = pd.read_parquet(path)
    missing = {"status", "region", "split", "shard", "shard_index"} - set(frame.columns)
    if missing:
        raise DatasetError(f"{path} lacks columns {sorted(missing)}")
    frame = frame[frame["status"] == "ok"]
    if split is not None:
        frame = frame[frame["split"].isin([split] if isinstance(split, str) else list(split))]
    if labels is not None:
        override = frame["image_id"].astype(str).map(dict(labels))
        frame = frame.assign(manifest_region=frame["region"], region=override.where(override.notna(), frame["region"]))
    frame = frame.assign(label=frame["region"].map(region_index).astype("int64"))
    if labelled_only:
        frame = frame[frame["label"] >= 0]
    return frame.reset_index(drop=True)


def load_images(data_dir: Path, rows: pd.DataFrame) -> np.ndarray:
    """Stack the preprocessed images of `rows` from their shards: (n, S, S), shard dtype."""
    shards_dir = Path(data_dir) / "shards"
    rows = rows.reset_index(drop=True)
    parts: list[np.ndarray] = []
    order: list[np.ndarray] = []
    for shard, group in rows.groupby("shard", sort=True):
        path = shards_dir / str(shard)
        if not path.is_file():
            raise DatasetError(f"shard {path} listed in the manifest does not exist")
        array = np.load(path, mmap_mode="r")
        index = group["shard_index"].to_numpy()
        if array.ndim != 3 or index.min() < 0 or index.max() >= len(array):
            raise DatasetError(
                f"shard {path} has shape {array.shape}; manifest asks for rows {index.min()}..{index.max()}"
            )
        parts.append(np.asarray(array[index]))
        order.append(group.index.to_numpy())
    if not parts:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise DatasetError(f"shards under {shards_dir} hold images of different sizes: {sorted(shapes)}")
    stacked = np.concatenate(parts)
    out = np.empty_like(stacked)
    out[np.concatenate(order)] = stacked  # back to the rows' order
    return out


def read_truth_angles(path: Path, key: str | bytes | None = None) -> dict[str, float]:
    """Orientation labels from a synthetic truth.csv: the manifest's source_name (the file's
    pseudonym under `key`, default the configured key) -> angle in degrees by which the anatomy is
    turned counter-clockwise on screen (Baltruschat et al. 2018)."""
    from xrayops.data.truth import by_source_name

    frame = pd.read_csv(path)
    if "angle_deg" not in frame.columns:
        raise DatasetError(f"{path} has no angle_deg column: no orientation labels there")
    frame = frame[pd.to_numeric(frame["angle_deg"], errors="coerce").notna()]
    return by_source_name(dict(zip(frame["file"].astype(str), frame["angle_deg"].astype(float) % 360.0)), key)


_PIXEL_MAX = {torch.uint8: 255.0, torch.uint16: 65535.0}


def to_unit_float(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Stored pixels (uint8 or uint16, as the PreprocessingSpec says) -> float32 in [0, 1]."""
    images = torch.as_tensor(images)
    if images.dtype in _PIXEL_MAX:
        return images.float() / _PIXEL_MAX[images.dtype]
    if images.is_floating_point():
        return images.float()
    raise TypeError(f"cannot scale pixels of dtype {images.dtype} to [0, 1]; expected uint8, uint16 or float")


class ImageDataset(Dataset):
    """`(float tensor (1, S, S) in [0, 1], label)` for the ok rows of one split (None = all).

    Images are read once into memory as their stored integer type; `transform` (if any) is
    applied to each float image.
    """

    def __init__(
        self,
        data_dir: Path,
        split: str | Sequence[str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        labelled_only: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.rows = read_ok_rows(self.data_dir, split, labelled_only, labels)
        if self.rows.empty:
            what = "labelled " if labelled_only else ""
            raise DatasetError(f"no {what}ok images in split {split!r} of {self.data_dir}")
        self.images = torch.from_numpy(load_images(self.data_dir, self.rows))
        self.labels = torch.from_numpy(self.rows["label"].to_numpy())
        self.transform = transform

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = to_unit_float(self.images[index]).unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
