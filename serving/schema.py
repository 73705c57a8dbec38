"""The inference API on the wire: request decoding and response encoding for KServe v1
`:predict` and the Open Inference Protocol v2 (REST and gRPC).

v2 inputs, one of:
  - `dicom`  BYTES [N]: one DICOM file per element, raw bytes (binary data extension or
    gRPC) or base64 text (JSON);
  - `pixels` FP32 [N, S, S]: images already preprocessed with the bundle's spec, in [0, 1];
    optionally with `dicom_region` BYTES [N] (each image's tag region) and `image_meta`
    BYTES [N] (JSON of pseudonymised log fields), which is what the DICOM transformer sends.
Request parameters (v2 `parameters`, v1 `parameters`), all false by default:
  - `gradcam: true` adds a Grad-CAM heatmap per image;
  - `upright: true` adds the preprocessed image turned upright by the predicted orientation
    (Baltruschat et al. 2018; needs a model with an orientation head);
  - `embedding: true` adds each image's embedding (v2 only): the DICOM transformer asks for it
    so that the predictor's payload-logger events carry everything an inference log record
    needs (serving/log_sink.py), and strips it from the answer it returns;
  - `sr: true` adds each image's DICOM Structured Report (v2, `dicom` input only; see below).
v1 body: `{"instances": [{"b64": "<base64 DICOM>"}, ...], "parameters": {"gradcam": true}}`.

v2 outputs, one row per image: `region` BYTES, `confidence` FP32, `probabilities` FP32 [N, C]
(class order in the output's `classes` parameter), `orientation_deg` FP32 (only when the model
predicts an angle), `ood_score` FP32 (higher = further from the training radiographs, in the
model's own units: a relative Mahalanobis score can be negative; compare across models only through
`ood`), `ood` BOOL (only when the model has an OOD threshold),
`dicom_region` BYTES, `label_disagreement` BOOL, `gradcam` BYTES (base64 PNG, on request),
`upright` BYTES (base64 PNG, on request), `embedding` FP32 [N, D] (on request), `sr` BYTES (on
request), and one
`finding_<head>` FP32 per binary head of the model (P(positive); abnormality: de Cid Rodríguez 2021; Ghalyan et al.,
implant: Acitores 2022; NaN for an image no member scored).
The model version is in `model_version` and repeated in the response parameters.
v1 answer: `{"predictions": [ServedResponse, ...]}`.

Images the model is not for. A DICOM that the model's admission policy refuses (xrayops.dicom.admission:
by default anything but a human CR/DX greyscale radiograph, e.g. a CT, an ultrasound, a secondary
capture) is not an error: the request succeeds (200, the same on v1, v2 REST and gRPC) and that
image's row says `applicable` false, `refusal_reason` (a code such as `not_radiograph`,
`colour_image`, `secondary_capture`, `localizer`, `non_human`) and `refusal_detail` (one line such as
"modality CT"), with no region: v1 gives `region`, `confidence` null and no probabilities; v2 gives
`region` "" and NaN in the numeric outputs of that row. The other images of the request are answered
as usual. `applicable`, `refusal_reason` and `refusal_detail` are in every v2 answer. Files that are
not usable DICOM at all stay 4xx errors.

Structured Reports. With `sr: true` each row's `sr` element is a DICOM Part 10 file: a TID 1500
Measurement Report of that image's answer, filed into the source study (xrayops.results.sr), a
refused image's saying not applicable and why. It carries the patient's identifiers (it goes back
into the hospital's PACS) and is never logged. Raw bytes where the client asked for binary outputs
(binary data extension `binary_data_output`, or `binary_data` on the requested output) and on
gRPC; base64 text in a JSON answer. Only the DICOM input path can make one (the SR needs the
source header): a `pixels` request or a v1 request with `sr` is a 400 that says so.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
from kserve import InferInput, InferOutput, InferRequest, InferResponse
from kserve.protocol.infer_type import RequestedOutput
from kserve.errors import InvalidInput

from xrayops.contracts import InferenceResponse
from xrayops.regions import UNKNOWN

INPUT_DICOM = "dicom"
INPUT_PIXELS = "pixels"
INPUT_DICOM_REGION = "dicom_region"
INPUT_IMAGE_META = "image_meta"
PARAM_GRADCAM = "gradcam"
PARAM_UPRIGHT = "upright"
PARAM_EMBEDDING = "embedding"
PARAM_SR = "sr"
OUTPUT_EMBEDDING = "embedding"
OUTPUT_SR = "sr"
FINDING_PREFIX = "finding_"  # one FP32 output per binary head: finding_abnormal, finding_implant
# Bounds the memory one request can take; larger batches should be split by the client.
MAX_IMAGES_PER_REQUEST = 256


class ServedResponse(InferenceResponse):
    """InferenceResponse (docs/architecture.md, contract 4) plus the Grad-CAM heatmap when asked for."""

    gradcam_png: str | None = None  # base64 PNG, (S, S) 8-bit grey, bright = drove the prediction
    upright_png: str | None = None  # base64 PNG, (S, S) 8-bit grey: the image turned by -orientation_deg


@dataclass
class ImageBatch:
    """A request turned into model inputs: preprocessed images plus what the log needs."""

    protocol: Literal["v1", "v2"]
    request_id: str
    pixels: list[np.ndarray]  # (S, S) each: uint8/uint16 from preprocess, or float32 in [0, 1]
    dicom_regions: list[str]
    image_meta: list[dict] = field(default_factory=list)  # pseudonymised log fields per image
    gradcam: bool = False
    infer_request: InferRequest | None = None  # the v2 request, for requested outputs
    upright: bool = False
    embedding: bool = False
    # Images the admission policy refused, by their position in the request: they are not in
    # `pixels` and are answered not applicable (xrayops.dicom.admission.Admission values).
    refusals: dict[int, Any] = field(default_factory=dict)
    sr: bool = False  # the client asked for a DICOM SR per image
    # Each image's source header (xrayops.results.sr.source_header) by request position, refused ones
    # included: what an SR is filed under. PHI: held for the answer only, never logged.
    sources: list[Any] = field(default_factory=list, repr=False)


# decode_dicoms(blobs, input_name) -> [DecodedImage]; serving.transformer provides it.
DicomDecoder = Callable[[list[bytes], str], list[Any]]


def input_types(size: int) -> list[dict]:
    return [
        {"name": INPUT_DICOM, "datatype": "BYTES", "shape": [-1]},
        {"name": INPUT_PIXELS, "datatype": "FP32", "shape": [-1, size, size]},
        {"name": INPUT_DICOM_REGION, "datatype": "BYTES", "shape": [-1]},
        {"name": INPUT_IMAGE_META, "datatype": "BYTES", "shape": [-1]},
    ]


def output_types(n_classes: int, with_ood_flag: bool, findings: list[str] | tuple[str, ...] = ()) -> list[dict]:
    outputs = [
        {"name": "region", "datatype": "BYTES", "shape": [-1]},
        {"name": "confidence", "datatype": "FP32", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, n_classes]},
        # Only when a member predicts orientation (Baltruschat et al. 2018); absent means None.
        {"name": "orientation_deg", "datatype": "FP32", "shape": [-1]},
    ]
    outputs.append({"name": "ood_score", "datatype": "FP32", "shape": [-1]})
    if with_ood_flag:
        outputs.append({"name": "ood", "datatype": "BOOL", "shape": [-1]})
    outputs += [
        {"name": "dicom_region", "datatype": "BYTES", "shape": [-1]},
        {"name": "label_disagreement", "datatype": "BOOL", "shape": [-1]},
        {"name": "gradcam", "datatype": "BYTES", "shape": [-1]},
        {"name": "upright", "datatype": "BYTES", "shape": [-1]},
        {"name": OUTPUT_EMBEDDING, "datatype": "FP32", "shape": [-1, -1]},
        {"name": "applicable", "datatype": "BOOL", "shape": [-1]},
        {"name": "refusal_reason", "datatype": "BYTES", "shape": [-1]},
        {"name": "refusal_detail", "datatype": "BYTES", "shape": [-1]},
        {"name": OUTPUT_SR, "datatype": "BYTES", "shape": [-1]},
    ]
    outputs += [{"name": FINDING_PREFIX + name, "datatype": "FP32", "shape": [-1]} for name in findings]
    return outputs


def param_value(parameters, name: str):
    """A request parameter as a plain value, whether it came as JSON or as a gRPC InferParameter."""
    if not parameters or name not in parameters:
        return None
    value = parameters[name]
    for attr in ("bool_param", "int64_param", "string_param"):
        if hasattr(value, "HasField") and value.HasField(attr):
            return getattr(value, attr)
    return value


def flag(parameters, name: str) -> bool:
    """A boolean request parameter (absent: False); anything but a boolean is a 400."""
    value = param_value(parameters, name)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int):
        return bool(value)
    raise InvalidInput(f"parameter '{name}' must be true or false, got {value!r}")


def gradcam_requested(parameters) -> bool:
    return flag(parameters, PARAM_GRADCAM)


SR_NEEDS_DICOM = (
    "parameter 'sr' needs the DICOM input: a Structured Report is filed into the source study and "
    "references the source instance, which a '{input}' request does not carry; send the files as '" + INPUT_DICOM + "'"
)


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


def check_count(n: int) -> None:
    if n == 0:
        raise InvalidInput("the request holds no images")
    if n > MAX_IMAGES_PER_REQUEST:
        raise InvalidInput(f"the request holds {n} images; send at most {MAX_IMAGES_PER_REQUEST} per request")


def _tensor_values(tensor) -> np.ndarray:
    try:
        return tensor.as_numpy()
    except (ValueError, TypeError, struct.error) as exc:  # data that does not fit its declared shape or type
        raise InvalidInput(f"input '{tensor.name}' cannot be read as {tensor.datatype} {tensor.shape}: {exc}") from exc


def _texts(tensor, n: int) -> list[str]:
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input '{tensor.name}' must be BYTES, got {tensor.datatype}")
    values = list(_tensor_values(tensor).reshape(-1))
    if len(values) != n:
        raise InvalidInput(f"input '{tensor.name}' has {len(values)} elements for {n} images")
    try:
        return [v.decode() if isinstance(v, (bytes, bytearray)) else str(v) for v in values]
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input '{tensor.name}' must be UTF-8 text") from exc


def _image_meta(texts: list[str]) -> list[dict]:
    metas = []
    for i, text in enumerate(texts):
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"input '{INPUT_IMAGE_META}' element {i} is not JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise InvalidInput(f"input '{INPUT_IMAGE_META}' element {i} must be a JSON object")
        metas.append(meta)
    return metas


def infer_request_from_binary(body: bytes, json_length: int, model_name: str) -> InferRequest:
    """A v2 request in the binary data extension (JSON header, then raw tensors), with
    binary inputs kept as raw bytes."""
    try:
        header = orjson.loads(body[:json_length])
        inputs, raw = [], []
        offset = json_length
        for spec in header["inputs"]:
            parameters = spec.get("parameters") or {}
            tensor = InferInput(
                name=spec["name"], shape=list(spec["shape"]), datatype=spec["datatype"], parameters=parameters
            )
            if spec.get("data") is not None:
                tensor.data = spec["data"]
                raw.append(None)
            elif "binary_data_size" in parameters:
                size = int(parameters["binary_data_size"])
                chunk = body[offset : offset + size]
                if len(chunk) != size:
                    raise InvalidInput(f"input '{tensor.name}' declares {size} bytes but the body holds {len(chunk)}")
                raw.append(chunk)
                offset += size
            else:
                raise InvalidInput(f"input '{tensor.name}' has neither 'data' nor 'binary_data_size'")
            inputs.append(tensor)
        outputs = [RequestedOutput(o["name"], o.get("parameters")) for o in header.get("outputs") or []]
    except InvalidInput:
        raise
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request's JSON header is not valid JSON: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:  # a field missing or of the wrong kind
        raise InvalidInput(f"malformed v2 request header: {exc!r}") from exc
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=header.get("id"),
        raw_inputs=raw,
        parameters=header.get("parameters"),
        request_outputs=outputs or None,
    )


def decode_v2(request: InferRequest, size: int, request_id: str, decode_dicoms: DicomDecoder) -> ImageBatch:
    """A v2 request: `dicom` alone, or `pixels` with optional `dicom_region` / `image_meta`."""
    by_name = {t.name: t for t in request.inputs}
    names = [t.name for t in request.inputs]
    allowed = {INPUT_DICOM: {INPUT_DICOM}, INPUT_PIXELS: {INPUT_PIXELS, INPUT_DICOM_REGION, INPUT_IMAGE_META}}
    main = [n for n in names if n in allowed]
    if len(main) != 1 or len(set(names)) != len(names) or not set(names) <= allowed[main[0]]:
        raise InvalidInput(
            f"expected one input named '{INPUT_DICOM}' (BYTES), or '{INPUT_PIXELS}' (FP32) with optional "
            f"'{INPUT_DICOM_REGION}' and '{INPUT_IMAGE_META}' (BYTES), got {names}"
        )
    gradcam = gradcam_requested(request.parameters)
    tensor = by_name[main[0]]
    if tensor.name == INPUT_DICOM:
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input '{INPUT_DICOM}' must be BYTES, got {tensor.datatype}")
        elements = list(_tensor_values(tensor).reshape(-1))
        check_count(len(elements))
        images = decode_dicoms([dicom_bytes(e, i) for i, e in enumerate(elements)], INPUT_DICOM)
        return batch_of_decoded(
            images, "v2", request_id, gradcam, request, flag(request.parameters, PARAM_UPRIGHT),
            flag(request.parameters, PARAM_EMBEDDING), flag(request.parameters, PARAM_SR),
        )
    if flag(request.parameters, PARAM_SR):
        raise InvalidInput(SR_NEEDS_DICOM.format(input=INPUT_PIXELS))
    if tensor.datatype != "FP32":
        raise InvalidInput(f"input '{INPUT_PIXELS}' must be FP32, got {tensor.datatype}")
    values = _tensor_values(tensor)
    if values.ndim != 3 or values.shape[1:] != (size, size):
        raise InvalidInput(f"input '{INPUT_PIXELS}' must have shape [N, {size}, {size}], got {list(values.shape)}")
    n = values.shape[0]
    check_count(n)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise InvalidInput(f"input '{INPUT_PIXELS}' must be preprocessed pixels within [0, 1]")
    regions = _texts(by_name[INPUT_DICOM_REGION], n) if INPUT_DICOM_REGION in by_name else [UNKNOWN] * n
    metas = _image_meta(_texts(by_name[INPUT_IMAGE_META], n)) if INPUT_IMAGE_META in by_name else [{}] * n
    pixels = values.astype(np.float32)
    return ImageBatch(
        "v2", request_id, list(pixels), regions, metas, gradcam, request, flag(request.parameters, PARAM_UPRIGHT),
        flag(request.parameters, PARAM_EMBEDDING),
    )


def decode_v1(body, request_id: str, decode_dicoms: DicomDecoder) -> ImageBatch:
    """A v1 body `{"instances": [{"b64": ...}, ...], "parameters": {...}}`."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise InvalidInput('expected a JSON body {"instances": [{"b64": "<base64 DICOM>"}, ...]}')
    instances = body["instances"]
    check_count(len(instances))
    blobs = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or not isinstance(instance.get("b64"), str):
            raise InvalidInput(f'instance {i}: expected {{"b64": "<base64 DICOM>"}}')
        blobs.append(dicom_bytes(instance["b64"], i))
    parameters = body.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be a JSON object')
    if flag(parameters, PARAM_SR):
        raise InvalidInput("parameter 'sr' is served on the v2 protocol only (a BYTES output per image); "
                           "send the request to /v2/models/<name>/infer")
    images = decode_dicoms(blobs, "instances")
    return batch_of_decoded(images, "v1", request_id, gradcam_requested(parameters), upright=flag(parameters, PARAM_UPRIGHT))


def batch_of_decoded(
    images: list, protocol: Literal["v1", "v2"], request_id: str, gradcam: bool,
    infer_request: InferRequest | None = None, upright: bool = False, embedding: bool = False, sr: bool = False,
) -> ImageBatch:
    """Decoded DICOMs (serving.transformer.DecodedImage) to a batch: the admitted ones as model
    inputs, the refused ones as refusals at their positions (and every source header when an SR is asked for)."""
    admitted = [d for d in images if d.refusal is None]
    return ImageBatch(
        protocol, request_id, [d.pixels for d in admitted], [d.dicom_region for d in admitted],
        [d.meta for d in admitted], gradcam, infer_request, upright, embedding,
        refusals={i: d.refusal for i, d in enumerate(images) if d.refusal is not None},
        sr=sr, sources=[d.source for d in images] if sr else [],
    )


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def sr_binary(request: InferRequest | None) -> bool:
    """Whether the `sr` output goes as raw bytes: gRPC, or a REST client that asked for binary outputs."""
    if request is None:
        return False
    if getattr(request, "from_grpc", False):
        return True
    for output in request.request_outputs or []:
        if output.name == OUTPUT_SR:
            return bool(output.binary_data)
    return bool(request.use_binary_outputs)


def encode_v2(
    responses: list[ServedResponse], classes: list[str], model_name: str, version: str, batch: ImageBatch,
    embeddings: np.ndarray | None = None, srs: list[bytes] | None = None,
) -> InferResponse:
    """The v2 answer; `embeddings` (n, D) become the `embedding` output when given, `srs` (one
    Part 10 file per row) the `sr` output."""
    probabilities = [[r.probabilities.get(c, np.nan) for c in classes] for r in responses]
    ood_scores = [np.nan if r.ood_score is None else r.ood_score for r in responses]
    columns = [
        ("region", "BYTES", np.array([r.region or "" for r in responses], dtype=np.object_)),
        ("confidence", "FP32", np.array([np.nan if r.confidence is None else r.confidence for r in responses],
                                        dtype=np.float32)),
        ("probabilities", "FP32", np.array(probabilities, dtype=np.float32).reshape(len(responses), len(classes))),
    ]
    if any(r.orientation_deg is not None for r in responses):
        angles = [np.nan if r.orientation_deg is None else r.orientation_deg for r in responses]
        columns.append(("orientation_deg", "FP32", np.array(angles, dtype=np.float32)))
    columns.append(("ood_score", "FP32", np.array(ood_scores, dtype=np.float32)))
    if any(r.ood is not None for r in responses):
        columns.append(("ood", "BOOL", np.array([bool(r.ood) for r in responses], dtype=bool)))
    columns += [
        ("dicom_region", "BYTES", np.array([r.dicom_region for r in responses], dtype=np.object_)),
        ("label_disagreement", "BOOL", np.array([r.label_disagreement for r in responses], dtype=bool)),
    ]
    for name in sorted({n for r in responses for n in r.findings}):
        values = [r.findings.get(name, np.nan) for r in responses]
        columns.append((FINDING_PREFIX + name, "FP32", np.array(values, dtype=np.float32)))
    if any(r.gradcam_png is not None for r in responses):
        columns.append(("gradcam", "BYTES", np.array([r.gradcam_png or "" for r in responses], dtype=np.object_)))
    if any(r.upright_png is not None for r in responses):
        columns.append(("upright", "BYTES", np.array([r.upright_png or "" for r in responses], dtype=np.object_)))
    if embeddings is not None:
        columns.append((OUTPUT_EMBEDDING, "FP32", np.asarray(embeddings, dtype=np.float32).reshape(len(responses), -1)))
    columns += [
        ("applicable", "BOOL", np.array([r.applicable for r in responses], dtype=bool)),
        ("refusal_reason", "BYTES", np.array([r.refusal_reason for r in responses], dtype=np.object_)),
        ("refusal_detail", "BYTES", np.array([r.refusal_detail for r in responses], dtype=np.object_)),
    ]
    if srs is not None:
        raw = sr_binary(batch.infer_request)
        values = [bytes(s) if raw else base64.b64encode(s).decode("ascii") for s in srs]
        columns.append((OUTPUT_SR, "BYTES", np.array(values, dtype=np.object_)))
    request = batch.infer_request
    requested = [o.name for o in (request.request_outputs or [])] if request is not None else []
    if requested:  # only what was asked for, on REST and gRPC alike (kserve's gRPC path returns all)
        columns = [c for c in columns if c[0] in requested]
    outputs = []
    for name, datatype, values in columns:
        output = InferOutput(
            name=name, shape=list(values.shape), datatype=datatype,
            parameters={"classes": ",".join(classes)} if name == "probabilities" else None,
        )
        if name == OUTPUT_SR and values.size and isinstance(values.flat[0], bytes):
            # Raw Part 10 bytes as a plain list: set_data_from_numpy(binary_data=False) would try them as
            # UTF-8 and fail with a message quoting the file (identifiers). kserve serialises the list
            # as binary data (REST) or bytes_contents (gRPC).
            output.data = list(values)
        else:
            # As plain lists: kserve 0.21's gRPC encoder cannot take numpy data for raw-input requests.
            output.set_data_from_numpy(values, binary_data=False)
        outputs.append(output)
    return InferResponse(
        response_id=batch.request_id,
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


def parse_sr_output(response: InferResponse) -> list[bytes]:
    """The `sr` output of a v2 answer as Part 10 files, one per row (raw bytes or base64 text alike:
    a Part 10 file always holds bytes outside the base64 alphabet); empty when the answer has none."""
    for output in response.outputs:
        if output.name == OUTPUT_SR:
            return [dicom_bytes(v, i) for i, v in enumerate(output.as_numpy().reshape(-1))]
    return []


def parse_infer_response(response: InferResponse) -> list[ServedResponse]:
    """A v2 response (REST or gRPC, as kserve's clients return it) back into ServedResponses."""
    out = {o.name: o.as_numpy() for o in response.outputs}
    probs = out["probabilities"]
    classes = None
    for o in response.outputs:
        if o.name == "probabilities" and o.parameters:
            classes = str(param_value(o.parameters, "classes") or "").split(",") or None
    if not classes or len(classes) != probs.shape[1]:
        from xrayops.regions import REGIONS

        classes = list(REGIONS)
    params = response.parameters or {}
    version = response.model_version or str(param_value(params, "model_version") or "")
    results = []
    for i in range(probs.shape[0]):
        angle = float(out["orientation_deg"][i]) if "orientation_deg" in out else float("nan")
        findings = {name[len(FINDING_PREFIX):]: float(values[i]) for name, values in out.items()
                    if name.startswith(FINDING_PREFIX) and not np.isnan(values[i])}
        gradcam = _text(out["gradcam"][i]) if "gradcam" in out else ""
        upright = _text(out["upright"][i]) if "upright" in out else ""
        applicable = bool(out["applicable"][i]) if "applicable" in out else True
        if not applicable:
            results.append(ServedResponse(
                region=None, confidence=None, applicable=False,
                refusal_reason=_text(out["refusal_reason"][i]) if "refusal_reason" in out else "",
                refusal_detail=_text(out["refusal_detail"][i]) if "refusal_detail" in out else "",
                model_name=response.model_name or "", model_version=version,
            ))  # fmt: skip
            continue
        results.append(
            ServedResponse(
                region=_text(out["region"][i]),
                confidence=float(out["confidence"][i]),
                probabilities={name: float(p) for name, p in zip(classes, probs[i])},
                orientation_deg=None if np.isnan(angle) else angle,
                ood_score=float(out["ood_score"][i]) if "ood_score" in out else None,
                ood=bool(out["ood"][i]) if "ood" in out else None,
                dicom_region=_text(out["dicom_region"][i]) if "dicom_region" in out else UNKNOWN,
                label_disagreement=bool(out["label_disagreement"][i]) if "label_disagreement" in out else False,
                findings=findings,
                model_name=response.model_name or "",
                model_version=version,
                gradcam_png=gradcam or None,
                upright_png=upright or None,
            )
        )
    return results
