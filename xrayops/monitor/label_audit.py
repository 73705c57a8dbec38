"""Offline label audit with confident learning (cleanlab) over the labelled training data.

paper 000 keeps the backbone frozen so that training and validation images can later be
re-checked for wrong PACS labels with the same embedding. Here every labelled image gets an
OUT-OF-FOLD predicted distribution: a k-fold cross-validated linear head (multinomial
logistic regression, paper 000's one fully connected layer) on frozen-backbone embeddings,
so no image is judged by a head that saw its own (possibly wrong) label. cleanlab's
`find_label_issues` then flags images whose given label the out-of-fold probabilities
contradict, `get_label_quality_scores` ranks them, and `overall_label_health_score` gives
one number for the dataset.
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
    # Inverse L2 strength of the logistic-regression head. Standardised 512-d embeddings of a
    # few hundred images overfit without it; the out-of-fold probabilities must stay calibrated.
    C: float = Field(0.1, gt=0)
    max_iter: int = Field(500, ge=10)
    filter_by: FilterBy = "prune_by_noise_rate"  # cleanlab's default confident-learning filter
    splits: list[str] = Field(default_factory=lambda: ["train", "val"])  # the labelled training data
    rotation_average: bool = True  # as the fine-tuned head embeds (xrayops.train.finetune)
    device: str = "auto"


class LabelAudit(BaseModel):
    n_images: int
    n_issues: int
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

    is_issue: np.ndarray
    quality: np.ndarray  # 0 = label surely wrong, 1 = surely right (self-confidence)
    health: float


def score_labels(labels: np.ndarray, pred_probs: np.ndarray, filter_by: FilterBy = "prune_by_noise_rate") -> IssueScores:
    from cleanlab.dataset import overall_label_health_score
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    # n_jobs=1: cleanlab's process pool costs more than it saves at these sizes, and keeps the audit in-process.
    is_issue = find_label_issues(labels, pred_probs, filter_by=filter_by, n_jobs=1)
    quality = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    health = float(overall_label_health_score(labels, pred_probs, verbose=False))
    return IssueScores(is_issue=np.asarray(is_issue, bool), quality=np.asarray(quality, float), health=health)


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


def audit_frame(rows: pd.DataFrame, embeddings: np.ndarray, cfg: AuditConfig) -> tuple[pd.DataFrame, IssueScores, list[str]]:
    """Per-image audit table for manifest `rows` (with `region`) and their embeddings.

    Columns added: given_region, suggested_region, suggested_probability, given_probability,
    label_quality, is_issue, plus one prob_<class> column per present class.
    """
    labels, classes = compact_labels(rows["region"].astype(str).tolist())
    probs = out_of_fold_probabilities(embeddings, labels, len(classes), cfg.n_folds, cfg.seed, cfg.C, cfg.max_iter)
    scores = score_labels(labels, probs, cfg.filter_by)
    suggested = probs.argmax(1)
    table = rows.reset_index(drop=True).copy()
    table["given_region"] = [classes[i] for i in labels]
    table["suggested_region"] = [classes[i] for i in suggested]
    table["suggested_probability"] = probs.max(1)
    table["given_probability"] = probs[np.arange(len(labels)), labels]
    table["label_quality"] = scores.quality
    table["is_issue"] = scores.is_issue
    for i, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, i]
    return table, scores, classes


def embed_rows(data_dir: Path, rows: pd.DataFrame, backbone_path: Path, rotation_average: bool, device: str) -> np.ndarray:
    """Frozen-backbone embeddings (n, D) of manifest rows, exactly as the linear head sees them."""
    import torch

    from xrayops.data.dataset import load_images
    from xrayops.models.backbone import load_backbone
    from xrayops.models.heads import RegionClassifier
    from xrayops.train.finetune import embed_images
    from xrayops.train.runtime import configure_threads, resolve_device

    configure_threads()
    torch_device = resolve_device(device)
    backbone, dim, _ = load_backbone(Path(backbone_path), torch_device)
    model = RegionClassifier(backbone, dim, len(REGIONS), rotation_average).to(torch_device)
    images = torch.from_numpy(load_images(Path(data_dir), rows))
    return embed_images(model, images, torch_device).numpy()


def labelled_rows(data_dir: Path, splits: Sequence[str]) -> pd.DataFrame:
    from xrayops.data.dataset import read_ok_rows

    return read_ok_rows(Path(data_dir), list(splits), labelled_only=True)


def audit_labels(
    data_dir: str | Path, backbone_path: str | Path, out_dir: str | Path, cfg: AuditConfig | None = None,
    embeddings: np.ndarray | None = None,
) -> LabelAudit:
    """Audit the labelled images of `cfg.splits`; writes label_issues.csv (flagged images,
    most certainly wrong first), label_scores.parquet (every image) and label_audit.json.

    `embeddings` (aligned with the labelled rows) skips the backbone, e.g. from the feature store.
    """
    cfg = cfg or AuditConfig()
    data_dir, out = Path(data_dir), Path(out_dir)
    rows = labelled_rows(data_dir, cfg.splits)
    if embeddings is None:
        embeddings = embed_rows(data_dir, rows, Path(backbone_path), cfg.rotation_average, cfg.device)
    table, scores, classes = audit_frame(rows, embeddings, cfg)
    out.mkdir(parents=True, exist_ok=True)
    keep = ["image_id", "source_name", "split", "shard", "shard_index", "manufacturer", "given_region",
            "suggested_region", "suggested_probability", "given_probability", "label_quality", "is_issue"]
    keep = [c for c in keep if c in table.columns]
    issues = table[table["is_issue"]].sort_values("label_quality", kind="stable")[keep]
    issues.to_csv(out / ISSUES_NAME, index=False)
    table.drop(columns=["label"], errors="ignore").to_parquet(out / SCORES_NAME, index=False)
    oof_accuracy = float((table["suggested_region"] == table["given_region"]).mean())
    audit = LabelAudit(
        n_images=len(table),
        n_issues=int(scores.is_issue.sum()),
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
    log.info("label audit", n=audit.n_images, issues=audit.n_issues, health=round(audit.label_health_score, 3),
             oof_accuracy=round(oof_accuracy, 3))
    return audit


def flagged_vs_truth(scores: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Precision and recall of the flagged images against synth's truth.csv.

    A given tag is wrong when it names another region than the true one (`mislabeled`), or
    names a region on an out-of-domain image. Joined on the file name (manifest source_name).
    """
    t = truth.assign(file=truth["file"].astype(str)).set_index("file")
    joined = scores.join(t[["true_region", "mislabeled", "ood"]], on="source_name", how="inner")
    if len(joined) != len(scores):
        raise ValueError(f"{len(scores) - len(joined)} audited images have no row in the truth table")
    wrong = joined["true_region"].astype(str) != joined["given_region"].astype(str)
    flagged = joined["is_issue"].astype(bool)
    tp = int((flagged & wrong).sum())
    return {
        "n_images": int(len(joined)),
        "n_wrong": int(wrong.sum()),
        "n_flagged": int(flagged.sum()),
        "true_positives": tp,
        "precision": tp / int(flagged.sum()) if flagged.any() else None,
        "recall": tp / int(wrong.sum()) if wrong.any() else None,
    }

