"""`xrayops demo`: the whole loop on one machine, on synthetic data, with the real components.

synth -> ingest -> DVC version -> SimCLR pretrain -> linear head -> label audit + review worklist
-> evaluate -> MLflow register
-> kserve ModelServer (127.0.0.1) fed by kserve's REST client -> inference log -> Evidently drift
-> retrain decision -> the trigger launches the KFP retraining pipeline (kfp.local) over the
training and shifted exports: a challenger on the champion's backbone, gated against it
-> KFP compile of the training pipeline (+ a small kfp.local run).

Like the CLI, this is a composition root: it reaches `serving` and `pipelines` lazily.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from xrayops.config import Settings
from xrayops.logs import get_logger
from xrayops.release.manifest import REPO_MANIFEST

log = get_logger(__name__)


class DemoConfig(BaseModel):
    out: Path = Path("outputs/demo")
    n: int = 1400
    n_shifted: int = 240
    seed: int = 0
    synth_size: int = 160
    image_size: int = 64
    mislabel_rate: float = 0.05
    ood_rate: float = 0.03
    shift: float = 0.8
    pretrain_epochs: int = 12
    # Paper 000 uses 3e-4 for 1000 epochs; a dozen epochs on a CPU need a larger step
    # (1e-3 beat 3e-4 on the synthetic set at both demo and test scale).
    pretrain_lr: float = 1e-3
    batch_size: int = 128
    finetune_epochs: int = 100
    workers: int = 2
    repo_dir: Path = Path(".")
    run_pipeline: bool = True  # the kfp.local runs: retraining over both exports, then a small training pipeline
    pipeline_images: int = 140
    # The InferenceService the release step rolls (into the demo's outputs; the file is not changed).
    # Absent (an installed package has no infra/), the release is published without it.
    serving_manifest: Path = REPO_MANIFEST


class StepRecord(BaseModel):
    name: str
    seconds: float
    artefacts: dict[str, str] = Field(default_factory=dict)
    facts: dict[str, Any] = Field(default_factory=dict)


class DemoSummary(BaseModel):
    out: Path
    steps: list[StepRecord] = Field(default_factory=list)

    def step(self, name: str) -> StepRecord:
        return next(s for s in self.steps if s.name == name)


def with_demo_key(settings: Settings) -> Settings:
    """The demo's settings: the public DEMO_KEY (xrayops.dicom.deid), in this process and in the
    ones it starts (kfp.local tasks, the model server), whatever key the environment holds.

    The demo's data are synthetic, and one fixed key makes its dataset (and data.dvc's md5) the
    same on every machine; its pseudonyms protect nothing, which is why no real command uses it.
    """
    from pydantic import SecretStr

    from xrayops.dicom.deid import DEMO_KEY, KEY_ENV, KEY_FILE_ENV

    os.environ[KEY_ENV] = DEMO_KEY
    os.environ.pop(KEY_FILE_ENV, None)
    return settings.model_copy(update={"deid_key": SecretStr(DEMO_KEY), "deid_key_file": None})


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The scalar entries of a metrics.json (registries take flat numbers)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _run_step(summary: DemoSummary, name: str, fn: Callable[[], tuple[dict, dict]]) -> StepRecord:
    log.info("step start", step=name)
    start = time.perf_counter()
    artefacts, facts = fn()
    record = StepRecord(
        name=name, seconds=round(time.perf_counter() - start, 1), artefacts={k: str(v) for k, v in artefacts.items()}, facts=facts
    )
    summary.steps.append(record)
    log.info("step done", step=name, seconds=record.seconds, **facts)
    (summary.out / "summary.json").write_text(summary.model_dump_json(indent=2))
    return record


def retrain_through_trigger(result, champion_version: str, out: Path, cfg: DemoConfig, settings: Settings,
                            run_retraining: Callable) -> tuple[dict, dict]:
    """The monitoring window's signals go through the trigger (policy, cooldown, dedup, audit log);
    when it launches, `run_retraining` (the retraining pipeline under kfp.local) runs over both
    exports in `out/synth` and its gate decision becomes the step's facts."""
    from pipelines.retraining import settings_arguments
    from xrayops.monitor.trigger import AuditLog, TriggerPolicy, decide_and_launch, signals_from_monitor

    root, log_path, audit = out / "kfp-retrain", out / "kfp-retrain.log", AuditLog(out / "monitor" / "trigger.jsonl")
    gates: list[dict] = []

    def launch(arguments: dict) -> str:
        task = run_retraining(root, log_path, source_dir=str(out / "synth"), ingest_workers=cfg.workers,
                              finetune_epochs=cfg.finetune_epochs, seed=cfg.seed, **settings_arguments(settings))
        gates.append(json.loads(Path(task.output.path).read_text()))
        return str(root)

    window = result.snapshot.timestamp.isoformat() if result.snapshot else result.drift.json_path.stem
    decision = decide_and_launch(signals_from_monitor(result, window, champion_version),
                                 TriggerPolicy.from_settings(settings), audit, launch)
    facts: dict[str, Any] = {"trigger": decision.action, "crossed": decision.crossed}
    if decision.error:
        facts["error"] = decision.error
    for gate in gates:
        facts.update({"challenger": gate["challenger"], "champion_accuracy": round(gate["champion_accuracy"], 3),
                      "challenger_accuracy": round(gate["challenger_accuracy"], 3),
                      "ci": [round(gate["ci_low"], 3), round(gate["ci_high"], 3)], "promoted": gate["promote"]})
    return {"trigger_log": audit.path, "kfp_retrain_root": root, "kfp_retrain_log": log_path}, facts


def run_demo(cfg: DemoConfig, settings: Settings) -> DemoSummary:

    from xrayops.contracts import Lineage, PreprocessingSpec
    from xrayops.data.synth import synthesize
    from xrayops.data.truth import read_truth, read_truth_files, read_truth_table
    from xrayops.dicom.deid import require_key
    from xrayops.evaluate.report import evaluate_bundle
    from xrayops.ingest import ingest
    from xrayops.monitor.window import monitor_window
    from xrayops.registry import register_bundle
    from xrayops.train.finetune import FinetuneConfig, finetune
    from xrayops.train.pretrain import PretrainConfig, pretrain
    from xrayops.versioning import git_commit, version_dataset

    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    repo = cfg.repo_dir.resolve()
    data_dir = (repo / settings.data_dir) if not settings.data_dir.is_absolute() else settings.data_dir
    settings = settings.model_copy(update={"output_dir": out})
    summary = DemoSummary(out=out)
    state: dict[str, Any] = {}
    key = require_key(settings)
    # One demo is one pass of the loop: an earlier run's trigger decisions would hold this one back
    # (cooldown, duplicate cause).
    (out / "monitor" / "trigger.jsonl").unlink(missing_ok=True)

    def do_synth():
        train = synthesize(
            out / "synth" / "train", n=cfg.n, seed=cfg.seed, size=cfg.synth_size,
            mislabel_rate=cfg.mislabel_rate, shift=0.0, ood_rate=cfg.ood_rate,
        )
        shifted = synthesize(
            out / "synth" / "shifted", n=cfg.n_shifted, seed=cfg.seed + 1, size=cfg.synth_size,
            mislabel_rate=cfg.mislabel_rate, shift=cfg.shift, ood_rate=cfg.ood_rate,
        )
        state["train"], state["shifted"] = train, shifted
        return (
            {"train_dicom": train.dicom_dir, "train_truth": train.truth_path, "shifted_dicom": shifted.dicom_dir},
            {"n_train": train.n_files, "n_mislabeled": train.n_mislabeled, "n_shifted": shifted.n_files},
        )

    def do_ingest():
        result = ingest(
            state["train"].dicom_dir, data_dir, PreprocessingSpec(size=cfg.image_size),
            key, workers=cfg.workers, synonyms_path=settings.body_part_synonyms,
        )
        return (
            {"dataset": data_dir, "manifest": data_dir / "manifest.parquet"},
            {"ok": result.n_ok, "quarantined": result.n_quarantined},
        )

    def do_version():
        version = version_dataset(repo, data_dir, remote_url=settings.dvc_remote(), endpoint_url=settings.s3_endpoint_url)
        state["version"] = version
        return {"dvc_file": repo / (version.path + ".dvc"), "remote": version.remote}, {"md5": version.md5}

    def do_pretrain():
        cfg_pre = PretrainConfig(
            epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, batch_size=cfg.batch_size, seed=cfg.seed,
            device=settings.device,
        )
        result = pretrain(data_dir, out / "pretrain", cfg_pre)
        state["backbone"] = result.backbone_path
        return {"backbone": result.backbone_path}, {"first_loss": round(result.losses[0], 4), "last_loss": round(result.losses[-1], 4)}

    def do_finetune():
        lineage = Lineage(dataset_md5=state["version"].md5, git_commit=git_commit(repo), pipeline_run="xrayops-demo")
        bundle = finetune(
            data_dir, state["backbone"], out / "bundle", FinetuneConfig(epochs=cfg.finetune_epochs, seed=cfg.seed),
            lineage=lineage,
        )
        state["bundle"] = bundle
        return {"bundle": bundle}, {}

    def do_audit():
        from xrayops.monitor.label_audit import AuditConfig, audit_labels, flagged_vs_truth
        from xrayops.monitor.worklist import write_audit_worklist

        # paper 000 keeps the backbone frozen so the training tags can be re-checked with it.
        audit = audit_labels(data_dir, state["backbone"], out / "label-audit",
                             AuditConfig(seed=cfg.seed, device=settings.device))
        scores, worklist = write_audit_worklist(audit.scores_path, data_dir, out / "label-audit", limit=200)
        measured = flagged_vs_truth(scores, read_truth_table(state["train"].truth_path, key))
        return (
            {"label_issues": audit.issues_path, "worklist": worklist.html_path},
            {"audited": audit.n_images, "flagged": audit.n_issues, "wrong_tags": measured["n_wrong"],
             "precision": _round(measured["precision"]), "recall": _round(measured["recall"]),
             "label_health": round(audit.label_health_score, 3)},
        )

    def do_evaluate():
        truth = read_truth(state["train"].truth_path, key)
        result = evaluate_bundle(state["bundle"], data_dir, out / "evaluation", split="test", truth=truth)
        state["metrics"] = result.metrics
        keys = ("accuracy", "balanced_accuracy", "macro_f1", "chance_accuracy", "truth_accuracy", "n")
        return (
            {"report": result.html_path, "metrics": result.metrics_path, "confusion_matrix": result.confusion_png},
            {k: result.metrics[k] for k in keys if k in result.metrics},
        )

    def do_register():
        lineage = Lineage(
            dataset_md5=state["version"].md5, git_commit=git_commit(repo), pipeline_run="xrayops-demo",
            metrics=numeric_metrics(state["metrics"]),
        )
        registered = register_bundle(state["bundle"], settings.tracking_uri(), settings.registered_model_name, lineage)
        state["registered"] = registered
        return (
            {"tracking_uri": settings.tracking_uri(), "model_uri": registered.model_uri},
            {"version": registered.version, "alias": registered.alias},
        )

    def do_release():
        from xrayops.release.publish import release_to_folder

        # As on a cluster: the champion published as a serving release (a local folder here,
        # s3://xrayops-models/region there) and the InferenceService manifest rolled to it.
        rolled = out / "release" / "inferenceservice.yaml"
        rolled.unlink(missing_ok=True)  # one demo, one first release: no earlier run's to roll back to
        release, state["served_bundles"] = release_to_folder(
            [f"models:/{settings.registered_model_name}@{state['registered'].alias}"], out / "serving",
            settings.tracking_uri(), rolled, cfg.serving_manifest)
        artefacts: dict[str, Any] = {"release": release.uri}
        if rolled.is_file():
            artefacts["inference_service"] = rolled
        return artefacts, {"release_id": release.release_id, "members": {m.member: m.model_uri for m in release.members}}

    def do_serve():
        from serving.client import predict_files
        from serving.harness import running_server

        bundle_dirs = state["served_bundles"]  # the release folder, as KServe's storage initializer lays it out
        log_path = out / "inference-log"
        files = sorted(Path(state["shifted"].dicom_dir).glob("*.dcm"))
        truth = read_truth_files(state["shifted"].truth_path)  # by file: the server is sent the files
        with running_server(bundle_dirs, log_path=log_path, model_name=settings.registered_model_name) as url:
            responses = predict_files(url, settings.registered_model_name, files)
        labelled = [(r, truth[f.name]) for r, f in zip(responses, files) if truth[f.name] != "unknown"]
        served_acc = sum(r.region == t for r, t in labelled) / max(len(labelled), 1)
        state["log_path"] = log_path
        example = responses[0].model_dump(include={"region", "confidence", "dicom_region", "label_disagreement", "ood"})
        return (
            {"served_bundles": ", ".join(str(d) for d in bundle_dirs), "inference_log": log_path},
            {
                "requests": len(responses),
                "served_accuracy_vs_truth": round(served_acc, 3),
                "label_disagreements": sum(r.label_disagreement for r in responses),
                "example": example,
            },
        )

    def do_monitor():
        from xrayops.bundle import load_bundle

        meta = load_bundle(state["bundle"]).meta
        # The window also lands in an Evidently workspace: `xrayops dashboard --workspace <out>/evidently`.
        result = monitor_window(data_dir / "manifest.parquet", state["log_path"], out / "monitor", settings,
                                bundle_meta=meta, workspace=out / "evidently")  # fmt: skip
        state["decision"] = result
        return (
            {"drift_report": result.drift.html_path, "evidently_workspace": out / "evidently"},
            {
                "drift_share": round(result.drift.drift_share, 3),
                "label_noise_rate": result.label_noise_rate,
                "ood_rate": result.ood_rate,
                "retrain": result.decision.retrain,
                "reasons": result.decision.reasons,
                "snapshot": result.snapshot.snapshot_id if result.snapshot else None,
            },
        )

    def do_retrain():
        from pipelines.retraining import run_retraining_local

        return retrain_through_trigger(state["decision"], str(state["registered"].version), out, cfg, settings,
                                       run_retraining_local)

    def do_pipeline():
        from pipelines.run import compile_pipeline, run_local

        yaml_path = compile_pipeline(out / "pipeline" / "xrayops-training.yaml")
        artefacts: dict[str, Any] = {"pipeline_yaml": yaml_path}
        facts: dict[str, Any] = {"compiled": True, "ran_locally": False}
        if cfg.run_pipeline:
            # A small run of the same stages through kfp.local proves the compiled graph executes.
            run_local(
                out / "kfp-local", n_images=cfg.pipeline_images, synth_size=96, pretrain_epochs=1, finetune_epochs=20,
                drift_images=40, dvc_remote_url=settings.dvc_remote(), mlflow_tracking_uri=settings.tracking_uri(),
                model_name=settings.registered_model_name + "-kfp", log_path=out / "kfp-local.log",
            )
            artefacts["kfp_local_root"] = out / "kfp-local"
            artefacts["kfp_local_log"] = out / "kfp-local.log"
            facts["ran_locally"] = True
        return artefacts, facts

    for name, fn in [
        ("synth", do_synth), ("ingest", do_ingest), ("version", do_version), ("pretrain", do_pretrain),
        ("finetune", do_finetune), ("audit", do_audit), ("evaluate", do_evaluate), ("register", do_register),
        ("release", do_release), ("serve", do_serve), ("monitor", do_monitor),
        *([("retrain", do_retrain)] if cfg.run_pipeline else []), ("pipeline", do_pipeline),
    ]:
        _run_step(summary, name, fn)
    return summary


def print_summary(summary: DemoSummary, console) -> None:
    """A table of steps and their facts, then every artefact with its full path (never cut)."""
    from rich.table import Table

    table = Table(title=f"xrayops demo: outputs in {summary.out}")
    table.add_column("step")
    table.add_column("s", justify="right")
    table.add_column("facts", overflow="fold")
    for s in summary.steps:
        table.add_row(s.name, f"{s.seconds:.0f}", "\n".join(f"{k}={json.dumps(v, default=str)}" for k, v in s.facts.items()))
    console.print(table)
    console.print("artefacts:")
    for s in summary.steps:
        for key, path in s.artefacts.items():
            console.print(f"  {s.name}.{key}: {path}", soft_wrap=True, highlight=False)
    console.print(f"summary: {summary.out / 'summary.json'}", soft_wrap=True)
