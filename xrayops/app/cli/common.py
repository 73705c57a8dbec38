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

# Option types more than one verb takes, with one help text each. A verb gives the default; an
# option whose help must say something only that verb does keeps its own typer.Option.

# Data and training.
DataDirOption = Annotated[Optional[Path], typer.Option(help="Dataset folder (default XRAYOPS_DATA_DIR).")]
TestSetDataDirOption = Annotated[
    Optional[Path], typer.Option(help="Dataset whose test split is the fixed test set (default XRAYOPS_DATA_DIR).")
]
TestSetDvcOption = Annotated[Path, typer.Option(help=".dvc file of that dataset version: its md5 names the test set.")]
SeedOption = Annotated[int, typer.Option(help="Random seed; the same seed gives the same result.")]
PretrainEpochsOption = Annotated[int, typer.Option(help="SSL pretraining epochs.")]
HeadEpochsOption = Annotated[int, typer.Option(help="Linear-head epochs.")]
LabelsFromStoreOption = Annotated[
    bool,
    typer.Option("--labels-from-store", help="Train on the feature store's labels (reviewers' corrections over PACS tags)."),
]
BundleOption = Annotated[Path, typer.Option(help="Model bundle folder.")]
ModelRefOption = Annotated[str, typer.Option(help="Registry ref models:/NAME@ALIAS or models:/NAME/VERSION, or a bundle folder.")]
PromoteOption = Annotated[bool, typer.Option(help="Move the champion alias when the challenger passes the gate.")]

# Serving and monitoring.
BindHostOption = Annotated[str, typer.Option(help="Bind address (0.0.0.0 to accept connections from the network).")]
InferenceLogOption = Annotated[
    Optional[Path],
    typer.Option(help="Inference log folder (default: XRAYOPS_INFERENCE_LOG_PATH, else <output_dir>/inference-log)."),
]
EvidentlyWorkspaceOption = Annotated[
    Optional[Path], typer.Option(help="Evidently workspace (default XRAYOPS_EVIDENTLY_WORKSPACE, else <output_dir>/evidently).")
]

# Pipelines.
PipelineYamlOption = Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")]
ClusterOption = Annotated[
    bool, typer.Option("--cluster", help="Tasks read xrayops-config and the xrayops-s3/xrayops-deid Secrets (cluster runs).")
]
SourcePvcOption = Annotated[str, typer.Option(help="PersistentVolumeClaim holding the DICOM archive (mounted at /mnt/dicom).")]
GpuOption = Annotated[bool, typer.Option("--gpu", help="Schedule pretrain/finetune on the GPU node pool.")]
GpuNodePoolOption = Annotated[str, typer.Option(help="Value of the xrayops.io/pool node label.")]
GpuCountOption = Annotated[int, typer.Option(help="nvidia.com/gpu limit of each GPU task.")]
GpuPoolOption = Annotated[
    Optional[Path], typer.Option(help="JSON/YAML GpuPool of this cluster (accelerator, node selector, tolerations); implies --gpu.")
]
KfpRootOption = Annotated[Path, typer.Option(help="kfp.local pipeline root (artifacts).")]
SourceArchiveOption = Annotated[Path, typer.Option(help="The site's DICOM archive, all of it (old and new studies).")]

# Kubernetes manifests.
OverlayOption = Annotated[str, typer.Option(help="Overlay under infra/k8s/overlays: local or gpu-cloud.")]
K8sDirOption = Annotated[Path, typer.Option(help="Folder with base/ and overlays/ (kustomize).")]
ImageOption = Annotated[Optional[str], typer.Option(help="xrayops image name:tag (default: the overlay's).")]

# Releases.
StorageOption = Annotated[
    Optional[str], typer.Option(help="Serving storage: s3://BUCKET/PREFIX or a folder (default XRAYOPS_RELEASE_STORAGE_URI).")
]
ServiceManifestOption = Annotated[
    Optional[Path],
    typer.Option(help="InferenceService manifest to read (offline/GitOps: writes the result to --out); "
                 "without it the live one is read from the cluster (kubeconfig or in-cluster)."),
]
ServiceNameOption = Annotated[Optional[str], typer.Option(help="InferenceService name (default XRAYOPS_INFERENCE_SERVICE).")]
ServingNamespaceOption = Annotated[Optional[str], typer.Option(help="Namespace (default XRAYOPS_SERVING_NAMESPACE).")]
RolledServiceOutOption = Annotated[
    Optional[Path],
    typer.Option(help="Write the rolled InferenceService here (default: over --manifest, or replace the live one)."),
]
ReleaseIdArgument = Annotated[str, typer.Argument(help="Release id (r-...), published to the serving storage.")]
DeciderOption = Annotated[
    str, typer.Option(help="Who decides: a person's name (recorded in the audit log and on every member version).")
]
ChangeRecordOption = Annotated[
    Optional[Path], typer.Option(help="The change record read before deciding (its sha256 goes into the audit entry).")
]


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
