"""xrayops.upright: the image turned back by its predicted angle (paper 004)."""
from __future__ import annotations

import numpy as np
import pytest

from xrayops.upright import upright_image


def marker_image(size: int = 32) -> np.ndarray:
    """Dark, with a bright bar at the top centre: 'up' is unambiguous."""
    image = np.zeros((size, size), dtype=np.float32)
    image[2:6, size // 2 - 3 : size // 2 + 3] = 1.0
    return image


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_right_angle_turns_are_undone_exactly(k):
    image = marker_image()
    turned = np.rot90(image, k)  # counter-clockwise on screen by 90k degrees, the head's convention
    np.testing.assert_array_equal(upright_image(turned, 90.0 * k), image)
    np.testing.assert_array_equal(upright_image(turned, 90.0 * k + 360.0), image)


def test_a_small_angle_turns_the_bar_back_to_the_top():
    image = marker_image(64)
    from PIL import Image

    turned = np.asarray(Image.fromarray(image, mode="F").rotate(30.0, resample=Image.BILINEAR))  # 30 deg CCW
    back = upright_image(turned, 30.0)
    rows, cols = np.nonzero(back > 0.5)
    assert rows.max() < 10 and abs(cols.mean() - 32) < 2  # the bar is at the top centre again
    wrong = upright_image(turned, -30.0)  # turning the other way doubles the tilt instead
    assert np.abs(wrong - image).sum() > np.abs(back - image).sum() * 2
    assert back.shape == image.shape and back.min() >= 0 and back.max() <= 1


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        upright_image(np.zeros((2, 4, 4)), 10.0)
    with pytest.raises(ValueError, match="finite"):
        upright_image(np.zeros((4, 4)), float("nan"))
