"""Augmentations of Langer et al. 2024 (Table 1), batched with one random draw per image.

They work on float tensors in [0, 1], shape (1, S, S) or (batch, 1, S, S), on whatever device
the tensor lives on, so pretraining can augment on the GPU. The geometry follows
torchvision.transforms.v2 (RandomResizedCrop, then RandomAffine, whose inverse matrix is the
same as `torchvision.transforms.v2.functional.affine`; tests check this), but every image
gets its own parameters and all the geometry is one `grid_sample`: one resampling (less blur)
and one kernel for the whole batch. No Gaussian blur (Langer et al. 2024, after [1] there: it destroys
fine detail).
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.nn import functional as F

# Gauge radius as a fraction of the image side. Not given in Langer et al. 2024: a 25-30 mm
# calibration sphere on a 24-43 cm cassette spans roughly 6-12 % of the side.
GAUGE_RADIUS = 0.06


class AugmentParams(BaseModel):
    """One column of Langer et al. 2024, Table 1."""

    model_config = ConfigDict(frozen=True)

    brightness: tuple[float, float]
    contrast: tuple[float, float]
    rotation: tuple[float, float]  # degrees
    translate: float  # fraction of the side, both axes
    scale: tuple[float, float]
    shear: tuple[float, float]  # degrees, x shear (torchvision RandomAffine(shear=(a, b)))
    crop_scale: tuple[float, float]  # area fraction; above 1 zooms out (zero padded)
    crop_ratio: tuple[float, float]
    gauge_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # P(0, 1, 2 gauges)
    gauge_scale: tuple[float, float] = (0.8, 1.2)
    gauge_opacity: tuple[float, float] = (0.75, 1.0)
    # Uniform rotation over the full circle instead of `rotation`. Langer et al. 2024 normalises the
    # rotation while cleaning, so +-15 deg suffices there; see PretrainConfig.full_rotation.
    full_rotation: bool = False


# Langer et al. 2024, Table 1, "Pre-training" column.
PRETRAIN_AUG = AugmentParams(
    brightness=(0.5, 1.5),
    contrast=(0.25, 1.75),
    rotation=(-15.0, 15.0),
    translate=0.1,
    scale=(0.8, 1.5),
    shear=(-30.0, 30.0),
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
)

# Langer et al. 2024, Table 1, "Training" column (the linear head).
LINEAR_AUG = AugmentParams(
    brightness=(0.9, 1.1),
    contrast=(0.8, 1.2),
    rotation=(-5.0, 5.0),
    translate=0.02,
    scale=(0.95, 1.1),
    shear=(-10.0, 10.0),
    crop_scale=(0.95, 1.1),
    crop_ratio=(0.9, 1.1),
)


def _uniform(bounds: tuple[float, float], n: int, device, generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


def inverse_affine_theta(
    angle: torch.Tensor, translate: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor
) -> torch.Tensor:
    """(batch, 2, 3) sampling matrices in normalised coordinates for square images.

    The same inverse matrix as torchvision's `_get_inverse_affine_matrix` (rotation about the
    centre, x shear only). `translate` is (batch, 2) as a fraction of the side.
    """
    rot = torch.deg2rad(angle)
    tan_sx = torch.tan(torch.deg2rad(shear))
    a, c = torch.cos(rot), torch.sin(rot)
    b = -(a * tan_sx + torch.sin(rot))
    d = torch.cos(rot) - c * tan_sx
    m = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / scale[:, None, None]
    t = -(m @ (2 * translate).unsqueeze(-1))  # fraction of the side -> normalised units (side = 2)
    return torch.cat([m, t], dim=-1)


def sample_geometry(n: int, params: AugmentParams, device, generator=None) -> torch.Tensor:
    """Per-image RandomResizedCrop followed by RandomAffine, composed into (n, 2, 3) matrices."""
    # Random resized crop: area fraction and aspect ratio as torchvision samples them. Instead
    # of torchvision's rejection loop, a crop wider than the image is allowed and zero padded
    # (Table 1's linear-head crop scale reaches 1.1, i.e. zooming out).
    area = _uniform(params.crop_scale, n, device, generator)
    log_ratio = _uniform((math.log(params.crop_ratio[0]), math.log(params.crop_ratio[1])), n, device, generator)
    ratio = log_ratio.exp()
    crop_w, crop_h = (area * ratio).sqrt(), (area / ratio).sqrt()
    centre_x = 2 * (torch.rand(n, device=device, generator=generator) * (1 - crop_w) + crop_w / 2) - 1
    centre_y = 2 * (torch.rand(n, device=device, generator=generator) * (1 - crop_h) + crop_h / 2) - 1

    bounds = (-180.0, 180.0) if params.full_rotation else params.rotation
    angle = _uniform(bounds, n, device, generator)
    translate = (2 * torch.rand(n, 2, device=device, generator=generator) - 1) * params.translate
    scale = _uniform(params.scale, n, device, generator)
    shear = _uniform(params.shear, n, device, generator)
    affine = inverse_affine_theta(angle, translate, scale, shear)

    # Output -> affine inverse -> crop -> source: source = W (M p + t) + centre.
    crop = torch.stack([crop_w, crop_h], -1).unsqueeze(-1)
    centre = torch.stack([centre_x, centre_y], -1).unsqueeze(-1)
    return torch.cat([crop * affine[..., :2], crop * affine[..., 2:] + centre], dim=-1)


def warp(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample (batch, 1, H, W) through (batch, 2, 3) matrices to (batch, 1, size, size)."""
    shape = [images.shape[0], images.shape[1], size, size]
    grid = F.affine_grid(theta.to(images.dtype), shape, align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def jitter(images: torch.Tensor, params: AugmentParams, generator=None) -> torch.Tensor:
    """Brightness then contrast, per image, with torchvision's formulas (clamped to [0, 1])."""
    n = images.shape[0]
    brightness = _uniform(params.brightness, n, images.device, generator).view(n, 1, 1, 1)
    contrast = _uniform(params.contrast, n, images.device, generator).view(n, 1, 1, 1)
    images = (images * brightness).clamp(0, 1)
    mean = images.mean(dim=(-3, -2, -1), keepdim=True)
    return (contrast * images + (1 - contrast) * mean).clamp(0, 1)


def _disc(dist: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Anti-aliased disc coverage (one pixel of soft edge)."""
    return (radius - dist + 0.5).clamp(0, 1)


def gauge_templates(dist: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Three gauge shapes, (3, ...): solid sphere, ring, ring with centre mark.

    Surgery-planning gauges are metal spheres or rings: bright on the radiograph. Langer et al. 2024
    cut six real ones out of its images; we draw them.
    """
    disc = _disc(dist, radius)
    ring = disc - _disc(dist, 0.55 * radius)
    return torch.stack([disc, ring, ring + _disc(dist, 0.2 * radius)])


def add_gauges(images: torch.Tensor, params: AugmentParams, generator=None) -> torch.Tensor:
    """Paste 0, 1 or 2 bright circular gauges into each image (Langer et al. 2024, Table 1)."""
    n, _, height, width = images.shape
    device = images.device
    u = torch.rand(n, device=device, generator=generator)
    p0, p1, _ = params.gauge_probs
    count = (u >= p0).long() + (u >= p0 + p1).long()
    ys = torch.arange(height, device=device, dtype=images.dtype).view(1, height, 1) + 0.5
    xs = torch.arange(width, device=device, dtype=images.dtype).view(1, 1, width) + 0.5
    for slot in range(2):
        cx = torch.rand(n, 1, 1, device=device, generator=generator) * width
        cy = torch.rand(n, 1, 1, device=device, generator=generator) * height
        scale = _uniform(params.gauge_scale, n, device, generator).view(n, 1, 1)
        radius = GAUGE_RADIUS * min(height, width) * scale
        opacity = _uniform(params.gauge_opacity, n, device, generator).view(n, 1, 1)
        kind = torch.randint(3, (n,), device=device, generator=generator)
        dist = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()
        shape = gauge_templates(dist, radius)[kind, torch.arange(n, device=device)]
        alpha = (opacity * shape * (count > slot).view(n, 1, 1)).unsqueeze(1)
        images = images * (1 - alpha) + alpha
    return images


class BatchAugment(nn.Module):
    """Gauges -> random resized crop + affine (one resampling) -> brightness/contrast.

    Call with a square float tensor (1, S, S) or (batch, 1, S, S) in [0, 1]; returns the same layout
    at `size` x `size`. Pass a `torch.Generator` on the tensor's device for reproducible views.
    """

    def __init__(self, size: int, params: AugmentParams) -> None:
        super().__init__()
        self.size = size
        self.params = params

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        square = batch.dim() == 4 and batch.shape[1] == 1 and batch.shape[2] == batch.shape[3]
        if not square or not batch.is_floating_point():
            raise ValueError(
                f"expected a float tensor (1, S, S) or (B, 1, S, S), got {tuple(images.shape)} {images.dtype}"
            )
        batch = add_gauges(batch, self.params, generator)
        theta = sample_geometry(batch.shape[0], self.params, batch.device, generator)
        batch = jitter(warp(batch, theta, self.size), self.params, generator)
        return batch[0] if single else batch


def make_pretrain_transform(size: int, params: AugmentParams = PRETRAIN_AUG) -> BatchAugment:
    return BatchAugment(size, params)


def make_linear_transform(size: int, params: AugmentParams = LINEAR_AUG) -> BatchAugment:
    return BatchAugment(size, params)


class TwoViews:
    """Two independently augmented views of the same images (SimCLR's positive pair)."""

    def __init__(self, transform: BatchAugment) -> None:
        self.transform = transform

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(images, generator), self.transform(images, generator)
