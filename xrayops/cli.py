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
deploy_app = typer.Typer(help="Render or apply the Kubernetes manifests (infra/k8s overlays + compiled pipeline).", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
release_app = typer.Typer(
    help="Publish registry versions to the serving storage and point the InferenceService at them (or back).",
    no_args_is_help=True,
)
app.add_typer(release_app, name="release")
console = Console(stderr=True)


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
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering the images; the files do not depend on it.")] = 1,
) -> None:
    """Write synthetic radiographs as real DICOM (CR/DX, several codecs) plus a ground-truth sidecar."""
    from xrayops.data.synth import synthesize

    _print_json(synthesize(out, n=n, seed=seed, size=size, mislabel_rate=mislabel_rate, shift=shift, ood_rate=ood_rate,
                           workers=workers))


@app.command()
def ingest(
    source: Annotated[Optional[Path], typer.Argument(help="Folder of DICOM files (recursive; DICOMDIRs followed). With --dicomweb: the landing folder.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder (default XRAYOPS_DATA_DIR).")] = None,
    size: Annotated[int, typer.Option(help="Output image side (preprocessing spec).")] = 64,
    workers: Annotated[int, typer.Option(help="Decode processes.")] = 1,
    output_dtype: Annotated[str, typer.Option(help="uint8 or uint16 pixels (preprocessing spec).")] = "uint8",
    multiframe: Annotated[str, typer.Option(help="Multi-frame files: first | middle | all | reject.")] = "middle",
    batch_size: Annotated[int, typer.Option(help="Files per journal part: a killed run redoes at most one batch.")] = 64,
    dicomweb: Annotated[Optional[str], typer.Option(help="DICOMweb base URL: QIDO-RS search + WADO-RS retrieve into the landing folder first.")] = None,
    study: Annotated[Optional[list[str]], typer.Option(help="With --dicomweb: only these Study Instance UIDs (repeat).")] = None,
    contact_sheet: Annotated[Optional[Path], typer.Option(help="Also write a PNG grid of the processed images here.")] = None,
    source_map: Annotated[Optional[Path], typer.Option(
        help="Also write which file each src- pseudonym stands for (CSV, mode 0600). PHI: it holds the export's "
             "folder and file names; keep it with the source files, never inside the dataset.")] = None,
    admit_modality: Annotated[Optional[list[str]], typer.Option(help="Admitted Modality (repeat; default XRAYOPS_ADMIT_MODALITIES: CR, DX).")] = None,
    admit_sop_class: Annotated[Optional[list[str]], typer.Option(help="Admitted SOP Class UID (repeat; default CR and DX Image Storage).")] = None,
    admit_localizers: Annotated[bool, typer.Option("--admit-localizers", help="Admit localizer/scout images.")] = False,
    admit_secondary: Annotated[bool, typer.Option("--admit-secondary", help="Admit derived secondary images (ImageType SECONDARY).")] = False,
    pixels_cleaned: Annotated[
        bool, typer.Option("--pixels-cleaned", help="The site has removed burned-in text and recognizable features "
                           "upstream (PS3.15 Clean Pixel Data): admit images flagged with them.")
    ] = False,
) -> None:
    """Decode, de-identify and preprocess DICOM into a manifest and pixel shards; failures are quarantined.

    Only human projection radiographs enter the dataset (the admission policy: CR and DX by default);
    every other instance is quarantined with its reason, and the policy is written into preprocessing.json.
    """
    from xrayops.contracts import PreprocessingSpec
    from xrayops.ingest import ingest as run_ingest
    from xrayops.ingest import write_contact_sheet

    settings = get_settings()
    key = _deid_key(settings)
    if dicomweb:
        from xrayops.sources.dicomweb import fetch_dicomweb

        source = source or settings.output_dir / "landing"
        fetched = fetch_dicomweb(dicomweb, source, key, study_uids=study or [], keep_private=settings.landing_keep_private)
        console.print(f"dicomweb: {fetched.n_fetched} fetched, {fetched.n_skipped} already landed, failures {fetched.failures}")
    if source is None or not source.exists():
        _fail(f"source folder {source} does not exist")
    try:
        overrides = {k: v for k, v in {
            "admit_modalities": admit_modality, "admit_sop_classes": admit_sop_class,
            "admit_localizers": admit_localizers or None, "admit_secondary": admit_secondary or None,
            "admit_pixels_cleaned": pixels_cleaned or None,
        }.items() if v}  # fmt: skip
        policy = settings.model_copy(update=overrides).admission_policy()
        spec = PreprocessingSpec(size=size, output_dtype=output_dtype, multiframe=multiframe, admission=policy)
    except ValueError as exc:  # pydantic's ValidationError names the bad option
        _fail(f"invalid preprocessing option: {exc}")
    summary = run_ingest(
        source,
        data_dir or settings.data_dir,
        spec,
        key,
        workers,
        synonyms_path=settings.body_part_synonyms,
        batch_size=batch_size,
        source_map=source_map,
    )
    if source_map is not None:
        console.print(f"source map (PHI, mode 0600): {source_map}")
    if contact_sheet is not None and summary.n_ok:
        console.print(f"contact sheet: {write_contact_sheet(summary.data_dir, contact_sheet)}")
    _print_json(summary)


@app.command()
def listen(
    out: Annotated[Path, typer.Option(help="Landing folder that `xrayops ingest` then reads.")] = Path("outputs/landing"),
    port: Annotated[int, typer.Option(help="DICOM port to listen on.")] = 11112,
    ae_title: Annotated[str, typer.Option(help="Our AE title; senders must call it.")] = "XRAYOPS",
    host: Annotated[str, typer.Option(help="Bind address (0.0.0.0 to accept modalities on the network).")] = "127.0.0.1",
) -> None:
    """DICOM C-STORE listener (pynetdicom): every received instance lands in OUT, atomically, named by pseudonym."""
    from xrayops.sources.listener import listen as run_listen

    key = _deid_key(get_settings())
    console.print(f"listening on {host}:{port} as {ae_title}, landing in {out}")
    run_listen(out, port, ae_title, key, host=host, keep_private=get_settings().landing_keep_private)


@app.command()
def route(
    port: Annotated[Optional[int], typer.Option(help="DICOM port to listen on (XRAYOPS_ROUTE_PORT, 11113).")] = None,
    ae_title: Annotated[Optional[str], typer.Option(help="Our AE title (XRAYOPS_ROUTE_AE_TITLE).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address for DICOM and /healthz (XRAYOPS_ROUTE_HOST).")] = None,
    endpoint: Annotated[
        Optional[str], typer.Option(help="The endpoint: REST base URL, or host:port with --protocol grpc (XRAYOPS_ROUTE_ENDPOINT).")
    ] = None,
    protocol: Annotated[Optional[str], typer.Option(help="rest (v2, binary DICOM) or grpc (XRAYOPS_ROUTE_PROTOCOL).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Served model name (default: XRAYOPS_ROUTE_MODEL_NAME, else the registered name).")] = None,
    pacs_host: Annotated[Optional[str], typer.Option(help="PACS host the SRs are stored to (XRAYOPS_ROUTE_PACS_HOST).")] = None,
    pacs_port: Annotated[Optional[int], typer.Option(help="PACS DICOM port (XRAYOPS_ROUTE_PACS_PORT).")] = None,
    pacs_ae_title: Annotated[Optional[str], typer.Option(help="PACS AE title (XRAYOPS_ROUTE_PACS_AE_TITLE).")] = None,
    quiet_seconds: Annotated[
        Optional[float], typer.Option(help="A study is complete after this long without a new instance (XRAYOPS_ROUTE_STUDY_QUIET_SECONDS).")
    ] = None,
    sr_per: Annotated[Optional[str], typer.Option(help="study (one SR per study) or image (XRAYOPS_ROUTE_SR_PER).")] = None,
    dead_letter: Annotated[Optional[Path], typer.Option(help="Dead-letter folder (XRAYOPS_ROUTE_DEAD_LETTER_DIR).")] = None,
    health_port: Annotated[Optional[int], typer.Option(help="HTTP /healthz and /metrics port, 0 off (XRAYOPS_ROUTE_HEALTH_PORT).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Studies processed at once (XRAYOPS_ROUTE_WORKERS).")] = None,
    max_associations: Annotated[Optional[int], typer.Option(help="DICOM associations at once (XRAYOPS_ROUTE_MAX_ASSOCIATIONS).")] = None,
) -> None:
    """DICOM routing node: C-STORE in, the endpoint's Structured Reports (sr=true) C-STOREd to the PACS."""
    from pydantic import ValidationError

    from serving.client import EndpointClient
    from xrayops.route.service import route_token, run_route

    flags = {"route_port": port, "route_ae_title": ae_title, "route_host": host, "route_endpoint": endpoint,
             "route_protocol": protocol, "route_model_name": model_name, "route_pacs_host": pacs_host,
             "route_pacs_port": pacs_port, "route_pacs_ae_title": pacs_ae_title,
             "route_study_quiet_seconds": quiet_seconds, "route_sr_per": sr_per, "route_dead_letter_dir": dead_letter,
             "route_health_port": health_port, "route_workers": workers, "route_max_associations": max_associations}
    try:
        settings = get_settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        _fail(f"invalid route settings: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    key = _deid_key(settings)
    client = EndpointClient(settings.route_endpoint, settings.route_model_name or settings.registered_model_name,
                            settings.route_protocol, route_token(settings), settings.route_timeout_seconds)
    console.print(f"routing {settings.route_ae_title}@{settings.route_host}:{settings.route_port} -> "
                  f"{settings.route_endpoint} -> {settings.route_pacs_ae_title}@{settings.route_pacs_host}:{settings.route_pacs_port}")
    try:
        run_route(settings, client, key)
    except OSError as exc:
        _fail(f"cannot start the routing node: {exc.strerror or exc}")
    finally:
        client.close()


@app.command()
def keygen(
    out: Annotated[Optional[Path], typer.Option(help="Write the key to this new file (mode 0600) instead of printing it.")] = None,
) -> None:
    """Make a de-identification key: 32 random bytes, hex. Keep it secret and keep it (pseudonyms depend on it)."""
    from xrayops.dicom.deid import KEY_ENV, KEY_FILE_ENV, generate_key, write_key_file

    key = generate_key()
    if out is None:
        typer.echo(key)
        console.print(f"set {KEY_ENV} to it (or save it in a 0600 file and set {KEY_FILE_ENV}); keep it secret")
        return
    try:
        write_key_file(out, key)
    except FileExistsError:
        _fail(f"{out} exists; a key in use must not be overwritten (its pseudonyms would be lost)")
    console.print(f"key written to {out} (mode 0600). Use it: export {KEY_FILE_ENV}={out.resolve()}")
    console.print("on a cluster: kubectl -n xrayops create secret generic xrayops-deid --from-file=key=" + str(out))


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
    arch: Annotated[str, typer.Option(help="resnet18 (Langer et al. 2024) or resnet50.")] = "resnet18",
    method: Annotated[str, typer.Option(help="simclr, byol or supcon (Langer et al. 2024; supcon uses the region tags).")] = "simclr",
    lr: Annotated[float, typer.Option(help="Adam learning rate (Langer et al. 2024: 3e-4, cosine).")] = 3e-4,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay (Langer et al. 2024: 1e-4).")] = 1e-4,
    temperature: Annotated[float, typer.Option(help="NT-Xent / SupCon temperature (Langer et al. 2024: 0.5).")] = 0.5,
    tau_base: Annotated[float, typer.Option(help="BYOL base target momentum (Langer et al. 2024: 0.9995).")] = 0.9995,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at each epoch's end).")] = 200,
    init_from: Annotated[
        Optional[Path],
        typer.Option(help="Warm start from an earlier run's checkpoint.pt (whole SSL model) or a backbone.pt; "
                     "a new optimiser and cosine schedule."),
    ] = None,
) -> None:
    """Pretraining (SimCLR, BYOL or SupCon; Langer et al. 2024) of the backbone; resumes from a checkpoint.

    Under `torchrun --nproc_per_node=N` it trains with DDP (one process per GPU, gloo on CPU).
    With --init-from it trains on from an earlier run's weights (more epochs, a new dataset version).
    """
    from xrayops.train.pretrain import PretrainConfig, pretrain as run_pretrain

    settings = get_settings()
    cfg = PretrainConfig(
        epochs=epochs, batch_size=batch_size, seed=seed, arch=arch, device=settings.device, method=method, lr=lr,
        weight_decay=weight_decay, temperature=temperature, tau_base=tau_base, checkpoint_every_steps=checkpoint_every,
        init_from=init_from,
    )
    _print_json(run_pretrain(data_dir or settings.data_dir, out, cfg))


@app.command()
def finetune(
    backbone: Annotated[Path, typer.Option(help="backbone.pt from pretrain.")] = Path("outputs/pretrain/backbone.pt"),
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder.")] = None,
    out: Annotated[Path, typer.Option(help="Bundle output folder.")] = Path("outputs/bundle"),
    epochs: Annotated[int, typer.Option(help="Epochs for the linear head.")] = 60,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    truth: Annotated[Optional[Path], typer.Option(help="truth.csv from synth: its angles train the orientation head.")] = None,
    finetune_last_stage: Annotated[
        bool, typer.Option("--finetune-last-stage", help="Also fine-tune the backbone's last stage (layer4) with the head.")
    ] = False,
    labels_from_store: Annotated[
        bool,
        typer.Option("--labels-from-store", help="Train on the feature store's labels (reviewers' corrections over PACS tags)."),
    ] = False,
    as_of: Annotated[
        Optional[str], typer.Option(help="With --labels-from-store: label events up to this ISO time (default: now).")
    ] = None,
) -> None:
    """Train the linear region head on the frozen backbone (Langer et al. 2024) and write a model bundle.

    With --truth, also the (cos, sin) orientation head of Baltruschat et al. 2018. With --labels-from-store,
    the labels are the point-in-time training set of the Feast store (see `import-reviews`).
    """
    from datetime import datetime, timezone

    import pandas as pd

    from xrayops.contracts import Lineage
    from xrayops.data.dataset import read_truth_angles
    from xrayops.train.finetune import FinetuneConfig, finetune as run_finetune

    settings = get_settings()
    if not backbone.exists():
        _fail(f"backbone {backbone} not found; run `xrayops pretrain` first")
    data = data_dir or settings.data_dir
    angles = read_truth_angles(truth) if truth else None
    labels, lineage = None, None
    if labels_from_store:
        from xrayops.features import dataset_training_labels, open_store

        try:
            cutoff = pd.Timestamp(as_of).to_pydatetime() if as_of else datetime.now(timezone.utc)
        except ValueError as exc:
            _fail(f"--as-of {as_of!r} is not an ISO time: {exc}")
        labels = dataset_training_labels(open_store(settings), data, cutoff)
        lineage = Lineage(pipeline_run=f"labels from the feature store as of {pd.Timestamp(cutoff).isoformat()}")
    elif as_of:
        _fail("--as-of needs --labels-from-store")
    cfg = FinetuneConfig(epochs=epochs, seed=seed, finetune_last_stage=finetune_last_stage)
    bundle = run_finetune(data, backbone, out, cfg, lineage=lineage, angles=angles, labels=labels)
    typer.echo(str(bundle))


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Option(help="Model bundle folder.")] = Path("outputs/bundle"),
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder.")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("outputs/evaluation"),
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    truth: Annotated[Optional[Path], typer.Option(help="truth.csv from synth: also score against true labels.")] = None,
    member: Annotated[Optional[list[Path]], typer.Option(help="Further bundles: evaluate the softmax-average ensemble (Langer et al. 2024) beside its members.")] = None,
) -> None:
    """Metrics, per-class accuracy, confusion matrix, calibration, OOD AUROC, orientation, Grad-CAM and an HTML report."""
    from xrayops.data.dataset import read_truth_angles
    from xrayops.data.truth import read_truth
    from xrayops.evaluate.report import evaluate_bundle, evaluate_ensemble

    settings = get_settings()
    regions = read_truth(truth) if truth else None
    angles = read_truth_angles(truth) if truth else None
    if member:
        result = evaluate_ensemble([bundle, *member], data_dir or settings.data_dir, out, split, regions, angles)
    else:
        result = evaluate_bundle(bundle, data_dir or settings.data_dir, out, split=split, truth=regions, truth_angles=angles)
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
    from xrayops.registry import numeric_metrics
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
    log_path: Annotated[Optional[Path], typer.Option(help="Inference log folder (overrides XRAYOPS_INFERENCE_LOG_PATH).")] = None,
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
    log_path: Annotated[
        Optional[Path],
        typer.Option(help="Inference log folder (default: XRAYOPS_INFERENCE_LOG_PATH, else <output_dir>/inference-log)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
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
    workspace: Annotated[
        Optional[Path],
        typer.Option(help="Evidently workspace for the window's snapshot (default XRAYOPS_EVIDENTLY_WORKSPACE, else <output_dir>/evidently)."),
    ] = None,
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
    workspace: Annotated[
        Optional[Path], typer.Option(help="Evidently workspace (default XRAYOPS_EVIDENTLY_WORKSPACE, else <output_dir>/evidently).")
    ] = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
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


@app.command("audit-labels")
def audit_labels_cmd(
    backbone: Annotated[list[Path], typer.Option(
        help="Frozen backbone.pt (from pretrain). Repeat for an ensemble (e.g. SimCLR and BYOL; Langer et al. 2024).")] = [
        Path("outputs/pretrain/backbone.pt")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder (default XRAYOPS_DATA_DIR).")] = None,
    out: Annotated[Path, typer.Option(help="Audit folder: label_issues.csv, label_audit.json, review worklist.")] = Path(
        "outputs/label-audit"
    ),
    folds: Annotated[int, typer.Option(help="Cross-validation folds for the out-of-fold probabilities.")] = 5,
    flag_below: Annotated[float, typer.Option(
        help="Flag a tag when the out-of-fold probability of it is below this (0: cleanlab's "
             "confident-learning filter decides).")] = 0.1,
    pool_studies: Annotated[bool, typer.Option(
        help="Judge a study's images that carry the same tag together (geometric mean of their tag "
             "probabilities); --no-pool-studies judges every image alone.")] = True,
    worklist_limit: Annotated[int, typer.Option(help="At most this many images on the review worklist (0: all).")] = 200,
    truth: Annotated[Optional[Path], typer.Option(help="truth.csv from synth: also print precision/recall of the flags.")] = None,
) -> None:
    """Confident-learning (cleanlab) audit of the PACS region labels, and a radiologists' review worklist."""
    import pandas as pd

    from xrayops.monitor.label_audit import AuditConfig, audit_labels, flagged_vs_truth
    from xrayops.monitor.worklist import write_audit_worklist

    settings = get_settings()
    missing = [str(b) for b in backbone if not b.exists()]
    if missing:
        _fail(f"backbone {', '.join(missing)} not found; run `xrayops pretrain` first")
    if not 0 <= flag_below < 1:
        _fail(f"--flag-below must be in [0, 1), got {flag_below}")
    data = data_dir or settings.data_dir
    cfg = AuditConfig(n_folds=folds, seed=settings.seed, device=settings.device, flag_below=flag_below or None,
                      pool_studies=pool_studies)
    audit = audit_labels(data, backbone, out, cfg)
    scores, worklist = write_audit_worklist(audit.scores_path, data, out, limit=worklist_limit or None)
    result = {"audit": audit.model_dump(mode="json"), "worklist": worklist.model_dump(mode="json")}
    if truth is not None:
        from xrayops.data.truth import read_truth_table

        known = read_truth_table(truth, _deid_key(settings))  # file names as the manifest's pseudonyms
        result["against_truth"] = flagged_vs_truth(scores, known)
        result["cleanlab_filter_against_truth"] = flagged_vs_truth(scores, known, "cleanlab_issue")
    _print_json(result)


@app.command("import-reviews")
def import_reviews_cmd(
    decisions: Annotated[Path, typer.Argument(help="Reviewer CSV: image_id, decision, corrected_region, reviewer, timestamp.")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset folder whose manifest the reviews refer to.")] = None,
) -> None:
    """Feed radiologists' decisions back as timestamped label events in the Feast feature store."""
    import pandas as pd

    from xrayops.features import open_store, record_reviews
    from xrayops.monitor.review import read_decisions

    settings = get_settings()
    manifest_path = (data_dir or settings.data_dir) / "manifest.parquet"
    if not manifest_path.exists():
        _fail(f"{manifest_path} not found; reviews must refer to an ingested dataset")
    manifest = pd.read_parquet(manifest_path)
    imported = read_decisions(decisions, dict(zip(manifest["image_id"].astype(str), manifest["region"].astype(str))))
    # The PACS tags as of the manifest's writing, so a training set has a label to fall back on.
    known_at = pd.Timestamp(manifest_path.stat().st_mtime, unit="s", tz="UTC").floor("us").to_pydatetime()
    store = open_store(settings)
    record_reviews(store, manifest, imported.events, known_at)
    _print_json({"events": len(imported.events), "rejected": [r.model_dump() for r in imported.rejected],
                 "feature_repo": str(Path(store.repo_path))})


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


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")] = Path("outputs/pipeline/xrayops-training.yaml"),
    gpu: Annotated[bool, typer.Option("--gpu", help="Schedule pretrain/finetune on the GPU node pool.")] = False,
    gpu_node_pool: Annotated[str, typer.Option(help="Value of the xrayops.io/pool node label.")] = "gpu",
    gpu_count: Annotated[int, typer.Option(help="nvidia.com/gpu limit of each GPU task.")] = 1,
    cluster: Annotated[
        bool, typer.Option("--cluster", help="Tasks read xrayops-config and the xrayops-s3/xrayops-deid Secrets (cluster runs).")
    ] = False,
    gpu_pool: Annotated[
        Optional[Path], typer.Option(help="JSON/YAML GpuPool of this cluster (accelerator, node selector, tolerations); implies --gpu.")
    ] = None,
) -> None:
    """Compile the training pipeline to KFP v2 YAML."""
    from pipelines.gpu_pool import GpuPool
    from pipelines.run import compile_pipeline

    pool = GpuPool.from_file(gpu_pool) if gpu_pool else None
    typer.echo(str(compile_pipeline(out, gpu=gpu or pool is not None, gpu_node_pool=gpu_node_pool, gpu_count=gpu_count,
                                    cluster=cluster, gpu_pool=pool)))


@pipeline_app.command("compile-ingestion")
def pipeline_compile_ingestion(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")] = Path("outputs/pipeline/xrayops-ingestion.yaml"),
    cluster: Annotated[bool, typer.Option("--cluster", help="Tasks read xrayops-config and the xrayops-s3/xrayops-deid Secrets.")] = False,
    source_pvc: Annotated[str, typer.Option(help="PersistentVolumeClaim holding the DICOM folder (mounted at /mnt/dicom).")] = "",
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
        out: Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")] = Path(f"outputs/pipeline/xrayops-{name}.yaml"),
        cluster: Annotated[bool, typer.Option("--cluster", help="Tasks read xrayops-config and the xrayops-s3/xrayops-deid Secrets.")] = False,
        source_pvc: Annotated[str, typer.Option(help="PersistentVolumeClaim holding the DICOM archive (mounted at /mnt/dicom).")] = "",
        gpu: Annotated[bool, typer.Option("--gpu", help="Schedule pretrain/finetune on the GPU node pool.")] = False,
        gpu_node_pool: Annotated[str, typer.Option(help="Value of the xrayops.io/pool node label.")] = "gpu",
        gpu_count: Annotated[int, typer.Option(help="nvidia.com/gpu limit of each GPU task.")] = 1,
        gpu_pool: Annotated[
            Optional[Path], typer.Option(help="JSON/YAML GpuPool of this cluster (accelerator, node selector, tolerations); implies --gpu.")
        ] = None,
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
    source_dir: Annotated[Path, typer.Option(help="The site's DICOM archive.")],
    root: Annotated[Path, typer.Option(help="kfp.local pipeline root (artifacts).")] = Path("outputs/kfp-site"),
    method: Annotated[Optional[list[str]], typer.Option(help="SSL method of a member; repeat (default: simclr, byol, supcon, Langer et al. 2024).")] = None,
    image_size: Annotated[int, typer.Option(help="Stored image side (Langer et al. 2024: 224).")] = 224,
    pretrain_epochs: Annotated[int, typer.Option(help="SSL epochs of every member.")] = 100,
    finetune_epochs: Annotated[int, typer.Option(help="Linear-head epochs.")] = 60,
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
    from pipelines.site_training import PAPER_000_METHODS, run_site_training_local

    settings = get_settings()
    if not source_dir.is_dir():
        _fail(f"--source-dir {source_dir} is not a folder")
    unknown = sorted(set(method or []) - set(PAPER_000_METHODS))
    if unknown:
        _fail(f"unknown SSL method {unknown[0]!r}: choose from {', '.join(PAPER_000_METHODS)}")
    release = _release_arguments(release_manifest, settings)
    methods = list(method or PAPER_000_METHODS)
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
    source_dir: Annotated[Path, typer.Option(help="The DICOM archive to retrain on (all of it: old and new studies).")],
    root: Annotated[Path, typer.Option(help="kfp.local pipeline root (artifacts).")] = Path("outputs/kfp-retrain"),
    pretrain_epochs: Annotated[int, typer.Option(help="0: keep the champion's frozen backbone; N: continue its SSL pretraining N epochs.")] = 0,
    finetune_epochs: Annotated[int, typer.Option(help="Linear-head epochs.")] = 60,
    model_name: Annotated[str, typer.Option(help="Registered model name in MLflow.")] = "xrayops-region",
    promote: Annotated[bool, typer.Option(help="Move the champion alias when the challenger passes the gate.")] = True,
    labels_from_store: Annotated[
        bool, typer.Option("--labels-from-store", help="Train on the Feast store's labels (reviewers' corrections over PACS tags).")
    ] = False,
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
    root: Annotated[Path, typer.Option(help="kfp.local pipeline root (artifacts).")] = Path("outputs/kfp-local"),
    n_images: Annotated[int, typer.Option(help="Synthetic images for the run.")] = 280,
    pretrain_epochs: Annotated[int, typer.Option(help="Pretraining epochs.")] = 2,
    finetune_epochs: Annotated[int, typer.Option(help="Linear-head epochs.")] = 30,
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


_K8S_DIR_HELP = "Folder with base/ and overlays/ (kustomize)."


def _render_manifests(overlay: str, k8s_dir: Path, image: Optional[str]) -> str:
    from xrayops.deploy import DeployError, render

    try:
        return render(k8s_dir, overlay, default_image=get_settings().image, image=image)
    except DeployError as exc:
        _fail(str(exc))


@deploy_app.command("render")
def deploy_render(
    overlay: Annotated[str, typer.Option(help="Overlay under infra/k8s/overlays: local or gpu-cloud.")],
    k8s_dir: Annotated[Path, typer.Option(help=_K8S_DIR_HELP)] = Path("infra/k8s"),
    image: Annotated[Optional[str], typer.Option(help="xrayops image name:tag (default: the overlay's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the manifests here instead of stdout.")] = None,
) -> None:
    """Print the full manifests: `kubectl kustomize` of the overlay plus the compiled pipeline (ConfigMap xrayops-pipeline)."""
    manifests = _render_manifests(overlay, k8s_dir, image)
    if out is None:
        typer.echo(manifests, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(manifests)
        typer.echo(str(out))


@deploy_app.command("apply")
def deploy_apply(
    overlay: Annotated[str, typer.Option(help="Overlay under infra/k8s/overlays: local or gpu-cloud.")],
    k8s_dir: Annotated[Path, typer.Option(help=_K8S_DIR_HELP)] = Path("infra/k8s"),
    image: Annotated[Optional[str], typer.Option(help="xrayops image name:tag (default: the overlay's).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="kubectl's client-side dry run: validate, change nothing.")] = False,
    server_dry_run: Annotated[bool, typer.Option("--server-dry-run", help="Server-side dry run (admission included).")] = False,
    allow_unpinned: Annotated[bool, typer.Option("--allow-unpinned", help="Apply images without a digest (development clusters only).")] = False,
) -> None:
    """Render the overlay and `kubectl apply` it to the current kubectl context (every image pinned by digest)."""
    from xrayops.deploy import DeployError, apply

    manifests = _render_manifests(overlay, k8s_dir, image)
    try:
        mode = "server" if server_dry_run else "client" if dry_run else None
        typer.echo(apply(manifests, dry_run=mode, allow_unpinned=allow_unpinned), nl=False)
    except DeployError as exc:
        _fail(str(exc))


@deploy_app.command("pin")
def deploy_pin(
    overlay: Annotated[str, typer.Option(help="Overlay under infra/k8s/overlays whose `images:` get digests.")],
    k8s_dir: Annotated[Path, typer.Option(help=_K8S_DIR_HELP)] = Path("infra/k8s"),
    digest: Annotated[Optional[list[str]], typer.Option(help="IMAGE=sha256:... (the name in the overlay's images:); repeat.")] = None,
    resolve: Annotated[bool, typer.Option("--resolve", help="Ask the registry (`crane digest NAME:TAG`) for images not given.")] = False,
    dockerfile: Annotated[Optional[Path], typer.Option(help="Also pin this Dockerfile's ARG PYTHON_IMAGE base image.")] = None,
    base_digest: Annotated[Optional[str], typer.Option(help="The base image's sha256 digest (else --resolve asks the registry).")] = None,
) -> None:
    """Write image digests into the overlay's kustomization.yaml (and the Dockerfile's base image); exit 2 while any stays unpinned."""
    from xrayops.deploy import DeployError, parse_digest_args, pin_dockerfile, pin_overlay

    try:
        pinned, missing = pin_overlay(k8s_dir, overlay, parse_digest_args(digest or []), resolve=resolve)
        base = pin_dockerfile(dockerfile, base_digest, resolve=resolve) if dockerfile is not None else None
    except DeployError as exc:
        _fail(str(exc))
    _print_json({"overlay": overlay, "pinned": [p.model_dump() for p in pinned],
                 "base_image": base.model_dump() if base else None, "unpinned": missing})
    if missing:
        _fail(f"still unpinned in {overlay}: {', '.join(missing)} (give --digest NAME=sha256:... or --resolve)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every artefact of the run.")] = Path("outputs/demo"),
    n: Annotated[int, typer.Option(help="Training images to synthesise.")] = 1400,
    pretrain_epochs: Annotated[int, typer.Option(help="SimCLR epochs.")] = 12,
    skip_pipeline_run: Annotated[bool, typer.Option("--skip-pipeline-run", help="Compile the KFP pipeline but do not run it.")] = False,
    scenario: Annotated[
        str, typer.Option(help="loop: the whole loop once; drift: a vendor-shifted batch with more wrong tags -> "
                               "monitoring -> trigger -> retrain on the new DVC version -> gate -> promotion -> reload.")
    ] = "loop",
    screenshot: Annotated[Optional[Path], typer.Option(help="drift scenario: where to save the dashboard PNG (default OUT/dashboard.png).")] = None,
    review_budget: Annotated[
        int, typer.Option(min=0, help="drift scenario: suspect labels reviewed before retraining (0: retrain on the raw tags).")
    ] = 200,
    backbone: Annotated[
        Optional[Path], typer.Option(help="drift scenario: use this pretrained backbone.pt instead of pretraining on v1.")
    ] = None,
) -> None:
    """The whole loop on this machine: synth, ingest, version, pretrain, finetune, evaluate, register, serve, monitor, pipeline."""
    from xrayops.app.demo import DemoConfig, print_summary, run_demo, with_demo_key

    # Synthetic data under a public key, the same on every machine (data.dvc's md5 depends on it).
    settings = with_demo_key(get_settings())
    console.print("de-identification: the public demo key (synthetic data only; pseudonyms anyone can recompute)")
    if scenario == "drift":
        from xrayops.app.scenario import DriftScenarioConfig, run_drift_scenario

        if backbone is not None and not backbone.is_file():
            _fail(f"backbone {backbone} not found")

        default_out = Path("outputs/demo")
        cfg = DriftScenarioConfig(out=Path("outputs/demo-drift") if out == default_out else out, n=n,
                                  pretrain_epochs=pretrain_epochs, screenshot=screenshot, review_budget=review_budget,
                                  backbone=backbone)
        print_summary(run_drift_scenario(cfg, settings), console=Console())
        return
    if scenario != "loop":
        _fail(f"unknown scenario {scenario!r}: loop or drift")
    summary = run_demo(
        DemoConfig(out=out, n=n, pretrain_epochs=pretrain_epochs, run_pipeline=not skip_pipeline_run), settings
    )
    print_summary(summary, console=Console())


@app.command()
def gate(
    champion: Annotated[str, typer.Option(help="Champion: models:/NAME@champion, models:/NAME/VERSION or a bundle folder.")],
    challenger: Annotated[str, typer.Option(help="Challenger: models:/NAME/VERSION (promotion needs a registry version).")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset whose test split is the fixed test set (default XRAYOPS_DATA_DIR).")] = None,
    dataset_dvc: Annotated[Path, typer.Option(help=".dvc file of that dataset: its md5 names the test set.")] = Path("data.dvc"),
    truth: Annotated[Optional[Path], typer.Option(help="truth.csv (synth): score against true regions instead of the PACS tags.")] = None,
    promote: Annotated[bool, typer.Option(help="Move the champion alias when the challenger passes.")] = True,
    out: Annotated[Path, typer.Option(help="Where to write gate.json.")] = Path("outputs/gate/gate.json"),
) -> None:
    """Champion/challenger gate on one fixed, versioned test set: paired-bootstrap CI of the accuracy
    difference; promote (move the MLflow alias) when the challenger is not worse beyond XRAYOPS_GATE_MARGIN."""
    from xrayops.data.truth import read_truth
    from xrayops.evaluate.gate import GateModel, GatePolicy, run_gate
    from xrayops.registry import RegistryError, resolve_bundle
    from xrayops.versioning import read_dvc_file

    settings = get_settings()
    if not dataset_dvc.is_file():
        _fail(f"{dataset_dvc} not found: the gate's test set must be a versioned dataset (xrayops version-dataset)")
    try:
        sides = [GateModel(bundle_dir=str(resolve_bundle(ref, settings.tracking_uri(), settings.output_dir / "gate" / role)),
                           ref=ref) for role, ref in (("champion", champion), ("challenger", challenger))]
        decision = run_gate(*sides, data_dir or settings.data_dir, read_dvc_file(dataset_dvc)["md5"],
                            GatePolicy.from_settings(settings, promote=promote), settings.tracking_uri(),
                            read_truth(truth) if truth else None)
    except (RegistryError, ValueError) as exc:
        _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(decision.model_dump_json(indent=2))
    _print_json(decision)


_MANIFEST_HELP = ("InferenceService manifest to read (offline/GitOps: writes the result to --out); "
                  "without it the live one is read from the cluster (kubeconfig or in-cluster).")


def _release_target(manifest: Optional[Path], name: str, namespace: str) -> list[dict]:
    """The documents a release rolls: a manifest's (offline/GitOps), or the live InferenceService(s)."""
    from xrayops.release.cluster import live_services
    from xrayops.release.manifest import read_manifest

    return read_manifest(manifest) if manifest is not None else live_services(name, namespace)


def _write_release_target(docs: list[dict], manifest: Optional[Path], out: Optional[Path], dry_run: bool) -> str:
    """Where the rolled documents went: a file (offline), stdout (dry run) or the cluster."""
    import sys

    from xrayops.release.cluster import replace_services
    from xrayops.release.manifest import dump_manifest, write_manifest

    target = out or (None if dry_run else manifest)
    if target is not None:
        write_manifest(docs, target)
        return str(target)
    if dry_run:
        dump_manifest(docs, sys.stdout)
        return "stdout"
    names = replace_services(docs)
    return f"cluster:{docs[0]['metadata'].get('namespace')}/{','.join(names)}"


def _print_release(outcome, where: str) -> None:
    summary = {"release": outcome.release.model_dump(mode="json"), "uri": outcome.release.uri,
               "replaces": outcome.previous, "inference_service": where}
    if where == "stdout":  # the manifest went to stdout: keep it pipeable
        console.print_json(json.dumps(summary))
    else:
        _print_json(summary)


@release_app.command("publish")
def release_publish(
    model: Annotated[list[str], typer.Option(help="Model to serve: models:/NAME@ALIAS, models:/NAME/VERSION or a bundle "
                                                  "folder; repeat for several ensemble members (one per SSL method).")],
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI): s3://BUCKET/PREFIX or a folder.")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help=_MANIFEST_HELP)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the rolled InferenceService here (default: over --manifest, or replace the live one).")] = None,
    name: Annotated[Optional[str], typer.Option(help="InferenceService name (default XRAYOPS_INFERENCE_SERVICE).")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Namespace (default XRAYOPS_SERVING_NAMESPACE).")] = None,
    replace_all: Annotated[bool, typer.Option(help="Serve exactly these models; by default the live release's other members stay.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Publish, but print the rolled InferenceService instead of writing or replacing it.")] = False,
) -> None:
    """Publish models as an immutable release (one folder per ensemble member, named by the weights)
    and point the InferenceService at it: KServe rolls the predictor, whose new pods verify every
    weights.pt before they take traffic. A retrained member replaces the live member of its SSL
    method; the others stay."""
    from xrayops.registry import RegistryError
    from xrayops.release import ReleaseError, release_models
    from xrayops.release.approval import ApprovalError

    settings = get_settings()
    try:
        docs = _release_target(manifest, name or settings.inference_service, namespace or settings.serving_namespace)
        outcome = release_models(docs, model, storage or settings.release_storage_uri, settings.tracking_uri(),
                                 settings.s3_endpoint_url, replace_all, settings.release_requires_approval)
        where = _write_release_target(outcome.documents, manifest, out, dry_run)
    except ApprovalError as exc:  # published to the storage, not served: exit 3 tells scripts "awaiting approval"
        _fail(str(exc), 3)
    except (ReleaseError, RegistryError) as exc:
        _fail(str(exc))
    _print_release(outcome, where)


@release_app.command("rollback")
def release_rollback(
    to: Annotated[Optional[str], typer.Option(help="Release id to serve (default: the one before the live release).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help=_MANIFEST_HELP)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the rolled InferenceService here (default: over --manifest, or replace the live one).")] = None,
    name: Annotated[Optional[str], typer.Option(help="InferenceService name (default XRAYOPS_INFERENCE_SERVICE).")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Namespace (default XRAYOPS_SERVING_NAMESPACE).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the rolled InferenceService instead of writing or replacing it.")] = False,
) -> None:
    """Point the InferenceService back at the release it served before (recorded on it), or at --to
    (which, with XRAYOPS_RELEASE_REQUIRES_APPROVAL, must be approved unless it is that release)."""
    from xrayops.release import ReleaseError, roll_back

    settings = get_settings()
    try:
        docs = _release_target(manifest, name or settings.inference_service, namespace or settings.serving_namespace)
        outcome = roll_back(docs, storage or settings.release_storage_uri, settings.s3_endpoint_url, to,
                            settings.release_requires_approval, settings.tracking_uri())
        where = _write_release_target(outcome.documents, manifest, out, dry_run)
    except ReleaseError as exc:
        _fail(str(exc))
    _print_release(outcome, where)


@release_app.command("list")
def release_list(
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI).")] = None,
) -> None:
    """The releases in the serving storage, oldest first, with their members' registry versions."""
    from xrayops.release import ReleaseError
    from xrayops.release.storage import list_releases, open_store

    settings = get_settings()
    try:
        releases, incomplete = list_releases(open_store(storage or settings.release_storage_uri, settings.s3_endpoint_url))
    except ReleaseError as exc:
        _fail(str(exc))
    _print_json({"releases": [{"release_id": r.release_id, "created_at": r.created_at.isoformat(), "previous": r.previous,
                               "members": {m.member: m.model_uri for m in r.members}} for r in releases],
                 "incomplete": incomplete})


@release_app.command("verify")
def release_verify(
    release_id: Annotated[str, typer.Argument(help="Release id (r-...), e.g. from `xrayops release show`.")],
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI).")] = None,
) -> None:
    """Hash every member's weights in the serving storage against the release (an audit: is what serving
    loads what was released?). Exit 1 when any member differs."""
    from xrayops.release import ReleaseError
    from xrayops.release.storage import open_store, verify_release

    settings = get_settings()
    try:
        found = verify_release(open_store(storage or settings.release_storage_uri, settings.s3_endpoint_url), release_id)
    except ReleaseError as exc:
        _fail(str(exc))
    _print_json({"release_id": release_id, "members": found, "ok": all(v == "ok" for v in found.values())})
    if any(v != "ok" for v in found.values()):
        raise typer.Exit(1)


@release_app.command("show")
def release_show(
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help=_MANIFEST_HELP)] = None,
    name: Annotated[Optional[str], typer.Option(help="InferenceService name (default XRAYOPS_INFERENCE_SERVICE).")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Namespace (default XRAYOPS_SERVING_NAMESPACE).")] = None,
) -> None:
    """What the InferenceService serves: its release, the members' registry versions and weights, and
    the release a rollback would return to."""
    from xrayops.release import ReleaseError
    from xrayops.release.manifest import primary_service
    from xrayops.release.plan import live_release_id, previous_release_id
    from xrayops.release.storage import open_store, read_release

    settings = get_settings()
    try:
        service = primary_service(_release_target(manifest, name or settings.inference_service,
                                                  namespace or settings.serving_namespace))
        live = live_release_id(service)
        if live is None:
            _fail(f"{service['metadata']['name']} serves no release yet "
                  f"(storageUri {service['spec']['predictor']['model'].get('storageUri')})")
        release = read_release(open_store(storage or settings.release_storage_uri, settings.s3_endpoint_url), live)
    except ReleaseError as exc:
        _fail(str(exc))
    _print_json({"inference_service": service["metadata"]["name"], "release": release.model_dump(mode="json"),
                 "uri": release.uri, "rollback_to": previous_release_id(service)})


@release_app.command("record")
def release_record(
    release_id: Annotated[str, typer.Argument(help="The candidate release (r-...), published to the serving storage.")],
    dataset_dvc: Annotated[Path, typer.Option(help="The .dvc file of the dataset version whose test split is the evidence.")] = Path("data.dvc"),
    data_dir: Annotated[Optional[Path], typer.Option(help="That dataset, ingested (default XRAYOPS_DATA_DIR).")] = None,
    champion: Annotated[Optional[str], typer.Option(help="Model to compare with (default: the member it replaces in the previous release).")] = None,
    member: Annotated[str, typer.Option(help="The changed member to record, when the release changes several.")] = "",
    gate: Annotated[Optional[Path], typer.Option(help="gate.json of the gate's decision (default: run the gate, without promoting).")] = None,
    previous_manifest: Annotated[Optional[Path], typer.Option(help="manifest.parquet of the champion's dataset version (default: read from the DVC remote).")] = None,
    truth: Annotated[Optional[Path], typer.Option(help="truth.csv (synthetic data): score against the true regions too.")] = None,
    trigger_log: Annotated[Optional[Path], typer.Option(help="The retraining trigger's JSONL audit log: why the run started.")] = None,
    window: Annotated[str, typer.Option(help="The trigger window that launched the run (default: the latest launched).")] = "",
    labels_from_store: Annotated[bool, typer.Option(help="Count the reviewers' label corrections in the feature store.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for change_record.json/.html (and .pdf).")] = Path("outputs/change-record"),
    pdf: Annotated[bool, typer.Option(help="Also print it to PDF with headless Chromium.")] = False,
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI).")] = None,
) -> None:
    """The change record of a candidate release for its approvers: what changed (dataset diff, label
    corrections, code, configuration), why (the trigger's evidence, the dashboard link), the evidence
    (gate and subgroups, metrics with 95 % CIs, calibration, OOD rate) and the approval block."""
    from xrayops.data.truth import read_truth
    from xrayops.evaluate.gate import GateDecision
    from xrayops.registry import RegistryError
    from xrayops.release import ReleaseError
    from xrayops.release.change_record import print_pdf, record_release, trigger_evidence
    from xrayops.release.storage import open_store, read_release
    from xrayops.versioning import read_dvc_file

    settings = get_settings()
    if not dataset_dvc.is_file():
        _fail(f"{dataset_dvc} not found: the evidence is the test split of a versioned dataset (xrayops version-dataset)")
    try:
        store = open_store(storage or settings.release_storage_uri, settings.s3_endpoint_url)
        release = read_release(store, release_id)
        labels = None
        if labels_from_store:
            from datetime import datetime, timezone

            from xrayops.features import dataset_training_labels, open_store as feature_store

            labels = dataset_training_labels(feature_store(settings), data_dir or settings.data_dir, datetime.now(timezone.utc))
        made, _, html_path = record_release(
            release, read_release(store, release.previous) if release.previous else None, data_dir or settings.data_dir,
            read_dvc_file(dataset_dvc)["md5"], settings.tracking_uri(), out, champion or "", member,
            gate=GateDecision.model_validate_json(gate.read_text()) if gate else None,
            truth=read_truth(truth) if truth else None, previous_manifest=previous_manifest,
            dvc_remote=settings.dvc_remote(), s3_endpoint_url=settings.s3_endpoint_url, labels=labels,
            trigger=trigger_evidence(trigger_log, window, "", settings.dashboard_url),
            requires_approval=settings.release_requires_approval, image=settings.image,
            gate_samples=settings.gate_bootstrap_samples, gate_margin=settings.gate_margin,
            subgroup_min_n=settings.gate_subgroup_min_n, subgroup_margin=settings.gate_subgroup_margin)
        printed = print_pdf(html_path, out / "change_record.pdf") if pdf else None
    except (ReleaseError, RegistryError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    _print_json({"record_id": made.record_id, "release": release_id, "html": str(html_path),
                 "pdf": str(printed.pdf) if printed else None, "console": printed.console if printed else [],
                 "gate": "promote" if made.gate.promote else "keep the champion",
                 "approval": made.approval.state if made.approval else "not approvable (members outside the registry)"})


def _decide_release(decision: str, release_id: str, by: str, note: str, record: Optional[Path],
                    storage: Optional[str]) -> None:
    from xrayops.release import ReleaseError
    from xrayops.release.approval import decide
    from xrayops.release.storage import open_store, read_release

    settings = get_settings()
    try:
        release = read_release(open_store(storage or settings.release_storage_uri, settings.s3_endpoint_url), release_id)
        entry = decide(decision, release, by, note, settings.tracking_uri(), settings.audit_log_path(), record)
    except ReleaseError as exc:
        _fail(str(exc))
    _print_json({"audit_log": str(settings.audit_log_path()), "entry": entry.model_dump(mode="json")})


_BY_HELP = "Who decides: a person's name (recorded in the audit log and on every member version)."
_RECORD_HELP = "The change record read before deciding (its sha256 goes into the audit entry)."


@release_app.command("approve")
def release_approve(
    release_id: Annotated[str, typer.Argument(help="Release id (r-...), published to the serving storage.")],
    by: Annotated[str, typer.Option(help=_BY_HELP)],
    note: Annotated[str, typer.Option(help="Why it may go live (the evidence weighed, conditions).")],
    record: Annotated[Optional[Path], typer.Option(help=_RECORD_HELP)] = None,
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI).")] = None,
) -> None:
    """Approve a release: an entry in the hash-chained audit log (XRAYOPS_RELEASE_AUDIT_LOG) and tags on
    every member's registry version; with XRAYOPS_RELEASE_REQUIRES_APPROVAL only approved releases go live."""
    _decide_release("approved", release_id, by, note, record, storage)


@release_app.command("reject")
def release_reject(
    release_id: Annotated[str, typer.Argument(help="Release id (r-...), published to the serving storage.")],
    by: Annotated[str, typer.Option(help=_BY_HELP)],
    note: Annotated[str, typer.Option(help="Why it must not go live.")],
    record: Annotated[Optional[Path], typer.Option(help=_RECORD_HELP)] = None,
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI).")] = None,
) -> None:
    """Reject a release, recorded like an approval; a rejected release is refused by publish."""
    _decide_release("rejected", release_id, by, note, record, storage)


@release_app.command("audit")
def release_audit(
    log: Annotated[Optional[Path], typer.Option(help="Audit log (default XRAYOPS_RELEASE_AUDIT_LOG).")] = None,
    registry: Annotated[bool, typer.Option(help="Also check that the registry's tags carry each release's latest decision.")] = True,
    storage: Annotated[Optional[str], typer.Option(help="Serving storage (default XRAYOPS_RELEASE_STORAGE_URI).")] = None,
) -> None:
    """Verify the release audit log's hash chain (and that the registry agrees); exit 1 when broken."""
    from xrayops.release import ReleaseError
    from xrayops.release.approval import read_entries, registry_problems, verify_chain
    from xrayops.release.storage import list_releases, open_store

    settings = get_settings()
    path = log or settings.audit_log_path()
    report = verify_chain(path)
    problems = [] if report.ok else [f"line {report.broken_line}: {report.problem}"]
    if report.ok and registry:
        try:
            releases, _ = list_releases(open_store(storage or settings.release_storage_uri, settings.s3_endpoint_url))
            problems = registry_problems(settings.tracking_uri(), read_entries(path),
                                         {r.release_id: r for r in releases})
        except ReleaseError as exc:
            _fail(str(exc))
    _print_json({**report.model_dump(), "registry_checked": report.ok and registry, "problems": problems,
                 "ok": not problems})
    if problems:
        raise typer.Exit(1)


def main() -> None:
    """The `xrayops` entry point: an XrayopsError is one line on stderr and its exit code, not a traceback."""
    from xrayops.errors import XrayopsError

    try:
        app()
    except XrayopsError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
