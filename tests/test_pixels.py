"""The shared pixel pipeline: windowing against pydicom, inversion, border removal, resizing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import make_dataset, ramp, to_bytes
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from xrayops.contracts import PreprocessingSpec
from xrayops.dicom.contact_sheet import LABEL_HEIGHT, contact_sheet
from xrayops.dicom.decode import DicomError, decode_frame, decode_j2k_reduced, decode_pixels, read_dicom
from xrayops.dicom.pixels import (
    apply_window,
    image_statistics,
    invert_monochrome1,
    percentile_window,
    decode_for_spec,
    preprocess,
    preprocess_array,
    reduction_levels,
    remove_border,
    resize_with_padding,
    to_grayscale,
    to_output_dtype,
    wavelet_reduce,
)
from tests.conftest import DICOM_SAMPLES

SAMPLES = DICOM_SAMPLES
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"real DICOM samples not present at {SAMPLES}")
SPEC = PreprocessingSpec()


def test_window_centre_width_follows_the_dicom_linear_function():
    pixels = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    ds = make_dataset(pixels, WindowCenter=2048, WindowWidth=1024)
    out = apply_window(pixels, ds, SPEC)
    assert out.dtype == np.float32
    assert out[pixels <= 1535].max() == 0.0
    assert out[pixels > 2560].min() == 1.0
    inside = (pixels > 1600) & (pixels < 2500)
    # PS3.3 C.11.2.1.2: ((x - (c - 0.5)) / (w - 1) + 0.5), on 0..1
    expected = ((pixels[inside] - 2047.5) / 1023 + 0.5).astype(np.float32)
    np.testing.assert_allclose(out[inside], expected, atol=1e-5)


def test_rescale_is_applied_before_the_window():
    pixels = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    # stored 0..4095 -> HU -1024..3071; a window of 40/400 sits on stored 864..1264
    ds = make_dataset(pixels, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    out = apply_window(pixels, ds, SPEC)
    assert out[pixels < 860].max() == 0.0 and out[pixels > 1270].min() == 1.0
    assert 0.45 < out[pixels == 1064].item() < 0.55


def test_voi_lut_sequence_is_scaled_by_its_own_range():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = make_dataset(pixels)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]  # nominal 16 bit, but entries only reach 1000
    item.LUTData = [min(1000, 4 * v) for v in range(256)]
    ds.VOILUTSequence = [item]
    out = apply_window(pixels, ds, SPEC)
    np.testing.assert_allclose(out.ravel(), np.minimum(1000, 4 * np.arange(256)) / 1000, atol=1e-6)


def test_no_voi_gives_the_percentile_window():
    pixels = ramp(64, 64)
    out = apply_window(pixels, make_dataset(pixels), SPEC)
    low, high = np.percentile(pixels, SPEC.percentile_window)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out == 0.0) == pytest.approx(np.mean(pixels <= low), abs=0.01)
    assert np.mean(out == 1.0) == pytest.approx(np.mean(pixels >= high), abs=0.01)


def test_window_that_misses_the_data_falls_back_to_percentiles():
    pixels = ramp(64, 64) + 30000  # window below the data: every pixel would be white
    ds = make_dataset(pixels.astype(np.uint16), bits_stored=16, WindowCenter=100, WindowWidth=50)
    out = apply_window(pixels, ds, SPEC)
    assert 0.3 < out.mean() < 0.7


def test_constant_image_becomes_zeros_not_nan():
    out = percentile_window(np.full((10, 10), 7, dtype=np.uint16), 0.5, 99.5)
    assert np.all(out == 0.0)


def test_monochrome1_is_inverted():
    pixels = ramp(32, 32)
    spec = PreprocessingSpec(size=32, remove_border=False)
    mono2 = preprocess(read_dicom(to_bytes(make_dataset(pixels, photometric="MONOCHROME2"))), spec)
    mono1 = preprocess(read_dicom(to_bytes(make_dataset(pixels, photometric="MONOCHROME1"))), spec)
    np.testing.assert_allclose(mono1.astype(int), 255 - mono2.astype(int), atol=1)
    assert mono2[0, 0] < 10 and mono1[0, 0] > 245
    keep = PreprocessingSpec(size=32, remove_border=False, invert_monochrome1=False)
    np.testing.assert_array_equal(preprocess(read_dicom(to_bytes(make_dataset(pixels, photometric="MONOCHROME1"))), keep), mono2)
    np.testing.assert_allclose(invert_monochrome1(np.array([0.0, 0.25, 1.0])), [1.0, 0.75, 0.0])


@needs_samples
def test_real_monochrome1_chest_shows_bright_spine_and_dark_lungs():
    ds = read_dicom(SAMPLES / "radiographs" / "dwv__gdcm-CR-MONO1-10-chest.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"

    def spine_and_lungs(a):
        h, w = a.shape
        band = a[int(h * 0.3) : int(h * 0.6)].astype(float)
        return band[:, int(w * 0.45) : int(w * 0.55)].mean(), band[:, int(w * 0.2) : int(w * 0.3)].mean()

    raw_spine, raw_lung = spine_and_lungs(decode_pixels(ds))
    out_spine, out_lung = spine_and_lungs(preprocess(ds, SPEC))
    assert raw_spine < raw_lung  # MONOCHROME1 stores bone as low values
    assert out_spine > out_lung + 40  # after inversion bone is bright


def test_remove_border_crops_a_bright_frame():
    image = np.full((100, 80), 1.0, dtype=np.float32)
    image[10:90, 5:70] = 0.3
    cropped = remove_border(image, 0.92)
    assert cropped.shape == (80, 65)
    assert cropped.max() == pytest.approx(0.3)


def test_remove_border_trims_rotated_capture_wedges():
    yy, xx = np.mgrid[0:120, 0:120]
    # a square rotated 45 degrees inside a white canvas: the corners are white wedges
    image = np.where(np.abs(xx - 60) + np.abs(yy - 60) < 60, 0.4, 1.0).astype(np.float32)
    cropped = remove_border(image, 0.92)
    assert cropped.shape[0] < 100 and cropped.shape[1] < 100
    assert (cropped >= 0.92).mean() < (image >= 0.92).mean()


def test_remove_border_keeps_content_and_all_bright_images():
    image = np.full((50, 50), 0.2, dtype=np.float32)
    image[25, :] = 1.0  # a bright line inside the image is content
    assert remove_border(image, 0.92).shape == (50, 50)
    bright = np.ones((50, 50), dtype=np.float32)
    assert remove_border(bright, 0.92).shape == (50, 50)


def test_resize_with_padding_keeps_aspect_and_centres():
    image = np.ones((100, 50), dtype=np.float32)
    out = resize_with_padding(image, 64, keep_aspect=True, pad_value=0.0)
    assert out.shape == (64, 64)
    assert np.all(out[:, 16:48] == pytest.approx(1.0)) and np.all(out[:, :16] == 0.0) and np.all(out[:, 48:] == 0.0)
    stretched = resize_with_padding(image, 64, keep_aspect=False)
    assert np.all(stretched == pytest.approx(1.0))


def test_output_dtype_scaling():
    image = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_output_dtype(image, "uint8"), [[0, 128, 255]])
    np.testing.assert_array_equal(to_output_dtype(image, "uint16"), [[0, 32768, 65535]])


@pytest.mark.parametrize("size, dtype", [(64, "uint8"), (32, "uint16")])
def test_preprocess_returns_spec_size_and_dtype(size, dtype):
    ds = read_dicom(to_bytes(make_dataset(ramp(48, 40))))
    out = preprocess(ds, PreprocessingSpec(size=size, output_dtype=dtype))
    assert out.shape == (size, size) and out.dtype == np.dtype(dtype)


def test_rgb_becomes_luminance():
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green
    ds = make_dataset(rgb, photometric="RGB")
    gray = to_grayscale(decode_pixels(read_dicom(to_bytes(ds))), ds)
    assert gray.shape == (20, 30)
    np.testing.assert_allclose(gray, 0.587 * 200, rtol=1e-5)
    assert preprocess(read_dicom(to_bytes(ds)), SPEC).shape == (64, 64)


def test_palette_without_its_lut_is_a_dicom_error():
    ds = make_dataset(ramp(bits=8), photometric="PALETTE COLOR", bits_stored=8)
    with pytest.raises(DicomError) as info:
        preprocess(read_dicom(to_bytes(ds)), SPEC)
    assert info.value.reason == "unsupported_photometric"


def test_image_statistics_in_unit_range():
    mean, std = image_statistics(np.array([[0, 255]], dtype=np.uint8))
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.5)
    mean16, _ = image_statistics(np.array([[0, 65535]], dtype=np.uint16))
    assert mean16 == pytest.approx(0.5)


@needs_samples
def test_palette_colour_sample_becomes_grayscale():
    ds = read_dicom(SAMPLES / "other" / "pydicom-data-git__gdcm-US-ALOKA-16_big.dcm")
    out = preprocess(ds, SPEC)
    assert out.shape == (64, 64) and 10 < out.mean() < 200


def test_contact_sheet_has_the_grid_size(tmp_path):
    arrays = [np.full((16, 16), v, dtype=np.uint8) for v in (0, 64, 128, 192, 255)]
    path = contact_sheet(arrays, [f"tile {i}" for i in range(5)], tmp_path / "sheet.png", columns=3, scale=2)
    with Image.open(path) as sheet:
        assert sheet.size == (3 * 32, 2 * (32 + LABEL_HEIGHT))
        assert sheet.getpixel((40, 5)) == 64  # second tile's pixels


@needs_samples
def test_contact_sheet_of_real_radiographs(tmp_path):
    names = [
        "dwv__gdcm-CR-MONO1-10-chest.dcm",
        "orthanc__KarstenHilbertRF.dcm",
        "wg04__XA1_JPLY.dcm",
        "wg04__RG3_JPLY.dcm",
        "pydicom-data-git__RG3_J2KI.dcm",
        "covid-chest-imaging-database__1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",
    ]
    arrays = [preprocess(read_dicom(SAMPLES / "radiographs" / n), SPEC) for n in names]
    for array in arrays:
        assert array.shape == (64, 64) and array.std() > 10
    path = contact_sheet(arrays, [n.split("__")[-1][:12] for n in names], tmp_path / "radiographs.png", columns=3)
    with Image.open(path) as sheet:
        assert sheet.size == (3 * 128, 2 * (128 + LABEL_HEIGHT))


# pydicom's reference cannot be computed (broken Modality LUT descriptor), or its window maps
# every pixel to one value (ours then falls back to the percentile window).
NO_REFERENCE = {
    "other/dwv__leadtools-8BitsJpegLossyGrayScale.dcm", "other/dwv__leadtools-flowers-16-mono2-rle.dcm",
    "radiographs/pylibjpeg-data__JPEG2KLossless_1s_1f_u_16_16.dcm",
}  # fmt: skip


@needs_samples
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_real_grayscale_sample_matches_pydicom_reference_and_the_early_reduction():
    """Per file: our window vs pydicom's apply_modality_lut + apply_voi_lut at full resolution
    (the same function where the file has a VOI, its percentile window where it has none), and
    the production path (reduce_early, JPEG 2000 at reduced resolution) vs the full-resolution one."""
    checked, failures = 0, []
    for path in sorted(SAMPLES.rglob("*.dcm")):
        name = path.relative_to(SAMPLES).as_posix()
        ds = read_dicom(path)
        try:
            stored = decode_pixels(ds)
        except DicomError:
            continue  # the broken codestream; test_dicom_decode covers it
        if not str(ds.PhotometricInterpretation).startswith("MONOCHROME") or name in NO_REFERENCE:
            continue
        reference = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
        ours = apply_window(stored, ds, SPEC).astype(np.float64)
        has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
        corr = np.corrcoef(ours.ravel(), reference.ravel())[0, 1]
        if not (0.0 <= ours.min() and ours.max() <= 1.0) or corr < (0.999 if has_voi else 0.98):
            failures.append((name, "reference", round(corr, 4)))
        if name.startswith("radiographs/"):
            early = preprocess(ds, SPEC).astype(float)
            full = preprocess_array(stored, ds, PreprocessingSpec(reduce_early=False)).astype(float)
            # same picture; borders found on the smaller image may differ by a pixel row or column
            if np.abs(early - full).mean() > 12 or np.corrcoef(early.ravel(), full.ravel())[0, 1] < 0.9:
                failures.append((name, "reduce_early", round(float(np.abs(early - full).mean()), 2)))
        checked += 1
    assert checked >= 50 and failures == []


@needs_samples
@pytest.mark.parametrize("name", ["wg04__RG2_J2KR.dcm", "pydicom-data-git__RG3_J2KR.dcm", "pylibjpeg-data__966_fixed.dcm"])
def test_reduced_jpeg2000_decoding_is_the_5_3_low_pass_band_bit_for_bit(name):
    ds = read_dicom(SAMPLES / "radiographs" / name)
    full = decode_pixels(ds)
    # 10- and 12-bit codestreams: Pillow scales samples to 16 bits; the decoder undoes it exactly
    np.testing.assert_array_equal(decode_j2k_reduced(ds, None, 0), full)
    for levels in (1, 2, 3):
        reduced = decode_j2k_reduced(ds, None, levels)
        np.testing.assert_array_equal(reduced, wavelet_reduce(full, levels, (0, 2 ** int(ds.BitsStored) - 1)))


@needs_samples
@pytest.mark.parametrize("name", ["wg04__RG2_J2KI.dcm", "wg04__MG1_J2KI.dcm"])
def test_irreversible_jpeg2000_is_not_decoded_at_reduced_resolution(name):
    """A 9/7 low-pass band is not the 5/3 band every other syntax gets: such files are decoded whole."""
    ds = read_dicom(SAMPLES / "radiographs" / name)
    assert decode_j2k_reduced(ds, None, 2) is None
    frame = decode_for_spec(ds, PreprocessingSpec(size=256), None)
    full = decode_pixels(ds)
    levels = reduction_levels(full.shape, 256)
    assert levels >= 1
    np.testing.assert_array_equal(frame, wavelet_reduce(full, levels, (0, 2 ** int(ds.BitsStored) - 1)))


@needs_samples
def test_reduced_jpeg2000_falls_back_to_fewer_levels_when_a_deep_level_fails(monkeypatch):
    import xrayops.dicom.decode as decode

    ds = read_dicom(SAMPLES / "radiographs" / "wg04__RG2_J2KR.dcm")
    full = decode_pixels(ds)
    real = decode._pillow_j2k
    tried = []

    def fails_below_half(codestream, levels, precision):  # Pillow's "broken data stream" at deep levels
        tried.append(levels)
        return None if levels > 1 else real(codestream, levels, precision)

    monkeypatch.setattr(decode, "_pillow_j2k", fails_below_half)
    reduced = decode_j2k_reduced(ds, None, 3)
    assert tried == [3, 2, 1]
    assert reduced.shape == (-(-full.shape[0] // 2), -(-full.shape[1] // 2))
    # decode_for_spec computes the levels the decoder did not. The same band as a full decode, but
    # for the decoder's clip to 0..1023 at level 1 where the 5/3 filter overshoots a hard edge
    spec = PreprocessingSpec(size=128)
    expected = wavelet_reduce(full, reduction_levels(full.shape, 128), (0, 1023)).astype(int)
    diff = np.abs(decode_for_spec(ds, spec, None).astype(int) - expected)
    assert diff.max() <= 2 and np.mean(diff > 0) < 0.001
    monkeypatch.setattr(decode, "_pillow_j2k", lambda *a: None)
    assert decode_j2k_reduced(ds, None, 3) is None  # then the full decoders take over
    out = decode_frame(ds, None, reduce=3)
    np.testing.assert_array_equal(out, full)


def test_reduced_decoding_does_not_apply_to_other_syntaxes_or_signed_data():
    ds = read_dicom(to_bytes(make_dataset(ramp(64, 64))))
    assert decode_j2k_reduced(ds, None, 2) is None  # native data: decoded whole, then wavelet_reduce
    out = decode_frame(ds, None, reduce=2)
    assert out.shape == (64, 64)


def _low_band_reference(x: list[int]) -> list[int]:
    """ISO/IEC 15444-1 F.3.8.2 (1D_SD, 5/3 reversible), sample by sample, with symmetric extension."""
    n = len(x)
    if n == 1:
        return list(x)
    def ext(i: int) -> int:  # whole-sample symmetric: period 2(n - 1), mirrored about 0 and n - 1
        i = abs(i) % (2 * (n - 1))
        return x[2 * (n - 1) - i] if i >= n else x[i]

    d = {i: ext(i) - (ext(i - 1) + ext(i + 1)) // 2 for i in range(-1, n + 1) if i % 2}
    return [x[i] + (d[i - 1] + d[i + 1] + 2) // 4 for i in range(0, n, 2)]


@pytest.mark.parametrize("shape", [(1, 5), (2, 3), (7, 4), (9, 12), (33, 17)])
def test_wavelet_reduce_follows_the_standard_lifting_columns_then_rows(shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 4096, shape).astype(np.uint16)
    columns = np.array([_low_band_reference(list(map(int, col))) for col in pixels.T]).T
    expected = np.array([_low_band_reference(list(map(int, row))) for row in columns])
    got = wavelet_reduce(pixels, 1, (0, 2**16 - 1))
    assert got.dtype == np.uint16 and got.shape == (-(-shape[0] // 2), -(-shape[1] // 2))
    np.testing.assert_array_equal(got, np.clip(expected, 0, 2**16 - 1))


def test_wavelet_reduce_keeps_flat_and_linear_images_and_clips_overshoot_to_the_stored_range():
    flat = np.full((37, 50), 1234, np.uint16)
    np.testing.assert_array_equal(wavelet_reduce(flat, 3), np.full((5, 7), 1234))
    y, x = np.mgrid[0:64, 0:64]
    ramp_image = (10 * x + 3 * y).astype(np.float32)
    reduced = wavelet_reduce(ramp_image, 1)  # a low-pass with unit gain passes a ramp (inside)
    np.testing.assert_allclose(reduced[1:-1, 1:-1], ramp_image[2:-2:2, 2:-2:2], atol=1e-3)
    edge = np.zeros((16, 16), np.uint16)
    edge[:, 8:] = 4095  # a hard edge: the 5/3 filter overshoots both ways
    clipped = wavelet_reduce(edge, 1, (0, 4095))
    assert clipped.min() == 0 and clipped.max() == 4095
    assert wavelet_reduce(edge.astype(np.int32), 1).min() < 0  # without a stored range it would not


def test_wavelet_reduce_float_and_integer_agree_within_rounding():
    pixels = np.random.default_rng(3).integers(0, 4096, (301, 203)).astype(np.uint16)
    integer = wavelet_reduce(pixels, 2).astype(np.float64)
    floating = wavelet_reduce(pixels.astype(np.float32), 2).astype(np.float64)
    assert np.abs(integer - floating).max() <= 3.0  # floor rounding, < 1.5 per level
    nan = pixels.astype(np.float32)
    nan[5, 5] = np.nan
    assert np.isfinite(wavelet_reduce(nan, 1)).all()  # non-finite float pixels do not spread


def test_colour_frames_are_decoded_whole_and_reduced_after_luminance():
    rgb = np.random.default_rng(0).integers(0, 256, (600, 520, 3)).astype(np.uint8)
    ds = read_dicom(to_bytes(make_dataset(rgb, photometric="RGB")))
    spec = PreprocessingSpec(size=64)
    assert decode_for_spec(ds, spec, None).shape == (600, 520, 3)
    out = preprocess(ds, spec)
    expected = preprocess_array(rgb, ds, PreprocessingSpec(size=64, reduce_early=False))
    assert out.shape == (64, 64) and np.abs(out.astype(int) - expected.astype(int)).mean() < 8
