"""`xrayops demo --scenario drift`: continual retraining, end to end, on one machine.

1. A champion is trained on dataset version v1 (synthetic, one vendor; SimCLR on v1, or a given
   pretrained backbone), registered in MLflow (alias `champion`), released and served by the
   kserve ModelServer on 127.0.0.1.
2. Traffic: two calm windows, then two windows of a vendor-shifted batch with a raised mislabel
   rate (`synth --shift --mislabel-rate`). Every window is monitored against the training manifest
   and logged to the Evidently workspace (drift share, label-noise rate, OOD rate, prediction mix,
   volume), so the dashboard shows them rising.
3. The trigger (thresholds from Settings, cooldown and dedup, JSONL audit log) fires on the first
   shifted window. Its launcher does what a site does: the new batch lands in the PACS export, the
   reviewers work through the label audit's worklist (a stand-in radiologist here, deciding from
   synth's truth) and their decisions become label events in the feature store; then the REAL
   retraining pipeline (pipelines/retraining.py, the graph a cluster runs) runs under kfp.local
   over the export: ingestion into v2, DVC version, a challenger head on the champion's frozen
   backbone trained on the store's point-in-time labels, evaluation, registration, and the
   paired-bootstrap gate on v2's test split, which moves the alias when the challenger passes.
   The second shifted window is suppressed (same cause), not a second run.
4. Reload: the new champion is published as the next serving release and served.
5. A headless-Chromium screenshot of the dashboard (when Chromium is installed).

The steps share `xrayops.app.steps` with the demo loop.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field

from xrayops.app.steps import (
    DemoSummary,
    RunContext,
    StepResult,
    finetune,
    ingest_step,
    new_context,
    pretrain,
    register,
    release_champion,
    run_steps,
    version,
)
from xrayops.config import Settings
from xrayops.release.manifest import REPO_MANIFEST


class DriftScenarioConfig(BaseModel):
    out: Path = Path("outputs/demo-drift")
    repo_dir: Path = Path(".")
    n: int = 1400  # v1 training images
    n_window: int = 120  # served images per traffic window
    seed: int = 0
    synth_size: int = 160
    image_size: int = 64
    mislabel_rate: float = 0.05  # PACS tags wrong in the calm data
    shifted_mislabel_rate: float = 0.30  # ... and in the shifted batch
    shift: float = 1.0  # share of the shifted batch from the second vendor
    ood_rate: float = 0.03
    pretrain_epochs: int = 12
    backbone: Path | None = None  # an existing backbone.pt instead of pretraining on v1
    pretrain_lr: float = 1e-3
    batch_size: int = 128
    finetune_epochs: int = 100
    workers: int = 2
    screenshot: Path | None = None  # default: <out>/dashboard.png
    gate_margin: float | None = None  # default: Settings.gate_margin
    # Before retraining, the cleanlab audit's suspects (at most this many, most doubtful first)
    # are reviewed and the decisions become label events; 0: retrain on the raw tags.
    review_budget: int = Field(200, ge=0)
    serving_manifest: Path = REPO_MANIFEST
    run_name: str = "xrayops-demo-drift"
    bundle_folder: str = "champion"


def review_from_truth(worklist: pd.DataFrame, manifest: pd.DataFrame, truth: dict[str, str],
                      reviewer: str = "simulated-radiologist") -> pd.DataFrame:
    """A stand-in radiologist for the synthetic scenario: decides each worklist row from synth's
    truth (keep a right tag, relabel a wrong one, exclude an image with no region). A real
    site fills the same CSV columns by hand and runs `xrayops import-reviews`."""
    from xrayops.regions import REGIONS

    source = dict(zip(manifest["image_id"].astype(str), manifest["source_name"].astype(str)))
    rows = []
    now = datetime.now(timezone.utc).isoformat()
    for item in worklist.to_dict(orient="records"):
        true = truth.get(source.get(str(item["image_id"]), ""), "")
        if not true:
            continue  # no truth: left unreviewed
        decision = "exclude" if true not in REGIONS else "keep" if true == item["given_region"] else "relabel"
        rows.append({"image_id": item["image_id"], "decision": decision,
                     "corrected_region": true if decision == "relabel" else "", "reviewer": reviewer, "timestamp": now})
    return pd.DataFrame(rows, columns=["image_id", "decision", "corrected_region", "reviewer", "timestamp"])


def _pacs(ctx: RunContext) -> Path:
    return ctx.out / "pacs"


def synth(ctx: RunContext) -> StepResult:
    """v1's export, calm traffic, and the shifted batch; the PACS export starts as v1 alone (a
    second run into the same folder starts from v1 again)."""
    from xrayops.data.synth import synthesize
    from xrayops.data.truth import by_source_name, read_truth_files

    cfg = ctx.cfg
    ctx.train = synthesize(ctx.out / "synth" / "train", n=cfg.n, seed=cfg.seed, size=cfg.synth_size,
                           mislabel_rate=cfg.mislabel_rate, shift=0.0, ood_rate=cfg.ood_rate)
    ctx.calm = synthesize(ctx.out / "synth" / "calm", n=2 * cfg.n_window, seed=cfg.seed + 1, size=cfg.synth_size,
                          mislabel_rate=cfg.mislabel_rate, shift=0.0, ood_rate=cfg.ood_rate)
    ctx.shifted = synthesize(ctx.out / "synth" / "shifted", n=2 * cfg.n_window, seed=cfg.seed + 2,
                             size=cfg.synth_size, mislabel_rate=cfg.shifted_mislabel_rate, shift=cfg.shift,
                             ood_rate=cfg.ood_rate)
    shutil.rmtree(_pacs(ctx), ignore_errors=True)
    shutil.copytree(ctx.train.dicom_dir, _pacs(ctx) / "v1")
    by_file = {f"{prefix}/{name}": region for prefix, s in (("v1", ctx.train), ("v2", ctx.shifted))
               for name, region in read_truth_files(s.truth_path).items()}
    ctx.extra["truth"] = by_source_name(by_file, ctx.key)  # source_name -> true region
    return ({"train": ctx.train.dicom_dir, "calm": ctx.calm.dicom_dir, "shifted": ctx.shifted.dicom_dir},
            {"n_train": ctx.train.n_files, "n_shifted": ctx.shifted.n_files,
             "shifted_mislabeled": ctx.shifted.n_mislabeled})


def keep_reference(ctx: RunContext) -> StepResult:
    """v1's manifest, kept as the monitoring reference (the dataset folder moves on to v2)."""
    reference = ctx.out / "reference-v1.parquet"
    pd.read_parquet(ctx.data_dir / "manifest.parquet").to_parquet(reference)
    ctx.extra["reference"] = reference
    return {"reference": reference}, {}


def traffic(ctx: RunContext) -> StepResult:
    """Four windows through the released champion; each window's records cut from the log by time."""
    from serving.client import predict_files
    from serving.harness import running_server
    from xrayops.inference_log import read_log

    cfg, name = ctx.cfg, ctx.settings.registered_model_name
    calm = sorted(Path(ctx.calm.dicom_dir).glob("*.dcm"))
    shifted = sorted(Path(ctx.shifted.dicom_dir).glob("*.dcm"))
    ctx.log_path = ctx.out / "inference-log"
    shutil.rmtree(ctx.log_path, ignore_errors=True)  # this run's windows only
    ctx.extra["first_release"], _ = release_champion(ctx, first=True)
    batches = [calm[:cfg.n_window], calm[cfg.n_window:], shifted[:cfg.n_window], shifted[cfg.n_window:]]
    bounds = []
    with running_server(ctx.served_bundles, log_path=ctx.log_path, model_name=name,
                        model_version=str(ctx.registered.version), enable_grpc=False) as url:
        for batch in batches:
            start = datetime.now(timezone.utc)
            responses = predict_files(url, name, batch)
            bounds.append((start, datetime.now(timezone.utc)))
    served = read_log(ctx.log_path)  # after the server stopped: its buffered records are all written
    windows = []
    for k, (start, end) in enumerate(bounds):
        frame = served[(served["timestamp"] >= pd.Timestamp(start)) & (served["timestamp"] <= pd.Timestamp(end))]
        path = ctx.out / "windows" / f"window-{k}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path)
        windows.append(path)
    ctx.extra["windows"] = windows
    return ({"inference_log": ctx.log_path}, {"windows": [len(pd.read_parquet(w)) for w in windows],
                                              "served_version": responses[-1].model_version})


def review_labels(ctx: RunContext) -> dict[str, Any]:
    """The site's review before a retraining run: the label audit of the export as it now stands,
    its worklist decided by the stand-in radiologist, the decisions stored as label events."""
    from xrayops.features import open_store, record_reviews
    from xrayops.monitor.label_audit import AuditConfig, audit_labels
    from xrayops.monitor.review import decisions_to_events
    from xrayops.monitor.worklist import write_audit_worklist

    manifest = pd.read_parquet(ctx.data_dir / "manifest.parquet")
    ingested_at = datetime.now(timezone.utc)
    audit_dir = ctx.out / "label-audit"
    audit = audit_labels(ctx.data_dir, ctx.backbone, audit_dir, AuditConfig(seed=ctx.cfg.seed, device=ctx.settings.device))
    _, worklist = write_audit_worklist(audit.scores_path, ctx.data_dir, audit_dir, limit=ctx.cfg.review_budget)
    decisions = review_from_truth(pd.read_csv(worklist.csv_path, dtype=str, keep_default_na=False), manifest,
                                  ctx.extra["truth"])
    decisions.to_csv(audit_dir / "review_decisions.csv", index=False)
    imported = decisions_to_events(decisions, dict(zip(manifest["image_id"].astype(str), manifest["region"].astype(str))))
    record_reviews(open_store(ctx.settings), manifest, imported.events, ingested_at)
    counts = decisions["decision"].value_counts()
    return {"audited": audit.n_images, "flagged": audit.n_issues, "reviewed": len(decisions),
            "relabelled": int(counts.get("relabel", 0)), "excluded": int(counts.get("exclude", 0)),
            "kept": int(counts.get("keep", 0)), "rejected": len(imported.rejected)}


@contextmanager
def pipeline_environment(ctx: RunContext):
    """The settings the pipeline's tasks need, as environment (kfp.local runs them as subprocesses):
    this run's key and output folder (feature store, registry)."""
    from xrayops.dicom.deid import KEY_ENV, KEY_FILE_ENV

    secret = ctx.settings.deid_key.get_secret_value() if ctx.settings.deid_key is not None else ""
    key = {KEY_ENV: secret} if secret else {KEY_FILE_ENV: str(ctx.settings.deid_key_file or "")}
    updates = {**key, "XRAYOPS_OUTPUT_DIR": str(ctx.out), "XRAYOPS_FEATURE_REPO_DIR": str(ctx.settings.feature_repo_dir or "")}
    saved = {k: os.environ.get(k) for k in (*updates, KEY_ENV, KEY_FILE_ENV)}
    for name in (KEY_ENV, KEY_FILE_ENV):
        os.environ.pop(name, None)
    os.environ.update({k: v for k, v in updates.items() if v})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch_retraining(ctx: RunContext):
    """The trigger's launcher: the batch lands in the export, the review runs, then the retraining
    pipeline (kfp.local) over the export; its gate decision is kept for the gate step."""
    from pipelines.retraining import run_retraining_local, settings_arguments
    from xrayops.contracts import PreprocessingSpec
    from xrayops.ingest import ingest

    def launch(arguments: dict) -> str:
        cfg, pacs = ctx.cfg, _pacs(ctx)
        shutil.copytree(ctx.shifted.dicom_dir, pacs / "v2", dirs_exist_ok=True)
        # The export as the pipeline will ingest it (same key: the same pseudonyms), for the review.
        landed = ingest(pacs, ctx.data_dir, PreprocessingSpec(size=cfg.image_size), ctx.key, workers=cfg.workers,
                        synonyms_path=ctx.settings.body_part_synonyms)
        ctx.extra["v2_ok"] = landed.n_ok
        version(ctx)  # the export as reviewed, versioned here too: `xrayops gate` can re-score on it
        if cfg.review_budget:
            ctx.extra["review"] = review_labels(ctx)
        params = {**settings_arguments(ctx.settings), "source_dir": str(pacs), "ingest_workers": cfg.workers,
                  "finetune_epochs": cfg.finetune_epochs, "seed": cfg.seed, "labels_from_store": bool(cfg.review_budget)}
        if cfg.gate_margin is not None:
            params["gate_margin"] = cfg.gate_margin
        root = ctx.out / "kfp-retrain"
        with pipeline_environment(ctx):
            task = run_retraining_local(root, ctx.out / "kfp-retrain.log", **params)
        ctx.extra["gate"] = json.loads(Path(task.output.path).read_text())
        return str(root)

    return launch


def monitor(ctx: RunContext) -> StepResult:
    from xrayops.bundle_meta import read_bundle_meta
    from xrayops.monitor.trigger import AuditLog, TriggerPolicy, decide_and_launch, signals_from_monitor
    from xrayops.monitor.window import monitor_window
    from xrayops.monitor.workspace import default_workspace

    meta = read_bundle_meta(ctx.bundle)
    audit_log = AuditLog(ctx.out / "monitor" / "trigger.jsonl")
    audit_log.path.unlink(missing_ok=True)  # one scenario, one story: an earlier run's decisions would hold it back
    policy, workspace = TriggerPolicy.from_settings(ctx.settings), default_workspace(ctx.settings)
    rows = []
    for k, window in enumerate(ctx.extra["windows"]):
        result = monitor_window(ctx.extra["reference"], window, ctx.out / "monitor" / f"window-{k}", ctx.settings,
                                bundle_meta=meta, workspace=workspace)
        decision = decide_and_launch(signals_from_monitor(result, result.snapshot.timestamp.isoformat(),
                                                          str(ctx.registered.version)), policy, audit_log,
                                     launch_retraining(ctx))
        rows.append({"window": k, "drift_share": round(result.drift.drift_share, 3),
                     "label_noise_rate": None if result.label_noise_rate is None else round(result.label_noise_rate, 3),
                     "ood_rate": None if result.ood_rate is None else round(result.ood_rate, 3),
                     "action": decision.action, "crossed": decision.crossed, "suppressed_by": decision.suppressed_by,
                     "error": decision.error})
    ctx.extra["workspace"] = workspace
    return {"workspace": workspace, "audit_log": audit_log.path}, {"windows": rows}


def gate(ctx: RunContext) -> StepResult:
    """The retraining pipeline's gate decision (paired bootstrap on v2's test split), as the run's record."""
    decision = ctx.extra.get("gate")
    if decision is None:
        raise RuntimeError("the trigger launched no retraining run; nothing was gated (see the audit log)")
    from xrayops.registry import resolve_bundle

    (ctx.out / "gate.json").write_text(json.dumps(decision, indent=2))
    challenger = resolve_bundle(decision["challenger"], ctx.settings.tracking_uri(), ctx.out / "challenger")
    return ({"gate": ctx.out / "gate.json", "challenger_bundle": challenger},
            {"promote": decision["promote"], "test_set": decision["test_set"], "n": decision["n"],
             "challenger": decision["challenger"], "champion_accuracy": round(decision["champion_accuracy"], 3),
             "challenger_accuracy": round(decision["challenger_accuracy"], 3),
             "ci": [round(decision["ci_low"], 3), round(decision["ci_high"], 3)], "v2_ok": ctx.extra.get("v2_ok"),
             "review": ctx.extra.get("review")})


APPROVER = "Demo Quality Officer (stand-in)"


def approve(ctx: RunContext) -> StepResult:
    """A promoted challenger reaches serving only through an approval: the candidate release is
    published (not yet served), its change record written (what changed, why, the evidence), and
    a quality officer approves it, here a named stand-in as the review step has one. The decision
    is an entry of the hash-chained audit log and a tag on the member's registry version."""
    from xrayops.evaluate.gate import GateDecision
    from xrayops.release.approval import decide
    from xrayops.release.change_record import record_release, trigger_evidence
    from xrayops.release.publish import release_models

    gate_decision = GateDecision.model_validate(ctx.extra["gate"])
    if not gate_decision.promote:
        return {}, {"approved": None, "why": "the gate kept the champion: nothing to release"}
    name, uri = ctx.settings.registered_model_name, ctx.settings.tracking_uri()
    from xrayops.release.manifest import read_manifest

    # Published against what serves now (so it records the release it replaces), not yet rolled out.
    rolled = ctx.out / "release" / "inferenceservice.yaml"
    live = read_manifest(rolled) if rolled.is_file() else None
    candidate = release_models(live, [f"models:/{name}@champion"], str(ctx.out / "serving"), uri,
                               replace_all=True).release
    record, _, html = record_release(
        candidate, ctx.extra["first_release"], ctx.data_dir, ctx.version.md5, uri, ctx.out / "change-record",
        gate=gate_decision, truth=ctx.extra["truth"], dvc_remote=ctx.settings.dvc_remote(),
        trigger=trigger_evidence(ctx.out / "monitor" / "trigger.jsonl"))
    entry = decide("approved", candidate, APPROVER, "drift scenario: change record read; gate passed, no subgroup refused",
                   uri, ctx.settings.audit_log_path(), change_record=html)
    return ({"change_record": html, "audit_log": ctx.settings.audit_log_path()},
            {"release_id": candidate.release_id, "approved": True, "by": entry.by, "record": record.record_id})


def reload(ctx: RunContext) -> StepResult:
    """Whatever the alias names now is released (the next release, rolled on from the first) and served."""
    from mlflow import MlflowClient

    from serving.client import predict_files
    from serving.harness import running_server

    name, uri = ctx.settings.registered_model_name, ctx.settings.tracking_uri()
    version_now = str(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, "champion").version)
    published, rolled = release_champion(ctx)
    files = sorted(Path(ctx.shifted.dicom_dir).glob("*.dcm"))[:8]
    with running_server(ctx.served_bundles, model_name=name, model_version=version_now, enable_grpc=False) as url:
        responses = predict_files(url, name, files)
    return ({"release": published.uri, "inference_service": rolled},
            {"champion_alias_version": version_now, "served_versions": sorted({r.model_version for r in responses}),
             "release_id": published.release_id, "replaces": published.previous,
             "members": {m.member: m.model_uri for m in published.members}})


def dashboard(ctx: RunContext) -> StepResult:
    from xrayops.monitor.ui import capture_workspace, find_chromium

    if find_chromium() is None:
        return {}, {"screenshot": "skipped: no chromium"}
    shot = capture_workspace(ctx.extra["workspace"], ctx.cfg.screenshot or ctx.out / "dashboard.png",
                             log_path=ctx.out / "evidently-ui.log")
    return {"screenshot": shot.screenshot}, {"panels_rendered": True}


SCENARIO_STEPS = [
    ("synth", synth), ("ingest", ingest_step(_pacs)), ("version", version), ("reference", keep_reference),
    ("pretrain", pretrain), ("finetune", finetune), ("register", register), ("traffic", traffic),
    ("monitor", monitor), ("gate", gate), ("approve", approve), ("reload", reload), ("dashboard", dashboard),
]


def run_drift_scenario(cfg: DriftScenarioConfig, settings: Settings) -> DemoSummary:
    return run_steps(new_context(cfg, settings), SCENARIO_STEPS)
