"""Linear evaluation (Langer et al. 2024): a linear head on the FROZEN pretrained backbone.

The backbone stays frozen so that the training and validation images can later be
re-checked for wrong PACS labels by the same embedding (Langer et al. 2024, section 4.4). The head
trains on standardised embeddings and the scaling is then folded into its weights, so the
bundle still holds one linear layer. It is selected by validation accuracy, calibrated on
the validation split (temperature scaling). An out-of-domain detector is fitted on the
training embeddings (xrayops.models.ood) and its threshold set on the validation split.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.nn import functional as F

from xrayops.bundle import save_bundle
from xrayops.contracts import BINARY_LABEL_COLUMNS, Lineage, ModelBundleMeta, PreprocessingSpec
from xrayops.data.augment import make_linear_transform
from xrayops.data.dataset import DatasetError, ImageDataset, read_preprocessing, to_unit_float
from xrayops.logs import get_logger
from xrayops.models.backbone import load_backbone
from xrayops.models.heads import (
    RegionClassifier,
    angular_error,
    energy_score,
    fit_temperature,
    fold_standardization,
    linear_head,
    orientation_head,
    orientation_loss,
    vector_to_angle,
)
from xrayops.models.ood import OodDetector, fit_ood_detector, ood_scores
from xrayops.models.ood_features import DEFAULT_ZOOMS, StageCapture, view_features
from xrayops.progress import track
from xrayops.regions import REGIONS
from xrayops.train.runtime import configure_threads, resolve_device, seed_everything, step_generator

log = get_logger(__name__)


class FinetuneConfig(BaseModel):
    epochs: int = Field(50, ge=1)
    lr: float = 5e-2  # Langer et al. 2024, linear evaluation: Adam, lr 5e-2, cosine schedule, no weight decay
    batch_size: int = Field(64, ge=1)  # not in Langer et al. 2024; small batches give small datasets more steps
    seed: int = 0
    # Langer et al. 2024, Table 1 "Training" column. Off by default: then embeddings are computed
    # once and the head trains in seconds on a CPU.
    augment: bool = False
    device: str = "auto"
    # Out-of-domain score: a detector on frozen features fitted on the labelled training images,
    # "relative_mahalanobis" (class-conditional minus background distance; Ren et al. 2021),
    # "mahalanobis" (class means, Ledoit-Wolf-shrunk shared covariance; Lee et al. 2018) or "knn"
    # (k-th nearest L2-normalised training embedding; Sun et al. 2022), or "energy" of the logits
    # (Liu et al. 2020), which scored 0.29 AUROC on the demo's own out-of-domain images. Its
    # features: the pooled outputs of `ood_stages` (empty: the region embedding), averaged over
    # the eight turns and mirror images at each of `ood_zooms` (empty: the four turns of the
    # region pass). Relative Mahalanobis on stages 2-4 over three zooms was chosen on validation
    # data (benchmarks/README.md, "Out-of-domain detection").
    ood_method: Literal["relative_mahalanobis", "mahalanobis", "knn", "energy"] = "relative_mahalanobis"
    ood_knn_k: int = Field(10, ge=1)
    ood_stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    ood_zooms: tuple[Annotated[float, Field(gt=0.25, lt=4.0)], ...] = DEFAULT_ZOOMS
    # Out-of-domain threshold: this percentile of the validation images' scores, i.e. about
    # 5 % of in-domain validation images are flagged (the false-alarm rate).
    ood_percentile: float = Field(95.0, gt=0, lt=100)
    confidence_threshold: float = Field(0.9, ge=0, le=1)  # for label_disagreement
    # Embed each image as the mean over its four right-angle rotations (RegionClassifier):
    # our images come at any angle, where Langer et al. 2024 straightened them while cleaning. On
    # 1,400 synthetic 64 px images after 12 SimCLR epochs it raised test accuracy from 0.28 to 0.42.
    rotation_average: bool = True
    name: str = "xrayops-region"
    # Orientation head (Baltruschat et al. 2018): trained when angles are known for the training images
    # (`finetune(..., angles=...)`, e.g. the synthetic truth table), or with
    # `orientation_assume_upright` for data whose images are all upright. Either way every
    # image also serves turned by 90, 180 and 270 degrees (Baltruschat et al. 2018's augmentation).
    orientation_epochs: int = Field(100, ge=1)
    orientation_lr: float = 1e-2  # Baltruschat et al. 2018: Adam, lr 0.01, batch 256
    orientation_batch_size: int = Field(256, ge=1)
    orientation_assume_upright: bool = False
    # Optional: after the linear head, fine-tune the backbone's last stage (layer4, "conv5" in
    # Baltruschat et al. 2018: MAE 4.25 -> 2.79 deg) together with the head on augmented images. Off by
    # default: Langer et al. 2024 keeps the backbone frozen so that images can be re-checked for wrong
    # labels by the same embedding.
    finetune_last_stage: bool = False
    last_stage_epochs: int = Field(10, ge=1)
    last_stage_lr: float = Field(1e-4, gt=0)
    # Binary heads from the manifest's optional label columns (BINARY_LABEL_COLUMNS), trained
    # when a column has positives and negatives among the training images.
    binary_heads: bool = True


@torch.inference_mode()
def embed_images(
    model: RegionClassifier, images: torch.Tensor, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Embeddings (n, D) of stored images (n, S, S) through the frozen backbone, in eval mode."""
    model.eval()
    chunks = [
        model.embed(to_unit_float(images[i : i + batch_size]).unsqueeze(1).to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


@torch.inference_mode()
def embed_turned(
    model: RegionClassifier, images: torch.Tensor, device: torch.device, batch_size: int = 128
) -> torch.Tensor:
    """(4, n, D): backbone embeddings of the images turned by 0, 90, 180, 270 degrees.

    Their mean is the rotation-averaged region embedding, and each turn is an orientation
    training example, so one pass serves both heads.
    """
    model.eval()
    chunks = [
        model.turned_embeddings(to_unit_float(images[i : i + batch_size]).unsqueeze(1).to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks, dim=1)


@torch.inference_mode()
def stage_embeddings(
    model: RegionClassifier, images: torch.Tensor, device: torch.device, stages, batch_size: int = 128
) -> torch.Tensor:
    """(n, width) pooled outputs of `stages` for stored images, rotation-averaged as the region
    embedding is: the features predict_arrays captures for a multi-stage OOD detector."""
    model.eval()
    chunks = []
    with StageCapture(model.backbone, stages) as capture:
        for i in range(0, len(images), batch_size):
            x = to_unit_float(images[i : i + batch_size]).unsqueeze(1).to(device)
            model.embed(x)
            chunks.append(capture.features(len(x), model.rotation_average))
    return torch.cat(chunks)


@torch.no_grad()
def view_embeddings(
    model: RegionClassifier, images: torch.Tensor, device: torch.device, stages, zooms, batch_size: int = 64
) -> torch.Tensor:
    """(n, width) pooled `stages` features of stored images averaged over their test-time views
    (xrayops.models.ood_features.view_features): what predict_arrays scores."""
    model.eval()
    chunks = [view_features(model.backbone, to_unit_float(images[i : i + batch_size]).unsqueeze(1).to(device), stages,
                            zooms).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def angles_for(rows, angles: dict[str, float] | None, assume_upright: bool) -> torch.Tensor | None:
    """Orientation labels (n,) in degrees for manifest rows, NaN where unknown; None if none known."""
    if angles is None and not assume_upright:
        return None
    names = rows["source_name"].astype(str)
    values = [0.0 if angles is None else float(angles.get(name, float("nan"))) for name in names]
    out = torch.tensor(values, dtype=torch.float32)
    return out if torch.isfinite(out).any() else None


def train_orientation_head(
    train_turned: torch.Tensor,
    train_angles: torch.Tensor,
    val_x: torch.Tensor,
    val_angles: torch.Tensor,
    cfg: FinetuneConfig,
) -> tuple[nn.Linear, float]:
    """A (cos, sin) linear regression (Baltruschat et al. 2018) on standardised upright embeddings.

    `train_turned` (4, n, D) are the embeddings of the images turned by k * 90 degrees, whose
    angles are angle + 90 k. Trained with Baltruschat et al. 2018's loss, selected by validation MAE.
    Returns (head with standardisation folded in, validation MAE in degrees).
    """
    known = torch.isfinite(train_angles)
    x = torch.cat([train_turned[k][known] for k in range(4)])
    y = torch.cat([(train_angles[known] + 90.0 * k) % 360.0 for k in range(4)])
    val_known = torch.isfinite(val_angles)
    val_x, val_y = val_x[val_known], val_angles[val_known]
    mean, std = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)
    x, val_x = (x - mean) / std, (val_x - mean) / std
    head = orientation_head(x.shape[1])
    steps = cfg.orientation_epochs * -(-len(x) // cfg.orientation_batch_size)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.orientation_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    best_state, best_mae = copy.deepcopy(head.state_dict()), float("inf")
    for _ in track(range(cfg.orientation_epochs), "orientation head epochs", cfg.orientation_epochs):
        for batch in torch.randperm(len(x), generator=generator).split(cfg.orientation_batch_size):
            loss = orientation_loss(head(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if len(val_x):
            with torch.no_grad():
                mae = float(angular_error(vector_to_angle(head(val_x)), val_y).mean())
            if mae < best_mae:
                best_state, best_mae = copy.deepcopy(head.state_dict()), mae
    if len(val_x):
        head.load_state_dict(best_state)
    return fold_standardization(head, mean, std), best_mae if len(val_x) else float("nan")


def augmented_embedder(
    model: RegionClassifier, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device, seed: int
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """(indices, step) -> standardised embeddings of those images, freshly augmented (Langer et al. 2024,
    Table 1, "Training" column); the draw depends only on (seed, step)."""
    augment = make_linear_transform(int(images.shape[-1]))

    @torch.no_grad()
    def embed_batch(indices: torch.Tensor, step: int) -> torch.Tensor:
        batch = to_unit_float(images[indices]).unsqueeze(1).to(device)
        embedding = model.embed(augment(batch, step_generator(device, seed, step))).float().cpu()
        return (embedding - mean) / std

    return embed_batch


def train_linear_head(
    train_x: torch.Tensor | None,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    head: nn.Linear,
    cfg: FinetuneConfig,
    embed_batch: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[nn.Linear, float, int]:
    """Train `head` with cross-entropy; keep the epoch with the best validation accuracy.

    `train_x` are precomputed embeddings, or None with `embed_batch(indices, step)` giving
    the embeddings of freshly augmented training images. Returns (best head, its val accuracy, epoch).
    """
    n = len(train_y)
    steps_per_epoch = -(-n // cfg.batch_size)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)
    best_state, best_accuracy, best_epoch, step = copy.deepcopy(head.state_dict()), -1.0, -1, 0
    for epoch in track(range(cfg.epochs), "linear head epochs", cfg.epochs):
        for batch in torch.randperm(n, generator=generator).split(cfg.batch_size):
            x = train_x[batch] if train_x is not None else embed_batch(batch, step)
            loss = F.cross_entropy(head(x), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        with torch.no_grad():
            accuracy = float((head(val_x).argmax(1) == val_y).float().mean())
        if accuracy > best_accuracy:
            best_state, best_accuracy, best_epoch = copy.deepcopy(head.state_dict()), accuracy, epoch
    head.load_state_dict(best_state)
    return head, best_accuracy, best_epoch


def binary_labels(rows, column: str) -> torch.Tensor | None:
    """(n,) float labels 1/0, NaN where unknown, from an optional manifest column; None if absent."""
    if column not in rows.columns:
        return None
    values = torch.tensor(rows[column].astype(float).to_numpy(), dtype=torch.float32)
    if not torch.isin(values, torch.tensor([0.0, 1.0])).logical_or(torch.isnan(values)).all():
        raise DatasetError(f"manifest column {column!r} must hold 1, 0 or nothing, got {sorted(set(values.tolist()))[:5]}")
    return values


def train_binary_head(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, cfg: FinetuneConfig
) -> tuple[nn.Linear, float]:
    """A logistic unit on standardised frozen embeddings (binary cross-entropy, Adam with the
    linear head's lr and cosine schedule). Positives are weighted by the negative/positive ratio
    (findings are usually rare). The epoch with the best validation AUC is kept (the last one
    if validation has no labels of both kinds). Returns (head with standardisation folded in, val AUC)."""
    from xrayops.evaluate.metrics import roc_auc

    mean, std = train_x.mean(0), train_x.std(0, correction=0).clamp_min(1e-6)
    x, vx = (train_x - mean) / std, (val_x - mean) / std
    head = nn.Linear(x.shape[1], 1)
    pos_weight = ((1 - train_y).sum() / train_y.sum().clamp_min(1)).reshape(1)
    steps = cfg.epochs * -(-len(x) // cfg.batch_size)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    best_state, best_auc = copy.deepcopy(head.state_dict()), -1.0
    for _ in range(cfg.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(cfg.batch_size):
            loss = F.binary_cross_entropy_with_logits(head(x[batch]).squeeze(-1), train_y[batch], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            auc = roc_auc(val_y.numpy(), head(vx).squeeze(-1).numpy()) if len(vx) else float("nan")
        if not np.isfinite(auc):
            best_state, best_auc = copy.deepcopy(head.state_dict()), float("nan")
        elif auc > best_auc:
            best_state, best_auc = copy.deepcopy(head.state_dict()), auc
    head.load_state_dict(best_state)
    return fold_standardization(head, mean, std), best_auc


class Standardize(nn.Module):
    """(x - mean) / std with fixed statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def finetune_last_stage(
    model: RegionClassifier, train: ImageDataset, val: ImageDataset, cfg: FinetuneConfig, device: torch.device
) -> float:
    """Fine-tune layer4 and the (folded) region head together on augmented images (Langer et al. 2024,
    Table 1 "Training" column), cross-entropy, Adam at `last_stage_lr` with cosine schedule.
    The earlier stages stay frozen. Keeps the epoch with the best validation accuracy (the
    frozen-backbone state if no epoch beats it); returns that accuracy."""
    stage = model.backbone.layer4
    trainable = [*stage.parameters(), *model.head.parameters()]
    for parameter in trainable:
        parameter.requires_grad_(True)
    augment = make_linear_transform(train.size)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    optimizer = torch.optim.Adam(trainable, lr=cfg.last_stage_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.last_stage_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def val_accuracy() -> float:
        model.eval()
        logits = torch.cat([
            model(to_unit_float(val.images[i : i + 128]).unsqueeze(1).to(device)).float().cpu()
            for i in range(0, len(val), 128)
        ])
        return float((logits.argmax(1) == val.labels).float().mean())

    best_state, best_accuracy, step = copy.deepcopy(model.state_dict()), val_accuracy(), 0
    for _ in track(range(cfg.last_stage_epochs), "last-stage epochs", cfg.last_stage_epochs):
        # Batch norm keeps its pretrained running statistics (eval mode) in the tuned stage too:
        # batch statistics of small batches would shift the features under the trained head.
        model.eval()
        for batch in torch.randperm(len(train), generator=generator).split(cfg.batch_size):
            images = to_unit_float(train.images[batch]).unsqueeze(1).to(device)
            x = augment(images, step_generator(device, cfg.seed + 1, step))
            loss = F.cross_entropy(model(x), train.labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        accuracy = val_accuracy()
        if accuracy > best_accuracy:
            best_state, best_accuracy = copy.deepcopy(model.state_dict()), accuracy
    model.load_state_dict(best_state)
    for parameter in trainable:
        parameter.requires_grad_(False)
    model.eval()
    return best_accuracy


@dataclass
class SplitEmbeddings:
    """Frozen-backbone embeddings of the train and val images, as the heads are fitted on them."""

    train: torch.Tensor  # (n, D) region embeddings
    val: torch.Tensor
    # (4, n, D) embeddings of the images turned by k * 90 degrees; None when neither rotation
    # averaging nor the orientation head needs them.
    train_turned: torch.Tensor | None = None
    val_turned: torch.Tensor | None = None


@dataclass
class Calibration:
    """What the validation split sets after the heads are trained: temperature and OOD threshold."""

    temperature: float
    val_nll: float  # cross-entropy of the calibrated logits
    detector: OodDetector | None  # None: the energy score
    ood_threshold: float
    ood_scale: float


def load_labelled_splits(
    data_dir: Path, labels: Mapping[str, str] | None
) -> tuple[ImageDataset, ImageDataset]:
    """The labelled train and val images; a missing val split is an error, not a silent skip."""
    train = ImageDataset(data_dir, "train", labelled_only=True, labels=labels)
    try:
        val = ImageDataset(data_dir, "val", labelled_only=True, labels=labels)
    except DatasetError as exc:
        raise DatasetError(
            f"{exc}: the linear head needs validation images for model selection and calibration"
        ) from exc
    return train, val


def frozen_classifier(
    backbone_path: Path, cfg: FinetuneConfig, device: torch.device
) -> tuple[RegionClassifier, int, dict]:
    """(classifier on the frozen pretrained backbone, embedding size, backbone info)."""
    backbone, embedding_dim, info = load_backbone(backbone_path, device)
    model = RegionClassifier(backbone, embedding_dim, len(REGIONS), cfg.rotation_average).to(device)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    model.eval()  # the backbone is frozen, batch-norm statistics included
    return model, embedding_dim, info


def split_embeddings(
    model: RegionClassifier, train: ImageDataset, val: ImageDataset, device: torch.device, cfg: FinetuneConfig,
    turned: bool,
) -> SplitEmbeddings:
    """Region embeddings of both splits; with `turned`, from one pass over the four turns."""
    if not turned:
        return SplitEmbeddings(embed_images(model, train.images, device), embed_images(model, val.images, device))
    train_turned, val_turned = embed_turned(model, train.images, device), embed_turned(model, val.images, device)
    if cfg.rotation_average:
        return SplitEmbeddings(train_turned.mean(0), val_turned.mean(0), train_turned, val_turned)
    return SplitEmbeddings(train_turned[0], val_turned[0], train_turned, val_turned)


def fit_region_head(
    model: RegionClassifier, train: ImageDataset, val: ImageDataset, embeddings: SplitEmbeddings,
    embedding_dim: int, cfg: FinetuneConfig, device: torch.device,
) -> tuple[nn.Linear, float, int]:
    """Train the region head (and, if configured, the last stage with it); sets model.head.

    Returns (head with the standardisation folded in, its val accuracy, best linear-head epoch)."""
    # The head trains on standardised embeddings; the scaling is folded into it afterwards.
    train_x, val_x = embeddings.train, embeddings.val
    mean, std = train_x.mean(0), train_x.std(0, correction=0).clamp_min(1e-6)
    embed_batch = augmented_embedder(model, train.images, mean, std, device, cfg.seed) if cfg.augment else None
    head, val_accuracy, best_epoch = train_linear_head(
        None if cfg.augment else (train_x - mean) / std,
        train.labels,
        (val_x - mean) / std,
        val.labels,
        linear_head(embedding_dim, len(REGIONS)),
        cfg,
        embed_batch,
    )
    if cfg.finetune_last_stage:
        # The head stays in its standardised form while it trains with the stage (folded
        # weights scale as 1/std and would make the step size uneven across features).
        model.head = nn.Sequential(Standardize(mean, std), head).to(device)
        val_accuracy = finetune_last_stage(model, train, val, cfg, device)
    model.head = head = fold_standardization(head.cpu(), mean, std)  # the heads are fitted on CPU embeddings
    return head, val_accuracy, best_epoch


def fit_orientation(
    model: RegionClassifier, val: ImageDataset, embeddings: SplitEmbeddings, train_angles: torch.Tensor,
    angles: dict[str, float] | None, cfg: FinetuneConfig,
) -> float:
    """Train model.orientation_head on the turned embeddings; returns its val MAE in degrees."""
    val_angles = angles_for(val.rows, angles, cfg.orientation_assume_upright)
    model.orientation_head, orientation_mae = train_orientation_head(
        embeddings.train_turned, train_angles, embeddings.val_turned[0],
        val_angles if val_angles is not None else torch.full((len(val),), float("nan")), cfg,
    )
    log.info("finetune.orientation", val_mae_deg=round(orientation_mae, 2))
    return orientation_mae


def fit_binary_heads(
    model: RegionClassifier, train: ImageDataset, val: ImageDataset, embeddings: SplitEmbeddings, cfg: FinetuneConfig
) -> dict[str, float]:
    """A head in model.binary_heads per label column with both classes in train; returns val AUCs."""
    binary_metrics: dict[str, float] = {}
    for column in BINARY_LABEL_COLUMNS if cfg.binary_heads else ():
        train_y, val_y = binary_labels(train.rows, column), binary_labels(val.rows, column)
        if train_y is None or not ((train_y == 1).any() and (train_y == 0).any()):
            continue
        if val_y is None:
            val_y = torch.full((len(val),), float("nan"))
        known, val_known = ~torch.isnan(train_y), ~torch.isnan(val_y)
        model.binary_heads[column], auc = train_binary_head(
            embeddings.train[known], train_y[known], embeddings.val[val_known], val_y[val_known], cfg
        )
        binary_metrics[f"val_{column}_auc"] = auc
        log.info("finetune.binary_head", column=column, train_labels=int(known.sum()), val_auc=round(auc, 4))
    return binary_metrics


def fit_ood(
    model: RegionClassifier, train: ImageDataset, val: ImageDataset, embeddings: SplitEmbeddings,
    val_logits: torch.Tensor, temperature: float, cfg: FinetuneConfig, device: torch.device,
) -> tuple[OodDetector | None, np.ndarray]:
    """The out-of-domain detector (None for the energy score) and the val images' scores."""
    if cfg.ood_method == "energy":
        return None, energy_score(val_logits, temperature).numpy()
    # On the backbone as it serves (after any last-stage tuning).
    if cfg.ood_zooms:
        stages = cfg.ood_stages or ("layer4",)
        ood_train = view_embeddings(model, train.images, device, stages, cfg.ood_zooms)
        ood_val = view_embeddings(model, val.images, device, stages, cfg.ood_zooms)
    elif cfg.ood_stages:
        ood_train = stage_embeddings(model, train.images, device, cfg.ood_stages)
        ood_val = stage_embeddings(model, val.images, device, cfg.ood_stages)
    else:
        ood_train, ood_val = embeddings.train, embeddings.val
    detector = fit_ood_detector(ood_train, train.labels, cfg.ood_method, cfg.ood_knn_k)
    return detector, ood_scores(detector, ood_val)


def calibrate(
    model: RegionClassifier, head: nn.Linear, train: ImageDataset, val: ImageDataset, embeddings: SplitEmbeddings,
    cfg: FinetuneConfig, device: torch.device,
) -> Calibration:
    """Temperature scaling and the OOD detector's threshold, both on the val split."""
    with torch.no_grad():
        val_logits = head(embeddings.val)
    temperature = fit_temperature(val_logits, val.labels)
    detector, val_scores = fit_ood(model, train, val, embeddings, val_logits, temperature, cfg, device)
    ood_threshold = float(np.percentile(val_scores, cfg.ood_percentile))
    # In-domain spread, the unit in which an ensemble averages its members' margins.
    ood_scale = max(ood_threshold - float(np.median(val_scores)), 1e-12)
    val_nll = float(F.cross_entropy(val_logits / temperature, val.labels))
    return Calibration(temperature, val_nll, detector, ood_threshold, ood_scale)


def bundle_lineage(
    lineage: Lineage | None, cfg: FinetuneConfig, train: ImageDataset, val: ImageDataset, relabelled: bool,
    val_accuracy: float, calibration: Calibration, binary_metrics: dict[str, float], orientation_mae: float | None,
) -> Lineage:
    """A copy of the caller's lineage with this run's validation metrics added."""
    lineage = (lineage or Lineage()).model_copy(deep=True)
    lineage.metrics.update(
        {"val_accuracy": val_accuracy, "val_nll_calibrated": calibration.val_nll, "train_images": float(len(train))}
    )
    lineage.metrics.update({k: v for k, v in binary_metrics.items() if np.isfinite(v)})
    if cfg.finetune_last_stage:
        lineage.metrics["finetuned_last_stage"] = 1.0
    if relabelled:
        changed = sum(int((d.rows["region"] != d.rows["manifest_region"]).sum()) for d in (train, val))
        lineage.metrics["labels_changed_from_tags"] = float(changed)
    if orientation_mae is not None and np.isfinite(orientation_mae):
        lineage.metrics["val_orientation_mae_deg"] = orientation_mae
    return lineage


def write_region_bundle(
    out_dir: Path, model: RegionClassifier, cfg: FinetuneConfig, info: dict, embedding_dim: int,
    spec: PreprocessingSpec, calibration: Calibration, lineage: Lineage, orientation_source: str,
) -> Path:
    """bundle.json and weights.pt of the trained classifier (moved to CPU) in out_dir."""
    meta = ModelBundleMeta(
        name=cfg.name,
        arch=info["arch"],
        ssl_method=info["ssl_method"] or "simclr",
        embedding_dim=embedding_dim,
        classes=list(REGIONS),
        preprocessing=spec,
        temperature=calibration.temperature,
        ood_threshold=calibration.ood_threshold,
        ood_scale=calibration.ood_scale,
        ood_stages=(list(cfg.ood_stages or (("layer4",) if cfg.ood_zooms else ()))
                    if calibration.detector is not None else []),
        ood_zooms=list(cfg.ood_zooms) if calibration.detector is not None else [],
        confidence_threshold=cfg.confidence_threshold,
        lineage=lineage,
        created_at=datetime.now(timezone.utc),
        orientation=model.orientation_head is not None,
        orientation_source=orientation_source,
    )
    save_bundle(Path(out_dir), model.cpu(), meta, calibration.detector)
    return Path(out_dir)


def finetune(
    data_dir: Path,
    backbone_path: Path,
    out_dir: Path,
    cfg: FinetuneConfig | None = None,
    lineage: Lineage | None = None,
    angles: dict[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Train, select, calibrate and bundle the region classifier; returns the bundle dir.

    `labels` (image_id -> region) replaces the manifest's PACS-tag regions for the images it
    names: the point-in-time training set from the feature store, where reviewers' corrections
    win over tags (`xrayops.features.training_set`).

    `angles` (source_name -> orientation in degrees, counter-clockwise on screen) adds the
    orientation head; so does `cfg.orientation_assume_upright`.
    """
    cfg = cfg or FinetuneConfig()
    device = resolve_device(cfg.device)
    configure_threads()
    seed_everything(cfg.seed)
    spec = read_preprocessing(data_dir)
    train, val = load_labelled_splits(data_dir, labels)
    model, embedding_dim, info = frozen_classifier(backbone_path, cfg, device)

    train_angles = angles_for(train.rows, angles, cfg.orientation_assume_upright)
    turned = cfg.rotation_average or train_angles is not None
    embeddings = split_embeddings(model, train, val, device, cfg, turned)
    head, val_accuracy, best_epoch = fit_region_head(model, train, val, embeddings, embedding_dim, cfg, device)
    if cfg.finetune_last_stage:
        # The features changed: every later head and the calibration use the tuned ones.
        embeddings = split_embeddings(model, train, val, device, cfg, turned)
        log.info("finetune.last_stage", val_accuracy=round(val_accuracy, 4))
    orientation_mae = None
    if train_angles is not None:
        orientation_mae = fit_orientation(model, val, embeddings, train_angles, angles, cfg)
    binary_metrics = fit_binary_heads(model, train, val, embeddings, cfg)
    calibration = calibrate(model, head, train, val, embeddings, cfg, device)
    log.info(
        "finetune.done", val_accuracy=round(val_accuracy, 4), epoch=best_epoch, temperature=calibration.temperature
    )

    lineage = bundle_lineage(
        lineage, cfg, train, val, labels is not None, val_accuracy, calibration, binary_metrics, orientation_mae
    )
    orientation_source = ("truth" if angles is not None else "upright") if train_angles is not None else ""
    return write_region_bundle(out_dir, model, cfg, info, embedding_dim, spec, calibration, lineage, orientation_source)
