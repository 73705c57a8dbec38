"""Tiny ingested-format data directories for the learning tests.

Writes exactly what ingestion writes (docs/architecture.md, "Storage formats"):
manifest.parquet with ManifestRow columns, shards/shard-NNNNN.npy (uint8, (n, S, S)) and
preprocessing.json. The images are simple learnable shapes, one per class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xrayops.contracts import ManifestRow, PreprocessingSpec

CLASSES = ("skull", "knee", "hand", "pelvis_hip")


def draw_shape(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A bright shape on a dark noisy background, float in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    r = size * rng.uniform(0.25, 0.32)
    dist = np.hypot(xx - cx, yy - cy)
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    if kind == "skull":  # filled disc
        mask = dist < r
    elif kind == "knee":  # ring
        mask = (dist < r) & (dist > 0.6 * r)
    elif kind == "hand":  # filled square
        mask = (np.abs(u) < 0.8 * r) & (np.abs(v) < 0.8 * r)
    elif kind == "pelvis_hip":  # cross
        mask = ((np.abs(u) < 0.25 * r) & (np.abs(v) < r)) | ((np.abs(v) < 0.25 * r) & (np.abs(u) < r))
    else:
        raise ValueError(kind)
    image = 0.1 + 0.05 * rng.standard_normal((size, size)) + 0.7 * mask
    return np.clip(image, 0, 1)


@dataclass
class TinyData:
    data_dir: Path
    truth: dict[str, str]  # source_name -> true region
    manifest: pd.DataFrame


def make_data_dir(
    root: Path,
    n_per_class: int = 40,
    size: int = 32,
    n_unknown: int = 8,
    n_quarantined: int = 2,
    mislabel_rate: float = 0.0,
    shard_size: int = 50,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> TinyData:
    rng = np.random.default_rng(seed)
    data_dir = Path(root)
    (data_dir / "shards").mkdir(parents=True, exist_ok=True)
    truth_regions = [c for c in classes for _ in range(n_per_class)] + [classes[i % len(classes)] for i in range(n_unknown)]
    order = rng.permutation(len(truth_regions))
    images, rows, truth = [], [], {}
    for position, k in enumerate(order):
        true_region = truth_regions[k]
        name = f"img{position:05d}.dcm"
        truth[name] = true_region
        if k >= len(classes) * n_per_class:
            region = "unknown"
        elif rng.random() < mislabel_rate:
            region = str(rng.choice([c for c in classes if c != true_region]))
        else:
            region = true_region
        split = ("train", "train", "train", "val", "test")[position % 5]
        shard_no, index = divmod(len(images), shard_size)
        images.append((draw_shape(true_region, rng, size) * 255).round().astype(np.uint8))
        rows.append(
            ManifestRow(
                image_id=f"i{position}", study_id=f"s{position}", patient_id=f"p{position}", source_sha256="0" * 64,
                source_name=name, body_part_raw=region.upper(), region=region, shard=f"shard-{shard_no:05d}.npy",
                shard_index=index, split=split, pixel_mean=float(images[-1].mean()), pixel_std=float(images[-1].std()),
            ).model_dump()
        )
    for q in range(n_quarantined):
        rows.append(
            ManifestRow(
                image_id=f"q{q}", study_id=f"qs{q}", patient_id=f"qp{q}", source_sha256="1" * 64,
                source_name=f"bad{q}.dcm", status="quarantined", reason="not a DICOM file",
            ).model_dump()
        )
    stack = np.stack(images)
    for shard_no, start in enumerate(range(0, len(stack), shard_size)):
        np.save(data_dir / "shards" / f"shard-{shard_no:05d}.npy", stack[start : start + shard_size])
    manifest = pd.DataFrame(rows)
    manifest.to_parquet(data_dir / "manifest.parquet", index=False)
    (data_dir / "preprocessing.json").write_text(PreprocessingSpec(size=size).model_dump_json(indent=2))
    return TinyData(data_dir=data_dir, truth=truth, manifest=manifest)


def random_backbone(path: Path, arch: str = "resnet18", seed: int = 0) -> Path:
    """A randomly initialised backbone.pt (no pretraining), for fast fine-tuning tests."""
    import torch

    from xrayops.models.backbone import build_backbone, save_backbone

    torch.manual_seed(seed)
    backbone, _ = build_backbone(arch)
    return save_backbone(Path(path), backbone, arch, "simclr")
