"""Data in: synthetic phantoms, ingestion of folders, DICOMweb and C-STORE, the routing node, keys, DVC versions."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from xrayops.app.cli.common import (
    app, console, _fail, _deid_key, _print_json, BindHostOption, DataDirOption, SeedOption,
)
from xrayops.config import get_settings


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder: OUT/dicom/*.dcm and OUT/truth.csv.")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 700,
    seed: SeedOption = 0,
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
    data_dir: DataDirOption = None,
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
    host: BindHostOption = "127.0.0.1",
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
    data_dir: DataDirOption = None,
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
