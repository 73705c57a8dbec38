"""Read DICOM files and decode one frame of pixels, falling back across decoder backends.

Every failure is a `DicomError` with a short machine `reason` (written to the manifest and
quarantine.csv) and a human `detail`. Details never quote tag values, so they carry no PHI.
"""
from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGExtended12Bit,
)

from xrayops.errors import XrayopsError

try:  # python-gdcm is a declared dependency; the guard keeps decode usable without it.
    import gdcm
except ImportError:  # pragma: no cover - exercised only in broken installs
    gdcm = None

# Largest file we read and largest frame we decode. 1 GiB and 100 Mpx are well above real
# radiographs (a 4664x3064 mammogram is 14 Mpx) and keep one bad file from exhausting memory.
MAX_FILE_BYTES = 1 << 30
MAX_FRAME_PIXELS = 100_000_000

# pylibjpeg first, then GDCM (de Cid Rodríguez 2021 read its DICOMs with GDCM), then the rest.
PLUGIN_ORDER = ("pylibjpeg", "gdcm", "pillow", "pydicom")

# Photometric interpretations decode_pixels returns. YBR_FULL(_422) arrives converted to RGB by
# pydicom; the JPEG 2000 decoders return YBR_ICT/YBR_RCT as RGB.
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")

J2K_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000 lossless / lossy
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",  # HTJ2K
})  # fmt: skip

FramePolicy = Literal["first", "middle", "all", "reject"]


class DicomError(XrayopsError):
    """A file that cannot become an image, with a short `reason` code and a human `detail`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def read_dicom(source: Path | str | bytes) -> Dataset:
    """Parse a DICOM file (Part 10, or raw without preamble and file meta) into a Dataset.

    Raises DicomError: not_dicom, too_large, truncated, read_failed, unreadable.
    """
    data = _read_bytes(source)
    if len(data) > MAX_FILE_BYTES:
        raise DicomError("too_large", f"file is {len(data)} bytes, limit {MAX_FILE_BYTES}")
    has_preamble = data[128:132] == b"DICM"
    if not has_preamble and not _looks_like_raw_dicom(data):
        raise DicomError("not_dicom", "no DICM preamble and no DICOM tag at the start of the file")
    with quiet_pydicom() as caught:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
        except InvalidDicomError as exc:
            raise DicomError("not_dicom", "pydicom rejected the file header") from exc
        except EOFError as exc:
            raise DicomError("truncated", "file ends inside its header") from exc
        except Exception as exc:  # pydicom raises many types on corrupt headers
            raise DicomError("read_failed", f"pydicom could not parse the file ({type(exc).__name__})") from exc
        if any("End of file" in str(w.message) for w in caught) or _has_short_element(ds):
            raise DicomError("truncated", "file ends before its last element is complete")
        if len(ds) == 0:
            raise DicomError("not_dicom", "no data elements")
        _convert_elements(ds)
    _ensure_transfer_syntax(ds)
    return ds


@contextmanager
def quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Collect pydicom's warnings and mute its logger: both can quote tag values (PHI)."""
    logger = logging.getLogger("pydicom")
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        logger.disabled = was_disabled


def decode_pixels(
    ds: Dataset, frame_policy: FramePolicy = "middle", max_pixels: int = MAX_FRAME_PIXELS
) -> np.ndarray:
    """Decode one frame: 2-D for monochrome and palette (LUT indices), (rows, cols, 3) for RGB.

    Tries each available backend in PLUGIN_ORDER, then GDCM directly for 12-bit JPEG Extended
    (pydicom's GDCM plugin refuses it, GDCM itself decodes it). Multi-frame files give the
    first or middle frame, or are rejected, by `frame_policy` ("all" gives the middle frame
    here; `frame_indices` lists every frame for callers that keep them all).

    Raises DicomError: no_pixel_data, invalid_pixel_module, unsupported_photometric,
    multiframe_rejected, too_large, unsupported_transfer_syntax, truncated, decode_failed.
    """
    check_pixel_module(ds, max_pixels)  # a file without pixels fails as such, before the frame policy
    return decode_frame(ds, frame_index(ds, frame_policy), max_pixels)


def decode_frame(ds: Dataset, index: int | None, max_pixels: int = MAX_FRAME_PIXELS, reduce: int = 0) -> np.ndarray:
    """Decode frame `index` (None: single-frame data) after the same checks as decode_pixels.

    `reduce` > 0 asks for JPEG 2000 at 1/2^reduce resolution (shape ceil(rows/2^reduce), ...);
    other syntaxes, or a codestream Pillow's OpenJPEG cannot reduce, are decoded whole.
    """
    rows, cols, spp = check_pixel_module(ds, max_pixels)
    if reduce > 0:
        reduced = decode_j2k_reduced(ds, index, reduce)
        if reduced is not None:
            return reduced
    arr = _decode_with_fallback(ds, index)
    expected = (rows, cols) if spp == 1 else (rows, cols, spp)
    if arr.shape != expected:
        raise DicomError("decode_failed", f"decoded shape {arr.shape}, expected {expected}")
    return arr


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def frame_index(ds: Dataset, frame_policy: FramePolicy) -> int | None:
    """Which frame to decode: None for single-frame data, else per the spec's policy ("all": middle)."""
    n_frames = number_of_frames(ds)
    if n_frames <= 1:
        return None
    if frame_policy == "reject":
        raise DicomError("multiframe_rejected", f"{n_frames} frames and the spec rejects multi-frame")
    return 0 if frame_policy == "first" else n_frames // 2


def frame_indices(ds: Dataset, frame_policy: FramePolicy) -> list[int | None]:
    """Every frame an ingest run keeps: all of them for "all", else the one frame_index picks."""
    if frame_policy == "all" and number_of_frames(ds) > 1:
        return list(range(number_of_frames(ds)))
    return [frame_index(ds, frame_policy)]


def check_pixel_module(ds: Dataset, max_pixels: int = MAX_FRAME_PIXELS) -> tuple[int, int, int]:
    """(rows, columns, samples) of a decodable pixel module, else the DicomError that says why."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError("no_pixel_data", "the dataset has no Pixel Data element")
    rows, cols, spp = _image_geometry(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME + COLOUR:
        raise DicomError("unsupported_photometric", f"photometric interpretation {photometric or 'missing'!r}")
    if rows * cols > max_pixels:
        raise DicomError("too_large", f"{rows}x{cols} frame exceeds {max_pixels} pixels")
    return rows, cols, spp


def _read_bytes(source: Path | str | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DicomError("too_large", f"file is {size} bytes, limit {MAX_FILE_BYTES}")
        return path.read_bytes()
    except OSError as exc:
        raise DicomError("unreadable", f"cannot read file ({type(exc).__name__})") from exc


def _looks_like_raw_dicom(data: bytes) -> bool:
    """A preamble-less file is DICOM if it opens with a group 0002 or 0008 tag (either byte order)."""
    if len(data) < 8:
        return False
    little = int.from_bytes(data[0:2], "little")
    big = int.from_bytes(data[0:2], "big")
    return little in (0x0002, 0x0008) or big in (0x0002, 0x0008)


def _has_short_element(ds: Dataset) -> bool:
    """pydicom silently keeps a value cut off by end of file; its raw length gives it away."""
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF or elem.value is None:
            continue
        if len(elem.value) < elem.length:
            return True
    return False


def _convert_elements(ds: Dataset) -> None:
    """Parse every element now, while pydicom is quiet; drop the ones that cannot be parsed.

    pydicom converts raw elements on first access, which would otherwise warn (quoting values)
    wherever a tag is later read. A malformed element is not worth losing the image for.
    """
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
        except Exception:
            del ds[tag]
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                _convert_elements(item)


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Raw files carry no file meta: record the encoding pydicom parsed them with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit:
        tsyntax = ImplicitVRLittleEndian
    else:
        tsyntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    meta.TransferSyntaxUID = tsyntax


def decode_j2k_reduced(ds: Dataset, index: int | None, reduce: int) -> np.ndarray | None:
    """A grayscale unsigned JPEG 2000 frame decoded at 1/2^reduce resolution by Pillow (OpenJPEG's
    resolution reduction skips the finest wavelet levels), or None when that path does not apply.

    Only reversible (5/3) single-tile codestreams with no image offset are reduced: their low-pass
    band is what xrayops.dicom.pixels.wavelet_reduce computes for every other syntax. An irreversible
    (9/7) band, or tiles, would give other pixels than the same image in another syntax.
    """
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if tsyntax not in J2K_SYNTAXES or int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("PixelRepresentation") or 0):
        return None
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() not in MONOCHROME:
        return None  # palette indices must go through their LUT before any averaging
    rows, cols, _ = _image_geometry(ds)
    try:
        from pydicom.encaps import get_frame

        codestream = get_frame(ds.PixelData, index or 0, number_of_frames=number_of_frames(ds))
        # A raw codestream opens with SOC then SIZ; Ssiz of the first component (byte 42) holds
        # precision - 1 and the sign bit. Pillow scales samples up to its mode's bit depth.
        if codestream[:4] != b"\xff\x4f\xff\x51" or codestream[42] & 0x80 or not _j2k_reducible(codestream):
            return None
        precision = (codestream[42] & 0x7F) + 1
    except Exception:
        return None
    # OpenJPEG cannot skip more levels than the encoder made, and a level the decoder refuses
    # is retried one level up; xrayops.dicom.pixels.decode_for_spec computes the rest itself.
    for levels in range(min(reduce, _j2k_decomposition_levels(codestream)), 0, -1) or (0,):
        arr = _pillow_j2k(codestream, levels, precision)
        step = 1 << levels
        if arr is not None and arr.shape == (-(-rows // step), -(-cols // step)):
            return arr
    return None


def _pillow_j2k(codestream: bytes, levels: int, precision: int) -> np.ndarray | None:
    try:
        with quiet_pydicom(), Image.open(io.BytesIO(codestream)) as image:
            if levels:
                _reduce_to_ceil_size(image, levels)
            image.load()
            depth = {"L": 8, "I;16": 16}.get(image.mode)
            if depth is None or precision > depth:
                return None
            return np.asarray(image) >> (depth - precision)  # Pillow shifted left; exact inverse
    except Exception:  # a codestream Pillow rejects at this level
        return None


def _reduce_to_ceil_size(image: Image.Image, levels: int) -> None:
    """Ask Pillow for the 1/2^levels resolution at OpenJPEG's size, ceil(side / 2^levels).

    Pillow's own `reduce` sizes the image round(side / 2^levels), one short of what OpenJPEG
    decodes for sides just above a multiple of 2^levels, and then fails ("broken data stream").
    This sets the size and the decoder's reduce argument the way Pillow's load() would.
    """
    step, tile = 1 << levels, image.tile[0]
    if len(image.tile) != 1 or not isinstance(tile[3], tuple) or len(tile[3]) != 5:
        image.reduce = levels  # a layout this does not know: Pillow's own sizing
        return
    width, height = image.size
    image._size = (-(-width // step), -(-height // step))
    codec, _, layers, fd, length = tile[3]
    fields = (tile[0], (0, 0, *image.size), tile[2], (codec, levels, layers, fd, length))
    image.tile = [fields if type(tile) is tuple else type(tile)(*fields)]  # Pillow >= 11: a NamedTuple


def _j2k_reducible(codestream: bytes) -> bool:
    """One tile, no image or tile offset, and the reversible 5/3 wavelet (main header)."""
    # SIZ (from byte 8): Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, 4 bytes each.
    width, height, x_off, y_off, tile_w, tile_h, tile_x, tile_y = struct.unpack(">8I", codestream[8:40])
    if x_off or y_off or tile_x or tile_y or tile_w < width or tile_h < height:
        return False
    cod = _main_header_cod(codestream)
    # COD: marker(2) Lcod(2) Scod(1) SGcod(4), SPcod: levels, xcb, ycb, style, transformation (1 = 5/3).
    return cod >= 0 and len(codestream) > cod + 13 and codestream[cod + 13] == 1


def _main_header_cod(codestream: bytes) -> int:
    end = codestream.find(b"\xff\x90")  # SOT: the main header ends here
    return codestream.find(b"\xff\x52", 0, end if end > 0 else len(codestream))


def _j2k_decomposition_levels(codestream: bytes) -> int:
    """Wavelet levels in the main header's COD marker (0 when there is none before the first tile)."""
    cod = _main_header_cod(codestream)
    # COD: marker(2) Lcod(2) Scod(1) SGcod(4), then SPcod whose first byte is the level count.
    return codestream[cod + 9] if cod >= 0 and len(codestream) > cod + 9 else 0


def _image_geometry(ds: Dataset) -> tuple[int, int, int]:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomError("invalid_pixel_module", "Rows, Columns or Bits Allocated missing or invalid") from exc
    if rows <= 0 or cols <= 0 or bits <= 0 or spp not in (1, 3):
        raise DicomError("invalid_pixel_module", f"rows={rows} cols={cols} bits={bits} samples={spp}")
    return rows, cols, spp


def _decode_with_fallback(ds: Dataset, index: int | None) -> np.ndarray:
    tsyntax = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise DicomError("unsupported_transfer_syntax", f"no decoder for {tsyntax.name}") from exc
    if decoder.is_native:
        plugins: list[str] = [""]
    else:
        available = decoder.available_plugins
        plugins = [p for p in PLUGIN_ORDER if p in available] + [p for p in available if p not in PLUGIN_ORDER]
    failures: list[str] = []
    for plugin in plugins:
        try:
            with quiet_pydicom():
                return pixel_array(ds, index=index, decoding_plugin=plugin)
        except Exception as exc:  # each backend raises its own types; try the next one
            if "less than expected" in str(exc):
                raise DicomError("truncated", "pixel data is shorter than rows x columns x frames") from exc
            message = _last_line(exc)  # pydicom already prefixes its plugin's name
            failures.append(message if plugin and message.startswith(plugin) else f"{plugin or 'native'}: {message}")
    if tsyntax == JPEGExtended12Bit and int(ds.get("SamplesPerPixel") or 1) == 1:
        try:
            return decode_with_gdcm(ds, index or 0)
        except Exception as exc:
            failures.append(f"gdcm-direct: {_last_line(exc)}")
    if not plugins:
        raise DicomError("decode_failed", f"no decoder is installed for {tsyntax.name}")
    # The backends' own messages go to the debug log; the quarantine row says it in product words.
    logging.getLogger(__name__).debug("decode backends failed: %s", "; ".join(failures)[:500])
    tried = ", ".join(dict.fromkeys(f.split(":", 1)[0] for f in failures))
    raise DicomError(
        "decode_failed",
        f"no decoder could read the {tsyntax.name} pixel data (tried {tried}): the compressed data is damaged "
        "or uses a feature they do not support",
    )


def _last_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def decode_with_gdcm(ds: Dataset, index: int = 0) -> np.ndarray:
    """Decode one encapsulated grayscale frame with GDCM itself, bypassing pydicom's plugin checks."""
    if gdcm is None:
        raise RuntimeError("python-gdcm is not installed")
    from pydicom.encaps import get_frame

    rows, cols, _ = _image_geometry(ds)
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation") or 0)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(get_frame(ds.PixelData, index, number_of_frames=n_frames))
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((cols, rows, 1))
    image.SetDataElement(element)
    pi_type = gdcm.PhotometricInterpretation.GetPIType(str(ds.PhotometricInterpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    ts_type = gdcm.TransferSyntax.GetTSType(str(ds.file_meta.TransferSyntaxUID))
    image.SetTransferSyntax(gdcm.TransferSyntax(ts_type))
    image.SetPixelFormat(gdcm.PixelFormat(1, bits_allocated, bits_stored, bits_stored - 1, signed))
    buffer = image.GetBuffer()
    if buffer is None:
        raise RuntimeError("GDCM returned no pixels")
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    raw = buffer.encode("utf-8", "surrogateescape")  # GDCM hands back char* as str
    if len(raw) < rows * cols * dtype.itemsize:
        raise RuntimeError("GDCM returned fewer bytes than the frame needs")
    return np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols).copy()


# Transfer syntaxes whose pixels may have lost information: JPEG baseline/extended, JPEG-LS
# near-lossless, JPEG 2000 (irreversible), HTJ2K (may be irreversible), and the video syntaxes.
LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102",
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105",
    "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108",
})  # fmt: skip


def is_lossy(ds: Dataset) -> bool:
    """The image has been lossy compressed at some point (LossyImageCompression 01), or is stored so."""
    try:
        flagged = str(ds.get("LossyImageCompression", "") or "").strip() == "01"
    except Exception:
        flagged = False
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    return flagged or syntax in LOSSY_SYNTAXES
