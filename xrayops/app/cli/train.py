"""Models: self-supervised pretraining, the linear head, evaluation, the registry, the label audit and reviews, the gate."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from xrayops.app.cli.common import (
    app, _fail, _deid_key, _print_json, BundleOption, DataDirOption, HeadEpochsOption, LabelsFromStoreOption,
    ModelRefOption, PretrainEpochsOption, PromoteOption, SeedOption, TestSetDataDirOption, TestSetDvcOption,
)
from xrayops.config import get_settings


@app.command()
def pretrain(
    data_dir: DataDirOption = None,
    out: Annotated[Path, typer.Option(help="Output folder for backbone.pt and checkpoints.")] = Path("outputs/pretrain"),
    epochs: PretrainEpochsOption = 8,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    seed: SeedOption = 0,
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
    data_dir: DataDirOption = None,
    out: Annotated[Path, typer.Option(help="Bundle output folder.")] = Path("outputs/bundle"),
    epochs: HeadEpochsOption = 60,
    seed: SeedOption = 0,
    truth: Annotated[Optional[Path], typer.Option(help="truth.csv from synth: its angles train the orientation head.")] = None,
    finetune_last_stage: Annotated[
        bool, typer.Option("--finetune-last-stage", help="Also fine-tune the backbone's last stage (layer4) with the head.")
    ] = False,
    labels_from_store: LabelsFromStoreOption = False,
    as_of: Annotated[
        Optional[str], typer.Option(help="With --labels-from-store: label events up to this ISO time (default: now).")
    ] = None,
    ood_method: Annotated[str, typer.Option(
        help="Out-of-domain score: relative_mahalanobis, mahalanobis, knn, or energy (of the logits; far weaker).")
    ] = "relative_mahalanobis",
    ood_zoom: Annotated[Optional[list[float]], typer.Option(
        "--ood-zoom", help="A zoom of the test-time views the OOD features average over; repeat for several "
        "(default 1.0 1.2 0.85). --ood-zoom 1 alone costs a third; --ood-zoom 0: no views, the region pass's "
        "features (fastest, weakest; benchmarks/README.md, \"Out-of-domain detection\").")
    ] = None,
) -> None:
    """Train the linear region head on the frozen backbone (Langer et al. 2024) and write a model bundle.

    With --truth, also the (cos, sin) orientation head of Baltruschat et al. 2018. With --labels-from-store,
    the labels are the point-in-time training set of the Feast store (see `import-reviews`). The bundle
    carries its out-of-domain detector and threshold (the validation split's 95th percentile).
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
    from pydantic import ValidationError

    zooms = {} if ood_zoom is None else {"ood_zooms": () if list(ood_zoom) == [0.0] else tuple(ood_zoom)}
    try:
        cfg = FinetuneConfig(epochs=epochs, seed=seed, finetune_last_stage=finetune_last_stage, ood_method=ood_method,
                             **zooms)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        _fail(f"finetune settings: {problems}")
    bundle = run_finetune(data, backbone, out, cfg, lineage=lineage, angles=angles, labels=labels)
    typer.echo(str(bundle))


@app.command()
def evaluate(
    bundle: BundleOption = Path("outputs/bundle"),
    data_dir: DataDirOption = None,
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
    bundle: BundleOption = Path("outputs/bundle"),
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


@app.command("audit-labels")
def audit_labels_cmd(
    backbone: Annotated[list[Path], typer.Option(
        help="Frozen backbone.pt (from pretrain). Repeat for an ensemble (e.g. SimCLR and BYOL; Langer et al. 2024).")] = [
        Path("outputs/pretrain/backbone.pt")],
    data_dir: DataDirOption = None,
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
    data_dir: DataDirOption = None,
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


@app.command()
def gate(
    champion: ModelRefOption,
    challenger: Annotated[str, typer.Option(help="Challenger: models:/NAME/VERSION (promotion needs a registry version).")],
    data_dir: TestSetDataDirOption = None,
    dataset_dvc: TestSetDvcOption = Path("data.dvc"),
    truth: Annotated[Optional[Path], typer.Option(help="truth.csv (synth): score against true regions instead of the PACS tags.")] = None,
    promote: PromoteOption = True,
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
