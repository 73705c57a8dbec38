"""Self-supervised pretraining of the backbone (paper 000: SimCLR on all images, no labels)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch.utils.data import DataLoader

from xrayops.data.augment import PRETRAIN_AUG, TwoViews, make_pretrain_transform
from xrayops.data.dataset import ImageDataset
from xrayops.logs import get_logger
from xrayops.models.backbone import build_backbone, save_backbone
from xrayops.models.ssl import build_ssl_model
from xrayops.progress import track
from xrayops.train.runtime import (
    configure_threads,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    step_generator,
)

log = get_logger(__name__)

# Fields that shape the training trajectory: a checkpoint only resumes under the same values.
TRAJECTORY_FIELDS = (
    "arch", "method", "epochs", "batch_size", "lr", "weight_decay", "temperature",
    "proj_hidden_dim", "proj_out_dim", "seed", "full_rotation",
)


class PretrainConfig(BaseModel):
    arch: str = "resnet18"
    method: Literal["simclr"] = "simclr"
    epochs: int = Field(100, ge=1)  # paper 000 ran 1000 epochs on 31k images
    batch_size: int = Field(256, ge=2)  # paper 000: 1024 for SimCLR
    lr: float = 3e-4  # paper 000: Adam, lr 3e-4, cosine schedule
    weight_decay: float = 1e-4  # paper 000
    temperature: float = 0.5  # paper 000: NT-Xent tau = 0.5
    proj_hidden_dim: int = 512  # paper 000 gives "2-layer MLP" only; 512 = the embedding size
    proj_out_dim: int = 128  # SimCLR's default
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    checkpoint_every_steps: int = Field(200, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early (and checkpoint) after this many steps in total
    # Paper 000 straightens every image while cleaning and augments only +-15 deg. Our
    # synthetic (and real unsorted PACS) images come at any angle, so by default the views
    # are rotated over the full circle and the embedding learns to ignore orientation.
    full_rotation: bool = True


class PretrainResult(BaseModel):
    backbone_path: Path
    checkpoint_path: Path
    losses: list[float]  # mean loss of each completed epoch
    steps: int
    epochs_completed: int
    images: int
    resumed_from_step: int = 0
    seconds: float


class PretrainError(RuntimeError):
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
    current = cfg.model_dump()
    before = saved["config"]
    changed = [f"{k}: {before.get(k)!r} -> {current[k]!r}" for k in TRAJECTORY_FIELDS if before.get(k) != current[k]]
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


def train_step(
    model: torch.nn.Module, optimizer, scheduler, view_a: torch.Tensor, view_b: torch.Tensor, cuda: bool
) -> torch.Tensor:
    """One optimisation step on a batch of view pairs; bf16 autocast and channels_last on CUDA."""
    if cuda:
        view_a = view_a.contiguous(memory_format=torch.channels_last)
        view_b = view_b.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        loss = model.loss(view_a, view_b)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def pretrain(
    data_dir: Path, out_dir: Path, cfg: PretrainConfig | None = None, progress: bool = True
) -> PretrainResult:
    """Pretrain a backbone on every ok image of `data_dir`; write out_dir/backbone.pt.

    Resumes from out_dir/checkpoint.pt when one exists (same config), reproducing the
    uninterrupted run: batches and augmentations are functions of (seed, epoch, step).
    """
    cfg = cfg or PretrainConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    device = resolve_device(cfg.device)
    configure_threads(cfg.num_workers)
    seed_everything(cfg.seed)

    dataset = ImageDataset(data_dir, split=None)  # every ok image: labels are not used
    n = len(dataset)
    if n < 2:
        raise PretrainError(f"pretraining needs at least 2 images, {data_dir} has {n}")
    steps_per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0))
    total_steps = cfg.epochs * steps_per_epoch

    backbone, embedding_dim = build_backbone(cfg.arch)
    model = build_ssl_model(
        cfg.method, backbone, embedding_dim, cfg.proj_hidden_dim, cfg.proj_out_dim, cfg.temperature
    )
    cuda = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last) if cuda else model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    step, losses, epoch_sum = 0, [], 0.0  # epoch_sum: loss summed over this epoch's steps so far
    if checkpoint_path.exists():
        try:
            saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise PretrainError(f"cannot read {checkpoint_path} ({exc}); delete it to start over") from exc
        _check_resumable(saved, cfg, n, checkpoint_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, losses = saved["step"], list(saved["losses"])
        epoch_sum = saved["epoch_loss_sum"]
        set_rng_state(saved["rng"])
        log.info("pretrain.resume", step=step, of=total_steps)
    resumed_from = step

    def checkpoint() -> None:
        _save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "epoch": step // steps_per_epoch, "losses": losses, "epoch_loss_sum": epoch_sum,
            "rng": rng_state(), "config": cfg.model_dump(), "images": n,
        })

    params = PRETRAIN_AUG.model_copy(update={"full_rotation": cfg.full_rotation})
    views = TwoViews(make_pretrain_transform(dataset.size, params))
    stop_at = min(total_steps, cfg.max_steps or total_steps)
    epochs = range(step // steps_per_epoch, cfg.epochs)
    model.train()
    for epoch in track(epochs, "pretrain epochs", len(epochs)) if progress else epochs:
        if step >= stop_at:
            break
        batches = epoch_batches(n, cfg.batch_size, cfg.seed, epoch)[step % steps_per_epoch :]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=cuda)
        running = torch.zeros((), device=device)
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            view_a, view_b = views(images, step_generator(device, cfg.seed, step))
            running += train_step(model, optimizer, scheduler, view_a, view_b, cuda)
            step += 1
            if step % steps_per_epoch == 0:  # epoch complete
                epoch_sum += float(running)
                running.zero_()
                mean = epoch_sum / steps_per_epoch
                if not torch.isfinite(torch.tensor(mean)):
                    raise PretrainError(f"loss is {mean} in epoch {epoch}: training diverged (try a lower lr)")
                losses.append(mean)
                epoch_sum = 0.0
                log.info("pretrain.epoch", epoch=epoch, loss=round(mean, 4), step=step)
                checkpoint()
            elif step % cfg.checkpoint_every_steps == 0 or step >= stop_at:
                epoch_sum += float(running)
                running.zero_()
                checkpoint()
            if step >= stop_at:
                break

    backbone_path = save_backbone(out_dir / "backbone.pt", model.backbone, cfg.arch, cfg.method)
    return PretrainResult(
        backbone_path=backbone_path,
        checkpoint_path=checkpoint_path,
        losses=losses,
        steps=step,
        epochs_completed=len(losses),
        images=n,
        resumed_from_step=resumed_from,
        seconds=time.perf_counter() - started,
    )
