"""Serving releases: publish, rollback, show, list, verify; change records, approval and its audit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from xrayops.app.cli.common import (
    release_app, console, _fail, _print_json, ChangeRecordOption, DeciderOption, ReleaseIdArgument,
    RolledServiceOutOption, ServiceManifestOption, ServiceNameOption, ServingNamespaceOption, StorageOption,
    TestSetDataDirOption, TestSetDvcOption,
)
from xrayops.config import get_settings


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
    storage: StorageOption = None,
    manifest: ServiceManifestOption = None,
    out: RolledServiceOutOption = None,
    name: ServiceNameOption = None,
    namespace: ServingNamespaceOption = None,
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
    storage: StorageOption = None,
    manifest: ServiceManifestOption = None,
    out: RolledServiceOutOption = None,
    name: ServiceNameOption = None,
    namespace: ServingNamespaceOption = None,
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
    storage: StorageOption = None,
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
    release_id: ReleaseIdArgument,
    storage: StorageOption = None,
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
    storage: StorageOption = None,
    manifest: ServiceManifestOption = None,
    name: ServiceNameOption = None,
    namespace: ServingNamespaceOption = None,
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
    release_id: ReleaseIdArgument,
    dataset_dvc: TestSetDvcOption = Path("data.dvc"),
    data_dir: TestSetDataDirOption = None,
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
    storage: StorageOption = None,
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


@release_app.command("approve")
def release_approve(
    release_id: ReleaseIdArgument,
    by: DeciderOption,
    note: Annotated[str, typer.Option(help="Why it may go live (the evidence weighed, conditions).")],
    record: ChangeRecordOption = None,
    storage: StorageOption = None,
) -> None:
    """Approve a release: an entry in the hash-chained audit log (XRAYOPS_RELEASE_AUDIT_LOG) and tags on
    every member's registry version; with XRAYOPS_RELEASE_REQUIRES_APPROVAL only approved releases go live."""
    _decide_release("approved", release_id, by, note, record, storage)


@release_app.command("reject")
def release_reject(
    release_id: ReleaseIdArgument,
    by: DeciderOption,
    note: Annotated[str, typer.Option(help="Why it must not go live.")],
    record: ChangeRecordOption = None,
    storage: StorageOption = None,
) -> None:
    """Reject a release, recorded like an approval; a rejected release is refused by publish."""
    _decide_release("rejected", release_id, by, note, record, storage)


@release_app.command("audit")
def release_audit(
    log: Annotated[Optional[Path], typer.Option(help="Audit log (default XRAYOPS_RELEASE_AUDIT_LOG).")] = None,
    registry: Annotated[bool, typer.Option(help="Also check that the registry's tags carry each release's latest decision.")] = True,
    storage: StorageOption = None,
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
