"""The DICOM transformer: DICOM files in, model-ready pixels out.

`decode_dicoms` is the one DICOM step of serving. It parses with `xrayops.dicom.decode.read_dicom`,
checks the header against the serving limits (size, frames) BEFORE any pixel is decoded, and
turns pixels into the model input with `xrayops.dicom.pixels.preprocess`, the function
ingestion used (docs/architecture.md, contract 2). Identifiers leave it pseudonymised (`safe_metadata`).

Locally `serving.model.XrayModel` calls it in-process. On a cluster `DicomTransformer` runs it
in the transformer pod and forwards `pixels` (+ `dicom_region`, `image_meta`) to the predictor
pod over the Open Inference Protocol (kserve's `predictor_host` client); the predictor never
sees a DICOM file, so PHI stays in the transformer. The predictor's payload logger therefore
logs pseudonymised data only; the transformer has no logger.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kserve import InferInput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import RequestedOutput
from prometheus_client import Counter
from pydicom.dataset import Dataset

from serving.errors import PayloadTooLarge, UnsupportedMedia
from serving.schema import (
    INPUT_DICOM_REGION,
    INPUT_IMAGE_META,
    INPUT_PIXELS,
    OUTPUT_EMBEDDING,
    OUTPUT_SR,
    PARAM_EMBEDDING,
    PARAM_GRADCAM,
    PARAM_UPRIGHT,
    ImageBatch,
    ServedResponse,
    decode_v1,
    decode_v2,
    encode_v1,
    encode_v2,
    parse_infer_response,
)
from xrayops.bundle_meta import verify_bundle
from xrayops.contracts import PreprocessingSpec
from xrayops.dicom.admission import Admission, admit
from xrayops.dicom.decode import DicomError, read_dicom
from xrayops.dicom.deid import safe_metadata
from xrayops.dicom.labels import region_from_dataset
from xrayops.dicom.pixels import preprocess
from xrayops.refusals import not_applicable, with_refusals
from xrayops.release.storage import release_of_folders
from xrayops.results.identity import AlgorithmIdentity, identity_of
from xrayops.results.sr import SRError, image_srs, source_header
from xrayops.inference_log import HEADER_FIELDS
from xrayops.logs import get_logger
from xrayops.regions import UNKNOWN

log = get_logger(__name__)

REFUSED = Counter("xrayops_not_applicable_total", "DICOM instances the admission policy refused", ["reason"])

# Reasons from xrayops.dicom.decode that mean "valid DICOM in an encoding we cannot read".
UNSUPPORTED_REASONS = ("unsupported_transfer_syntax", "unsupported_photometric")


@dataclass(frozen=True)
class DecodeLimits:
    """Serving limits on one image, checked on the header before decoding."""

    max_image_pixels: int = 40_000_000  # 40 Mpx: above a 4664x3064 mammogram (14 Mpx)
    max_frames: int = 1  # a radiograph is one frame; cine loops (XA/RF) are not this model's input


@dataclass
class DecodedImage:
    pixels: np.ndarray | None  # (size, size) as PreprocessingSpec.output_dtype says; None when refused
    dicom_region: str
    meta: dict
    refusal: Admission | None = None  # the admission policy's refusal: answered not applicable
    # The header an SR is filed under (xrayops.results.sr.source_header): PHI, never logged.
    source: Dataset | None = field(default=None, repr=False)


def check_header(ds: Dataset, limits: DecodeLimits, where: str) -> None:
    """Reject by header what serving will not decode: huge frames and multi-frame cines."""
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: Rows, Columns or NumberOfFrames is not a number") from exc
    if rows * cols > limits.max_image_pixels:
        raise PayloadTooLarge(
            f"{where}: {rows}x{cols} image has {rows * cols} pixels, over the limit of {limits.max_image_pixels}; "
            "rejected from its header before decoding"
        )
    if frames > limits.max_frames:
        raise InvalidInput(
            f"{where}: {frames}-frame DICOM (cine/multi-frame); this service classifies single-frame radiographs "
            f"(at most {limits.max_frames} frame{'s' if limits.max_frames > 1 else ''})"
        )


def decode_dicom(blob: bytes, spec: PreprocessingSpec, limits: DecodeLimits, key: str, where: str) -> DecodedImage:
    """One DICOM file to model pixels, its tag region and its pseudonymised log fields; or, for an
    instance the bundle's admission policy refuses, the refusal (decided on the header, nothing decoded)."""
    if not blob:
        raise InvalidInput(f"{where}: empty file")
    try:
        ds = read_dicom(blob)
    except DicomError as exc:
        raise dicom_error(exc, where) from exc
    admission = admit(ds, spec.admission, "inference")
    if not admission.admitted:
        REFUSED.labels(admission.reason).inc()
        return DecodedImage(None, UNKNOWN, {}, admission, source_header(ds))
    check_header(ds, limits, where)
    try:
        pixels = preprocess(ds, spec)
    except DicomError as exc:
        raise dicom_error(exc, where) from exc
    meta = safe_metadata(ds, key)
    return DecodedImage(pixels, region_from_dataset(ds).region, {k: meta.get(k) for k in HEADER_FIELDS},
                        source=source_header(ds))


def dicom_error(exc: DicomError, where: str) -> InvalidInput:
    detail = f": {exc.detail}" if exc.detail else ""
    message = f"{where} is not usable DICOM ({exc.reason}{detail})"
    if exc.reason == "too_large":
        return PayloadTooLarge(message)
    if exc.reason in UNSUPPORTED_REASONS:
        return UnsupportedMedia(message)
    return InvalidInput(message)


def decode_dicoms(
    blobs: list[bytes], spec: PreprocessingSpec, limits: DecodeLimits, key: str, input_name: str
) -> list[DecodedImage]:
    """Every file of a request; the first unusable one rejects the request, naming it."""
    return [decode_dicom(b, spec, limits, key, f"input '{input_name}' element {i}") for i, b in enumerate(blobs)]


class RequestDecoder:
    """Requests (v1 dict or v2 InferRequest) to an `ImageBatch`, for one preprocessing spec."""

    def __init__(self, spec: PreprocessingSpec, limits: DecodeLimits, key: str) -> None:
        self.spec, self.limits, self.key = spec, limits, key

    def dicoms(self, blobs: list[bytes], input_name: str) -> list[DecodedImage]:
        return decode_dicoms(blobs, self.spec, self.limits, self.key, input_name)

    def __call__(self, payload, headers: dict[str, str] | None) -> ImageBatch:
        headers = headers or {}
        if isinstance(payload, InferRequest):
            request_id = payload.id or headers.get("x-request-id") or uuid.uuid4().hex
            return decode_v2(payload, self.spec.size, request_id, self.dicoms)
        return decode_v1(payload, headers.get("x-request-id") or uuid.uuid4().hex, self.dicoms)


def pixels_request(model_name: str, batch: ImageBatch) -> InferRequest:
    """The transformer's request to the predictor: preprocessed pixels plus the header fields
    the predictor needs for label_disagreement and the inference log (pseudonyms, no PHI).

    It asks for the embedding too, so that the predictor's payload-logger events (request +
    response) hold every field of an InferenceLogRecord (serving/log_sink.py); `strip_embedding`
    takes it out of the answer again."""
    pixels = np.stack([np.asarray(p, dtype=np.float32) / _scale(p) for p in batch.pixels])
    inputs = [InferInput(name=INPUT_PIXELS, shape=list(pixels.shape), datatype="FP32")]
    inputs[0].set_data_from_numpy(pixels, binary_data=False)
    for name, values in (
        (INPUT_DICOM_REGION, batch.dicom_regions),
        (INPUT_IMAGE_META, [json.dumps(m) for m in batch.image_meta]),
    ):
        tensor = InferInput(name=name, shape=[len(values)], datatype="BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=False)
        inputs.append(tensor)
    asked = batch.infer_request.request_outputs if batch.infer_request is not None else None
    asked = [o for o in asked or [] if o.name != OUTPUT_SR]  # the transformer makes the SRs, not the predictor
    outputs = [RequestedOutput(o.name, o.parameters) for o in asked] + [RequestedOutput(OUTPUT_EMBEDDING)] if asked else None
    return InferRequest(
        model_name=model_name, infer_inputs=inputs, request_id=batch.request_id,
        parameters={PARAM_GRADCAM: batch.gradcam, PARAM_UPRIGHT: batch.upright, PARAM_EMBEDDING: True},
        request_outputs=outputs,  # the client's, plus the embedding the payload log needs
    )


def strip_embedding(response: InferResponse) -> InferResponse:
    """The predictor's answer without the embedding the transformer asked for (the log's, not the client's)."""
    response.outputs = [o for o in response.outputs if o.name != OUTPUT_EMBEDDING]
    return response


def _scale(array: np.ndarray) -> float:
    kind = np.asarray(array).dtype
    return float(np.iinfo(kind).max) if kind.kind == "u" else 1.0


class DicomTransformer(Model):
    """kserve transformer: decodes DICOM (v1 or v2) and asks the predictor with pixels (v2)."""

    def __init__(self, name: str, bundle_dir: str | Path, limits: DecodeLimits, key: str) -> None:
        super().__init__(name)
        self.bundle_dir = Path(bundle_dir)
        self.limits, self.key = limits, key
        self.decoder: RequestDecoder | None = None
        self.meta = None
        self.load_error = ""
        self.release = None  # the serving release the bundle folder belongs to (release.json beside it), if any

    def load(self) -> bool:
        """Only the bundle's preprocessing spec is needed; the weights' hash is still checked so
        transformer and predictor cannot run different bundles unnoticed."""
        try:
            meta = verify_bundle(self.bundle_dir)
            release = release_of_folders([self.bundle_dir], [meta])
        except Exception as exc:  # BundleError and unreadable storage alike: not ready, with the reason
            self.ready, self.load_error = False, str(exc)
            return False
        self.release = release
        self.decoder = RequestDecoder(meta.preprocessing, self.limits, self.key)
        self.meta = meta
        self.ready = True
        return True

    async def preprocess(self, payload, headers: dict[str, str] | None = None) -> ImageBatch:
        return await asyncio.get_running_loop().run_in_executor(None, self.decoder, payload, headers)

    def validate(self, payload):
        return payload

    async def predict(self, payload: ImageBatch, headers: dict[str, str] | None = None, response_headers=None):
        """Admitted images go to the predictor; refused ones never leave the transformer and are put
        back into the answer, not applicable, at their positions."""
        response: InferResponse | None = None
        if payload.pixels:
            response = strip_embedding(await super().predict(pixels_request(self.name, payload), headers))
        if response is not None and not payload.refusals and not payload.sr:
            return encode_v1(parse_infer_response(response)) if payload.protocol == "v1" else response
        answered = parse_infer_response(response) if response is not None else []
        version = answered[0].model_version if answered else ""
        refusals = {i: ServedResponse(**not_applicable(a, self.name, version).model_dump())
                    for i, a in payload.refusals.items()}  # fmt: skip
        responses = with_refusals(answered, refusals)
        if payload.protocol == "v1":
            return encode_v1(responses)
        srs = None
        if payload.sr:  # here, where the source headers are: the predictor never sees one
            identity = self.identity(version)
            try:
                srs = await asyncio.get_running_loop().run_in_executor(
                    None, image_srs, payload.sources, responses, identity)  # fmt: skip
            except SRError as exc:
                raise InvalidInput(f"cannot make the Structured Report of {exc}") from None
        return encode_v2(responses, self.meta.classes, self.name, version, payload, srs=srs)

    def identity(self, version: str) -> AlgorithmIdentity:
        """Who answered, for the SR: the predictor's version, the release's members (or this bundle's hash)."""
        return identity_of(self.name, version or self.meta.weights_sha256[:12], [self.meta], self.release)
