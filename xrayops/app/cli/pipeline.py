"""The KFP pipelines: compile, run under kfp.local, submit to a cluster."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from xrayops.app.cli.common import (
    pipeline_app, _fail, _print_json, ClusterOption, GpuCountOption, GpuNodePoolOption, GpuOption, GpuPoolOption,
    HeadEpochsOption, KfpRootOption, LabelsFromStoreOption, PipelineYamlOption, PretrainEpochsOption, PromoteOption,
    SourceArchiveOption, SourcePvcOption,
)
from xrayops.config import get_settings


@pipeline_app.command("compile")
def pipeline_compile(
    out: PipelineYamlOption = Path("outputs/pipeline/xrayops-training.yaml"),
    gpu: GpuOption = False,
    gpu_node_pool: GpuNodePoolOption = "gpu",
    gpu_count: GpuCountOption = 1,
    cluster: ClusterOption = False,
    gpu_pool: GpuPoolOption = None,
) -> None:
    """Compile the training pipeline to KFP v2 YAML."""
    from pipelines.gpu_pool import GpuPool
    from pipelines.run import compile_pipeline

    pool = GpuPool.from_file(gpu_pool) if gpu_pool else None
    typer.echo(str(compile_pipeline(out, gpu=gpu or pool is not None, gpu_node_pool=gpu_node_pool, gpu_count=gpu_count,
                                    cluster=cluster, gpu_pool=pool)))


@pipeline_app.command("compile-ingestion")
def pipeline_compile_ingestion(
    out: PipelineYamlOption = Path("outputs/pipeline/xrayops-ingestion.yaml"),
    cluster: ClusterOption = False,
    source_pvc: SourcePvcOption = "",
    parallelism: Annotated[int, typer.Option(help="Most batches ingested at once (0: no limit).")] = 0,
) -> None:
    """Compile the ingestion fan-out (plan, ParallelFor ingest batches, merge, DVC version) to KFP v2 YAML."""
    from pipelines.ingestion import compile_ingestion

    typer.echo(str(compile_ingestion(out, cluster=cluster, source_pvc=source_pvc, parallelism=parallelism)))


def _release_arguments(release_manifest: Optional[Path], settings) -> dict:
    """Pipeline arguments that release to XRAYOPS_RELEASE_STORAGE_URI and roll the manifest (checked
    before a run starts); none without a manifest."""
    from xrayops.release import ReleaseError
    from xrayops.release.manifest import read_manifest

    if release_manifest is None:
        return {}
    try:
        read_manifest(release_manifest)
    except ReleaseError as exc:
        _fail(str(exc))
    return {"release": True, "release_storage_uri": settings.release_storage_uri,
            "inference_service_manifest": str(release_manifest.resolve())}


def _roll_local_manifest(root: Path, release_manifest: Optional[Path]) -> dict:
    """After a local run with a release: the release step's rolled manifest written over the one the
    user gave (as `xrayops release publish --manifest` does); nothing when no release ran."""
    if release_manifest is None:
        return {}
    runs = sorted((d for d in Path(root).iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    rendered = sorted(runs[-1].rglob("release-op/rendered")) if runs else []
    if not rendered:
        return {"release": "none (not promoted)"}
    release_manifest.write_text(rendered[0].read_text())
    released = json.loads((rendered[0].parent / "release").read_text())
    return {"release": released["release_id"], "release_manifest": str(release_manifest)}


def _archive_compile_command(name: str, summary: str):
    """`pipeline compile-NAME` for a pipeline over a site's archive (same options, one body)."""

    def command(
        out: PipelineYamlOption = Path(f"outputs/pipeline/xrayops-{name}.yaml"),
        cluster: ClusterOption = False,
        source_pvc: SourcePvcOption = "",
        gpu: GpuOption = False,
        gpu_node_pool: GpuNodePoolOption = "gpu",
        gpu_count: GpuCountOption = 1,
        gpu_pool: GpuPoolOption = None,
    ) -> None:
        from pipelines.gpu_pool import GpuPool
        from pipelines.retraining import compile_retraining
        from pipelines.site_training import compile_site_training

        compile_fn = {"retraining": compile_retraining, "site-training": compile_site_training}[name]
        pool = GpuPool.from_file(gpu_pool) if gpu_pool else GpuPool.labelled(gpu_node_pool, gpu_count)
        typer.echo(str(compile_fn(out, gpu=gpu or gpu_pool is not None, cluster=cluster, gpu_pool=pool, source_pvc=source_pvc)))

    command.__doc__ = summary
    return command


pipeline_app.command("compile-retraining")(_archive_compile_command(
    "retraining", "Compile the retraining pipeline (archive -> new DVC version -> challenger on the champion's\n"
                  "backbone -> gate -> alias) to KFP v2 YAML."))
pipeline_app.command("compile-site-training")(_archive_compile_command(
    "site-training", "Compile the site-training pipeline (archive -> DVC version -> one SimCLR, BYOL and SupCon\n"
                     "member each -> ensemble evaluated beside them -> optional release) to KFP v2 YAML."))


@pipeline_app.command("site-train")
def pipeline_site_train(
    source_dir: SourceArchiveOption,
    root: KfpRootOption = Path("outputs/kfp-site"),
    method: Annotated[Optional[list[str]], typer.Option(help="SSL method of a member; repeat (default: simclr, byol, supcon, Langer et al. 2024).")] = None,
    image_size: Annotated[int, typer.Option(help="Stored image side (Langer et al. 2024: 224).")] = 224,
    pretrain_epochs: PretrainEpochsOption = 100,
    finetune_epochs: HeadEpochsOption = 60,
    model_name: Annotated[str, typer.Option(help="Members register as NAME-METHOD in MLflow.")] = "xrayops-region",
    release_manifest: Annotated[Optional[Path], typer.Option(
        help="Release the members (XRAYOPS_RELEASE_STORAGE_URI) and roll this InferenceService manifest to them "
             "(written over it after the run).")] = None,
    replace_champions: Annotated[bool, typer.Option(
        help="Move the champion alias of members that already have one (default: refuse; retrain them instead).")] = False,
) -> None:
    """Run the site-training pipeline here with kfp.local: Langer et al. 2024's ensemble on the site's own
    archive, each member registered as NAME-METHOD with alias champion (the first champions)."""
    from pipelines.retraining import store_arguments
    from pipelines.site_training import ENSEMBLE_METHODS, run_site_training_local

    settings = get_settings()
    if not source_dir.is_dir():
        _fail(f"--source-dir {source_dir} is not a folder")
    unknown = sorted(set(method or []) - set(ENSEMBLE_METHODS))
    if unknown:
        _fail(f"unknown SSL method {unknown[0]!r}: choose from {', '.join(ENSEMBLE_METHODS)}")
    release = _release_arguments(release_manifest, settings)
    methods = list(method or ENSEMBLE_METHODS)
    from xrayops.registry import RegistryError, held_aliases

    try:  # the pipeline's first step asks the same; here it costs no ingestion
        held = held_aliases(settings.tracking_uri(), [f"{model_name}-{m}" for m in methods], "champion")
    except RegistryError as exc:
        _fail(str(exc))
    if held and not replace_champions:
        _fail(f"{', '.join(sorted(held))} already have a champion: retrain them (`xrayops pipeline retrain "
              f"--model-name NAME`), or pass --replace-champions")
    log_path = Path(root) / "kfp-local.log"
    try:
        task = run_site_training_local(root, log_path, **{
            **store_arguments(settings), "source_dir": str(source_dir.resolve()), "ssl_methods": methods,
            "image_size": image_size, "pretrain_epochs": pretrain_epochs, "finetune_epochs": finetune_epochs,
            "model_name": model_name, "replace_champions": replace_champions, **release,
        })
    except RuntimeError as exc:
        _fail(str(exc))
    _print_json({"pipeline_root": str(Path(root).resolve()), "stage_log": str(log_path.resolve()),
                 "ensemble_accuracy": task.output, **_roll_local_manifest(root, release_manifest)})


@pipeline_app.command("retrain")
def pipeline_retrain(
    source_dir: SourceArchiveOption,
    root: KfpRootOption = Path("outputs/kfp-retrain"),
    pretrain_epochs: Annotated[int, typer.Option(help="0: keep the champion's frozen backbone; N: continue its SSL pretraining N epochs.")] = 0,
    finetune_epochs: HeadEpochsOption = 60,
    model_name: Annotated[str, typer.Option(help="Registered model name in MLflow.")] = "xrayops-region",
    promote: PromoteOption = True,
    labels_from_store: LabelsFromStoreOption = False,
    release_manifest: Annotated[Optional[Path], typer.Option(
        help="Release a promoted challenger (XRAYOPS_RELEASE_STORAGE_URI) and roll this InferenceService manifest "
             "to it (written over it after the run); default: no release.")] = None,
) -> None:
    """Run the retraining pipeline here with kfp.local: the champion comes from MLflow
    (XRAYOPS_MLFLOW_TRACKING_URI), the new dataset version goes to XRAYOPS_DVC_REMOTE_URL."""
    from pipelines.retraining import run_retraining_local, settings_arguments

    settings = get_settings()
    if not source_dir.is_dir():
        _fail(f"--source-dir {source_dir} is not a folder")
    release = _release_arguments(release_manifest, settings)
    from xrayops.registry import RegistryError, model_version

    try:  # before minutes of ingestion: is there a champion to gate against?
        model_version(f"models:/{model_name}@champion", settings.tracking_uri())
    except RegistryError as exc:
        _fail(f"{exc} (register a champion first: `xrayops register`, or `make demo`)")
    log_path = Path(root) / "kfp-local.log"
    try:
        task = run_retraining_local(root, log_path, **{
            **settings_arguments(settings), "source_dir": str(source_dir.resolve()), "pretrain_epochs": pretrain_epochs,
            "finetune_epochs": finetune_epochs, "model_name": model_name, "promote": promote,
            "labels_from_store": labels_from_store, **release,
        })
    except RuntimeError as exc:
        _fail(str(exc))
    decision = json.loads(Path(task.output.path).read_text())
    _print_json({"pipeline_root": str(Path(root).resolve()), "stage_log": str(log_path.resolve()), "gate": decision,
                 **_roll_local_manifest(root, release_manifest)})


@pipeline_app.command("run")
def pipeline_run(
    local: Annotated[bool, typer.Option("--local", help="Run with kfp.local (SubprocessRunner) on this machine.")] = False,
    root: KfpRootOption = Path("outputs/kfp-local"),
    n_images: Annotated[int, typer.Option(help="Synthetic images for the run.")] = 280,
    pretrain_epochs: PretrainEpochsOption = 2,
    finetune_epochs: HeadEpochsOption = 30,
) -> None:
    """Run the pipeline. `--local` runs every stage here with kfp.local; clusters use `pipeline submit` (see docs)."""
    from pipelines.run import run_local

    if not local:
        _fail("only --local runs are available from this command; for a cluster use `xrayops pipeline submit --host URL`")
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


@pipeline_app.command("submit")
def pipeline_submit(
    host: Annotated[str, typer.Option(envvar="KFP_HOST", help="KFP API endpoint, e.g. http://localhost:8080 (port-forward of ml-pipeline-ui).")],
    package: Annotated[Optional[Path], typer.Option(help="Compiled pipeline YAML; default: compile it now (cluster mode).")] = None,
    recurring: Annotated[Optional[str], typer.Option(help="Cron schedule: create a recurring run instead of one run (5 or 6 fields).")] = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment name.")] = "xrayops",
    run_name: Annotated[Optional[str], typer.Option(help="Run (or recurring run) name.")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Kubeflow profile namespace (multi-user KFP).")] = None,
    service_account: Annotated[Optional[str], typer.Option(help="ServiceAccount the run's pods use.")] = None,
    pipeline_root: Annotated[Optional[str], typer.Option(help="Artifact root, e.g. s3://xrayops-pipelines/root.")] = None,
    param: Annotated[Optional[list[str]], typer.Option(help="Pipeline argument KEY=VALUE (repeatable).")] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="When compiling: training steps on the GPU node pool.")] = False,
    gpu_node_pool: Annotated[str, typer.Option(help="When compiling: xrayops.io/pool label of the GPU pool.")] = "gpu",
    gpu_count: Annotated[int, typer.Option(help="When compiling: nvidia.com/gpu per GPU task.")] = 1,
    token: Annotated[Optional[str], typer.Option(envvar="XRAYOPS_KFP_TOKEN", help="Bearer token for an authenticating KFP endpoint.")] = None,
    if_retrain: Annotated[
        Optional[Path], typer.Option(help="monitor.json of `xrayops monitor`: submit only if its decision is to retrain.")
    ] = None,
    pipeline: Annotated[
        Optional[str], typer.Option(help="When compiling: `training` (synthetic demo loop), `site-training` (Langer et al. 2024's "
                                         "ensemble on the site's archive: the first champions) or `retraining` (the "
                                         "site's archive, gated against the champion); default retraining with --if-retrain.")
    ] = None,
    source_pvc: Annotated[str, typer.Option(help="When compiling the site-training or retraining pipeline: PVC of the DICOM archive.")] = "xrayops-dicom",
) -> None:
    """Start a run (or, with --recurring, a recurring run) of an xrayops pipeline on Kubeflow Pipelines."""
    import tempfile

    from pipelines.gpu_pool import GpuPool
    from pipelines.retraining import compile_retraining
    from pipelines.run import compile_pipeline
    from pipelines.site_training import compile_site_training
    from pipelines.submit import SubmitError, parse_params, submit
    from xrayops.monitor.window import MonitorResult

    if if_retrain is not None:
        if not if_retrain.is_file():
            _fail(f"--if-retrain: no monitoring result at {if_retrain}")
        decision = MonitorResult.model_validate_json(if_retrain.read_text()).decision
        if not decision.retrain:
            _print_json({"submitted": False, "retrain": False, "reasons": decision.reasons})
            return
    pipeline = pipeline or ("retraining" if if_retrain is not None else "training")
    if pipeline not in ("training", "site-training", "retraining"):
        _fail(f"--pipeline must be training, site-training or retraining, got {pipeline!r}")
    if package is not None and not package.is_file():
        _fail(f"--package {package} does not exist")
    try:
        arguments = parse_params(param or [])
        with tempfile.TemporaryDirectory(prefix="xrayops-submit-") as tmp:
            archive_pipelines = {"retraining": compile_retraining, "site-training": compile_site_training}
            if package is None and pipeline in archive_pipelines:
                package = archive_pipelines[pipeline](
                    Path(tmp) / f"xrayops-{pipeline}.yaml", gpu=gpu, cluster=True,
                    gpu_pool=GpuPool.labelled(gpu_node_pool, gpu_count), source_pvc=source_pvc)
            elif package is None:
                package = compile_pipeline(
                    Path(tmp) / "xrayops-training.yaml", gpu=gpu, gpu_node_pool=gpu_node_pool, gpu_count=gpu_count, cluster=True
                )
            result = submit(
                host,
                package,
                arguments=arguments,
                experiment=experiment,
                run_name=run_name,
                namespace=namespace,
                service_account=service_account,
                pipeline_root=pipeline_root,
                recurring=recurring,
                token=token,
            )
    except SubmitError as exc:
        _fail(str(exc))
    _print_json({"submitted": True, **result.model_dump(exclude_none=True)})
