"""One radiograph written in every transfer syntax this environment can encode, with real encoders.

pydicom 3 writes the native encodings (explicit/implicit VR little endian, explicit VR big endian,
deflate) and encodes RLE and JPEG 2000 (pylibjpeg-openjpeg); GDCM's own codecs encode JPEG-LS
(lossless and near-lossless), JPEG Lossless process 14 and a second JPEG 2000 lossless codestream.
pydicom has no HTJ2K or JPEG-LS encoder without pyjpegls, which is not a dependency.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import gdcm
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from xrayops.data.phantoms import draw_region

# JPEG-LS near-lossless: every stored value within NEAR of the original (ISO 14495-1).
JPEGLS_NEAR = 3
# JPEG 2000 lossy compression ratio: visibly lossy on noisy 12-bit data, as archives use it.
J2K_LOSSY_RATIO = 20


def radiograph(rows: int = 1500, cols: int = 1200, bits: int = 12, seed: int = 0, region: str = "knee") -> np.ndarray:
    """A radiograph-like frame: an anatomical phantom with quantum noise, bright collimator shutters
    on two sides (hard edges that border removal crops) and a burnt-in side marker."""
    rng = np.random.default_rng(seed)
    base = draw_region(region, rng, 512)
    image = np.asarray(Image.fromarray(base, mode="F").resize((cols, rows), Image.Resampling.BILINEAR))
    full = 2**bits - 1
    signal = 0.08 + 0.8 * image
    noisy = signal * full + rng.normal(0.0, 0.006 * full, size=image.shape) * np.sqrt(signal)
    shutter = max(8, cols // 25)
    noisy[:, :shutter] = noisy[:, -shutter:] = 0.97 * full
    noisy[rows // 10 : rows // 10 + rows // 30, cols // 8 : cols // 8 + cols // 40] = full  # "L" marker
    return np.clip(np.rint(noisy), 0, full).astype(np.uint16)


def _native(tsyntax) -> Callable[[Dataset, Path], None]:
    def write(ds: Dataset, path: Path) -> None:
        ds = _copy(ds)
        if tsyntax == ExplicitVRBigEndian:  # pydicom writes big endian data as given
            bits = int(ds.BitsAllocated)
            ds.PixelData = np.frombuffer(ds.PixelData, dtype=f"<u{bits // 8}").astype(f">u{bits // 8}").tobytes()
        ds.file_meta.TransferSyntaxUID = tsyntax
        dcmwrite(path, ds, enforce_file_format=True)

    return write


def _pydicom_encoder(tsyntax, **kwargs) -> Callable[[Dataset, Path], None]:
    def write(ds: Dataset, path: Path) -> None:
        ds = _copy(ds)
        ds.compress(tsyntax, generate_instance_uid=False, **kwargs)
        dcmwrite(path, ds, enforce_file_format=True)

    return write


def _gdcm_encoder(ts_type: int, near: int | None = None) -> Callable[[Dataset, Path], None]:
    """Transcode the native file with GDCM (ImageChangeTransferSyntax and its codecs)."""

    def write(ds: Dataset, path: Path) -> None:
        native = path.with_suffix(".native.dcm")
        _native(ds.file_meta.TransferSyntaxUID)(ds, native)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(native))
        if not reader.Read():
            raise RuntimeError("GDCM could not read the native file")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(ts_type))
        if near is not None:
            codec = gdcm.JPEGLSCodec()
            codec.SetLossless(False)
            codec.SetLossyError(near)
            change.SetUserCodec(codec)
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError("GDCM could not encode the image")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError("GDCM could not write the file")
        native.unlink()

    return write


TS = gdcm.TransferSyntax
# name -> writer(dataset, path); the dataset is native explicit VR little endian.
LOSSLESS: dict[str, Callable[[Dataset, Path], None]] = {
    "explicit_le": _native(ExplicitVRLittleEndian),
    "implicit_le": _native(ImplicitVRLittleEndian),
    "explicit_be": _native(ExplicitVRBigEndian),
    "deflated_le": _native(DeflatedExplicitVRLittleEndian),
    "rle": _pydicom_encoder(RLELossless, encoding_plugin="pylibjpeg"),
    "j2k_lossless": _pydicom_encoder(JPEG2000Lossless),
    "j2k_lossless_gdcm": _gdcm_encoder(TS.JPEG2000Lossless),
    "jpegls_lossless": _gdcm_encoder(TS.JPEGLSLossless),
    "jpeg_lossless_sv1": _gdcm_encoder(TS.JPEGLosslessProcess14_1),
    "jpeg_lossless": _gdcm_encoder(TS.JPEGLosslessProcess14),
}  # fmt: skip
# name -> (writer, largest error of one stored value, or None when the codec bounds none).
LOSSY: dict[str, tuple[Callable[[Dataset, Path], None], int | None]] = {
    "j2k_lossy": (_pydicom_encoder(JPEG2000, j2k_cr=[J2K_LOSSY_RATIO]), None),
    "jpegls_near": (_gdcm_encoder(TS.JPEGLSNearLossless, near=JPEGLS_NEAR), JPEGLS_NEAR),
}


def _copy(ds: Dataset) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(ds)
