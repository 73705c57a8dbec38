"""What every verb group of the `xrayops` CLI shares: the Typer apps, the console, the helpers
that turn a failure into one line and an exit code, and the option types several verbs take."""
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
pipeline_app = typer.Typer(help="Compile or run the KFP pipelines.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
deploy_app = typer.Typer(help="Render or apply the Kubernetes manifests (infra/k8s overlays + compiled pipelines).",
                         no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
release_app = typer.Typer(
    help="Publish registry versions to the serving storage and point the InferenceService at them (or back); "
    "change records, approval and its audit log.",
    no_args_is_help=True,
)
app.add_typer(release_app, name="release")
console = Console(stderr=True)

# Option types more than one verb takes, with one help text each.
DataDirOption = Annotated[Optional[Path], typer.Option(help="Dataset folder (default XRAYOPS_DATA_DIR).")]
SeedOption = Annotated[int, typer.Option(help="Seed.")]
ModelRefOption = Annotated[str, typer.Option(help="Registry ref models:/NAME@ALIAS or models:/NAME/VERSION, or a bundle folder.")]


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _deid_key(settings) -> bytes:
    """The configured de-identification key, or exit 2 with how to make one (xrayops.dicom.deid)."""
    from xrayops.dicom.deid import DeidKeyError, require_key

    try:
        return require_key(settings)
    except DeidKeyError as exc:
        _fail(str(exc))


def _print_json(obj) -> None:
    text = obj.model_dump_json(indent=2) if hasattr(obj, "model_dump_json") else json.dumps(obj, indent=2, default=str)
    typer.echo(text)


@app.callback()
def configure(
    log_level: Annotated[Optional[str], typer.Option(help="Log level (default XRAYOPS_LOG_LEVEL or INFO).")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Structured JSON log lines on stderr.")] = False,
) -> None:
    settings = get_settings()
    configure_logging(log_level or settings.log_level, json=log_json or settings.log_json)
