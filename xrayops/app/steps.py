"""The demo's and the drift scenario's steps: small functions over one typed context.

A step takes the `RunContext`, does one stage with the real component, fills the context's typed
fields for the steps after it, and returns what the summary shows: artefacts (paths) and facts.
`run_steps` runs a list of them, timing each and writing `summary.json` after every step, so a
stopped run shows how far it got.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from xrayops.config import Settings
from xrayops.logs import get_logger

log = get_logger(__name__)


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


StepResult = tuple[dict[str, Any], dict[str, Any]]  # (artefacts, facts)


@dataclass
class RunContext:
    """What one run knows: where things are, the settings, and what earlier steps made."""

    out: Path
    repo: Path
    data_dir: Path
    settings: Settings
    key: str
    cfg: Any  # DemoConfig or DriftScenarioConfig
    summary: DemoSummary
    # Filled by the steps, in order.
    train: Any = None  # SynthSummary of the training export
    shifted: Any = None  # SynthSummary of the shifted (second-vendor) batch
    calm: Any = None  # SynthSummary of calm traffic (scenario)
    version: Any = None  # DatasetVersion of the training data (v1)
    backbone: Path | None = None
    bundle: Path | None = None  # the champion's bundle folder
    metrics: dict[str, Any] = field(default_factory=dict)
    registered: Any = None  # RegisteredModel of the champion
    served_bundles: list[Path] = field(default_factory=list)
    log_path: Path | None = None  # the served window's inference log
    monitor: Any = None  # MonitorResult of the served window
    extra: dict[str, Any] = field(default_factory=dict)  # scenario-only results, named by the scenario's steps


Step = tuple[str, Callable[[RunContext], StepResult]]


def run_steps(ctx: RunContext, steps: Sequence[Step]) -> DemoSummary:
    for name, fn in steps:
        log.info("step start", step=name)
        start = time.perf_counter()
        artefacts, facts = fn(ctx)
        record = StepRecord(name=name, seconds=round(time.perf_counter() - start, 1),
                            artefacts={k: str(v) for k, v in artefacts.items()}, facts=facts)
        ctx.summary.steps.append(record)
        log.info("step done", step=name, seconds=record.seconds, **facts)
        (ctx.out / "summary.json").write_text(ctx.summary.model_dump_json(indent=2))
    return ctx.summary


def new_context(cfg: Any, settings: Settings) -> RunContext:
    """The context of a run into `cfg.out`, with the dataset in the repository's data folder."""
    from xrayops.dicom.deid import require_key

    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    repo = cfg.repo_dir.resolve()
    data_dir = settings.data_dir if settings.data_dir.is_absolute() else repo / settings.data_dir
    settings = settings.model_copy(update={"output_dir": out})
    return RunContext(out=out, repo=repo, data_dir=data_dir, settings=settings, key=require_key(settings), cfg=cfg,
                      summary=DemoSummary(out=out))


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- steps shared by the demo and the scenario ------------------------------------------------------


def ingest_step(source: Callable[[RunContext], Path]) -> Callable[[RunContext], StepResult]:
    """Ingest the export `source(ctx)` names into the dataset folder, with the run's image size."""

    def ingest_export(ctx: RunContext) -> StepResult:
        from xrayops.contracts import PreprocessingSpec
        from xrayops.ingest import ingest

        result = ingest(source(ctx), ctx.data_dir, PreprocessingSpec(size=ctx.cfg.image_size), ctx.key,
                        workers=ctx.cfg.workers, synonyms_path=ctx.settings.body_part_synonyms)
        return ({"dataset": ctx.data_dir, "manifest": ctx.data_dir / "manifest.parquet"},
                {"ok": result.n_ok, "quarantined": result.n_quarantined, "refused": result.refused})

    return ingest_export


def version(ctx: RunContext) -> StepResult:
    from xrayops.versioning import version_dataset

    ctx.version = version_dataset(ctx.repo, ctx.data_dir, remote_url=ctx.settings.dvc_remote(),
                                  endpoint_url=ctx.settings.s3_endpoint_url)
    return {"dvc_file": ctx.repo / (ctx.version.path + ".dvc"), "remote": ctx.version.remote}, {"md5": ctx.version.md5}


def pretrain(ctx: RunContext) -> StepResult:
    """SimCLR from random init; a given backbone (the site's, pretrained once) is used as it is."""
    from xrayops.train.pretrain import PretrainConfig
    from xrayops.train.pretrain import pretrain as run_pretrain

    given = getattr(ctx.cfg, "backbone", None)
    if given is not None:
        ctx.backbone = Path(given).resolve()
        return {"backbone": ctx.backbone}, {"given": True}
    cfg = ctx.cfg
    result = run_pretrain(ctx.data_dir, ctx.out / "pretrain", PretrainConfig(
        epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, batch_size=cfg.batch_size, seed=cfg.seed,
        device=ctx.settings.device))
    ctx.backbone = result.backbone_path
    return {"backbone": result.backbone_path}, {"first_loss": round(result.losses[0], 4),
                                                "last_loss": round(result.losses[-1], 4)}


def finetune(ctx: RunContext) -> StepResult:
    """The linear head on the frozen backbone (Langer et al. 2024), calibrated, with the OOD detector."""
    from xrayops.contracts import Lineage
    from xrayops.train.finetune import FinetuneConfig
    from xrayops.train.finetune import finetune as run_finetune
    from xrayops.versioning import git_commit

    lineage = Lineage(dataset_md5=ctx.version.md5, git_commit=git_commit(ctx.repo), pipeline_run=ctx.cfg.run_name)
    ctx.bundle = run_finetune(ctx.data_dir, ctx.backbone, ctx.out / ctx.cfg.bundle_folder,
                              FinetuneConfig(epochs=ctx.cfg.finetune_epochs, seed=ctx.cfg.seed), lineage=lineage)
    return {"bundle": ctx.bundle}, {}


def register(ctx: RunContext) -> StepResult:
    """The champion in MLflow with its lineage (dataset md5, commit, metrics when evaluated)."""
    from xrayops.contracts import Lineage
    from xrayops.registry import numeric_metrics, register_bundle
    from xrayops.versioning import git_commit

    lineage = Lineage(dataset_md5=ctx.version.md5, git_commit=git_commit(ctx.repo), pipeline_run=ctx.cfg.run_name,
                      metrics=numeric_metrics(ctx.metrics))
    ctx.registered = register_bundle(ctx.bundle, ctx.settings.tracking_uri(), ctx.settings.registered_model_name,
                                     lineage, alias="champion")
    return ({"tracking_uri": ctx.settings.tracking_uri(), "model_uri": ctx.registered.model_uri},
            {"version": ctx.registered.version, "alias": ctx.registered.alias})


def release_champion(ctx: RunContext, first: bool = False):
    """The champion published as a serving release, as on a cluster (a local folder here,
    s3://xrayops-models/region there), and the InferenceService manifest rolled to it. The first
    release of a run starts the rolled manifest afresh; later ones roll it on (a rollback target)."""
    from xrayops.release.publish import release_to_folder

    rolled = ctx.out / "release" / "inferenceservice.yaml"
    if first:
        rolled.unlink(missing_ok=True)
    release, ctx.served_bundles = release_to_folder(
        [f"models:/{ctx.settings.registered_model_name}@champion"], ctx.out / "serving", ctx.settings.tracking_uri(),
        rolled, ctx.cfg.serving_manifest)
    return release, rolled


def release(ctx: RunContext) -> StepResult:
    published, rolled = release_champion(ctx, first=True)
    artefacts: dict[str, Any] = {"release": published.uri}
    if rolled.is_file():
        artefacts["inference_service"] = rolled
    return artefacts, {"release_id": published.release_id, "members": {m.member: m.model_uri for m in published.members}}
