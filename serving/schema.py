"""The inference API on the wire: request decoding and response encoding for KServe v1
`:predict` and the Open Inference Protocol v2 (REST and gRPC).

v2 inputs (one of):
  - `dicom`  BYTES [N]: one DICOM file per element, raw bytes (binary data extension or
    gRPC) or base64 text (JSON);
  - `pixels` FP32 [N, S, S]: images already preprocessed with the bundle's spec, in [0, 1].
v1 body: `{"instances": [{"b64": "<base64 DICOM>"}, ...]}`.

v2 outputs, one row per image: `region` BYTES, `confidence` FP32, `probabilities` FP32 [N, C]
(class order in the output's `classes` parameter), `ood_score` FP32, `ood` BOOL (only when
the bundle has an OOD threshold), `dicom_region` BYTES, `label_disagreement` BOOL.
v1 answer: `{"predictions": [InferenceResponse, ...]}`.
"""
from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from pydicom.dataset import Dataset

from xrayops.contracts import InferenceResponse
from xrayops.dicom.decode import DicomError, read_dicom

INPUT_DICOM = "dicom"
INPUT_PIXELS = "pixels"
# Bounds the memory one request can take; larger batches should be split by the client.
MAX_IMAGES_PER_REQUEST = 256


@dataclass
class DecodedRequest:
    """A request turned into model inputs: DICOM datasets or preprocessed pixel arrays."""

    protocol: Literal["v1", "v2"]
    request_id: str
    datasets: list[Dataset] = field(default_factory=list)
    pixels: np.ndarray | None = None  # float32 (N, S, S)
    infer_request: InferRequest | None = None  # the v2 request, for requested outputs


def input_types(size: int) -> list[dict]:
    return [
        {"name": INPUT_DICOM, "datatype": "BYTES", "shape": [-1]},
        {"name": INPUT_PIXELS, "datatype": "FP32", "shape": [-1, size, size]},
    ]


def output_types(n_classes: int, with_ood_flag: bool) -> list[dict]:
    outputs = [
        {"name": "region", "datatype": "BYTES", "shape": [-1]},
        {"name": "confidence", "datatype": "FP32", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, n_classes]},
        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
    ]
    if with_ood_flag:
        outputs.append({"name": "ood", "datatype": "BOOL", "shape": [-1]})
    outputs += [
        {"name": "dicom_region", "datatype": "BYTES", "shape": [-1]},
        {"name": "label_disagreement", "datatype": "BOOL", "shape": [-1]},
    ]
    return outputs


def dicom_bytes(element: bytes | str, index: int) -> bytes:
    """One element of a `dicom` tensor as file bytes: text is base64; bytes are the file
    itself, or its base64 (a DICOM file always holds bytes outside the base64 alphabet)."""
    if isinstance(element, str):
        try:
            return base64.b64decode(element, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"input '{INPUT_DICOM}' element {index}: text is not valid base64 ({exc})") from exc
    if isinstance(element, (bytes, bytearray)):
        try:
            return base64.b64decode(bytes(element), validate=True)
        except (binascii.Error, ValueError):
            return bytes(element)
    raise InvalidInput(f"input '{INPUT_DICOM}' element {index}: expected bytes, got {type(element).__name__}")


def parse_dicoms(blobs: list[bytes], input_name: str) -> list[Dataset]:
    """Parse every file; the first one that is not readable DICOM rejects the request."""
    datasets = []
    for i, blob in enumerate(blobs):
        if not blob:
            raise InvalidInput(f"input '{input_name}' element {i}: empty file")
        try:
            datasets.append(read_dicom(blob))
        except DicomError as exc:
            detail = f": {exc.detail}" if exc.detail else ""
            raise InvalidInput(f"input '{input_name}' element {i} is not usable DICOM ({exc.reason}{detail})") from exc
    return datasets


def check_count(n: int) -> None:
    if n == 0:
        raise InvalidInput("the request holds no images")
    if n > MAX_IMAGES_PER_REQUEST:
        raise InvalidInput(f"the request holds {n} images; send at most {MAX_IMAGES_PER_REQUEST} per request")


def decode_v2(request: InferRequest, size: int, request_id: str) -> DecodedRequest:
    """A v2 request with exactly one input, `dicom` or `pixels`."""
    names = [t.name for t in request.inputs]
    if len(names) != 1 or names[0] not in (INPUT_DICOM, INPUT_PIXELS):
        raise InvalidInput(f"expected one input named '{INPUT_DICOM}' (BYTES) or '{INPUT_PIXELS}' (FP32), got {names}")
    tensor = request.inputs[0]
    try:
        values = tensor.as_numpy()
    except (ValueError, TypeError, struct.error) as exc:  # data that does not fit its declared shape or type
        raise InvalidInput(f"input '{tensor.name}' cannot be read as {tensor.datatype} {tensor.shape}: {exc}") from exc
    if tensor.name == INPUT_DICOM:
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input '{INPUT_DICOM}' must be BYTES, got {tensor.datatype}")
        elements = list(values.reshape(-1))
        check_count(len(elements))
        datasets = parse_dicoms([dicom_bytes(e, i) for i, e in enumerate(elements)], INPUT_DICOM)
        return DecodedRequest("v2", request_id, datasets=datasets, infer_request=request)
    if tensor.datatype != "FP32":
        raise InvalidInput(f"input '{INPUT_PIXELS}' must be FP32, got {tensor.datatype}")
    if values.ndim != 3 or values.shape[1:] != (size, size):
        raise InvalidInput(f"input '{INPUT_PIXELS}' must have shape [N, {size}, {size}], got {list(values.shape)}")
    check_count(values.shape[0])
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise InvalidInput(f"input '{INPUT_PIXELS}' must be preprocessed pixels within [0, 1]")
    return DecodedRequest("v2", request_id, pixels=values.astype(np.float32), infer_request=request)


def decode_v1(body, request_id: str) -> DecodedRequest:
    """A v1 body `{"instances": [{"b64": ...}, ...]}`."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise InvalidInput('expected a JSON body {"instances": [{"b64": "<base64 DICOM>"}, ...]}')
    instances = body["instances"]
    check_count(len(instances))
    blobs = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or not isinstance(instance.get("b64"), str):
            raise InvalidInput(f'instance {i}: expected {{"b64": "<base64 DICOM>"}}')
        blobs.append(dicom_bytes(instance["b64"], i))
    return DecodedRequest("v1", request_id, datasets=parse_dicoms(blobs, "instances"))


def encode_v2(
    responses: list[InferenceResponse], classes: list[str], model_name: str, version: str, decoded: DecodedRequest
) -> InferResponse:
    probabilities = [[r.probabilities[c] for c in classes] for r in responses]
    ood_scores = [np.nan if r.ood_score is None else r.ood_score for r in responses]
    columns = [
        ("region", "BYTES", np.array([r.region for r in responses], dtype=np.object_)),
        ("confidence", "FP32", np.array([r.confidence for r in responses], dtype=np.float32)),
        ("probabilities", "FP32", np.array(probabilities, dtype=np.float32).reshape(len(responses), len(classes))),
        ("ood_score", "FP32", np.array(ood_scores, dtype=np.float32)),
    ]
    if responses and responses[0].ood is not None:
        columns.append(("ood", "BOOL", np.array([bool(r.ood) for r in responses], dtype=bool)))
    columns += [
        ("dicom_region", "BYTES", np.array([r.dicom_region for r in responses], dtype=np.object_)),
        ("label_disagreement", "BOOL", np.array([r.label_disagreement for r in responses], dtype=bool)),
    ]
    outputs = []
    for name, datatype, values in columns:
        output = InferOutput(
            name=name, shape=list(values.shape), datatype=datatype,
            parameters={"classes": ",".join(classes)} if name == "probabilities" else None,
        )
        # As plain lists: kserve 0.21's gRPC encoder cannot take numpy data for raw-input requests.
        output.set_data_from_numpy(values, binary_data=False)
        outputs.append(output)
    request = decoded.infer_request
    return InferResponse(
        response_id=decoded.request_id,
        model_name=model_name,
        model_version=version,
        infer_outputs=outputs,
        # kserve 0.21's REST client drops model_version when it parses a response; parameters survive.
        parameters={"model_version": version},
        use_binary_outputs=request.use_binary_outputs if request is not None else False,
        requested_outputs=request.request_outputs if request is not None else None,
    )


def encode_v1(responses: list[InferenceResponse]) -> dict:
    return {"predictions": [r.model_dump(mode="json") for r in responses]}
