"""THE pixel pipeline: one decoded DICOM frame to a model-ready square image.

`preprocess` is the only function that turns a Dataset into pixels, for ingestion and for
serving alike, so training and inference see identical inputs (docs/architecture.md, contract 2). Each
step is a small function on arrays so it can be tested alone. Intermediate images are float32
in [0, 1] where 1 is bright (bone white, as a radiologist views it).
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from xrayops.contracts import PreprocessingSpec
from xrayops.dicom.decode import MONOCHROME, DicomError, check_pixel_module, decode_frame, frame_index

# An edge row/column is border when at least half of it is at or above the border threshold;
# rotated captures leave white wedges, so "whole row white" would miss them (Langer et al. 2024, Cleaning).
BORDER_LINE_FRACTION = 0.5
# Never crop below a quarter of a side: an image that bright is content, not a frame.
MIN_KEPT_FRACTION = 0.25
# A file window that leaves fewer than 1% of pixels unsaturated misses the data (a header from
# another processing step); such a window is ignored in favour of the percentile window.
MIN_WINDOW_COVERAGE = 0.01
# Percentiles are estimated on a strided sample of about this many pixels (mammograms are 14 Mpx).
PERCENTILE_SAMPLE = 1_000_000
# ITU-R BT.601 luma weights, as in DICOM's YBR_FULL definition (PS3.3 C.7.6.3.1.2).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def preprocess(ds: Dataset, spec: PreprocessingSpec) -> np.ndarray:
    """Decode, window, invert, de-border and resize `ds` to a (spec.size, spec.size) image.

    Raises xrayops.dicom.decode.DicomError when the pixels cannot be decoded.
    """
    check_pixel_module(ds)  # a file without pixels fails as such, before the frame policy
    return preprocess_array(decode_for_spec(ds, spec, frame_index(ds, spec.multiframe)), ds, spec)


def decode_for_spec(ds: Dataset, spec: PreprocessingSpec, index: int | None) -> np.ndarray:
    """Decode frame `index` at the resolution the spec works at, the same pixels whatever the syntax.

    With spec.reduce_early a grayscale frame comes back as the low-pass band of `reduction_levels`
    levels of JPEG 2000's reversible 5/3 wavelet: a reversible JPEG 2000 codestream is decoded at
    that resolution (OpenJPEG skips the finest levels, 3-10x faster), any other syntax is decoded
    whole and `wavelet_reduce` computes the same band with the same integer lifting. A lossless
    image therefore gives identical pixels in every syntax, and a lossy one differs by its own
    compression error only. Irreversible (9/7) and tiled codestreams are decoded whole too: their
    reduced band is another filter's. Colour frames are reduced after luminance, in preprocess_array.
    """
    rows, cols, _ = check_pixel_module(ds)
    levels = 0
    if spec.reduce_early and photometric(ds) in MONOCHROME:
        levels = reduction_levels((rows, cols), spec.size)
    frame = decode_frame(ds, index, reduce=levels)
    if not frame.dtype.isnative:  # explicit VR big endian: the same values, the same bytes to hash
        frame = frame.astype(frame.dtype.newbyteorder("="))
    if not levels:
        return frame
    # The codestream may stop short (fewer levels coded, a level its decoder refuses), and its
    # decoder clips to the codestream's precision (GDCM writes 16 for 12-bit data): clip to Bits Stored.
    done = next((k for k in range(levels + 1) if frame.shape == _reduced_shape(rows, cols, k)), 0)
    return clip_to_range(wavelet_reduce(frame, levels - done), stored_range(ds))


def reduction_levels(shape: tuple[int, ...], size: int) -> int:
    """Largest k whose 1/2^k image keeps a long side >= 2 x `size` (0 for images already that
    small). Defined on ceil(side / 2^k), the wavelet's band size, so applying it to a reduced
    image gives 0: reducing is idempotent, whoever calls it first."""
    long_side, k = max(shape[:2]), 0
    while -(-long_side // (2 << k)) >= 2 * size:
        k += 1
    return k


def preprocess_array(arr: np.ndarray, ds: Dataset, spec: PreprocessingSpec) -> np.ndarray:
    """The steps of `preprocess` after decoding, for callers that decode themselves (ingest keeps
    each decoded frame to hash it, and the "all" frame policy gives several frames per file).

    `arr` may be the frame from decode_for_spec or the whole decoded frame: with spec.reduce_early
    both are reduced to the same 5/3 low-pass band here (a reduced frame is left as it is)."""
    gray = to_grayscale(arr, ds)
    if spec.reduce_early:
        gray = wavelet_reduce(gray, reduction_levels(gray.shape, spec.size), stored_range(ds))
    image = apply_window(gray, ds, spec)
    if spec.invert_monochrome1 and photometric(ds) == "MONOCHROME1":
        image = invert_monochrome1(image)
    if spec.remove_border:
        image = remove_border(image, spec.border_threshold)
    image = resize_with_padding(image, spec.size, spec.keep_aspect, spec.pad_value)
    return to_output_dtype(image, spec.output_dtype)


def wavelet_reduce(values: np.ndarray, levels: int, value_range: tuple[int, int] | None = None) -> np.ndarray:
    """The LL band after `levels` levels of JPEG 2000's reversible 5/3 wavelet (ISO/IEC 15444-1
    Annex F; Le Gall and Tabatabai 1988): a half-size, antialiased image per level.

    Integer frames get the standard's integer lifting, columns then rows as OpenJPEG's encoder
    runs them, so the result equals a JPEG 2000 decode at 1/2^levels bit for bit, including its
    clip to the stored range (`value_range`) and the input dtype. Float data (colour luminance,
    float pixel data) gets the same filter without rounding. levels 0 returns the input.
    """
    if levels <= 0:
        return values
    integer = values.dtype.kind in "uib"
    if integer:  # 16-bit stored values and their sums fit int32
        work, dtype = values, np.dtype(np.int32 if values.dtype.itemsize <= 2 else np.int64)
    else:
        work, dtype = np.where(np.isfinite(values), values, 0.0), np.dtype(np.float32)
    for _ in range(levels):
        work = _low_band(_low_band(work, dtype).T, dtype).T
    if not integer:
        return np.ascontiguousarray(work)
    return clip_to_range(work, value_range, values.dtype if values.dtype.kind != "b" else np.dtype(np.uint8))


def clip_to_range(values: np.ndarray, value_range: tuple[int, int] | None, dtype: np.dtype | None = None) -> np.ndarray:
    """Integer `values` clipped to `value_range` (and to `dtype`'s range), as C-ordered `dtype`."""
    dtype = np.dtype(dtype or values.dtype)
    if dtype.kind not in "ui":
        return values
    info = np.iinfo(dtype)
    lo, hi = value_range if value_range is not None else (info.min, info.max)
    return np.ascontiguousarray(np.clip(values, max(lo, info.min), min(hi, info.max)).astype(dtype, copy=False))


def _low_band(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One 5/3 analysis step along axis 0, low band only, with the standard's symmetric extension.

    Predict d[n] = x[2n+1] - floor((x[2n] + x[2n+2]) / 2), update s[n] = x[2n] + floor((d[n-1] +
    d[n] + 2) / 4); for a float `dtype`, the same without floor and offset. A single sample is kept.
    """
    integer = dtype.kind == "i"
    if x.shape[0] == 1:
        return x.astype(dtype)
    even, odd = x[0::2], x[1::2]
    n_even, n_odd = even.shape[0], odd.shape[0]
    d = np.empty((n_odd, *x.shape[1:]), dtype)
    if n_even > n_odd:
        np.add(even[:n_odd], even[1:], out=d, dtype=dtype)
    else:  # the last odd sample mirrors its left neighbour
        np.add(even[:-1], even[1:], out=d[:-1], dtype=dtype)
        np.multiply(even[-1], 2, out=d[-1], dtype=dtype)
    if integer:
        d >>= 1
    else:
        d *= 0.5
    np.subtract(odd, d, out=d, dtype=dtype)
    s = np.empty((n_even, *x.shape[1:]), dtype)
    np.multiply(d[0], 2, out=s[0])  # d[-1] mirrors d[0]
    np.add(d[:-1], d[1:], out=s[1:n_odd])
    if n_even > n_odd:
        np.multiply(d[-1], 2, out=s[-1])
    if integer:
        s += 2
        s >>= 2
    else:
        s *= 0.25
    np.add(s, even, out=s, dtype=dtype)
    return s


def stored_range(ds: Dataset) -> tuple[int, int] | None:
    """The values Bits Stored and Pixel Representation allow (a JPEG 2000 decoder clips to them)."""
    try:
        bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation") or 0)
    except (AttributeError, TypeError, ValueError):
        return None
    if not 1 <= bits <= 32:
        return None
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _reduced_shape(rows: int, cols: int, levels: int) -> tuple[int, int]:
    step = 1 << levels
    return -(-rows // step), -(-cols // step)


def photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def to_grayscale(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour (RGB, or palette indices through the palette LUT) to luminance; gray passes through."""
    if photometric(ds) == "PALETTE COLOR" and arr.ndim == 2:
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:  # missing or malformed palette LUT descriptors/data
            raise DicomError("unsupported_photometric", "palette colour LUT could not be applied") from exc
    if arr.ndim == 3:
        return arr[..., :3].astype(np.float32) @ LUMA
    return arr


def apply_window(arr: np.ndarray, ds: Dataset, spec: PreprocessingSpec) -> np.ndarray:
    """Modality LUT/rescale, then the file's VOI LUT or window; a percentile window when it has neither.

    Returns float32 in [0, 1]. Colour images have no LUTs and always get the percentile window.
    """
    values = np.asarray(arr)
    if values.dtype.kind == "f":
        values = np.where(np.isfinite(values), values, 0.0)
    if photometric(ds) not in MONOCHROME:
        return percentile_window(values, *spec.percentile_window)
    if spec.apply_modality_lut:
        values = _modality(values, ds)
    if spec.apply_voi_lut:
        windowed = voi_window(values, ds)
        if windowed is not None:
            return windowed
    return percentile_window(values, *spec.percentile_window)


def voi_window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The file's own VOI LUT Sequence or Window Centre/Width (first of several), scaled to [0, 1].

    None when the file has no usable VOI (absent, empty, values pydicom rejects, or a window
    that saturates nearly every pixel).
    """
    use_lut = _has_voi_lut(ds)
    if not use_lut and (ds.get("WindowCenter") is None or ds.get("WindowWidth") is None):
        return None
    if use_lut and values.dtype.kind == "f":
        values = np.rint(values).astype(np.int64)  # a LUT is indexed by integers, after rescale too
    try:
        with warnings.catch_warnings(), np.errstate(over="ignore"):
            warnings.simplefilter("ignore")
            out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            lo, hi = _voi_output_range(ds, use_lut)
    except Exception:  # malformed VOI attributes: fall back to the percentile window
        return None
    if not hi > lo:
        return None
    image = np.clip((np.asarray(out, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    sample = _sample(image)
    if np.mean((sample > 0.0) & (sample < 1.0)) < MIN_WINDOW_COVERAGE:
        return None
    return image


def percentile_window(values: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Robust linear window between two percentiles; a constant image becomes all zeros."""
    values = np.asarray(values, dtype=np.float32)
    sample = _sample(values)
    lo, hi = (float(v) for v in np.percentile(sample, [low_pct, high_pct]))
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def invert_monochrome1(image: np.ndarray) -> np.ndarray:
    """MONOCHROME1 stores bright as low values; flip so that 1 is white in every image."""
    return 1.0 - image


def remove_border(image: np.ndarray, threshold: float) -> np.ndarray:
    """Crop a burnt-in bright frame or collimator shutter from the edges (Langer et al. 2024, Cleaning).

    Trims edge rows and columns whose bright fraction (pixels >= threshold) is at least
    BORDER_LINE_FRACTION, repeating so that rows and columns see each other's trims.
    """
    top, bottom, left, right = 0, image.shape[0], 0, image.shape[1]
    for _ in range(3):
        view = image[top:bottom, left:right] >= threshold
        rows = np.flatnonzero(view.mean(axis=1) < BORDER_LINE_FRACTION)
        cols = np.flatnonzero(view.mean(axis=0) < BORDER_LINE_FRACTION)
        if rows.size == 0 or cols.size == 0:
            return image[top:bottom, left:right]
        new = (top + rows[0], top + rows[-1] + 1, left + cols[0], left + cols[-1] + 1)
        if new == (top, bottom, left, right):
            break
        if (new[1] - new[0]) < MIN_KEPT_FRACTION * image.shape[0] or (
            new[3] - new[2]
        ) < MIN_KEPT_FRACTION * image.shape[1]:
            break
        top, bottom, left, right = new
    return image[top:bottom, left:right]


def resize_with_padding(image: np.ndarray, size: int, keep_aspect: bool = True, pad_value: float = 0.0) -> np.ndarray:
    """Resize to size x size; with keep_aspect, fit the long side and pad the short one (de Cid Rodríguez 2021)."""
    height, width = image.shape
    if keep_aspect:
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    else:
        new_h, new_w = size, size
    # Pillow's bilinear filter widens with the scale factor, so downsizing is antialiased.
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F").resize(
        (new_w, new_h), Image.Resampling.BILINEAR
    )
    canvas = np.full((size, size), pad_value, dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = np.asarray(resized, dtype=np.float32)
    return np.clip(canvas, 0.0, 1.0)


def to_output_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] float to the spec's integer dtype at full scale."""
    full_scale = {"uint8": 255, "uint16": 65535}[dtype]
    return np.round(np.clip(image, 0.0, 1.0) * full_scale).astype(dtype)


def image_statistics(arr: np.ndarray) -> tuple[float, float]:
    """Mean and std in [0, 1] units whatever the dtype, so uint8 and uint16 datasets compare."""
    values = np.asarray(arr)
    scale = float(np.iinfo(values.dtype).max) if values.dtype.kind in "ui" else 1.0
    values = values.astype(np.float64) / scale
    return float(values.mean()), float(values.std())


def _sample(values: np.ndarray) -> np.ndarray:
    """A strided, deterministic sample of about PERCENTILE_SAMPLE pixels."""
    step = max(1, int(np.sqrt(values.size / PERCENTILE_SAMPLE)))
    return values[::step, ::step]


def _modality(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT or rescale; a malformed Modality LUT leaves stored values (the window copes)."""
    try:
        return apply_modality_lut(values, ds)
    except Exception:
        return values


def _has_voi_lut(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    if not seq:
        return False
    item = seq[0]
    return item.get("LUTDescriptor") is not None and item.get("LUTData") is not None


def _voi_output_range(ds: Dataset, use_lut: bool) -> tuple[float, float]:
    """The output range of the VOI transform pydicom applied.

    A LUT's range is its smallest and largest entry (the descriptor's nominal bit depth often
    overstates it). A window maps everything below/above it to pydicom's y_min/y_max, so two
    sentinels far outside any window return exactly those.
    """
    if use_lut:
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        n_entries, first = int(descriptor[0]) or 2**16, int(descriptor[1])
        entries = apply_voi_lut(np.arange(first, first + n_entries), ds, index=0, prefer_lut=True)
        return float(np.min(entries)), float(np.max(entries))
    sentinels = apply_voi_lut(np.array([-1e300, 1e300]), ds, index=0, prefer_lut=False)
    return float(sentinels[0]), float(sentinels[1])
