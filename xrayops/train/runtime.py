"""Device, thread and seed helpers shared by pretraining and fine-tuning."""
from __future__ import annotations

import os
import random

from dataclasses import dataclass

import numpy as np
import torch
from torch import distributed as dist


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU. Asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(num_workers: int = 0) -> int:
    """Give torch the cores left after data-loader workers; never more than it already uses.

    Oversubscribing (intra-op threads + workers > cores) makes CPU training slower, and the
    machine is shared.
    """
    threads = max(1, min(torch.get_num_threads(), available_cores() - num_workers))
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_generator(device: torch.device, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A generator whose stream depends only on (seed, step, rank).

    Augmentations draw from it, so a run resumed at step k sees exactly the views an
    uninterrupted run would have seen. Each DDP rank augments its own shard with its own stream.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step + rank * 1_000_000_007) % 2**63)
    return generator


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, else gloo).

    Returns this process's place and its device (cuda:LOCAL_RANK under CUDA). Without torchrun
    it is a no-op returning rank 0 of 1 and `resolve_device(device_name)`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank), device


def shard_batch(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's equal share of a global batch (strided, like DistributedSampler).

    The global batch is trimmed to a multiple of world_size so every rank steps with the same
    number of images; the union over ranks is the (trimmed) global batch.
    """
    usable = len(batch) - len(batch) % world_size
    if usable == 0:
        raise ValueError(f"a batch of {len(batch)} images cannot be split over {world_size} processes")
    return batch[:usable][rank::world_size]
