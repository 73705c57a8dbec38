"""Pretraining of the backbone, Langer et al. 2024: SimCLR or BYOL on every image (no labels), or SupCon
with the PACS region tags as classes.

Runs on one CPU or GPU, or under torchrun with DDP (one process per GPU; gloo on CPU): each
epoch's global batches are a function of (seed, epoch) and every rank takes its strided share,
so the trajectory does not depend on the number of ranks' data order. bf16 autocast and
channels_last on CUDA. Checkpoints every N steps (and at each epoch's end) resume to the same
result after a kill, momentum encoder included.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from xrayops.errors import XrayopsError
from xrayops.data.augment import PRETRAIN_AUG, TwoViews, make_pretrain_transform
from xrayops.data.dataset import ImageDataset
from xrayops.logs import get_logger
from xrayops.models.backbone import build_backbone, save_backbone
from xrayops.models.ssl import SSLModel, build_ssl_model
from xrayops.progress import track
from xrayops.train.runtime import (
    Distributed,
    configure_threads,
    init_distributed,
    rng_state,
    seed_everything,
    set_rng_state,
    shard_batch,
    step_generator,
)

log = get_logger(__name__)

# Fields that shape the training trajectory: a checkpoint only resumes under the same values.
TRAJECTORY_FIELDS = (
    "arch", "method", "epochs", "batch_size", "lr", "weight_decay", "temperature", "tau_base",
    "proj_hidden_dim", "proj_out_dim", "seed", "full_rotation", "init_from",
)


class PretrainConfig(BaseModel):
    arch: str = "resnet18"  # or resnet50 (Langer et al. 2024: no better)
    method: Literal["simclr", "byol", "supcon"] = "simclr"
    epochs: int = Field(100, ge=1)  # Langer et al. 2024 ran 1000 epochs on 31k images
    batch_size: int = Field(256, ge=2)  # global batch; Langer et al. 2024: 1024 for SimCLR, 896 for BYOL
    lr: float = 3e-4  # Langer et al. 2024: Adam, lr 3e-4, cosine schedule
    weight_decay: float = 1e-4  # Langer et al. 2024
    # Langer et al. 2024: NT-Xent tau = 0.5. SupCon uses it too (Khosla et al. 2020 used 0.1).
    temperature: float = Field(0.5, gt=0)
    tau_base: float = Field(0.9995, gt=0, lt=1)  # Langer et al. 2024: BYOL's base target momentum
    proj_hidden_dim: int = 512  # Langer et al. 2024 gives "2-layer MLP" only; 512 = the embedding size
    proj_out_dim: int = 128  # SimCLR's default
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    checkpoint_every_steps: int = Field(200, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early (and checkpoint) after this many steps in total
    # Langer et al. 2024 straightens every image while cleaning and augments only +-15 deg. Our
    # synthetic (and real unsorted PACS) images come at any angle, so by default the views
    # are rotated over the full circle and the embedding learns to ignore orientation.
    full_rotation: bool = True
    # Warm start: a pretrain checkpoint.pt (the whole SSL model: backbone, projection head, BYOL's
    # target) or a backbone.pt. A new optimiser and cosine schedule start from those weights, so an
    # earlier run can be trained on (more epochs, a new dataset version) without starting over.
    init_from: Path | None = None
    amp: bool = True  # bf16 autocast on CUDA where the GPU supports bf16
    cpu_bf16: bool = False  # bf16 autocast on CPU too (slower than fp32 on most CPUs)
    sync_batchnorm: bool = True  # under DDP on CUDA: batch norm over the global batch


class PretrainResult(BaseModel):
    backbone_path: Path
    checkpoint_path: Path
    losses: list[float]  # mean loss of each completed epoch
    steps: int
    epochs_completed: int
    images: int
    resumed_from_step: int = 0
    init_from: Path | None = None
    seconds: float
    method: str = "simclr"
    world_size: int = 1


class PretrainError(XrayopsError, RuntimeError):
    pass


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled full batches; a function of (seed, epoch) only, so resumable.

    The ragged tail is dropped: NT-Xent and batch norm want equal-sized batches.
    """
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(n, generator=generator)
    batch_size = min(batch_size, n)
    return [order[i : i + batch_size].tolist() for i in range(0, n - batch_size + 1, batch_size)]


def _check_resumable(saved: dict, cfg: PretrainConfig, n_images: int, path: Path) -> None:
    current = cfg.model_dump(mode="json")
    # A field absent from an older checkpoint had its default value then.
    before = {k: saved["config"].get(k, PretrainConfig.model_fields[k].default) for k in TRAJECTORY_FIELDS}
    changed = [f"{k}: {before[k]!r} -> {current[k]!r}" for k in TRAJECTORY_FIELDS if before[k] != current[k]]
    if saved["images"] != n_images:
        changed.append(f"images: {saved['images']} -> {n_images}")
    if changed:
        raise PretrainError(
            f"{path} was written by a different run ({'; '.join(changed)}); delete it or use another out_dir"
        )


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint


class LossModule(torch.nn.Module):
    """`forward` = the SSL model's loss, so DistributedDataParallel sees the call and
    all-reduces the gradients."""

    def __init__(self, model: SSLModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.loss(view_a, view_b, labels)


def autocast_dtype(device: torch.device, cfg: PretrainConfig) -> torch.dtype | None:
    """bf16 where it pays: CUDA with bf16 support (cfg.amp), CPU only when asked (cfg.cpu_bf16)."""
    if device.type == "cuda":
        return torch.bfloat16 if cfg.amp and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cfg.cpu_bf16 else None


def train_step(
    loss_module: torch.nn.Module,
    optimizer,
    scheduler,
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    labels: torch.Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch of view pairs, under autocast when amp_dtype is set.

    On CUDA the views go channels_last (the model is converted to match).
    """
    if view_a.is_cuda:
        view_a = view_a.contiguous(memory_format=torch.channels_last)
        view_b = view_b.contiguous(memory_format=torch.channels_last)
    with torch.autocast(view_a.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss = loss_module(view_a, view_b, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def build_training(cfg: PretrainConfig, device: torch.device, place: Distributed, total_steps: int):
    """(ssl model, loss module (DDP-wrapped when distributed), optimizer, scheduler)."""
    backbone, embedding_dim = build_backbone(cfg.arch)
    model = build_ssl_model(
        cfg.method, backbone, embedding_dim, cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.temperature, cfg.tau_base
    )
    cuda = device.type == "cuda"
    if place.enabled and cuda and cfg.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last) if cuda else model.to(device)
    loss_module: torch.nn.Module = LossModule(model)
    if place.enabled:
        loss_module = DistributedDataParallel(loss_module, device_ids=[device.index] if cuda else None)
    trainable = [p for p in model.parameters() if p.requires_grad]  # not BYOL's momentum encoder
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return model, loss_module, optimizer, scheduler


def warm_start(model: SSLModel, path: Path, cfg: PretrainConfig) -> str:
    """Load an earlier run's weights into a freshly built SSL model; returns what was loaded.

    A checkpoint.pt of the same arch, method and head sizes gives the whole model; otherwise
    (another method, or a backbone.pt) only the backbone is taken and the head starts fresh.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainError(f"init_from: {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise PretrainError(f"init_from: cannot read {path} ({exc})") from exc
    if isinstance(blob, dict) and {"model", "config"} <= blob.keys():  # a pretrain checkpoint.pt
        saved = blob["config"]
        arch, state = saved.get("arch", "resnet18"), blob["model"]
        same_model = all(saved.get(k, PretrainConfig.model_fields[k].default) == getattr(cfg, k)
                         for k in ("method", "proj_hidden_dim", "proj_out_dim"))
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    elif isinstance(blob, dict) and {"arch", "state_dict"} <= blob.keys():  # a backbone.pt
        arch, state, same_model, backbone_state = blob["arch"], None, False, blob["state_dict"]
    else:
        raise PretrainError(f"init_from: {path} is neither a pretrain checkpoint.pt nor a backbone.pt")
    if arch != cfg.arch:
        raise PretrainError(f"init_from: {path} holds a {arch} backbone, this run trains a {cfg.arch}")
    if same_model:
        model.load_state_dict(state)
        return "model"
    model.backbone.load_state_dict(backbone_state)
    momentum = getattr(model, "backbone_momentum", None)
    if momentum is not None:  # BYOL's target starts as a copy of the online network, as when built
        momentum.load_state_dict(backbone_state)
    return "backbone"


def pretrain(
    data_dir: Path, out_dir: Path, cfg: PretrainConfig | None = None, progress: bool = True
) -> PretrainResult:
    """Pretrain a backbone on every ok image of `data_dir`; write out_dir/backbone.pt.

    Resumes from out_dir/checkpoint.pt when one exists (same config), reproducing the
    uninterrupted run: batches and augmentations are functions of (seed, epoch, step, rank).
    Under torchrun every rank calls this; rank 0 writes the files.
    """
    cfg = cfg or PretrainConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    if cfg.init_from is not None and Path(cfg.init_from).resolve().parent == out_dir.resolve():
        raise PretrainError(f"init_from {cfg.init_from} is in the output folder, where this run would overwrite it; "
                            "write to another --out")
    place, device = init_distributed(cfg.device)
    configure_threads(cfg.num_workers)
    seed_everything(cfg.seed)

    dataset = ImageDataset(data_dir, split=None)  # every ok image: SupCon uses the labels, the others do not
    n = len(dataset)
    if n < 2:
        raise PretrainError(f"pretraining needs at least 2 images, {data_dir} has {n}")
    if cfg.method == "supcon" and not (dataset.labels >= 0).any():
        raise PretrainError(f"SupCon needs region labels, but no ok image of {data_dir} has a known region")
    if min(cfg.batch_size, n) < 2 * place.world_size:
        raise PretrainError(f"batch size {min(cfg.batch_size, n)} is too small for {place.world_size} processes")
    steps_per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0))
    total_steps = cfg.epochs * steps_per_epoch
    model, loss_module, optimizer, scheduler = build_training(cfg, device, place, total_steps)
    cuda = device.type == "cuda"
    amp_dtype = autocast_dtype(device, cfg)

    step, losses, epoch_sum = 0, [], 0.0  # epoch_sum: loss summed over this epoch's steps so far
    if checkpoint_path.exists():
        try:
            saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise PretrainError(f"cannot read {checkpoint_path} ({exc}); delete it to start over") from exc
        _check_resumable(saved, cfg, n, checkpoint_path)
        model.load_state_dict(saved["model"])  # BYOL: the momentum encoder is in here too
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, losses = saved["step"], list(saved["losses"])
        epoch_sum = saved["epoch_loss_sum"]
        set_rng_state(saved["rng"])
        log.info("pretrain.resume", step=step, of=total_steps)
    elif cfg.init_from is not None:  # every rank loads the same weights, so DDP's replicas agree
        loaded = warm_start(model, cfg.init_from, cfg)
        log.info("pretrain.warm_start", init_from=str(cfg.init_from), loaded=loaded)
    resumed_from = step

    def checkpoint() -> None:
        if place.is_main:
            _save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "epoch": step // steps_per_epoch, "losses": losses, "epoch_loss_sum": epoch_sum,
                "rng": rng_state(), "config": cfg.model_dump(mode="json"), "images": n,
            })

    def flush(running: torch.Tensor) -> float:
        """The loss summed since the last flush, averaged over ranks; resets `running`."""
        if place.enabled:
            dist.all_reduce(running)
            running /= place.world_size
        value = float(running)
        running.zero_()
        return value

    params = PRETRAIN_AUG.model_copy(update={"full_rotation": cfg.full_rotation})
    views = TwoViews(make_pretrain_transform(dataset.size, params))
    stop_at = min(total_steps, cfg.max_steps or total_steps)
    epochs = range(step // steps_per_epoch, cfg.epochs)
    model.train()
    show = progress and place.is_main
    for epoch in track(epochs, "pretrain epochs", len(epochs)) if show else epochs:
        if step >= stop_at:
            break
        batches = epoch_batches(n, cfg.batch_size, cfg.seed, epoch)[step % steps_per_epoch :]
        if place.enabled:  # every rank its strided share of the same global batch
            batches = [shard_batch(b, place.rank, place.world_size) for b in batches]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=cuda)
        running = torch.zeros((), device=device)
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if model.needs_labels else None
            view_a, view_b = views(images, step_generator(device, cfg.seed, step, place.rank))
            running += train_step(loss_module, optimizer, scheduler, view_a, view_b, labels, amp_dtype)
            step += 1
            model.after_step(step, total_steps)  # BYOL: momentum update of the target network
            if step % steps_per_epoch == 0:  # epoch complete
                epoch_sum += flush(running)
                mean = epoch_sum / steps_per_epoch
                if not torch.isfinite(torch.tensor(mean)):
                    raise PretrainError(f"loss is {mean} in epoch {epoch}: training diverged (try a lower lr)")
                losses.append(mean)
                epoch_sum = 0.0
                if place.is_main:
                    log.info("pretrain.epoch", epoch=epoch, loss=round(mean, 4), step=step)
                checkpoint()
            elif step % cfg.checkpoint_every_steps == 0 or step >= stop_at:
                epoch_sum += flush(running)
                checkpoint()
            if step >= stop_at:
                break

    backbone_path = out_dir / "backbone.pt"
    if place.is_main:
        save_backbone(backbone_path, model.backbone, cfg.arch, cfg.method)
    if place.enabled:
        dist.barrier()  # the files exist before any rank returns
    return PretrainResult(
        backbone_path=backbone_path,
        checkpoint_path=checkpoint_path,
        losses=losses,
        steps=step,
        epochs_completed=len(losses),
        images=n,
        resumed_from_step=resumed_from,
        init_from=cfg.init_from,
        seconds=time.perf_counter() - started,
        method=cfg.method,
        world_size=place.world_size,
    )
