"""`xrayops demo`: the whole loop on one machine, on synthetic data, with the real components.

synth -> ingest -> DVC version -> SimCLR pretrain -> linear head -> label audit + review worklist
-> evaluate -> MLflow register -> serving release
-> kserve ModelServer (127.0.0.1) fed by kserve's REST client -> inference log -> Evidently drift
-> retrain decision -> the trigger launches the KFP retraining pipeline (kfp.local) over the
training and shifted exports: a challenger on the champion's backbone, gated against it
-> KFP compile of the training pipeline (+ a small kfp.local run).

The loop is `DEMO_STEPS`, a list of small steps over one `RunContext` (xrayops.app.steps); the
drift scenario shares them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from xrayops.app.steps import (
    DemoSummary,
    RunContext,
    StepResult,
    finetune,
    ingest_step,
    new_context,
    pretrain,
    register,
    release,
    rounded,
    run_steps,
    version,
)
from xrayops.config import Settings
from xrayops.release.manifest import REPO_MANIFEST


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
    # Langer et al. 2024 use 3e-4 for 1000 epochs; a dozen epochs on a CPU need a larger step
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
    run_name: str = "xrayops-demo"
    bundle_folder: str = "bundle"


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


def synth(ctx: RunContext) -> StepResult:
    from xrayops.data.synth import synthesize

    cfg = ctx.cfg
    ctx.train = synthesize(ctx.out / "synth" / "train", n=cfg.n, seed=cfg.seed, size=cfg.synth_size,
                           mislabel_rate=cfg.mislabel_rate, shift=0.0, ood_rate=cfg.ood_rate)
    ctx.shifted = synthesize(ctx.out / "synth" / "shifted", n=cfg.n_shifted, seed=cfg.seed + 1, size=cfg.synth_size,
                             mislabel_rate=cfg.mislabel_rate, shift=cfg.shift, ood_rate=cfg.ood_rate)
    return (
        {"train_dicom": ctx.train.dicom_dir, "train_truth": ctx.train.truth_path, "shifted_dicom": ctx.shifted.dicom_dir},
        {"n_train": ctx.train.n_files, "n_mislabeled": ctx.train.n_mislabeled, "n_shifted": ctx.shifted.n_files},
    )


def audit(ctx: RunContext) -> StepResult:
    """The training tags re-checked on the frozen backbone, which Langer et al. 2024 keep frozen for this."""
    from xrayops.data.truth import read_truth_table
    from xrayops.monitor.label_audit import AuditConfig, audit_labels, flagged_vs_truth
    from xrayops.monitor.worklist import write_audit_worklist

    result = audit_labels(ctx.data_dir, ctx.backbone, ctx.out / "label-audit",
                          AuditConfig(seed=ctx.cfg.seed, device=ctx.settings.device))
    scores, worklist = write_audit_worklist(result.scores_path, ctx.data_dir, ctx.out / "label-audit", limit=200)
    measured = flagged_vs_truth(scores, read_truth_table(ctx.train.truth_path, ctx.key))
    return (
        {"label_issues": result.issues_path, "worklist": worklist.html_path},
        {"audited": result.n_images, "flagged": result.n_issues, "wrong_tags": measured["n_wrong"],
         "precision": rounded(measured["precision"]), "recall": rounded(measured["recall"]),
         "label_health": round(result.label_health_score, 3)},
    )


def evaluate(ctx: RunContext) -> StepResult:
    from xrayops.data.truth import read_truth
    from xrayops.evaluate.report import evaluate_bundle

    result = evaluate_bundle(ctx.bundle, ctx.data_dir, ctx.out / "evaluation", split="test",
                             truth=read_truth(ctx.train.truth_path, ctx.key))
    ctx.metrics = result.metrics
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "chance_accuracy", "truth_accuracy", "ood_auroc",
            "ood_auroc_ci_low", "ood_auroc_ci_high", "ood_false_alarm_rate", "n")
    return (
        {"report": result.html_path, "metrics": result.metrics_path, "confusion_matrix": result.confusion_png},
        {k: result.metrics[k] for k in keys if k in result.metrics},
    )


def serve(ctx: RunContext) -> StepResult:
    """The release folder served (as KServe's storage initializer lays it out); the shifted batch
    sent as DICOM through kserve's REST client."""
    from serving.client import predict_files
    from serving.harness import running_server
    from xrayops.data.truth import read_truth_files

    ctx.log_path = ctx.out / "inference-log"
    files = sorted(Path(ctx.shifted.dicom_dir).glob("*.dcm"))
    truth = read_truth_files(ctx.shifted.truth_path)  # by file: the server is sent the files
    name = ctx.settings.registered_model_name
    with running_server(ctx.served_bundles, log_path=ctx.log_path, model_name=name) as url:
        responses = predict_files(url, name, files)
    labelled = [(r, truth[f.name]) for r, f in zip(responses, files) if truth[f.name] != "unknown"]
    served_acc = sum(r.region == t for r, t in labelled) / max(len(labelled), 1)
    example = responses[0].model_dump(include={"region", "confidence", "dicom_region", "label_disagreement", "ood"})
    return (
        {"served_bundles": ", ".join(str(d) for d in ctx.served_bundles), "inference_log": ctx.log_path},
        {"requests": len(responses), "served_accuracy_vs_truth": round(served_acc, 3),
         "label_disagreements": sum(r.label_disagreement for r in responses),
         "not_applicable": sum(not r.applicable for r in responses), "example": example},
    )


def monitor(ctx: RunContext) -> StepResult:
    """Drift of the served window against the training manifest; the window also lands in an
    Evidently workspace (`xrayops dashboard --workspace <out>/evidently`)."""
    from xrayops.bundle_meta import read_bundle_meta
    from xrayops.monitor.window import monitor_window

    ctx.monitor = monitor_window(ctx.data_dir / "manifest.parquet", ctx.log_path, ctx.out / "monitor", ctx.settings,
                                 bundle_meta=read_bundle_meta(ctx.bundle), workspace=ctx.out / "evidently")
    result = ctx.monitor
    return (
        {"drift_report": result.drift.html_path, "evidently_workspace": ctx.out / "evidently"},
        {"drift_share": round(result.drift.drift_share, 3), "label_noise_rate": result.label_noise_rate,
         "ood_rate": result.ood_rate, "retrain": result.decision.retrain, "reasons": result.decision.reasons,
         "snapshot": result.snapshot.snapshot_id if result.snapshot else None},
    )


def retrain_through_trigger(result, champion_version: str, out: Path, cfg: DemoConfig, settings: Settings,
                            run_retraining: Callable) -> tuple[dict, dict]:
    """The monitoring window's signals go through the trigger (policy, cooldown, dedup, audit log);
    when it launches, `run_retraining` (the retraining pipeline under kfp.local) runs over both
    exports in `out/synth` and its gate decision becomes the step's facts."""
    from pipelines.retraining import settings_arguments
    from xrayops.monitor.trigger import AuditLog, TriggerPolicy, decide_and_launch, signals_from_monitor

    root, log_path, audit_log = out / "kfp-retrain", out / "kfp-retrain.log", AuditLog(out / "monitor" / "trigger.jsonl")
    gates: list[dict] = []

    def launch(arguments: dict) -> str:
        task = run_retraining(root, log_path, source_dir=str(out / "synth"), ingest_workers=cfg.workers,
                              finetune_epochs=cfg.finetune_epochs, seed=cfg.seed, **settings_arguments(settings))
        gates.append(json.loads(Path(task.output.path).read_text()))
        return str(root)

    window = result.snapshot.timestamp.isoformat() if result.snapshot else result.drift.json_path.stem
    decision = decide_and_launch(signals_from_monitor(result, window, champion_version),
                                 TriggerPolicy.from_settings(settings), audit_log, launch)
    facts: dict[str, Any] = {"trigger": decision.action, "crossed": decision.crossed}
    if decision.error:
        facts["error"] = decision.error
    artefacts: dict[str, Any] = {"trigger_log": audit_log.path, "kfp_retrain_root": root, "kfp_retrain_log": log_path}
    for gate in gates:
        facts.update({"challenger": gate["challenger"], "champion_accuracy": round(gate["champion_accuracy"], 3),
                      "challenger_accuracy": round(gate["challenger_accuracy"], 3),
                      "ci": [round(gate["ci_low"], 3), round(gate["ci_high"], 3)], "promoted": gate["promote"],
                      "refused_subgroups": [f"{g['attribute']}={g['value']}" for g in gate.get("subgroups", [])
                                            if g.get("refused")]})
        # The run's change record (what changed, why, the evidence, the approval block): a KFP HTML artifact.
        records = sorted(root.glob("**/change-record/change_record.html"), key=lambda p: p.stat().st_mtime)
        if records:
            artefacts["change_record"] = records[-1]
    return artefacts, facts


def retrain(ctx: RunContext) -> StepResult:
    from pipelines.retraining import run_retraining_local

    return retrain_through_trigger(ctx.monitor, str(ctx.registered.version), ctx.out, ctx.cfg, ctx.settings,
                                   run_retraining_local)


def pipeline(ctx: RunContext) -> StepResult:
    """The training stages compiled to KFP YAML; a small run of the same graph through kfp.local
    proves the compiled graph executes."""
    from pipelines.run import compile_pipeline, run_local

    yaml_path = compile_pipeline(ctx.out / "pipeline" / "xrayops-training.yaml")
    artefacts: dict[str, Any] = {"pipeline_yaml": yaml_path}
    facts: dict[str, Any] = {"compiled": True, "ran_locally": False}
    if ctx.cfg.run_pipeline:
        settings = ctx.settings
        run_local(ctx.out / "kfp-local", n_images=ctx.cfg.pipeline_images, synth_size=96, pretrain_epochs=1,
                  finetune_epochs=20, drift_images=40, dvc_remote_url=settings.dvc_remote(),
                  mlflow_tracking_uri=settings.tracking_uri(), model_name=settings.registered_model_name + "-kfp",
                  log_path=ctx.out / "kfp-local.log")
        artefacts.update(kfp_local_root=ctx.out / "kfp-local", kfp_local_log=ctx.out / "kfp-local.log")
        facts["ran_locally"] = True
    return artefacts, facts


def demo_steps(cfg: DemoConfig) -> list:
    return [
        ("synth", synth), ("ingest", ingest_step(lambda ctx: ctx.train.dicom_dir)), ("version", version),
        ("pretrain", pretrain), ("finetune", finetune), ("audit", audit), ("evaluate", evaluate),
        ("register", register), ("release", release), ("serve", serve), ("monitor", monitor),
        *([("retrain", retrain)] if cfg.run_pipeline else []), ("pipeline", pipeline),
    ]


def run_demo(cfg: DemoConfig, settings: Settings) -> DemoSummary:
    ctx = new_context(cfg, settings)
    # One demo is one pass of the loop: an earlier run's trigger decisions would hold this one back
    # (cooldown, duplicate cause).
    (ctx.out / "monitor" / "trigger.jsonl").unlink(missing_ok=True)
    return run_steps(ctx, demo_steps(cfg))


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
