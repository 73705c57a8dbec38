"""Offline label audit with confident learning (cleanlab) over the labelled training data.

Langer et al. 2024 keeps the backbone frozen so that training and validation images can later be
re-checked for wrong PACS labels with the same embedding. Here every labelled image gets an
OUT-OF-FOLD predicted distribution: a k-fold cross-validated linear head (multinomial
logistic regression, Langer et al. 2024's one fully connected layer) on frozen-backbone embeddings,
so no image is judged by a head that saw its own (possibly wrong) label. Several backbones
(Langer et al. 2024's SimCLR / BYOL / SupCon members) average their probabilities. cleanlab's
`get_label_quality_scores` scores each image; a PACS tag is set per study, so the images of one
study that carry the same tag are judged together (de Cid Rodríguez 2021's study-level labels): the tag's
quality is the geometric mean of its images' scores. A tag is flagged when that falls below
`flag_below` (else by cleanlab's `find_label_issues`, reported beside it), and
`overall_label_health_score` gives one number for the dataset.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from xrayops.logs import get_logger
from xrayops.regions import REGIONS

log = get_logger(__name__)

ISSUES_NAME = "label_issues.csv"
SCORES_NAME = "label_scores.parquet"
AUDIT_NAME = "label_audit.json"
FilterBy = Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"]


class AuditConfig(BaseModel):
    n_folds: int = Field(5, ge=2)
    seed: int = 0
    # Inverse L2 strength of the logistic-regression head. Standardised embeddings of a few
    # hundred images overfit without it; the out-of-fold probabilities must stay calibrated.
    C: float = Field(0.1, gt=0)
    max_iter: int = Field(2000, ge=10)
    # Pooled outputs of these ResNet stages, concatenated, are the audit's embedding. Layers 2-4
    # raised the best recall at precision 0.8 by ~0.03 over layer 4 alone (0.87 -> 0.90 on the
    # development set, 0.89 -> 0.92 on a held-out one; benchmarks/README.md, label noise).
    stages: list[str] = Field(default_factory=lambda: ["layer2", "layer3", "layer4"])
    # Flag an image when the out-of-fold probability of its own tag (cleanlab's self-confidence
    # label quality) is below this. 0.1 was chosen on the development set; None leaves the flags
    # to cleanlab's confident-learning filter, which flagged more (precision 0.70-0.72 there).
    flag_below: float | None = Field(0.1, gt=0, lt=1)
    # Judge the images of a study that carry the same tag together (geometric mean of their
    # self-confidence). Chosen on the development set: precision/recall 0.82/0.89 -> 0.90/0.92
    # at the same flag_below (benchmarks/README.md, label noise).
    pool_studies: bool = True
    filter_by: FilterBy = "prune_by_noise_rate"  # cleanlab's default confident-learning filter
    splits: list[str] = Field(default_factory=lambda: ["train", "val"])  # the labelled training data
    rotation_average: bool = True  # as the fine-tuned head embeds (xrayops.train.finetune)
    device: str = "auto"


class LabelAudit(BaseModel):
    n_images: int
    n_issues: int  # flagged images (the AuditConfig.flag_below rule, else cleanlab's filter)
    n_cleanlab_issues: int  # what cleanlab's confident-learning filter flags, for comparison
    n_issue_tags: int  # distinct flagged tags: a study's images with one tag count once
    backbones: list[str] = Field(default_factory=list)  # ensemble members, probabilities averaged
    label_health_score: float  # cleanlab overall_label_health_score: ~ share of correct labels
    oof_accuracy: float  # out-of-fold accuracy against the given (noisy) labels
    classes: list[str]  # the classes present, in pred_probs column order
    per_class_issues: dict[str, int]
    issues_path: Path
    scores_path: Path
    audit_path: Path
    config: AuditConfig


def out_of_fold_probabilities(
    embeddings: np.ndarray, labels: np.ndarray, n_classes: int, n_folds: int = 5, seed: int = 0,
    C: float = 0.1, max_iter: int = 500,
) -> np.ndarray:
    """(n, n_classes) probabilities, each row from a head trained on the other folds.

    Labels are 0..n_classes-1. Folds are stratified; a class a fold's training part lacks
    gets probability 0 there. Embeddings are standardised on each training part only.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels")
    smallest = int(np.bincount(y, minlength=n_classes)[np.unique(y)].min()) if len(y) else 0
    folds = min(n_folds, max(smallest, 2))
    if len(y) < 2 * folds:
        raise ValueError(f"an out-of-fold audit needs at least {2 * folds} labelled images, got {len(y)}")
    probs = np.zeros((len(y), n_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A class with fewer members than folds: sklearn warns; such classes are exactly what
        # the audit should look at, so keep them.
        warnings.simplefilter("ignore", UserWarning)
        for train_idx, test_idx in splitter.split(x, y):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
            model.fit(x[train_idx], y[train_idx])
            probs[np.ix_(test_idx, model.classes_)] = model.predict_proba(x[test_idx])
    return probs


class IssueScores(BaseModel):
    """cleanlab's answer over given labels (0..K-1) and out-of-fold probabilities."""

    model_config = {"arbitrary_types_allowed": True}

    is_issue: np.ndarray  # the flags: quality below `flag_below`, else cleanlab's filter
    cleanlab_issue: np.ndarray  # cleanlab's confident-learning filter (find_label_issues)
    quality: np.ndarray  # the tag's quality: image_quality pooled over its group (study and tag)
    image_quality: np.ndarray  # 0 = label surely wrong, 1 = surely right (self-confidence)
    health: float


def pool_quality(quality: np.ndarray, groups: Sequence[str] | None) -> np.ndarray:
    """Each image's quality replaced by the geometric mean over its group (None: unchanged).

    The geometric mean is the per-image likelihood of the tag under independent views, so one
    confident view that contradicts the tag pulls the whole study down, and a single unsure view
    is steadied by its study-mates.
    """
    quality = np.asarray(quality, dtype=np.float64)
    if groups is None:
        return quality
    keys = pd.Series(np.asarray(groups, dtype=object))
    if len(keys) != len(quality):
        raise ValueError(f"{len(keys)} group keys for {len(quality)} images")
    logs = pd.Series(np.log(np.clip(quality, 1e-12, 1.0)))
    return np.exp(logs.groupby(keys.to_numpy()).transform("mean").to_numpy())


def score_labels(
    labels: np.ndarray, pred_probs: np.ndarray, filter_by: FilterBy = "prune_by_noise_rate",
    flag_below: float | None = None, groups: Sequence[str] | None = None,
) -> IssueScores:
    """Flags over given labels (0..K-1) and out-of-fold probabilities; `groups` (one key per
    image, e.g. study and tag) pools the quality that `flag_below` is compared with."""
    from cleanlab.dataset import overall_label_health_score
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    # n_jobs=1: cleanlab's process pool costs more than it saves at these sizes, and keeps the audit in-process.
    cleanlab_issue = np.asarray(find_label_issues(labels, pred_probs, filter_by=filter_by, n_jobs=1), bool)
    image_quality = np.asarray(get_label_quality_scores(labels, pred_probs, method="self_confidence"), float)
    quality = pool_quality(image_quality, groups)
    health = float(overall_label_health_score(labels, pred_probs, verbose=False))
    is_issue = cleanlab_issue if flag_below is None else quality < flag_below
    return IssueScores(is_issue=is_issue, cleanlab_issue=cleanlab_issue, quality=quality,
                       image_quality=image_quality, health=health)


def tag_groups(rows: pd.DataFrame) -> list[str] | None:
    """One key per image: its study and its given region; an image without a study id is its own group."""
    if "study_id" not in rows.columns:
        return None
    study = rows["study_id"].fillna("").astype(str).to_numpy()
    region = rows["region"].astype(str).to_numpy()
    return [f"{s}|{r}" if s else f"#{i}" for i, (s, r) in enumerate(zip(study, region))]


def compact_labels(regions: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Region names -> ids 0..K-1 over the classes present (in REGIONS order), and those classes.

    cleanlab estimates a noise matrix per class; a class with no image would be a row of zeros.
    """
    present = [r for r in REGIONS if r in set(regions)]
    unknown = sorted(set(regions) - set(REGIONS))
    if unknown:
        raise ValueError(f"labels that are not regions: {unknown[:5]}")
    index = {r: i for i, r in enumerate(present)}
    return np.array([index[r] for r in regions], dtype=np.int64), present


def audit_frame(
    rows: pd.DataFrame, embeddings: np.ndarray | Sequence[np.ndarray], cfg: AuditConfig
) -> tuple[pd.DataFrame, IssueScores, list[str]]:
    """Per-image audit table for manifest `rows` (with `region`) and their embeddings.

    Several embedding arrays (one per backbone) make an ensemble: each gets its own
    out-of-fold heads and their probabilities are averaged (Langer et al. 2024 averages the softmax
    outputs of its SimCLR, BYOL and SupCon members).

    Columns added: given_region, suggested_region, suggested_probability, given_probability,
    image_quality (this image's self-confidence), label_quality (pooled over the study's images
    with the same tag when `cfg.pool_studies`, else image_quality), is_issue, cleanlab_issue, plus
    one prob_<class> column per present class.
    """
    labels, classes = compact_labels(rows["region"].astype(str).tolist())
    members = [embeddings] if isinstance(embeddings, np.ndarray) else list(embeddings)
    if not members:
        raise ValueError("an audit needs the embeddings of at least one backbone")
    probs = np.mean([
        out_of_fold_probabilities(x, labels, len(classes), cfg.n_folds, cfg.seed, cfg.C, cfg.max_iter) for x in members
    ], axis=0)
    groups = tag_groups(rows) if cfg.pool_studies else None
    scores = score_labels(labels, probs, cfg.filter_by, cfg.flag_below, groups)
    suggested = probs.argmax(1)
    table = rows.reset_index(drop=True).copy()
    table["given_region"] = [classes[i] for i in labels]
    table["suggested_region"] = [classes[i] for i in suggested]
    table["suggested_probability"] = probs.max(1)
    table["given_probability"] = probs[np.arange(len(labels)), labels]
    table["image_quality"] = scores.image_quality
    table["label_quality"] = scores.quality
    table["is_issue"] = scores.is_issue
    table["cleanlab_issue"] = scores.cleanlab_issue
    for i, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, i]
    return table, scores, classes


def embed_stored_images(
    images: np.ndarray, backbone_path: Path, rotation_average: bool, device: str,
    stages: Sequence[str] = ("layer4",), batch_size: int = 128,
) -> np.ndarray:
    """Frozen-backbone embeddings (n, D) of stored images (n, S, S): the pooled `stages`, averaged
    over the four right-angle turns with `rotation_average` (as the fine-tuned region head averages)."""
    import torch

    from xrayops.data.dataset import to_unit_float
    from xrayops.models.backbone import load_backbone, stage_features
    from xrayops.train.runtime import configure_threads, resolve_device

    configure_threads()
    torch_device = resolve_device(device)
    backbone, _, _ = load_backbone(Path(backbone_path), torch_device)
    backbone.eval()
    pixels = torch.from_numpy(images)
    turns = range(4) if rotation_average else range(1)
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            x = to_unit_float(pixels[i : i + batch_size]).unsqueeze(1).to(torch_device)
            turned = [stage_features(backbone, torch.rot90(x, k, dims=(-2, -1)), tuple(stages)) for k in turns]
            chunks.append(torch.stack(turned).mean(0).float().cpu())
    return torch.cat(chunks).numpy()


def labelled_rows(data_dir: Path, splits: Sequence[str]) -> pd.DataFrame:
    from xrayops.data.dataset import read_ok_rows

    return read_ok_rows(Path(data_dir), list(splits), labelled_only=True)


def audit_labels(
    data_dir: str | Path, backbone_path: str | Path | Sequence[str | Path], out_dir: str | Path,
    cfg: AuditConfig | None = None, embeddings: np.ndarray | None = None,
) -> LabelAudit:
    """Audit the labelled images of `cfg.splits`; writes label_issues.csv (flagged images,
    most certainly wrong first), label_scores.parquet (every image) and label_audit.json.

    Several backbone paths audit with their ensemble (probabilities averaged). `embeddings`
    (aligned with the labelled rows) skips the backbone, e.g. from the feature store.
    """
    cfg = cfg or AuditConfig()
    data_dir, out = Path(data_dir), Path(out_dir)
    paths = [Path(backbone_path)] if isinstance(backbone_path, (str, Path)) else [Path(b) for b in backbone_path]
    rows = labelled_rows(data_dir, cfg.splits)
    if embeddings is None:
        if not paths:
            raise ValueError("an audit needs a backbone (or embeddings)")
        from xrayops.data.dataset import load_images

        images = load_images(data_dir, rows)  # read once, embedded by every member
        members = [embed_stored_images(images, b, cfg.rotation_average, cfg.device, cfg.stages) for b in paths]
    else:
        members, paths = [embeddings], []
    table, scores, classes = audit_frame(rows, members, cfg)
    out.mkdir(parents=True, exist_ok=True)
    keep = ["image_id", "study_id", "source_name", "split", "shard", "shard_index", "manufacturer",
            "given_region", "suggested_region", "suggested_probability", "given_probability", "label_quality",
            "image_quality", "is_issue", "cleanlab_issue"]
    keep = [c for c in keep if c in table.columns]
    issues = table[table["is_issue"]].sort_values(["label_quality", "image_quality"], kind="stable")[keep]
    issues.to_csv(out / ISSUES_NAME, index=False)
    table.drop(columns=["label"], errors="ignore").to_parquet(out / SCORES_NAME, index=False)
    oof_accuracy = float((table["suggested_region"] == table["given_region"]).mean())
    audit = LabelAudit(
        n_images=len(table),
        n_issues=int(scores.is_issue.sum()),
        n_cleanlab_issues=int(scores.cleanlab_issue.sum()),
        n_issue_tags=len({g for g, flagged in zip(tag_groups(rows) or range(len(rows)), scores.is_issue) if flagged}),
        backbones=[str(b) for b in paths],
        label_health_score=scores.health,
        oof_accuracy=oof_accuracy,
        classes=classes,
        per_class_issues={c: int(n) for c, n in issues["given_region"].value_counts().items()},
        issues_path=out / ISSUES_NAME,
        scores_path=out / SCORES_NAME,
        audit_path=out / AUDIT_NAME,
        config=cfg,
    )
    (out / AUDIT_NAME).write_text(audit.model_dump_json(indent=2))
    log.info("label audit", n=audit.n_images, issues=audit.n_issues, issue_tags=audit.n_issue_tags,
             cleanlab_issues=audit.n_cleanlab_issues,
             members=max(len(paths), 1), health=round(audit.label_health_score, 3),
             oof_accuracy=round(oof_accuracy, 3))
    return audit


def flagged_vs_truth(scores: pd.DataFrame, truth: pd.DataFrame, flag_column: str = "is_issue") -> dict:
    """Precision and recall of the flagged images (`flag_column`) against synth's truth.csv.

    A given tag is wrong when it names another region than the true one (synth's `mislabeled`,
    and out-of-domain images, whose true region is "unknown"). Joined on the file name
    (manifest source_name); `truth` needs the columns file and true_region.
    """
    missing = sorted({"file", "true_region"} - set(truth.columns))
    if missing:
        raise ValueError(f"the truth table lacks columns {missing}")
    t = truth.assign(file=truth["file"].astype(str)).set_index("file")
    joined = scores.join(t[["true_region"]], on="source_name", how="inner")
    if len(joined) != len(scores):
        raise ValueError(f"{len(scores) - len(joined)} audited images have no row in the truth table")
    wrong = joined["true_region"].astype(str) != joined["given_region"].astype(str)
    flagged = joined[flag_column].astype(bool)
    tp = int((flagged & wrong).sum())
    return {
        "n_images": int(len(joined)),
        "n_wrong": int(wrong.sum()),
        "n_flagged": int(flagged.sum()),
        "true_positives": tp,
        "precision": tp / int(flagged.sum()) if flagged.any() else None,
        "recall": tp / int(wrong.sum()) if wrong.any() else None,
    }

