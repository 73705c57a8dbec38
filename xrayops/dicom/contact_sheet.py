"""A labelled grid of preprocessed images (PNG), for eyeballing what the pixel pipeline produced."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 12  # pixels under each tile for its caption


def contact_sheet(
    arrays: Sequence[np.ndarray], labels: Sequence[str], path: Path, columns: int = 8, scale: int = 2
) -> Path:
    """Write `arrays` (2-D, uint8/uint16/float in [0, 1]) as a grid PNG with a caption under each.

    Every tile is the size of the largest array times `scale`; smaller arrays sit top-left.
    """
    if len(arrays) != len(labels):
        raise ValueError(f"{len(arrays)} arrays but {len(labels)} labels")
    if not arrays:
        raise ValueError("contact_sheet needs at least one array")
    tile_h = max(a.shape[0] for a in arrays) * scale
    tile_w = max(a.shape[1] for a in arrays) * scale
    columns = max(1, min(columns, len(arrays)))
    n_rows = math.ceil(len(arrays) / columns)
    sheet = Image.new("L", (columns * tile_w, n_rows * (tile_h + LABEL_HEIGHT)), color=0)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    max_chars = max(1, tile_w // 6)
    for i, (array, label) in enumerate(zip(arrays, labels)):
        x, y = (i % columns) * tile_w, (i // columns) * (tile_h + LABEL_HEIGHT)
        tile = Image.fromarray(_to_uint8(array), mode="L")
        tile = tile.resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
        sheet.paste(tile, (x, y))
        draw.text((x + 1, y + tile_h), str(label)[:max_chars], fill=255, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def _to_uint8(array: np.ndarray) -> np.ndarray:
    values = np.asarray(array)
    if values.ndim != 2:
        raise ValueError(f"contact sheet tiles must be 2-D, got shape {values.shape}")
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind in "ui":
        return (values.astype(np.float64) / np.iinfo(values.dtype).max * 255).round().astype(np.uint8)
    return (np.clip(values, 0.0, 1.0) * 255).round().astype(np.uint8)
