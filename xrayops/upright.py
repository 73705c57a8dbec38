"""Turn an image upright by its predicted orientation. Baltruschat et al. 2018: almost half of all radiographs
are not stored upright, so the service can return the image turned back, not only the angle."""
from __future__ import annotations

import numpy as np
from PIL import Image


def upright_image(image: np.ndarray, angle_deg: float, fill: float = 0.0) -> np.ndarray:
    """`image` (H, W) float in [0, 1], seen on screen turned counter-clockwise by `angle_deg` (the
    orientation head's convention, `xrayops.models.heads.vector_to_angle`), turned back clockwise.

    Same size; corners uncovered by the turn get `fill` (the spec's pad value). Right angles are
    turned exactly (np.rot90), any other angle with bilinear resampling about the centre.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    if not np.isfinite(angle_deg):
        raise ValueError(f"angle must be finite, got {angle_deg}")
    quarter = angle_deg / 90.0
    if abs(quarter - round(quarter)) < 1e-6:
        return np.ascontiguousarray(np.rot90(image, -int(round(quarter)) % 4))
    turned = Image.fromarray(image, mode="F").rotate(-angle_deg, resample=Image.BILINEAR, fillcolor=fill)
    return np.clip(np.asarray(turned, dtype=np.float32), 0.0, 1.0)
