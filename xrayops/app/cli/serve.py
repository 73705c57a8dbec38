"""The endpoint: `xrayops serve` (kserve ModelServer), the inference-log sink, and a client."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from xrayops.app.cli.common import app, console, _fail, _deid_key, BindHostOption, InferenceLogOption
from xrayops.config import get_settings


@app.command()
def serve(
    model: Annotated[
        Optional[list[str]],
        typer.Option(
            "--model", "--bundle",
            help="Bundle folder, storage URI (file://) or registry ref models:/NAME@ALIAS or models:/NAME/VERSION; "
            "repeat for a softmax-average ensemble (default: XRAYOPS_SERVE_MODELS, else outputs/bundle).",
        ),
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    # The underscore spellings are the ones the KServe controller appends to a transformer's args.
    http_port: Annotated[Optional[int], typer.Option("--http-port", "--http_port", help="REST port.")] = None,
    grpc_port: Annotated[Optional[int], typer.Option("--grpc-port", "--grpc_port", help="gRPC port.")] = None,
    model_name: Annotated[
        Optional[str], typer.Option("--model-name", "--model_name", help="Served model name (default: the bundle's).")
    ] = None,
    role: Annotated[str, typer.Option(help="predictor (also decodes DICOM) | transformer (cluster: DICOM -> pixels) | combiner (InferenceGraph).")] = (
        "predictor"
    ),
    predictor_host: Annotated[
        Optional[str],
        typer.Option("--predictor-host", "--predictor_host", help="Transformer role: the predictor's host[:port]."),
    ] = None,
    predictor_protocol: Annotated[
        str, typer.Option("--predictor-protocol", "--predictor_protocol", help="Transformer role: v2 (REST) or grpc-v2.")
    ] = "v2",
    local_log: Annotated[
        bool,
        typer.Option(
            "--local-log/--no-local-log",
            help="Append the inference log here (XRAYOPS_INFERENCE_LOG_PATH, else <output_dir>/inference-log); "
            "off on a cluster, where KServe's payload logger feeds `xrayops log-sink`.",
        ),
    ] = True,
    log_path: InferenceLogOption = None,
    model_version: Annotated[Optional[str], typer.Option("--model-version", help="Served version (default: the weights' content hash).")] = None,
    no_grpc: Annotated[bool, typer.Option("--no-grpc", help="Serve REST only.")] = False,
) -> None:
    """Serve the model with kserve's ModelServer (v1 and Open Inference Protocol v2, REST and gRPC)."""
    from serving.server import serve as run_serve
    from serving.server import serve_options
    from xrayops.registry import RegistryError, resolve_bundle

    settings = get_settings()
    if role == "transformer" or (role == "predictor" and local_log):  # they pseudonymise what they log
        _deid_key(settings)
    refs = model or settings.serve_models or ["outputs/bundle"]
    try:
        bundle_dirs = [
            resolve_bundle(ref, settings.tracking_uri(), settings.output_dir / "served-bundle" / str(i))
            for i, ref in enumerate(refs)
        ]
        run_serve(
            bundle_dirs,
            host=host or settings.serve_host,
            http_port=http_port or settings.serve_http_port,
            grpc_port=None if no_grpc else (grpc_port or settings.serve_grpc_port),
            log_path=(log_path or settings.inference_log_path or settings.output_dir / "inference-log") if local_log else None,
            model_name=model_name,
            model_version=model_version,
            device=settings.device,
            role=role,
            predictor_host=predictor_host,
            predictor_protocol=predictor_protocol,
            **serve_options(settings),
        )
    except (RegistryError, RuntimeError) as exc:  # a bad bundle is refused before anything listens
        _fail(str(exc))


@app.command("log-sink")
def log_sink(
    log_path: InferenceLogOption = None,
    host: BindHostOption = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8090,
    max_event_mb: Annotated[int, typer.Option(help="Largest CloudEvent accepted (413 above).")] = 64,
) -> None:
    """Receive KServe payload-logger CloudEvents and append them to the parquet inference log."""
    from serving.log_sink import run

    settings = get_settings()
    path = log_path or settings.inference_log_path or settings.output_dir / "inference-log"
    try:
        run(path, host=host, port=port, max_event_mb=max_event_mb, flush_records=settings.serve_log_flush_records,
            flush_seconds=settings.serve_log_flush_seconds)
    except OSError as exc:
        _fail(f"cannot start the inference-log sink: {exc}")


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(help="DICOM files to classify.")],
    url: Annotated[str, typer.Option(help="Base URL of a running `xrayops serve`.")] = "http://127.0.0.1:8080",
    model_name: Annotated[Optional[str], typer.Option(help="Served model name.")] = None,
    gradcam: Annotated[bool, typer.Option(help="Also return a Grad-CAM heatmap per image (base64 PNG).")] = False,
    upright: Annotated[
        bool, typer.Option(help="Also return each image turned upright by its predicted angle (base64 PNG; Baltruschat et al. 2018).")
    ] = False,
    sr: Annotated[
        Optional[Path],
        typer.Option("--sr", help="Also write each image's DICOM Structured Report into this folder (0700; PHI: "
                     "the SR carries the study's identifiers), named by the SR's instance UID."),
    ] = None,
) -> None:
    """Send DICOM files to a running server (kserve's InferenceRESTClient, v2) and print the answers."""
    import httpx

    from serving.client import predict_files, predict_files_with_sr

    settings = get_settings()
    name = model_name or settings.registered_model_name
    srs: list[bytes] = []
    try:
        if sr is None:
            responses = predict_files(url, name, files, gradcam=gradcam, upright=upright)
        else:
            responses, srs = predict_files_with_sr(url, name, files, gradcam=gradcam, upright=upright)
    except httpx.HTTPStatusError as exc:  # the server's 4xx message, not a traceback
        _fail(f"{exc.response.status_code}: {exc.response.text}")
    except (httpx.HTTPError, OSError) as exc:
        _fail(f"cannot reach {url}: {exc}")
    if sr is not None:
        from xrayops.results.files import write_srs

        try:
            console.print(f"wrote {len(write_srs(sr, srs))} Structured Reports to {sr}")
        except OSError as exc:
            _fail(f"cannot write the Structured Reports to {sr}: {exc.strerror}")
    typer.echo(json.dumps([r.model_dump() for r in responses], indent=2))
