"""The `xrayops` command line: one verb per stage, plus `pipeline` and `demo`.

This module is the composition root: it is the one place in `xrayops` that may reach the
adapters (`serving`, `pipelines`), and only lazily inside the commands that need them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from xrayops.config import get_settings
from xrayops.logs import configure_logging

app = typer.Typer(
    help="xrayops: radiograph MLOps. DICOM -> versioned dataset -> SSL model -> KServe -> monitoring -> retraining.",
    no_args_is_help=True,
    add_completion=False,
)
pipeline_app = typer.Typer(help="Compile or run the KFP pipeline.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _print_json(obj) -> None:
    text = obj.model_dump_json(indent=2) if hasattr(obj, "model_dump_json") else json.dumps(obj, indent=2, default=str)
    typer.echo(text)


@app.callback()
def main(
    log_level: Annotated[Optional[str], typer.Option(help="Log level (default XRAYOPS_LOG_LEVEL or INFO).")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Structured JSON log lines on stderr.")] = False,
) -> None:
    settings = get_settings()
    configure_logging(log_level or settings.log_level, json=log_json or settings.log_json)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder: OUT/dicom/*.dcm and OUT/truth.csv.")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 700,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
    size: Annotated[int, typer.Option(help="Nominal image side in pixels.")] = 160,
    mislabel_rate: Annotated[float, typer.Option(help="Share of images given a wrong BodyPartExamined tag.")] = 0.05,
    shift: Annotated[float, typer.Option(help="Domain shift 0..1: share of images from a second vendor.")] = 0.0,
    ood_rate: Annotated[float, typer.Option(help="Share of out-of-domain images.")] = 0.03,
) -> None:
    """Write synthetic radiographs as real DICOM (CR/DX, several codecs) plus a ground-truth sidecar."""
    from xrayops.data.synth import synthesize

    _print_json(synthesize(out, n=n, seed=seed, size=size, mislabel_rate=mislabel_rate, shift=shift, ood_rate=ood_rate))


@app.command()
def ingest(
    source: Annotated[Path, typer.Argument(help="Folder of DICOM files (searched recursively).")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder (default XRAYOPS_DATA_DIR).")] = None,
    size: Annotated[int, typer.Option(help="Output image side (preprocessing spec).")] = 64,
    workers: Annotated[int, typer.Option(help="Decode processes.")] = 1,
) -> None:
    """Decode, de-identify and preprocess DICOM into a manifest and pixel shards; failures are quarantined."""
    from xrayops.contracts import PreprocessingSpec
    from xrayops.ingest import ingest as run_ingest

    settings = get_settings()
    if not source.exists():
        _fail(f"source folder {source} does not exist")
    summary = run_ingest(
        source,
        data_dir or settings.data_dir,
        PreprocessingSpec(size=size),
        settings.deid_key.get_secret_value(),
        workers,
        synonyms_path=settings.body_part_synonyms,
    )
    _print_json(summary)


@app.command("version-dataset")
def version_dataset_cmd(
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder to track (default XRAYOPS_DATA_DIR).")] = None,
    repo: Annotated[Path, typer.Option(help="DVC/git repository root.")] = Path("."),
    remote: Annotated[Optional[str], typer.Option(help="DVC remote URL: a folder or s3://bucket/prefix.")] = None,
    endpoint_url: Annotated[Optional[str], typer.Option(help="S3 endpoint (MinIO, moto...).")] = None,
) -> None:
    """`dvc add` the dataset and `dvc push` it; prints the dataset version (content hash)."""
    from xrayops.versioning import version_dataset

    settings = get_settings()
    _print_json(
        version_dataset(
            repo,
            data_dir or settings.data_dir,
            remote_url=remote if remote is not None else settings.dvc_remote_url,
            endpoint_url=endpoint_url if endpoint_url is not None else settings.s3_endpoint_url,
        )
    )


@app.command()
def pretrain(
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for backbone.pt and checkpoints.")] = Path("outputs/pretrain"),
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    arch: Annotated[str, typer.Option(help="resnet18 (paper 000) or resnet50.")] = "resnet18",
) -> None:
    """Self-supervised pretraining (SimCLR, paper 000) of the backbone; resumes from a checkpoint."""
    from xrayops.train.pretrain import PretrainConfig, pretrain as run_pretrain

    settings = get_settings()
    cfg = PretrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, arch=arch, device=settings.device)
    _print_json(run_pretrain(data_dir or settings.data_dir, out, cfg))


@app.command()
def finetune(
    backbone: Annotated[Path, typer.Option(help="backbone.pt from pretrain.")] = Path("outputs/pretrain/backbone.pt"),
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder.")] = None,
    out: Annotated[Path, typer.Option(help="Bundle output folder.")] = Path("outputs/bundle"),
    epochs: Annotated[int, typer.Option(help="Epochs for the linear head.")] = 60,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train the linear region head on the frozen backbone (paper 000) and write a model bundle."""
    from xrayops.train.finetune import FinetuneConfig, finetune as run_finetune

    settings = get_settings()
    if not backbone.exists():
        _fail(f"backbone {backbone} not found; run `xrayops pretrain` first")
    bundle = run_finetune(data_dir or settings.data_dir, backbone, out, FinetuneConfig(epochs=epochs, seed=seed))
    typer.echo(str(bundle))


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Option(help="Model bundle folder.")] = Path("outputs/bundle"),
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder.")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("outputs/evaluation"),
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    truth: Annotated[Optional[Path], typer.Option(help="truth.csv from synth: also score against true labels.")] = None,
) -> None:
    """Metrics, per-class accuracy, confusion matrix and an HTML report."""
    from xrayops.data.truth import read_truth
    from xrayops.evaluate.report import evaluate_bundle

    settings = get_settings()
    result = evaluate_bundle(bundle, data_dir or settings.data_dir, out, split=split, truth=read_truth(truth) if truth else None)
    _print_json(result)


@app.command()
def register(
    bundle: Annotated[Path, typer.Option(help="Model bundle folder.")] = Path("outputs/bundle"),
    metrics: Annotated[Optional[Path], typer.Option(help="metrics.json from evaluate.")] = None,
    dataset_dvc: Annotated[Path, typer.Option(help=".dvc file of the training dataset.")] = Path("data.dvc"),
    name: Annotated[Optional[str], typer.Option(help="Registered model name.")] = None,
    alias: Annotated[str, typer.Option(help="Alias to point at the new version.")] = "champion",
) -> None:
    """Register the bundle in MLflow with lineage: DVC hash, git commit, metrics."""
    from xrayops.contracts import Lineage
    from xrayops.demo import numeric_metrics
    from xrayops.registry import register_bundle
    from xrayops.versioning import git_commit, read_dvc_file

    settings = get_settings()
    lineage = Lineage(
        dataset_md5=read_dvc_file(dataset_dvc)["md5"] if dataset_dvc.exists() else "",
        git_commit=git_commit(Path.cwd()),
        metrics=numeric_metrics(json.loads(metrics.read_text())) if metrics else {},
    )
    _print_json(register_bundle(bundle, settings.tracking_uri(), name or settings.registered_model_name, lineage, alias=alias))


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Bundle folder, or registry ref models:/NAME@ALIAS or models:/NAME/VERSION.")] = (
        "outputs/bundle"
    ),
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    http_port: Annotated[Optional[int], typer.Option(help="REST port.")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(help="gRPC port.")] = None,
) -> None:
    """Serve the model with kserve's ModelServer (v1 and Open Inference Protocol v2)."""
    from serving.server import serve as run_serve
    from xrayops.registry import resolve_bundle

    settings = get_settings()
    bundle_dir = resolve_bundle(model, settings.tracking_uri(), settings.output_dir / "served-bundle")
    run_serve(
        bundle_dir,
        host=host or settings.serve_host,
        http_port=http_port or settings.serve_http_port,
        grpc_port=grpc_port or settings.serve_grpc_port,
        log_path=settings.inference_log_path or settings.output_dir / "inference-log",
    )


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(help="DICOM files to classify.")],
    url: Annotated[str, typer.Option(help="Base URL of a running `xrayops serve`.")] = "http://127.0.0.1:8080",
    model_name: Annotated[Optional[str], typer.Option(help="Served model name.")] = None,
) -> None:
    """Send DICOM files to a running server (kserve's InferenceRESTClient, v2) and print the answers."""
    from serving.client import predict_files

    settings = get_settings()
    responses = predict_files(url, model_name or settings.registered_model_name, files)
    typer.echo(json.dumps([r.model_dump() for r in responses], indent=2))


@app.command()
def monitor(
    reference: Annotated[Path, typer.Option(help="Training manifest.parquet (the reference window).")] = Path(
        "data/manifest.parquet"
    ),
    current: Annotated[Path, typer.Option(help="Inference log folder, or another manifest.parquet.")] = Path(
        "outputs/inference-log"
    ),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("outputs/monitor"),
    bundle: Annotated[Optional[Path], typer.Option(help="Served bundle: its confidence and OOD thresholds.")] = None,
) -> None:
    """Evidently drift report of the current window against the reference, and the retrain decision."""
    from xrayops.bundle import load_bundle
    from xrayops.monitor import monitor_window

    meta = load_bundle(bundle).meta if bundle else None
    result = monitor_window(reference, current, out, get_settings(), bundle_meta=meta)
    _print_json(result)


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")] = Path("outputs/pipeline/xrayops-training.yaml"),
    gpu: Annotated[bool, typer.Option("--gpu", help="Schedule pretrain/finetune on the GPU node pool.")] = False,
    gpu_node_pool: Annotated[str, typer.Option(help="Value of the xrayops.io/pool node label.")] = "gpu",
) -> None:
    """Compile the training pipeline to KFP v2 YAML."""
    from pipelines.run import compile_pipeline

    typer.echo(str(compile_pipeline(out, gpu=gpu, gpu_node_pool=gpu_node_pool)))


@pipeline_app.command("run")
def pipeline_run(
    local: Annotated[bool, typer.Option("--local", help="Run with kfp.local (SubprocessRunner) on this machine.")] = False,
    root: Annotated[Path, typer.Option(help="kfp.local pipeline root (artifacts).")] = Path("outputs/kfp-local"),
    n_images: Annotated[int, typer.Option(help="Synthetic images for the run.")] = 280,
    pretrain_epochs: Annotated[int, typer.Option(help="Pretraining epochs.")] = 2,
    finetune_epochs: Annotated[int, typer.Option(help="Linear-head epochs.")] = 30,
) -> None:
    """Run the pipeline. `--local` runs every stage here with kfp.local; clusters use `pipeline submit` (see docs)."""
    from pipelines.run import run_local

    if not local:
        _fail("only --local runs are available from this command; compile the YAML and upload it to your KFP cluster")
    settings = get_settings()
    result = run_local(
        root,
        n_images=n_images,
        pretrain_epochs=pretrain_epochs,
        finetune_epochs=finetune_epochs,
        dvc_remote_url=settings.dvc_remote(),
        s3_endpoint_url=settings.s3_endpoint_url,
        mlflow_tracking_uri=settings.tracking_uri(),
    )
    _print_json(result)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every artefact of the run.")] = Path("outputs/demo"),
    n: Annotated[int, typer.Option(help="Training images to synthesise.")] = 1400,
    pretrain_epochs: Annotated[int, typer.Option(help="SimCLR epochs.")] = 12,
    skip_pipeline_run: Annotated[bool, typer.Option("--skip-pipeline-run", help="Compile the KFP pipeline but do not run it.")] = False,
) -> None:
    """The whole loop on this machine: synth, ingest, version, pretrain, finetune, evaluate, register, serve, monitor, pipeline."""
    from xrayops.demo import DemoConfig, print_summary, run_demo

    summary = run_demo(
        DemoConfig(out=out, n=n, pretrain_epochs=pretrain_epochs, run_pipeline=not skip_pipeline_run), get_settings()
    )
    print_summary(summary, console=Console())


if __name__ == "__main__":
    app()
