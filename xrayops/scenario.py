"""`xrayops demo --scenario drift`: continual retraining, end to end, on one machine.

1. A champion is trained on dataset version v1 (synthetic, one vendor; SimCLR on v1, or a given
   pretrained backbone), registered in MLflow
   (alias `champion`) and served by the kserve ModelServer on 127.0.0.1.
2. Traffic: two calm windows, then two windows of a vendor-shifted batch with a raised
   mislabel rate (`synth --shift --mislabel-rate`). Every window is monitored against the
   training manifest and logged to the Evidently workspace (drift share, label-noise rate,
   OOD rate, prediction mix, volume), so the dashboard shows them rising.
3. The trigger (thresholds from Settings, cooldown and dedup, JSONL audit log) fires on the
   first shifted window; its launcher retrains in process: the shifted batch is ingested with
   the old data as dataset version v2 (DVC); the cleanlab audit of v2's labels fills the review
   worklist, the reviewers' decisions become label events in the feature store, and the
   challenger's head is trained on v2's point-in-time training set (reviewed labels over PACS
   tags) over the champion's frozen backbone (paper 000). The second
   shifted window is suppressed (same cause), not a second run.
4. Gate: champion and challenger are scored on one fixed, versioned test set (the test split
   of v2, its md5 recorded) against the true regions; the paired-bootstrap gate promotes the
   challenger when it is not worse beyond the margin, moving the MLflow alias.
5. Reload: the server is restarted on `models:/NAME@champion` and answers with the new version.
6. A headless-Chromium screenshot of the dashboard (when Chromium is installed).

Like `xrayops.demo`, this is a composition root: it reaches `serving` lazily.
"""
from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field

from xrayops.config import Settings
from xrayops.demo import DemoSummary, _run_step
from xrayops.logs import get_logger

log = get_logger(__name__)


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


def _truth(key: bytes | str, *sets: tuple[str, Any]) -> dict[str, str]:
    """source_name -> true region, for synth sets landed in sub-folders of the PACS export."""
    from xrayops.data.truth import by_source_name, read_truth_files

    by_file = {f"{prefix}/{name}": region for prefix, s in sets for name, region in read_truth_files(s.truth_path).items()}
    return by_source_name(by_file, key)


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


def run_drift_scenario(cfg: DriftScenarioConfig, settings: Settings) -> DemoSummary:
    from xrayops.bundle import load_bundle
    from xrayops.contracts import Lineage, PreprocessingSpec
    from xrayops.data.synth import synthesize
    from xrayops.evaluate.gate import GateModel, GatePolicy, run_gate
    from xrayops.ingest import ingest
    from xrayops.inference_log import read_log
    from xrayops.monitor.trigger import AuditLog, TriggerPolicy, decide_and_launch, signals_from_monitor
    from xrayops.monitor.window import monitor_window
    from xrayops.monitor.workspace import default_workspace
    from xrayops.registry import register_bundle
    from xrayops.train.finetune import FinetuneConfig, finetune
    from xrayops.train.pretrain import PretrainConfig, pretrain
    from xrayops.features import open_store, record_reviews, training_labels
    from xrayops.monitor.label_audit import AuditConfig, audit_labels
    from xrayops.monitor.review import decisions_to_events
    from xrayops.monitor.worklist import write_audit_worklist
    from xrayops.versioning import git_commit, version_dataset

    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    repo = cfg.repo_dir.resolve()
    data_dir = settings.data_dir if settings.data_dir.is_absolute() else repo / settings.data_dir
    settings = settings.model_copy(update={"output_dir": out})
    name = settings.registered_model_name
    workspace = default_workspace(settings)
    summary = DemoSummary(out=out)
    state: dict[str, Any] = {}
    spec = PreprocessingSpec(size=cfg.image_size)
    from xrayops.dicom.deid import require_key

    key = require_key(settings)
    pacs = out / "pacs"

    def do_synth():
        state["train"] = synthesize(out / "synth" / "train", n=cfg.n, seed=cfg.seed, size=cfg.synth_size,
                                    mislabel_rate=cfg.mislabel_rate, shift=0.0, ood_rate=cfg.ood_rate)
        state["calm"] = synthesize(out / "synth" / "calm", n=2 * cfg.n_window, seed=cfg.seed + 1, size=cfg.synth_size,
                                   mislabel_rate=cfg.mislabel_rate, shift=0.0, ood_rate=cfg.ood_rate)
        state["shifted"] = synthesize(out / "synth" / "shifted", n=2 * cfg.n_window, seed=cfg.seed + 2,
                                      size=cfg.synth_size, mislabel_rate=cfg.shifted_mislabel_rate, shift=cfg.shift,
                                      ood_rate=cfg.ood_rate)
        # The PACS export ingestion reads: v1 now, the shifted batch joins it (as v2/) when retraining.
        shutil.copytree(state["train"].dicom_dir, pacs / "v1", dirs_exist_ok=True)
        state["truth"] = _truth(key, ("v1", state["train"]), ("v2", state["shifted"]))  # source_name -> true region
        return ({"train": state["train"].dicom_dir, "calm": state["calm"].dicom_dir, "shifted": state["shifted"].dicom_dir},
                {"n_train": state["train"].n_files, "n_shifted": state["shifted"].n_files,
                 "shifted_mislabeled": state["shifted"].n_mislabeled})

    def do_champion():
        summary_v1 = ingest(pacs, data_dir, spec, key, workers=cfg.workers,
                            synonyms_path=settings.body_part_synonyms)
        v1 = version_dataset(repo, data_dir, remote_url=settings.dvc_remote(), endpoint_url=settings.s3_endpoint_url)
        state["reference"] = out / "reference-v1.parquet"
        pd.read_parquet(data_dir / "manifest.parquet").to_parquet(state["reference"])  # v1, kept for monitoring
        if cfg.backbone is not None:  # the site's SSL backbone, pretrained once (e.g. on the GPU pool)
            state["backbone"] = cfg.backbone.resolve()
        else:
            pre = pretrain(data_dir, out / "pretrain", PretrainConfig(
                epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                device=settings.device))
            state["backbone"] = pre.backbone_path
        lineage = Lineage(dataset_md5=v1.md5, git_commit=git_commit(repo), pipeline_run="xrayops-demo-drift")
        bundle = finetune(data_dir, state["backbone"], out / "champion", FinetuneConfig(epochs=cfg.finetune_epochs, seed=cfg.seed),
                          lineage=lineage)
        registered = register_bundle(bundle, settings.tracking_uri(), name, lineage, alias="champion")
        state["v1"], state["champion"] = v1, registered
        return ({"bundle": bundle, "model_uri": registered.model_uri},
                {"v1_md5": v1.md5, "ok": summary_v1.n_ok, "champion_version": registered.version})

    def release_champion(first: bool = False) -> tuple[Any, list[Path]]:
        """The champion released as on a cluster (xrayops.release.release_to_folder); the first
        release of a run starts the manifest afresh, later ones roll it on (a rollback target)."""
        from xrayops.release.manifest import REPO_MANIFEST
        from xrayops.release.publish import release_to_folder

        rolled = out / "release" / "inferenceservice.yaml"
        if first:
            rolled.unlink(missing_ok=True)
        return release_to_folder([f"models:/{name}@champion"], out / "serving", settings.tracking_uri(), rolled,
                                 REPO_MANIFEST)

    def serve_ref(ref_version: str, files: list[Path], log_path: Path | None):
        from serving.client import predict_files
        from serving.harness import running_server

        release, bundle_dirs = release_champion()
        with running_server(bundle_dirs, log_path=log_path, model_name=name, model_version=ref_version,
                            enable_grpc=False) as url:
            return [r for k in range(0, len(files), cfg.n_window)
                    for r in predict_files(url, name, files[k:k + cfg.n_window])], release

    def do_traffic():
        calm = sorted(Path(state["calm"].dicom_dir).glob("*.dcm"))
        shifted = sorted(Path(state["shifted"].dicom_dir).glob("*.dcm"))
        log_path = out / "inference-log"
        from serving.client import predict_files
        from serving.harness import running_server

        version = str(state["champion"].version)
        release, bundle_dirs = release_champion(first=True)
        batches = [calm[:cfg.n_window], calm[cfg.n_window:], shifted[:cfg.n_window], shifted[cfg.n_window:]]
        bounds = []
        with running_server(bundle_dirs, log_path=log_path, model_name=name, model_version=version,
                            enable_grpc=False) as url:
            for batch in batches:
                start = datetime.now(timezone.utc)
                responses = predict_files(url, name, batch)
                bounds.append((start, datetime.now(timezone.utc)))
        served = read_log(log_path)
        windows = []
        for k, (start, end) in enumerate(bounds):
            frame = served[(served["timestamp"] >= pd.Timestamp(start)) & (served["timestamp"] <= pd.Timestamp(end))]
            path = out / "windows" / f"window-{k}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(path)
            windows.append(path)
        state["windows"] = windows
        return ({"inference_log": log_path}, {"windows": [len(pd.read_parquet(w)) for w in windows],
                                              "served_version": responses[-1].model_version})

    def review_labels() -> dict[str, str]:
        """Audit v2's labels, put the suspects on the worklist, have them reviewed, feed the
        decisions to the feature store, and return its point-in-time training labels."""
        manifest = pd.read_parquet(data_dir / "manifest.parquet")
        ingested_at = datetime.now(timezone.utc)
        audit_dir = out / "label-audit"
        audit = audit_labels(data_dir, state["backbone"], audit_dir, AuditConfig(seed=cfg.seed, device=settings.device))
        _, worklist = write_audit_worklist(audit.scores_path, data_dir, audit_dir, limit=cfg.review_budget)
        decisions = review_from_truth(pd.read_csv(worklist.csv_path, dtype=str, keep_default_na=False), manifest,
                                      state["truth"])
        decisions.to_csv(audit_dir / "review_decisions.csv", index=False)
        imported = decisions_to_events(decisions, dict(zip(manifest["image_id"].astype(str), manifest["region"].astype(str))))
        store = open_store(settings)
        record_reviews(store, manifest, imported.events, ingested_at)
        ok = manifest[manifest["status"] == "ok"]
        labels = training_labels(store, ok["image_id"].astype(str).tolist(), datetime.now(timezone.utc))
        counts = decisions["decision"].value_counts()
        state["review"] = {"audited": audit.n_images, "flagged": audit.n_issues, "reviewed": len(decisions),
                           "relabelled": int(counts.get("relabel", 0)), "excluded": int(counts.get("exclude", 0)),
                           "kept": int(counts.get("keep", 0)), "rejected": len(imported.rejected)}
        return labels

    def retrain(arguments: dict) -> str:
        """The trigger's launcher: ingest the new export into v2, version it, review the suspect
        labels, and train the challenger on the reviewed training set."""
        shutil.copytree(state["shifted"].dicom_dir, pacs / "v2", dirs_exist_ok=True)
        summary_v2 = ingest(pacs, data_dir, spec, key, workers=cfg.workers, synonyms_path=settings.body_part_synonyms)
        v2 = version_dataset(repo, data_dir, remote_url=settings.dvc_remote(), endpoint_url=settings.s3_endpoint_url)
        labels = review_labels() if cfg.review_budget else None
        lineage = Lineage(dataset_md5=v2.md5, git_commit=git_commit(repo), pipeline_run=f"retrain {arguments['trigger_window']}")
        bundle = finetune(data_dir, state["backbone"], out / "challenger",
                          FinetuneConfig(epochs=cfg.finetune_epochs, seed=cfg.seed), lineage=lineage, labels=labels)
        registered = register_bundle(bundle, settings.tracking_uri(), name, lineage, alias="challenger")
        state.update(v2=v2, challenger=registered, challenger_bundle=bundle, v2_ok=summary_v2.n_ok)
        return f"in-process:{registered.model_uri}"

    def do_monitor():
        meta = load_bundle(out / "champion").meta
        audit = AuditLog(out / "monitor" / "trigger.jsonl")
        policy = TriggerPolicy.from_settings(settings)
        rows = []
        for k, window in enumerate(state["windows"]):
            result = monitor_window(state["reference"], window, out / "monitor" / f"window-{k}", settings,
                                    bundle_meta=meta, workspace=workspace)
            decision = decide_and_launch(signals_from_monitor(result, result.snapshot.timestamp.isoformat(),
                                                              str(state["champion"].version)), policy, audit, retrain)
            rows.append({"window": k, "drift_share": round(result.drift.drift_share, 3),
                         "label_noise_rate": None if result.label_noise_rate is None else round(result.label_noise_rate, 3),
                         "ood_rate": None if result.ood_rate is None else round(result.ood_rate, 3),
                         "action": decision.action, "crossed": decision.crossed, "suppressed_by": decision.suppressed_by})
        state["monitor_rows"] = rows
        return {"workspace": workspace, "audit_log": audit.path}, {"windows": rows}

    def do_gate():
        if "challenger" not in state:
            raise RuntimeError("the trigger launched no retraining run; nothing to gate (see the audit log)")
        truth = state["truth"]
        test_set = state["v2"].md5
        policy = GatePolicy.from_settings(settings)
        if cfg.gate_margin is not None:
            policy = policy.model_copy(update={"margin": cfg.gate_margin})
        decision = run_gate(GateModel(bundle_dir=str(out / "champion"), ref=state["champion"].model_uri),
                            GateModel(bundle_dir=str(state["challenger_bundle"]), ref=state["challenger"].model_uri),
                            data_dir, test_set, policy, settings.tracking_uri(), truth)
        state["gate"] = decision
        (out / "gate.json").write_text(decision.model_dump_json(indent=2))
        return ({"gate": out / "gate.json"},
                {"promote": decision.promote, "test_set": test_set, "n": decision.n,
                 "champion_accuracy": round(decision.champion_accuracy, 3),
                 "challenger_accuracy": round(decision.challenger_accuracy, 3),
                 "ci": [round(decision.ci_low, 3), round(decision.ci_high, 3)], "v2_ok": state["v2_ok"],
                 "review": state.get("review")})

    def do_reload():
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=settings.tracking_uri(), registry_uri=settings.tracking_uri())
        version = str(client.get_model_version_by_alias(name, "champion").version)
        files = sorted(Path(state["shifted"].dicom_dir).glob("*.dcm"))[:8]
        responses, release = serve_ref(version, files, None)
        return ({"release": release.uri, "inference_service": out / "release" / "inferenceservice.yaml"},
                {"champion_alias_version": version, "served_versions": sorted({r.model_version for r in responses}),
                 "release_id": release.release_id, "replaces": release.previous,
                 "members": {m.member: m.model_uri for m in release.members}})

    def do_dashboard():
        from xrayops.monitor.ui import capture_workspace, find_chromium

        if find_chromium() is None:
            return {}, {"screenshot": "skipped: no chromium"}
        shot = capture_workspace(workspace, cfg.screenshot or out / "dashboard.png", log_path=out / "evidently-ui.log")
        return {"screenshot": shot.screenshot}, {"panels_rendered": True}

    for step, fn in [("synth", do_synth), ("champion", do_champion), ("traffic", do_traffic), ("monitor", do_monitor),
                     ("gate", do_gate), ("reload", do_reload), ("dashboard", do_dashboard)]:
        _run_step(summary, step, fn)
    return summary
