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
from dataclasses import dataclass, field
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


@dataclass
class PretrainRun:
    """One run's model, optimiser and position; `step`, `losses` and `epoch_sum` are what a
    checkpoint saves with the weights and a resumed run starts from."""

    cfg: PretrainConfig
    place: Distributed
    model: SSLModel
    loss_module: torch.nn.Module  # DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    n_images: int
    steps_per_epoch: int
    total_steps: int
    checkpoint_path: Path
    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each completed epoch
    epoch_sum: float = 0.0  # loss summed over this epoch's steps so far

    def checkpoint(self) -> None:
        if self.place.is_main:
            _save_checkpoint(self.checkpoint_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "epoch": self.step // self.steps_per_epoch, "losses": self.losses, "epoch_loss_sum": self.epoch_sum,
                "rng": rng_state(), "config": self.cfg.model_dump(mode="json"), "images": self.n_images,
            })

    def flush(self, running: torch.Tensor) -> float:
        """The loss summed since the last flush, averaged over ranks; resets `running`."""
        if self.place.enabled:
            dist.all_reduce(running)
            running /= self.place.world_size
        value = float(running)
        running.zero_()
        return value


def pretrain_images(data_dir: Path, cfg: PretrainConfig, place: Distributed) -> ImageDataset:
    """Every ok image (SupCon uses the labels, the others do not); refuses too few for a batch."""
    dataset = ImageDataset(data_dir, split=None)
    n = len(dataset)
    if n < 2:
        raise PretrainError(f"pretraining needs at least 2 images, {data_dir} has {n}")
    if cfg.method == "supcon" and not (dataset.labels >= 0).any():
        raise PretrainError(f"SupCon needs region labels, but no ok image of {data_dir} has a known region")
    if min(cfg.batch_size, n) < 2 * place.world_size:
        raise PretrainError(f"batch size {min(cfg.batch_size, n)} is too small for {place.world_size} processes")
    return dataset


def resume_or_warm_start(run: PretrainRun) -> None:
    """Continue from the run's checkpoint (same config), else load cfg.init_from, else nothing."""
    cfg, checkpoint_path = run.cfg, run.checkpoint_path
    if checkpoint_path.exists():
        try:
            saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise PretrainError(f"cannot read {checkpoint_path} ({exc}); delete it to start over") from exc
        _check_resumable(saved, cfg, run.n_images, checkpoint_path)
        run.model.load_state_dict(saved["model"])  # BYOL: the momentum encoder is in here too
        run.optimizer.load_state_dict(saved["optimizer"])
        run.scheduler.load_state_dict(saved["scheduler"])
        run.step, run.losses = saved["step"], list(saved["losses"])
        run.epoch_sum = saved["epoch_loss_sum"]
        set_rng_state(saved["rng"])
        log.info("pretrain.resume", step=run.step, of=run.total_steps)
    elif cfg.init_from is not None:  # every rank loads the same weights, so DDP's replicas agree
        loaded = warm_start(run.model, cfg.init_from, cfg)
        log.info("pretrain.warm_start", init_from=str(cfg.init_from), loaded=loaded)


def train_epoch(
    run: PretrainRun, dataset: ImageDataset, epoch: int, views: TwoViews, device: torch.device,
    amp_dtype: torch.dtype | None, stop_at: int,
) -> None:
    """The rest of `epoch` from run.step on (all of it unless resumed mid-epoch), stopping at
    `stop_at`; checkpoints at the epoch's end and every cfg.checkpoint_every_steps."""
    cfg, place, model, steps_per_epoch = run.cfg, run.place, run.model, run.steps_per_epoch
    batches = epoch_batches(run.n_images, cfg.batch_size, cfg.seed, epoch)[run.step % steps_per_epoch :]
    if place.enabled:  # every rank its strided share of the same global batch
        batches = [shard_batch(b, place.rank, place.world_size) for b in batches]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    running = torch.zeros((), device=device)
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if model.needs_labels else None
        view_a, view_b = views(images, step_generator(device, cfg.seed, run.step, place.rank))
        running += train_step(run.loss_module, run.optimizer, run.scheduler, view_a, view_b, labels, amp_dtype)
        run.step += 1
        model.after_step(run.step, run.total_steps)  # BYOL: momentum update of the target network
        if run.step % steps_per_epoch == 0:  # epoch complete
            run.epoch_sum += run.flush(running)
            mean = run.epoch_sum / steps_per_epoch
            if not torch.isfinite(torch.tensor(mean)):
                raise PretrainError(f"loss is {mean} in epoch {epoch}: training diverged (try a lower lr)")
            run.losses.append(mean)
            run.epoch_sum = 0.0
            if place.is_main:
                log.info("pretrain.epoch", epoch=epoch, loss=round(mean, 4), step=run.step)
            run.checkpoint()
        elif run.step % cfg.checkpoint_every_steps == 0 or run.step >= stop_at:
            run.epoch_sum += run.flush(running)
            run.checkpoint()
        if run.step >= stop_at:
            break


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

    dataset = pretrain_images(data_dir, cfg, place)
    n = len(dataset)
    steps_per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0))
    total_steps = cfg.epochs * steps_per_epoch
    model, loss_module, optimizer, scheduler = build_training(cfg, device, place, total_steps)
    amp_dtype = autocast_dtype(device, cfg)
    run = PretrainRun(
        cfg, place, model, loss_module, optimizer, scheduler, n, steps_per_epoch, total_steps, checkpoint_path
    )
    resume_or_warm_start(run)
    resumed_from = run.step

    params = PRETRAIN_AUG.model_copy(update={"full_rotation": cfg.full_rotation})
    views = TwoViews(make_pretrain_transform(dataset.size, params))
    stop_at = min(total_steps, cfg.max_steps or total_steps)
    epochs = range(run.step // steps_per_epoch, cfg.epochs)
    model.train()
    show = progress and place.is_main
    for epoch in track(epochs, "pretrain epochs", len(epochs)) if show else epochs:
        if run.step >= stop_at:
            break
        train_epoch(run, dataset, epoch, views, device, amp_dtype, stop_at)

    backbone_path = out_dir / "backbone.pt"
    if place.is_main:
        save_backbone(backbone_path, model.backbone, cfg.arch, cfg.method)
    if place.enabled:
        dist.barrier()  # the files exist before any rank returns
    return PretrainResult(
        backbone_path=backbone_path,
        checkpoint_path=checkpoint_path,
        losses=run.losses,
        steps=run.step,
        epochs_completed=len(run.losses),
        images=n,
        resumed_from_step=resumed_from,
        init_from=cfg.init_from,
        seconds=time.perf_counter() - started,
        method=cfg.method,
        world_size=place.world_size,
    )
