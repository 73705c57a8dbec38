"""Where xrayops reaches into kserve 0.21: every patch of the ModelServer in one place.

kserve's ModelServer is the server; these are the narrow changes it needs, each for a reason:
  - a bind address: `RESTServer.__init__` builds `uvicorn.Config(host="0.0.0.0")` and
    `GRPCServer.start` listens on `"[::]:<port>"`, so a plain ModelServer is reachable from every
    interface (`LoopbackRESTServer`, `LoopbackGRPCServer`, `LoopbackModelServer`);
  - a request-size limit: 413 before the body is read when Content-Length says so, and for a
    chunked body as soon as it passes the limit (`BodyLimitMiddleware`); gRPC messages get the same
    limit, never below 30 MB (kserve's 8 MiB default refuses one uncompressed radiograph);
  - binary-extension v2 requests parsed with the raw bytes kept: kserve's `InferRequest.from_bytes`
    re-encodes binary BYTES inputs as UTF-8 text, which fails on DICOM; a v2 JSON body without a
    Content-Type (as NVIDIA's tritonclient sends it) is read as JSON (`XrayDataPlane`);
  - model versions: kserve answers 501 to every `/v2/models/NAME/versions/V/...` route and its gRPC
    servicer ignores the version. Here the served version (the weights' content hash) is advertised
    in the metadata, accepted on every versioned route, and any other version is a 404 / NOT_FOUND;
  - requested outputs: kserve's gRPC answer ignores the request's `outputs`; here both protocols
    return only the outputs asked for (an unknown one is a 400 / INVALID_ARGUMENT);
  - client errors (4xx, INVALID_ARGUMENT, NOT_FOUND) are logged as one line without the message
    (which can quote the request) instead of a traceback at ERROR; server errors keep theirs.

`check_kserve_version` refuses to start on another kserve: each patch overrides private methods
whose shape is that release's.
"""
from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Optional, Union

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import StatusCode, aio
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from kserve.protocol.rest.v2_endpoints import V2Endpoints

from serving.errors import PayloadTooLarge, UnsupportedMedia, status_error_handler
from serving.schema import infer_request_from_binary
from xrayops.logs import get_logger

log = get_logger(__name__)

KSERVE_VERSION = "0.21.0"
MB = 1024 * 1024
MIN_GRPC_MESSAGE_BYTES = 30 * MB
DEFAULT_MAX_REQUEST_BYTES = 64 * MB


def check_kserve_version() -> None:
    """Fail loudly on a kserve these patches were not written against."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("kserve")
    except PackageNotFoundError as exc:
        raise RuntimeError("kserve is not installed") from exc
    if found != KSERVE_VERSION:
        raise RuntimeError(
            f"serving.kserve_compat patches kserve {KSERVE_VERSION} internals, but kserve {found} is installed; "
            "pin kserve or port the patches (see this module's docstring)"
        )


class ModelVersionNotFound(ModelNotFound):
    """A version the server does not serve (404 on REST, NOT_FOUND on gRPC)."""

    def __init__(self, model_name: str, version: str, served: str) -> None:
        super().__init__(model_name)
        self.reason = f"model {model_name} has no version {version!r}; it serves version {served!r}"

    def __str__(self) -> str:
        return self.reason


def served_version(model) -> str:
    return str(getattr(model, "version", "") or "")


def check_version(dataplane: DataPlane, model_name: str, version: str | None) -> None:
    """An empty version means the served one; any other must be it."""
    if not version:
        return
    model = dataplane.get_model_from_registry(model_name)  # ModelNotFound -> 404
    served = served_version(model)
    if version != served:
        raise ModelVersionNotFound(model_name, version, served)


def check_requested_outputs(request, model) -> None:
    """Requested outputs must be outputs this model has (Open Inference Protocol: unknown is an error)."""
    requested = [o.name for o in (getattr(request, "request_outputs", None) or [])]
    known = {o["name"] for o in model.get_output_types()} if hasattr(model, "get_output_types") else set()
    unknown = [name for name in requested if known and name not in known]
    if unknown:
        raise InvalidInput(f"unknown requested output(s) {unknown}; this model's outputs are {sorted(known)}")


class BodyLimitMiddleware:
    """Pure ASGI middleware: requests over `max_bytes` get a 413. A declared Content-Length over
    the limit is refused before any body byte is read; a body without one (chunked) is read up to
    the limit here and refused as soon as it passes it, then handed on whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str) -> JSONResponse:
        message = f"request body of {size} is over the limit of {self.max_bytes} bytes (XRAYOPS_SERVE_MAX_REQUEST_MB)"
        return JSONResponse({"error": message}, status_code=413)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await JSONResponse({"error": "invalid Content-Length header"}, status_code=400)(scope, receive, send)
            if int(declared) > self.max_bytes:
                return await self._too_large(f"{int(declared)} bytes")(scope, receive, send)
            return await self.app(scope, receive, send)
        # No length declared: the app would read a body error as a 400, so the limit is applied here.
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await self._too_large(f"more than {received} bytes")(scope, receive, send)
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def buffered_receive():
            return next(replay, None) or await receive()

        await self.app(scope, buffered_receive, send)


class XrayDataPlane(DataPlane):
    def decode_inference_request(self, body, headers, model_name):
        if isinstance(body, (bytes, bytearray)):
            json_length = headers.get("inference-header-content-length")
            if json_length is not None and json_length.isdigit():
                return infer_request_from_binary(bytes(body), int(json_length), model_name)
            if bytes(body).lstrip()[:1] == b"{":  # JSON sent without a Content-Type (tritonclient's JSON mode)
                try:
                    body = InferenceRequest.model_validate(orjson.loads(body))
                except (orjson.JSONDecodeError, ValueError) as exc:
                    raise InvalidInput(f"the body is not a valid v2 inference request: {exc}") from exc
                return super().decode_inference_request(body, headers, model_name)
            raise InvalidInput(
                "a v2 request is JSON, or the binary data extension with an 'inference-header-content-length' header"
            )
        return super().decode_inference_request(body, headers, model_name)

    async def infer(self, model_name, request, headers=None):
        check_requested_outputs(request, self.get_model_from_registry(model_name))
        return await super().infer(model_name, request, headers)

    async def model_metadata(self, model_name: str) -> dict:
        metadata = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        if served_version(model):
            metadata["versions"] = [served_version(model)]
        if hasattr(model, "member_info"):
            metadata["platform"] = "pytorch"
            metadata["parameters"] = {
                "members": [
                    {"name": m["bundle"]["name"], "version": m["version"], "ssl_method": m["bundle"]["ssl_method"],
                     "lineage": m["bundle"]["lineage"]}
                    for m in model.member_info()
                ],
            }
        return metadata


async def request_validation_handler(_request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body that is not a v2 request at all (empty, wrong fields), as a 400
    in kserve's {"error": ...} shape like every other input error."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]
    )
    return JSONResponse({"error": f"the body is not a valid v2 inference request ({problems})"}, status_code=400)


def _client_error(status: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        # One line, and not the message: it can quote what the client sent.
        log.info("client error", status=status, error=type(exc).__name__, path=request.url.path)
        return JSONResponse(status_code=int(getattr(exc, "status", status)), content={"error": str(exc)})

    return handler


class XrayServicer(InferenceServicer):
    """kserve's servicer with versions checked (and advertised) and requested outputs honoured."""

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        check_version(self._data_plane, request.name, request.version)
        metadata = await self._data_plane.model_metadata(model_name=request.name)
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata.get("versions") or [], platform=metadata["platform"],
            inputs=metadata["inputs"], outputs=metadata["outputs"],
        )

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        check_version(self._data_plane, request.name, request.version)
        return await super().ModelReady(request, context)

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        check_version(self._data_plane, request.model_name, request.model_version)
        return await super().ModelInfer(request, context)


class ClientErrorInterceptor(ExceptionToStatusInterceptor):
    """kserve's gRPC error mapping, with client errors logged as one line (no traceback, no message)."""

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if isinstance(ex, InvalidInput):
            log.info("client error", code="INVALID_ARGUMENT", error=type(ex).__name__, method=method_name)
            await context.abort(StatusCode.INVALID_ARGUMENT, ex.reason)
        elif isinstance(ex, ModelNotFound):
            log.info("client error", code="NOT_FOUND", error=type(ex).__name__, method=method_name)
            await context.abort(StatusCode.NOT_FOUND, ex.reason)
        else:
            await super().handle_exception(ex, request_or_iterator, context, method_name)


class LoopbackRESTServer(RESTServer):
    """kserve's REST server listening on `host`, with a body-size limit, 413/415 handlers, quiet
    client errors, versioned routes, v2 metadata with lineage, and the bundle metadata route."""

    def __init__(self, host: str, *args, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = host  # RESTServer.__init__ hard-codes "0.0.0.0"
        self.max_request_bytes = max_request_bytes

    def _add_middlewares(self, app: FastAPI) -> None:
        super()._add_middlewares(app)
        app.add_middleware(BodyLimitMiddleware, max_bytes=self.max_request_bytes)

    def _add_exception_handlers(self, app: FastAPI) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(InvalidInput, _client_error(400))
        app.add_exception_handler(ModelNotFound, _client_error(404))
        for error in (PayloadTooLarge, UnsupportedMedia):
            app.add_exception_handler(error, status_error_handler)
        app.add_exception_handler(RequestValidationError, request_validation_handler)

    def _register_endpoints(self, app: FastAPI) -> None:
        dataplane = self.dataplane
        v2 = V2Endpoints(dataplane, self.model_repository_extension)

        async def model_metadata(model_name: str) -> dict:
            # Ahead of kserve's route, whose response model drops everything but the v2 fields.
            return await dataplane.model_metadata(model_name)

        async def version_metadata(model_name: str, model_version: str) -> dict:
            check_version(dataplane, model_name, model_version)
            return await dataplane.model_metadata(model_name)

        async def version_ready(model_name: str, model_version: str):
            check_version(dataplane, model_name, model_version)
            return await v2.model_ready(model_name)

        async def version_infer(
            raw_request: Request, raw_response: Response, model_name: str, model_version: str,
            request_body: Union[InferenceRequest, bytes],
        ):
            check_version(dataplane, model_name, model_version)
            return await v2.infer(raw_request, raw_response, model_name, request_body)

        app.add_api_route("/v2/models/{model_name}", model_metadata, methods=["GET"])
        app.add_api_route("/v2/models/{model_name}/versions/{model_version}", version_metadata, methods=["GET"])
        app.add_api_route("/v2/models/{model_name}/versions/{model_version}/ready", version_ready, methods=["GET"])
        app.add_api_route("/v2/models/{model_name}/versions/{model_version}/infer", version_infer, methods=["POST"],
                          response_model=None)
        super()._register_endpoints(app)

        async def bundle_metadata(model_name: str) -> dict:
            model = dataplane.get_model_from_registry(model_name)  # ModelNotFound -> 404
            return model.bundle_info() if hasattr(model, "bundle_info") else {"name": model_name}

        app.add_api_route("/v2/models/{model_name}/bundle", bundle_metadata, methods=["GET"])


class LoopbackGRPCServer(GRPCServer):
    """kserve's gRPC server listening on `host` instead of "[::]". `start` is GRPCServer.start
    with the listen address, the servicer and the error interceptor changed."""

    def __init__(self, host: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers: int) -> None:
        servicer = XrayServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ClientErrorInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs["grpc_max_send_message_length"]),
                ("grpc.max_receive_message_length", self._kwargs["grpc_max_receive_message_length"]),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        listen_addr = f"{host}:{self._port}"
        if self._server.add_insecure_port(listen_addr) == 0:
            raise OSError(f"gRPC server cannot listen on {listen_addr}")
        log.info("gRPC server listening", address=listen_addr)
        await self._server.start()
        await self._server.wait_for_termination()


class LoopbackModelServer(ModelServer):
    """kserve's ModelServer with a bind address (one worker) and a request-size limit."""

    def __init__(self, host: str = "127.0.0.1", max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, **kwargs) -> None:
        check_kserve_version()
        super().__init__(workers=1, **kwargs)
        self.host = host
        self.max_request_bytes = max_request_bytes
        self.dataplane = XrayDataPlane(model_registry=self.registered_models)

    def start(self, models: list) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = LoopbackRESTServer(
            self.host,
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            max_request_bytes=self.max_request_bytes,
        )
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = LoopbackGRPCServer(
                self.host,
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs={
                    "grpc_max_send_message_length": grpc_limit(self.max_request_bytes),
                    "grpc_max_receive_message_length": grpc_limit(self.max_request_bytes),
                },
                grace_period=self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def grpc_limit(max_request_bytes: int) -> int:
    return max(max_request_bytes, MIN_GRPC_MESSAGE_BYTES)
