"""Run the predictor with kserve's ModelServer, bound to one address (127.0.0.1 by default).

kserve 0.21 has no bind-address option: `RESTServer.__init__` builds
`uvicorn.Config(host="0.0.0.0")` (kserve/protocol/rest/server.py) and `GRPCServer.start`
listens on `"[::]:<port>"` (kserve/protocol/grpc/server.py), so a plain ModelServer is
reachable from every interface. `LoopbackModelServer` swaps in the two servers with the
host as a parameter (single worker, which is all the embedded default needs); the data
plane, routes, error handlers and signal handling are kserve's.

Also here: a request-size limit on the REST body (413 before the body is read when
Content-Length says so; `XRAYOPS_SERVE_MAX_REQUEST_MB`), the same limit on gRPC messages
(never below 30 MB), 413/415 handlers for `serving.errors`, and the cluster roles: `predictor`
(the default; also decodes DICOM itself, the one-process local mode) and `transformer`
(`serving.transformer.DicomTransformer`, forwarding pixels to `--predictor-host`).
Health: `/v2/health/live`, `/v2/health/ready`, `/v2/models/<name>/ready`; Prometheus: `/metrics`.

Two more narrow fixes live here:
  - `XrayDataPlane.decode_inference_request`: kserve 0.21's `InferRequest.from_bytes`
    re-encodes binary BYTES inputs as UTF-8 text, which fails (HTTP 500) on binary DICOM.
    Binary-extension requests are parsed here with the raw bytes kept.
  - `XrayDataPlane.model_metadata` reports the served version (the v2 `versions` field, on
    REST and gRPC) and, on REST, `parameters` with each member's version and lineage;
    `GET /v2/models/{name}/bundle` returns the full bundle metadata of every member.

`python -m serving.server --bundle DIR ...` runs a server; `start_server_process` /
`running_server` run one in a subprocess for tests and the demo and stop it by PID.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import aio
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import InvalidInput
from kserve.predictor_config import PredictorConfig
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer

from serving.combiner import EnsembleCombiner
from serving.errors import PayloadTooLarge, UnsupportedMedia, status_error_handler
from serving.schema import infer_request_from_binary
from serving.model import XrayModel
from serving.transformer import DecodeLimits, DicomTransformer
from xrayops.bundle_meta import read_bundle_meta
from xrayops.logs import get_logger

log = get_logger(__name__)

MB = 1024 * 1024
# Radiographs are often tens of MB each; kserve's default gRPC limit is 8 MiB. Never below this.
MIN_GRPC_MESSAGE_BYTES = 30 * MB
DEFAULT_MAX_REQUEST_BYTES = 64 * MB
REPO_ROOT = Path(__file__).resolve().parents[1]
ROLES = ("predictor", "transformer", "combiner")


class BodyLimitMiddleware:
    """Pure ASGI middleware: requests over `max_bytes` get a 413. A declared Content-Length over
    the limit is refused before any body byte is read; a chunked body is counted as it arrives."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: str) -> str:
        return f"request body of {size} is over the limit of {self.max_bytes} bytes (XRAYOPS_SERVE_MAX_REQUEST_MB)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await JSONResponse({"error": "invalid Content-Length header"}, status_code=400)(scope, receive, send)
            if int(declared) > self.max_bytes:
                response = JSONResponse({"error": self._message(f"{int(declared)} bytes")}, status_code=413)
                return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self._message(f"more than {received} bytes"))
            return message

        await self.app(scope, limited_receive, send)


class XrayDataPlane(DataPlane):
    def decode_inference_request(self, body, headers, model_name):
        if isinstance(body, bytes):
            json_length = headers.get("inference-header-content-length")
            if json_length is None or not json_length.isdigit():
                raise InvalidInput("binary v2 request without a valid 'inference-header-content-length' header")
            return infer_request_from_binary(body, int(json_length), model_name)
        return super().decode_inference_request(body, headers, model_name)

    async def model_metadata(self, model_name: str) -> dict:
        metadata = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        if isinstance(model, XrayModel):
            metadata["versions"] = [model.version]
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


class XrayServicer(InferenceServicer):
    """kserve's servicer; ModelMetadata also carries `versions` (kserve 0.21 leaves it out)."""

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        metadata = await self._data_plane.model_metadata(model_name=request.name)
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata.get("versions") or [], platform=metadata["platform"],
            inputs=metadata["inputs"], outputs=metadata["outputs"],
        )


class LoopbackRESTServer(RESTServer):
    """kserve's REST server listening on `host`, with a body-size limit, 413/415 handlers,
    v2 metadata with lineage, and the bundle metadata route."""

    def __init__(self, host: str, *args, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = host  # RESTServer.__init__ hard-codes "0.0.0.0"
        self.max_request_bytes = max_request_bytes

    def _add_middlewares(self, app: FastAPI) -> None:
        super()._add_middlewares(app)
        app.add_middleware(BodyLimitMiddleware, max_bytes=self.max_request_bytes)

    def _add_exception_handlers(self, app: FastAPI) -> None:
        super()._add_exception_handlers(app)
        for error in (PayloadTooLarge, UnsupportedMedia):
            app.add_exception_handler(error, status_error_handler)
        app.add_exception_handler(RequestValidationError, request_validation_handler)

    def _register_endpoints(self, app: FastAPI) -> None:
        dataplane = self.dataplane

        async def model_metadata(model_name: str) -> dict:
            # Ahead of kserve's route, whose response model drops everything but the v2 fields.
            return await dataplane.model_metadata(model_name)

        app.add_api_route("/v2/models/{model_name}", model_metadata, methods=["GET"])
        super()._register_endpoints(app)

        async def bundle_metadata(model_name: str) -> dict:
            model = dataplane.get_model_from_registry(model_name)  # ModelNotFound -> 404
            return model.bundle_info() if isinstance(model, XrayModel) else {"name": model_name}

        app.add_api_route("/v2/models/{model_name}/bundle", bundle_metadata, methods=["GET"])


class LoopbackGRPCServer(GRPCServer):
    """kserve's gRPC server listening on `host` instead of "[::]". `start` is GRPCServer.start
    with the listen address changed."""

    def __init__(self, host: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers: int) -> None:
        servicer = XrayServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
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


def serve(
    bundle_dir: str | Path | Sequence[str | Path],
    host: str = "127.0.0.1",
    http_port: int = 8080,
    grpc_port: int | None = 8081,
    log_path: str | Path | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    device: str = "auto",
    role: str = "predictor",
    predictor_host: str | None = None,
    predictor_protocol: str = "v2",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    limits: DecodeLimits | None = None,
    max_batch_size: int = 32,
    max_batch_latency_ms: float = 5.0,
) -> None:
    """Serve one bundle, or several averaged as an ensemble, until SIGTERM/SIGINT.
    `grpc_port=None` serves REST only.

    role "predictor" (default) answers DICOM and pixel requests itself; "transformer" decodes
    DICOM and forwards pixels to `predictor_host` (protocol "v2" REST or "grpc-v2"); "combiner"
    averages the members' answers collected by an InferenceGraph Ensemble node.
    Raises RuntimeError, before anything listens, when a bundle fails verification.
    """
    dirs = [bundle_dir] if isinstance(bundle_dir, (str, Path)) else list(bundle_dir)
    if role not in ROLES:
        raise RuntimeError(f"unknown role {role!r}; choose one of {ROLES}")
    if not dirs:
        raise RuntimeError("no model bundle given")
    name = model_name or read_bundle_meta(Path(dirs[0])).name
    limits = limits or DecodeLimits()
    deid_key = None
    if role != "combiner":  # the predictor and the transformer pseudonymise: no key, no server
        from xrayops.config import get_settings
        from xrayops.dicom.deid import DeidKeyError, require_key

        try:
            deid_key = require_key(get_settings())
        except DeidKeyError as exc:
            raise RuntimeError(str(exc)) from exc
    predictor_config = None
    if role == "transformer":
        if not predictor_host:
            raise RuntimeError("the transformer role needs --predictor-host")
        model = DicomTransformer(name, dirs[0], limits, deid_key)
        predictor_config = PredictorConfig(predictor_host=predictor_host, predictor_protocol=predictor_protocol)
    elif role == "combiner":
        model = EnsembleCombiner(name, dirs)
    else:
        model = XrayModel(
            name, dirs, log_path=log_path, version=model_version, device=device, limits=limits, deid_key=deid_key,
            max_batch_size=max_batch_size, max_batch_latency_ms=max_batch_latency_ms,
        )
    if not model.load():
        raise RuntimeError(f"model {name} is not ready: {model.load_error}")
    server = LoopbackModelServer(
        host=host, http_port=http_port, grpc_port=grpc_port or 0, enable_grpc=grpc_port is not None, grace_period=5,
        max_request_bytes=max_request_bytes, predictor_config=predictor_config,
    )
    log.info("serving", model=name, role=role, version=getattr(model, "version", ""), members=len(dirs), host=host,
             http_port=http_port, grpc_port=grpc_port)
    server.start([model])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server started by `start_server_process`; `stop()` ends it by PID."""

    process: subprocess.Popen
    url: str
    grpc_address: str | None
    model_name: str
    output_path: Path
    owns_output: bool = False  # a temp file we created: removed on stop
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.output_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.owns_output:
            self.output_path.unlink(missing_ok=True)
        self.stopped = True
        return self.process.returncode


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_server_process(
    bundle_dir: str | Path | Sequence[str | Path],
    host: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
    enable_grpc: bool = True,
    log_path: str | Path | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    output_path: str | Path | None = None,
    startup_timeout: float = 180.0,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start `python -m serving.server` and return once the model answers ready.

    Several bundle folders serve an ensemble. Free ports are picked when none are given.
    `extra_args` go to the command line (e.g. ["--role", "transformer", ...]), `env` over
    os.environ (e.g. XRAYOPS_SERVE_MAX_REQUEST_MB). Server output goes to `output_path` (a temp
    file by default). Raises RuntimeError with the server's output if it exits or is not
    ready within `startup_timeout` seconds.
    """
    dirs = [bundle_dir] if isinstance(bundle_dir, (str, Path)) else list(bundle_dir)
    name = model_name or read_bundle_meta(Path(dirs[0])).name
    http_port = http_port or free_port(host)
    grpc_port = (grpc_port or free_port(host)) if enable_grpc else None
    owns_output = output_path is None
    if owns_output:
        handle, path = tempfile.mkstemp(prefix="xrayops-serve-", suffix=".log")
        os.close(handle)
        output_path = path
    output_path = Path(output_path)
    cmd = [sys.executable, "-m", "serving.server", *[a for d in dirs for a in ("--bundle", str(d))], "--host", host,
           "--http-port", str(http_port), "--model-name", name, *extra_args]
    cmd += ["--grpc-port", str(grpc_port)] if grpc_port else ["--no-grpc"]
    if log_path is not None:
        cmd += ["--log-path", str(log_path)]
    if model_version:
        cmd += ["--model-version", model_version]
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(output_path, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url_host = f"[{host}]" if ":" in host else host
    server = ServerProcess(
        process=process,
        url=f"http://{url_host}:{http_port}",
        grpc_address=f"{url_host}:{grpc_port}" if grpc_port else None,
        model_name=name,
        output_path=output_path,
        owns_output=owns_output,
    )
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _http_ok(f"{server.url}/v2/health/ready") and _http_ok(f"{server.url}/v2/models/{name}/ready"):
            return server
        time.sleep(0.3)
    problem = (
        f"server exited with code {process.returncode}" if process.poll() is not None
        else f"server not ready within {startup_timeout:.0f}s"
    )
    output = server.output_tail()
    server.stop()
    raise RuntimeError(f"{problem}:\n{output}")


@contextmanager
def running_server(bundle_dir: str | Path | Sequence[str | Path], **kwargs) -> Iterator[str]:
    """`start_server_process` as a context manager yielding the base URL; the server is
    stopped by PID on exit."""
    server = start_server_process(bundle_dir, **kwargs)
    try:
        yield server.url
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path, action="append",
                        help="model bundle folder; repeat for a softmax-average ensemble")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=8081)
    parser.add_argument("--no-grpc", action="store_true", help="serve REST only")
    parser.add_argument("--log-path", type=Path, default=None, help="inference log folder")
    parser.add_argument("--model-name", default=None, help="served name (default: the bundle's)")
    parser.add_argument("--model-version", default=None, help="served version (default: weights hash)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (default: XRAYOPS_DEVICE)")
    parser.add_argument("--role", choices=ROLES, default="predictor")
    parser.add_argument("--predictor-host", default=None, help="transformer role: the predictor's host[:port]")
    parser.add_argument("--predictor-protocol", default="v2", choices=("v2", "grpc-v2"))
    args = parser.parse_args(argv)
    from xrayops.config import get_settings

    settings = get_settings()
    try:
        serve(
            args.bundle, host=args.host, http_port=args.http_port, grpc_port=None if args.no_grpc else args.grpc_port,
            log_path=args.log_path or settings.inference_log_path, model_name=args.model_name,
            model_version=args.model_version, device=args.device or settings.device, role=args.role,
            predictor_host=args.predictor_host, predictor_protocol=args.predictor_protocol,
            **serve_options(settings),
        )
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def serve_options(settings) -> dict:
    """The serving limits and batching from `xrayops.config.Settings` as `serve` keywords."""
    return {
        "max_request_bytes": settings.serve_max_request_mb * MB,
        "limits": DecodeLimits(max_image_pixels=settings.serve_max_image_pixels, max_frames=settings.serve_max_frames),
        "max_batch_size": settings.serve_max_batch_size,
        "max_batch_latency_ms": settings.serve_max_batch_latency_ms,
    }


if __name__ == "__main__":
    main()
