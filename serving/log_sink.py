"""The inference-log sink: KServe's payload logger in, the parquet inference log out.

On a cluster the predictor's `logger` (mode: all) posts every request and every response as a
CloudEvent (HTTP binary mode: the body is the payload, attributes are `ce-*` headers):
  - `ce-id`: the same id for a request and its response (how they are paired here);
  - `ce-type`: `org.kubeflow.serving.inference.request` or `...inference.response`;
  - `ce-source`, `ce-inferenceservicename`, `ce-namespace`, `ce-component`, `ce-time`.
The predictor's request is what the DICOM transformer sent it (serving/transformer.py:
`pixels` FP32, `dicom_region`, `image_meta` with pseudonymised header fields, `embedding: true`),
its response the v2 answer with the `embedding` output. Together they hold every field of an
`InferenceLogRecord`, which `xrayops.inference_log.build_records` (the builder local serving
uses) turns into the same rows, appended with the same writer to the folder the monitor reads.

PHI never arrives here: the transformer, whose requests are DICOM files, has no logger, and a
logged request that carries a `dicom` input is refused (422) and dropped, never written.
Bad events get a 4xx with a message; nothing is a 500. Unpaired halves are kept for
`pending_ttl_s` (bounded by `max_pending`) and then dropped with a warning.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kserve import InferResponse
from kserve.errors import InvalidInput
from starlette.concurrency import run_in_threadpool

from serving.schema import (
    INPUT_DICOM,
    OUTPUT_EMBEDDING,
    ImageBatch,
    decode_v2,
    infer_request_from_binary,
    parse_infer_response,
)
from xrayops.errors import XrayopsError
from xrayops.contracts import InferenceLogRecord
from xrayops.inference_log import build_records
from xrayops.log_buffer import LogBuffer
from xrayops.logs import get_logger

log = get_logger(__name__)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
MB = 1024 * 1024


class EventError(XrayopsError):
    """An event the sink cannot use; `status` is the HTTP answer (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _refuse_dicom(_blobs: list[bytes], _input_name: str) -> list:
    raise EventError(
        "the logged request holds a 'dicom' input: raw DICOM may carry PHI and is never logged; "
        "configure the logger on the predictor (pixels + pseudonyms), not the transformer",
        status=422,
    )


def parse_request(body: bytes, ce_id: str) -> ImageBatch:
    """A logged v2 predictor request (JSON, as the transformer sends it) as an ImageBatch."""
    if not body:
        raise EventError("empty request event")
    try:
        request = infer_request_from_binary(body, len(body), "logged")
        if any(t.name == INPUT_DICOM for t in request.inputs):
            _refuse_dicom([], INPUT_DICOM)
        # Any spec size: the sink serves no model, it takes the pixels' own shape.
        pixels = [t for t in request.inputs if t.name == "pixels"]
        size = int(pixels[0].shape[-1]) if pixels and pixels[0].shape else 0
        return decode_v2(request, size, request.id or ce_id, _refuse_dicom)
    except InvalidInput as exc:
        raise EventError(f"the logged request is not a v2 pixels request: {exc}", status=422) from exc


def parse_response(body: bytes) -> tuple[list, np.ndarray]:
    """A logged v2 predictor response: the answers and the `embedding` output (n, D)."""
    if not body:
        raise EventError("empty response event")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"the logged response is not JSON: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("outputs"), list):
        raise EventError("the logged response is not a v2 inference response (no 'outputs' list)", status=422)
    try:
        response = InferResponse.from_rest(payload)
        responses = parse_infer_response(response)
        by_name = {o.name: o for o in response.outputs}
        if OUTPUT_EMBEDDING not in by_name:
            raise EventError(
                f"the logged response has no '{OUTPUT_EMBEDDING}' output; the transformer asks the predictor "
                "for it (parameter embedding: true)",
                status=422,
            )
        embeddings = np.asarray(by_name[OUTPUT_EMBEDDING].as_numpy(), dtype=np.float32).reshape(len(responses), -1)
    except EventError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, InvalidInput) as exc:
        raise EventError(f"the logged response cannot be read: {exc!r}", status=422) from exc
    return responses, embeddings


def event_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def pair_records(
    batch: ImageBatch, responses: list, embeddings: np.ndarray, timestamp: datetime | None
) -> list[InferenceLogRecord]:
    if len(responses) != len(batch.pixels):
        raise EventError(f"the response answers {len(responses)} images, the request held {len(batch.pixels)}", 422)
    metas = batch.image_meta or None
    return build_records(responses, batch.pixels, embeddings, batch.request_id, metas, timestamp)


@dataclass
class _Half:
    kind: str  # "request" | "response"
    value: object
    timestamp: datetime | None
    arrived: float = field(default_factory=time.monotonic)


class PendingPairs:
    """Request and response halves by ce-id until both are here; old and surplus halves are dropped."""

    def __init__(self, ttl_s: float, max_pending: int) -> None:
        self.ttl_s, self.max_pending = ttl_s, max_pending
        self._halves: OrderedDict[str, _Half] = OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._halves)

    def add(self, ce_id: str, half: _Half) -> _Half | None:
        """Store `half`; return the other half when it was already here (and forget both)."""
        self._expire()
        other = self._halves.get(ce_id)
        if other is not None and other.kind != half.kind:
            del self._halves[ce_id]
            return other
        if other is not None:  # a retry of the same half: the newer copy wins
            del self._halves[ce_id]
        self._halves[ce_id] = half
        while len(self._halves) > self.max_pending:
            old_id, _ = self._halves.popitem(last=False)
            self.dropped += 1
            log.warning("inference-log event dropped unpaired (too many pending)", ce_id=old_id)
        return None

    def _expire(self) -> None:
        now = time.monotonic()
        while self._halves:
            ce_id, half = next(iter(self._halves.items()))
            if now - half.arrived <= self.ttl_s:
                break
            del self._halves[ce_id]
            self.dropped += 1
            log.warning("inference-log event dropped unpaired (expired)", ce_id=ce_id, kind=half.kind)


def create_app(log_path: str | Path, max_event_bytes: int = 64 * MB, pending_ttl_s: float = 300.0,
               max_pending: int = 1000, flush_records: int = 512, flush_seconds: float = 10.0) -> FastAPI:
    """The sink as an ASGI app: POST / takes CloudEvents; GET /healthz for probes.

    Records are buffered into parts of `flush_records` (or what waited `flush_seconds`), and what
    waits is written when the app shuts down (SIGTERM)."""
    log_path = Path(log_path)
    buffer = LogBuffer(log_path, flush_records, flush_seconds)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        buffer.close()

    app = FastAPI(title="xrayops inference-log sink", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    pending = PendingPairs(pending_ttl_s, max_pending)
    lock = asyncio.Lock()
    stats = {"records": 0, "events": 0}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "pending": len(pending), "records": stats["records"], "dropped": pending.dropped}

    @app.post("/")
    async def receive(request: Request) -> JSONResponse:
        try:
            return await _receive(request)
        except EventError as exc:
            log.warning("inference-log event refused", status=exc.status, error=str(exc),
                        ce_id=request.headers.get("ce-id", ""))
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def _receive(request: Request) -> JSONResponse:
        headers = request.headers
        ce_id, ce_type = headers.get("ce-id", ""), headers.get("ce-type", "")
        if not ce_id:
            raise EventError("not a CloudEvent: no ce-id header (binary content mode expected)")
        if ce_type not in (REQUEST_TYPE, RESPONSE_TYPE):
            raise EventError(f"unexpected ce-type {ce_type!r}; expected {REQUEST_TYPE} or {RESPONSE_TYPE}")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_event_bytes:
            raise EventError(f"event of {declared} bytes is over the limit of {max_event_bytes}", status=413)
        body = await request.body()
        if len(body) > max_event_bytes:
            raise EventError(f"event of {len(body)} bytes is over the limit of {max_event_bytes}", status=413)
        stamp = event_time(headers.get("ce-time"))
        if ce_type == REQUEST_TYPE:
            half = _Half("request", await run_in_threadpool(parse_request, body, ce_id), stamp)
        else:
            half = _Half("response", await run_in_threadpool(parse_response, body), stamp)
        async with lock:
            stats["events"] += 1
            other = pending.add(ce_id, half)
        if other is None:
            return JSONResponse({"status": "pending", "ce_id": ce_id}, status_code=202)
        request_half, response_half = (half, other) if half.kind == "request" else (other, half)
        responses, embeddings = response_half.value
        stamp = request_half.timestamp or response_half.timestamp
        records = pair_records(request_half.value, responses, embeddings, stamp)
        part = await run_in_threadpool(buffer.add, records)
        async with lock:
            stats["records"] += len(records)
        log.info("inference-log records taken", ce_id=ce_id, records=len(records),
                 inference_service=headers.get("ce-inferenceservicename", ""), part=str(part or ""))
        status = "written" if part is not None and buffer.waiting == 0 else "buffered"
        return JSONResponse({"status": status, "records": len(records)}, status_code=201)

    return app


def run(log_path: str | Path, host: str = "127.0.0.1", port: int = 8090, max_event_mb: int = 64,
        flush_records: int = 512, flush_seconds: float = 10.0) -> None:
    """Serve the sink with uvicorn until SIGTERM/SIGINT."""
    import uvicorn

    Path(log_path).mkdir(parents=True, exist_ok=True)  # fail at start, not on the first event
    log.info("inference-log sink", host=host, port=port, log_path=str(log_path))
    app = create_app(log_path, max_event_bytes=max_event_mb * MB, flush_records=flush_records, flush_seconds=flush_seconds)
    uvicorn.run(app, host=host, port=port,
                log_level="warning", access_log=False)
