"""Monitoring: drift and label noise of a served window, the dashboard, the retraining trigger."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from xrayops.app.cli.common import app, console, _fail, _print_json, BindHostOption, EvidentlyWorkspaceOption
from xrayops.config import get_settings


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
    workspace: EvidentlyWorkspaceOption = None,
    snapshot: Annotated[bool, typer.Option(help="Add the window to the workspace (the `xrayops dashboard` panels).")] = True,
    embedding_reference: Annotated[
        Optional[Path], typer.Option(help="Inference log of a baseline window for embedding drift (default: the model version's first window).")
    ] = None,
) -> None:
    """Evidently drift report of the current window against the reference, the online label-noise
    rate (overall, per site, per vendor), the retrain decision, and a snapshot in the Evidently workspace."""
    from xrayops.bundle import load_bundle
    from xrayops.monitor import monitor_window
    from xrayops.monitor.workspace import default_workspace

    settings = get_settings()
    meta = load_bundle(bundle).meta if bundle else None
    target = (workspace or default_workspace(settings)) if snapshot else None
    result = monitor_window(reference, current, out, settings, bundle_meta=meta, workspace=target,
                            embedding_reference=embedding_reference)
    _print_json(result)


@app.command()
def dashboard(
    workspace: EvidentlyWorkspaceOption = None,
    host: BindHostOption = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the UI.")] = 8000,
    screenshot: Annotated[
        Optional[Path], typer.Option(help="Instead of serving: start the UI, save a headless-Chromium PNG of the dashboard here, stop.")
    ] = None,
) -> None:
    """The quality officers' dashboard: `evidently ui` over the monitoring workspace (drift share,
    label-noise rate, out-of-domain rate, prediction mix, request volume per window)."""
    import subprocess

    from xrayops.monitor.ui import capture_workspace, monitoring_project_id, project_url, ui_command
    from xrayops.monitor.workspace import default_workspace

    target = workspace or default_workspace(get_settings())
    project_id = monitoring_project_id(target)  # creates the project and its panels on first use
    if screenshot is not None:
        try:
            capture = capture_workspace(target, screenshot)
        except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
            _fail(str(exc))
        typer.echo(str(capture.screenshot))
        return
    console.print(f"dashboard: {project_url(f'http://{host}:{port}', project_id)}")
    raise typer.Exit(subprocess.call(ui_command(target, host, port)))


@app.command("retrain-trigger")
def retrain_trigger_cmd(
    monitor_result: Annotated[Path, typer.Option(help="monitor.json written by `xrayops monitor`.")] = Path(
        "outputs/monitor/monitor.json"
    ),
    window_id: Annotated[Optional[str], typer.Option(help="Window identity for dedup (default: the file's mtime).")] = None,
    model_version: Annotated[str, typer.Option(help="Serving champion's version.")] = "",
    audit_log: Annotated[Path, typer.Option(help="JSONL audit log of trigger decisions.")] = Path("outputs/monitor/trigger.jsonl"),
    pipeline_root: Annotated[Path, typer.Option(help="kfp.local pipeline root when no XRAYOPS_KFP_HOST is set.")] = Path(
        "outputs/kfp-retrain"
    ),
    source_dir: Annotated[
        Optional[Path], typer.Option(help="The DICOM archive to retrain on: launches the retraining pipeline (gated "
                                          "against the champion) instead of the synthetic demo loop.")
    ] = None,
    source_pvc: Annotated[str, typer.Option(help="On a cluster: the PVC holding the archive (mounted at /mnt/dicom).")] = "xrayops-dicom",
) -> None:
    """Decide on retraining from a monitoring window and launch a KFP run (XRAYOPS_KFP_HOST:
    kfp.Client on the cluster, the retraining pipeline over the archive on `source_pvc`; else
    kfp.local, the retraining pipeline over `--source-dir`, or without it the demo loop);
    cooldown and dedup apply."""
    from datetime import datetime, timezone

    from xrayops.monitor.trigger import AuditLog, TriggerPolicy, decide_and_launch, signals_from_monitor
    from xrayops.monitor.window import MonitorResult

    settings = get_settings()
    if not monitor_result.exists():
        _fail(f"{monitor_result} not found; run `xrayops monitor` first")
    result = MonitorResult.model_validate_json(monitor_result.read_text())
    window = window_id or datetime.fromtimestamp(monitor_result.stat().st_mtime, timezone.utc).isoformat()

    def launch(arguments: dict) -> str:
        if settings.kfp_host:
            import kfp

            from pipelines.retraining import compile_retraining

            package = compile_retraining(settings.output_dir / "pipeline" / "xrayops-retraining.yaml", cluster=True,
                                         source_pvc=source_pvc)
            # The window and reasons go to the run: the change record's "why".
            run = kfp.Client(host=settings.kfp_host).create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=f"retrain {arguments['trigger_window']}"
            )
            return run.run_id
        if source_dir is not None:
            from pipelines.retraining import run_retraining_local, settings_arguments

            run_retraining_local(pipeline_root, Path(pipeline_root) / "kfp-local.log", source_dir=str(source_dir.resolve()),
                                 **settings_arguments(settings), **arguments, trigger_log=str(audit_log.resolve()))
            return str(Path(pipeline_root).resolve())
        from pipelines.run import run_local

        return run_local(pipeline_root, dvc_remote_url=settings.dvc_remote(), s3_endpoint_url=settings.s3_endpoint_url,
                         mlflow_tracking_uri=settings.tracking_uri())["pipeline_root"]

    decision = decide_and_launch(signals_from_monitor(result, window, model_version), TriggerPolicy.from_settings(settings),
                                 AuditLog(audit_log), launch)
    _print_json(decision)
