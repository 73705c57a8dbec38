"""Batched paper-000 augmentations: torchvision-equal geometry, per-image randomness, gauges."""
import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from xrayops.data.augment import (
    LINEAR_AUG,
    PRETRAIN_AUG,
    AugmentParams,
    BatchAugment,
    TwoViews,
    add_gauges,
    inverse_affine_theta,
    jitter,
    make_pretrain_transform,
    sample_geometry,
    warp,
)

torch.set_num_threads(1)

IDENTITY = AugmentParams(
    brightness=(1, 1), contrast=(1, 1), rotation=(0, 0), translate=0.0, scale=(1, 1), shear=(0, 0),
    crop_scale=(1, 1), crop_ratio=(1, 1), gauge_probs=(1, 0, 0),
)


@pytest.mark.parametrize("angle,tx,ty,scale,shear", [(30.0, 3, -2, 1.2, 10.0), (-170.0, 0, 5, 0.8, -25.0), (90.0, -4, 0, 1.5, 30.0)])
def test_affine_matches_torchvision(angle, tx, ty, scale, shear):
    image = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = TF.affine(image, angle=angle, translate=[tx, ty], scale=scale, shear=[shear, 0.0], interpolation=InterpolationMode.BILINEAR)
    theta = inverse_affine_theta(torch.tensor([angle]), torch.tensor([[tx / 32, ty / 32]]), torch.tensor([scale]), torch.tensor([shear]))
    assert torch.allclose(warp(image[None], theta, 32)[0], expected, atol=1e-5)


def test_jitter_matches_torchvision_per_image():
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for b, c in [(1.4, 0.3), (0.6, 1.7)]:
        params = IDENTITY.model_copy(update={"brightness": (b, b), "contrast": (c, c)})
        expected = TF.adjust_contrast(TF.adjust_brightness(images[1], b), c)
        assert torch.allclose(jitter(images, params)[1], expected, atol=1e-6)


def test_identity_parameters_leave_the_image_unchanged():
    images = torch.rand(3, 1, 24, 24)
    assert torch.allclose(BatchAugment(24, IDENTITY)(images), images, atol=1e-5)


def test_each_image_gets_its_own_draw_and_a_seed_reproduces_it():
    images = torch.rand(1, 1, 32, 32).repeat(4, 1, 1, 1)
    augment = make_pretrain_transform(32)
    out = augment(images, torch.Generator().manual_seed(3))
    assert out.shape == (4, 1, 32, 32)
    assert 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out[0], out[1])  # same input, different views
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(3)))
    view_a, view_b = TwoViews(augment)(images, torch.Generator().manual_seed(3))
    assert not torch.allclose(view_a, view_b)


def test_single_image_layout_and_output_size():
    out = make_pretrain_transform(16)(torch.rand(1, 32, 32))
    assert out.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="expected a float tensor"):
        make_pretrain_transform(16)(torch.zeros(2, 3, 8, 8))


def _angles(params: AugmentParams, n: int) -> torch.Tensor:
    theta = sample_geometry(n, params, "cpu", torch.Generator().manual_seed(0))
    return torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0]))


def test_rotation_range_and_full_rotation():
    no_shear = IDENTITY.model_copy(update={"rotation": PRETRAIN_AUG.rotation})
    assert _angles(no_shear, 500).abs().max() <= 15.0 + 1e-4
    full = _angles(no_shear.model_copy(update={"full_rotation": True}), 500)
    assert full.abs().max() > 170 and full.abs().min() < 5


def test_pretraining_crop_zooms_in_more_than_linear_head_crop():
    # Table 1: crop area [0.08, 1] for pretraining vs [0.95, 1.1] for the head.
    only_crop = lambda p: IDENTITY.model_copy(update={"crop_scale": p.crop_scale, "crop_ratio": p.crop_ratio})  # noqa: E731
    area = lambda p: torch.linalg.det(sample_geometry(2000, only_crop(p), "cpu", torch.Generator().manual_seed(0))[:, :, :2])  # noqa: E731
    pre, lin = area(PRETRAIN_AUG), area(LINEAR_AUG)
    assert pre.min() >= 0.08 - 1e-4 and pre.max() <= 1 + 1e-4 and math.isclose(pre.mean().item(), 0.54, abs_tol=0.03)
    assert lin.min() >= 0.95 - 1e-4 and lin.max() <= 1.1 + 1e-4


def test_gauges_are_bright_discs_in_two_thirds_of_images():
    black = torch.zeros(900, 1, 64, 64)
    out = add_gauges(black, PRETRAIN_AUG, torch.Generator().manual_seed(0))
    has_gauge = (out.flatten(1) > 0).any(1).float()
    assert abs(has_gauge.mean().item() - 2 / 3) < 0.05  # P(0 gauges) = 1/3
    peak = out.flatten(1).max(1).values[has_gauge.bool()]
    assert peak.min() >= 0.75 - 1e-6 and peak.max() <= 1.0  # opacity [0.75, 1]
    always_two = add_gauges(black[:50], IDENTITY.model_copy(update={"gauge_probs": (0, 0, 1)}), torch.Generator().manual_seed(1))
    assert (always_two.flatten(1) > 0).any(1).all()
    area = (always_two > 0).flatten(1).sum(1).float()
    assert area.max() <= 2 * math.pi * (0.06 * 64 * 1.2 + 1) ** 2  # never more than two scale-1.2 discs


def test_both_columns_are_paper_000_table_1():
    assert PRETRAIN_AUG.model_dump() == {
        "brightness": (0.5, 1.5), "contrast": (0.25, 1.75), "rotation": (-15.0, 15.0), "translate": 0.1,
        "scale": (0.8, 1.5), "shear": (-30.0, 30.0), "crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3),
        "gauge_probs": (1 / 3, 1 / 3, 1 / 3), "gauge_scale": (0.8, 1.2), "gauge_opacity": (0.75, 1.0),
        "full_rotation": False,
    }
    assert LINEAR_AUG.model_dump() == {
        "brightness": (0.9, 1.1), "contrast": (0.8, 1.2), "rotation": (-5.0, 5.0), "translate": 0.02,
        "scale": (0.95, 1.1), "shear": (-10.0, 10.0), "crop_scale": (0.95, 1.1), "crop_ratio": (0.9, 1.1),
        "gauge_probs": (1 / 3, 1 / 3, 1 / 3), "gauge_scale": (0.8, 1.2), "gauge_opacity": (0.75, 1.0),
        "full_rotation": False,
    }
