"""The model server: one role's kserve Model behind kserve's ModelServer, bound to one address.

Roles: `predictor` (the default; also decodes DICOM itself, the one-process local mode),
`transformer` (`serving.transformer.DicomTransformer`: DICOM to pixels, forwarded to
`--predictor-host`) and `combiner` (`serving.combiner.EnsembleCombiner`, behind an InferenceGraph).
Health: `/v2/health/live`, `/v2/health/ready`, `/v2/models/<name>/ready`; Prometheus: `/metrics`;
`GET /v2/models/{name}/bundle`: every member's bundle metadata. The changes kserve's server needs
(bind address, size limits, versions, requested outputs...) are in `serving.kserve_compat`.

Started by `xrayops serve`; `serving.harness` runs one in a subprocess for tests and the demo.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kserve.predictor_config import PredictorConfig

from serving.combiner import EnsembleCombiner
from serving.kserve_compat import DEFAULT_MAX_REQUEST_BYTES, MB, LoopbackModelServer
from serving.model import XrayModel
from serving.transformer import DecodeLimits, DicomTransformer
from xrayops.bundle_meta import read_bundle_meta
from xrayops.logs import get_logger

log = get_logger(__name__)

ROLES = ("predictor", "transformer", "combiner")


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
    log_flush_records: int = 512,
    log_flush_seconds: float = 10.0,
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
    if role != "combiner":
        from xrayops.config import get_settings
        from xrayops.dicom.deid import DeidKeyError, require_key

        # The transformer pseudonymises every DICOM, a predictor that logs locally too: no key, no
        # server. A cluster's predictor (pixels from the transformer, --no-local-log) may lack it.
        try:
            deid_key = require_key(get_settings())
        except DeidKeyError as exc:
            if role == "transformer" or log_path is not None:
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
            log_flush_records=log_flush_records, log_flush_seconds=log_flush_seconds,
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


def serve_options(settings) -> dict:
    """The serving limits and batching from `xrayops.config.Settings` as `serve` keywords."""
    return {
        "max_request_bytes": settings.serve_max_request_mb * MB,
        "limits": DecodeLimits(max_image_pixels=settings.serve_max_image_pixels, max_frames=settings.serve_max_frames),
        "max_batch_size": settings.serve_max_batch_size,
        "max_batch_latency_ms": settings.serve_max_batch_latency_ms,
        "log_flush_records": settings.serve_log_flush_records,
        "log_flush_seconds": settings.serve_log_flush_seconds,
    }
