"""The same image gives the same pixels whatever its transfer syntax.

One radiograph-like frame is written in every syntax this environment encodes (tests/syntax_writers.py)
and preprocessed by the production path (decode_for_spec + preprocess_array, through `preprocess`
and through ingestion). Lossless syntaxes must agree within 1/255 (they agree exactly: every syntax is
reduced to the same 5/3 wavelet band); lossy ones may differ from them by their own compression
error only, as it propagates through that band and the file's window.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import make_dataset
from pydicom.uid import generate_uid
from syntax_writers import LOSSLESS, LOSSY, radiograph

from tests.conftest import DICOM_SAMPLES
from xrayops.contracts import PreprocessingSpec
from xrayops.dicom.decode import decode_j2k_reduced, decode_pixels, read_dicom
from xrayops.dicom.pixels import decode_for_spec, preprocess, preprocess_array, reduction_levels, wavelet_reduce

FULL_12 = 4095
WINDOW = {"WindowCenter": 2048, "WindowWidth": 3600}
# name -> (rows, cols, photometric, output size, file window): the reductions k = 1 and k = 2, a
# side that is no multiple of 2^k, MONOCHROME1, and the percentile window as well as a file window.
CASES = {
    "1500x1200-mono2-percentile": (1500, 1200, "MONOCHROME2", 256, {}),
    "1501x1203-mono1-window": (1501, 1203, "MONOCHROME1", 128, WINDOW),
}
# The L1 norm of the 5/3 low-pass, (1 + 2 + 6 + 2 + 1) / 8, per axis and level: the most one
# stored-value error can grow through wavelet_reduce (plus integer rounding, <= 1 per level).
LOW_PASS_L1 = 1.5


def stored(rows: int, cols: int, photometric: str) -> np.ndarray:
    image = radiograph(rows, cols, 12)
    return (FULL_12 - image).astype(np.uint16) if photometric == "MONOCHROME1" else image


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """case name -> every syntax's file of that case, with its spec and original pixels (written once)."""
    cache: dict[str, dict] = {}

    def write_case(case: str) -> dict:
        if case not in cache:
            rows, cols, photometric, size, window = CASES[case]
            pixels = stored(rows, cols, photometric)
            ds = make_dataset(pixels, photometric=photometric, bits_stored=12, **window)
            folder = tmp_path_factory.mktemp(case)
            files = {}
            for name, write in [*LOSSLESS.items(), *((n, w) for n, (w, _) in LOSSY.items())]:
                files[name] = folder / f"{name}.dcm"
                write(ds, files[name])
            spec = PreprocessingSpec(size=size)
            cache[case] = {"case": case, "files": files, "pixels": pixels, "ds": ds, "spec": spec, "window": window}
        return cache[case]

    return write_case


@pytest.mark.parametrize("case", list(CASES))
def test_every_syntax_was_written_and_decodes_to_its_pixels(written, case):
    written = written(case)
    for name, path in written["files"].items():
        ds = read_dicom(path)
        error = np.abs(decode_pixels(ds).astype(int) - written["pixels"]).max()
        if name in LOSSLESS:
            assert error == 0, name
        else:
            assert error > 0, name  # really lossy
            assert LOSSY[name][1] is None or error <= LOSSY[name][1], name
    assert {str(read_dicom(p).file_meta.TransferSyntaxUID) for p in written["files"].values()} >= {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81",
    }  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_lossless_syntaxes_give_the_same_shard(written, case):
    written = written(case)
    spec = written["spec"]
    levels = reduction_levels(written["pixels"].shape, spec.size)
    assert levels >= 1  # the early reduction is exercised
    for name in ("j2k_lossless", "j2k_lossless_gdcm"):  # and JPEG 2000 really is decoded reduced
        ds = read_dicom(written["files"][name])
        assert decode_j2k_reduced(ds, None, levels).shape == decode_for_spec(ds, spec, None).shape
    frames, shards = {}, {}
    for name in LOSSLESS:
        ds = read_dicom(written["files"][name])
        frames[name] = decode_for_spec(ds, spec, None)
        shards[name] = preprocess(ds, spec).astype(int)
        assert shards[name].shape == (spec.size, spec.size) and shards[name].std() > 10
    for a, b in itertools.combinations(LOSSLESS, 2):
        assert np.abs(shards[a] - shards[b]).max() <= 1, (a, b)
        np.testing.assert_array_equal(frames[a], frames[b], err_msg=f"{a} vs {b}")  # the design: one band
    # A caller that decodes whole (preprocess_array on the full frame) gets the same shard too.
    full = preprocess_array(written["pixels"], written["ds"], spec).astype(int)
    np.testing.assert_array_equal(full, shards["explicit_le"])


def test_lossy_syntaxes_differ_by_their_compression_error_only(written):
    """With the file's window (a percentile window would move with the error, unboundedly)."""
    written = written("1501x1203-mono1-window")
    spec, pixels = written["spec"], written["pixels"]
    levels = reduction_levels(pixels.shape, spec.size)
    lossless = preprocess(read_dicom(written["files"]["explicit_le"]), spec).astype(int)
    for name in LOSSY:
        ds = read_dicom(written["files"][name])
        decoded = decode_pixels(ds)
        shard = preprocess(ds, spec).astype(int)
        # The codec's decoding path adds nothing: the same as the decoded pixels, stored natively.
        np.testing.assert_array_equal(shard, preprocess_array(decoded, written["ds"], spec).astype(int))
        # The compression error through the 5/3 band (plus both images' integer rounding, < 1.5 per
        # level each), in stored values, then through the window; + 1 for the output's rounding.
        error = wavelet_reduce(decoded.astype(np.float32) - pixels.astype(np.float32), levels)
        width, rounding = written["window"]["WindowWidth"], 3 * levels
        bound = 1 + 255 * (float(np.abs(error).max()) + rounding) / width
        worst_stored = float(np.abs(decoded.astype(int) - pixels).max())
        loose = 1 + 255 * (LOW_PASS_L1 ** (2 * levels) * worst_stored + rounding) / width  # the filter's worst case
        difference = np.abs(shard - lossless)
        assert difference.max() <= bound <= loose, (name, difference.max(), bound)
        assert difference.max() > 0 or name == "jpegls_near"  # the test sees the loss


def test_monochrome1_gives_the_shard_of_its_monochrome2_twin(written, tmp_path):
    """The inverted storage of one image, with the mirrored window, is the same picture."""
    written = written("1501x1203-mono1-window")
    window = written["window"]
    twin = FULL_12 - written["pixels"]
    mirrored = {"WindowCenter": FULL_12 - window["WindowCenter"], "WindowWidth": window["WindowWidth"]}
    path = tmp_path / "twin.dcm"
    LOSSLESS["j2k_lossless"](make_dataset(twin.astype(np.uint16), photometric="MONOCHROME2", **mirrored), path)
    expected = preprocess(read_dicom(path), written["spec"]).astype(int)
    for name in ("explicit_le", "rle", "j2k_lossless", "jpegls_lossless"):
        shard = preprocess(read_dicom(written["files"][name]), written["spec"]).astype(int)
        assert np.abs(shard - expected).max() <= 1, name


def test_ingestion_keeps_one_lossless_copy_and_the_lossy_ones_close_to_it(tmp_path):
    """Through xrayops.ingest: each copy under its own SOP Instance UID. Every lossless copy decodes to
    the same reduced frame, so all but the first are duplicate_pixels; the lossy copies are kept,
    within 1/255 here (a file window and a quiet codec)."""
    from xrayops.data.manifest import read_manifest
    from xrayops.data.shards import load_shards
    from xrayops.ingest import ingest

    pixels = stored(1500, 1200, "MONOCHROME2")
    source = tmp_path / "source"
    source.mkdir()
    for name, write in [*LOSSLESS.items(), *((n, w) for n, (w, _) in LOSSY.items())]:
        ds = make_dataset(pixels, bits_stored=12, patient_id="P-INVARIANT", sop_uid=generate_uid(), **WINDOW)
        write(ds, source / f"{name}.dcm")
    spec = PreprocessingSpec(size=128)
    summary = ingest(source, tmp_path / "data", spec, "invariance-key")
    manifest = read_manifest(summary.manifest_path)
    assert summary.n_files == len(LOSSLESS) + len(LOSSY)
    assert summary.reasons == {"duplicate_pixels": len(LOSSLESS) - 1}
    kept = manifest[manifest.status == "ok"]
    assert len(kept) == 1 + len(LOSSY)
    shards = load_shards(tmp_path / "data")
    images = [shards[row.shard][row.shard_index] for row in kept.itertuples()]
    reference = preprocess(read_dicom(source / "explicit_le.dcm"), spec).astype(int)
    assert any(np.array_equal(image.astype(int), reference) for image in images)
    for image in images:
        assert np.abs(image.astype(int) - reference).max() <= 1
    duplicates = manifest.pixel_sha256[manifest.reason == "duplicate_pixels"]
    assert duplicates.nunique() == 1 and duplicates.iloc[0] in set(kept.pixel_sha256)


needs_samples = pytest.mark.skipif(not DICOM_SAMPLES.is_dir(), reason=f"real DICOM samples not present at {DICOM_SAMPLES}")
# DICOM WG04's reference radiographs, each stored in several syntaxes by its maker.
WG04_LOSSLESS = {
    "RG2": ["wg04__RG2_UNC", "wg04__RG2_RLE", "wg04__RG2_J2KR", "pylibjpeg-data__RG2_JLSL", "pylibjpeg-data__RG2_JPLL"],
    "RG3": ["wg04__RG3_RLE", "pydicom-data-git__RG3_J2KR", "wg04__RG3_JLSL", "wg04__RG3_JPLL"],
    "XA1": ["wg04__XA1_UNC", "wg04__XA1_RLE", "wg04__XA1_J2KR", "wg04__XA1_JLSL", "wg04__XA1_JPLL"],
}


@needs_samples
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("image", list(WG04_LOSSLESS))
def test_real_reference_images_give_the_same_shard_in_every_lossless_syntax(image):
    spec = PreprocessingSpec(size=256)
    shards = {}
    for name in WG04_LOSSLESS[image]:
        shards[name] = preprocess(read_dicom(DICOM_SAMPLES / "radiographs" / f"{name}.dcm"), spec).astype(int)
    first = next(iter(shards.values()))
    assert first.std() > 10
    for name, shard in shards.items():
        assert np.abs(shard - first).max() <= 1, name


def test_wavelet_reduce_is_idempotent_through_reduction_levels():
    """Whoever reduces first (decode_for_spec or preprocess_array), the other finds nothing to do."""
    for side in (511, 512, 1023, 1024, 1025, 2047, 2048, 4095, 4097):
        levels = reduction_levels((side, 7), 256)
        reduced_side = -(-side // (1 << levels))
        assert reduced_side >= 512 or levels == 0
        assert reduction_levels((reduced_side, 7), 256) == 0
        assert -(-side // (2 << levels)) < 512
