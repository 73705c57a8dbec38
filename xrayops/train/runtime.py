"""Device, thread and seed helpers shared by pretraining and fine-tuning."""
from __future__ import annotations

import os
import random

from dataclasses import dataclass

import numpy as np
import torch
from torch import distributed as dist

from xrayops.errors import XrayopsError


# The Linux driver each CUDA toolkit release needs (NVIDIA, CUDA Toolkit release notes, "CUDA
# Toolkit and Corresponding Driver Versions"). A driver older than the one torch was built against
# makes torch.cuda.is_available() False: the GPU is held but unused.
MIN_DRIVER = {
    "11.8": "520.61.05", "12.0": "525.60.13", "12.1": "530.30.02", "12.2": "535.54.03", "12.3": "545.23.06",
    "12.4": "550.54.14", "12.5": "555.42.02", "12.6": "560.28.03", "12.8": "570.26", "12.9": "575.51.03",
    "13.0": "580.65.06",
}
# Minor-version compatibility: the oldest driver of a major release (same release notes).
MIN_DRIVER_OF_MAJOR = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}
# What the NVIDIA container runtime / device plugin puts in NVIDIA_VISIBLE_DEVICES when no GPU is given.
_NO_GPU = {"", "void", "none"}
DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"


class DeviceError(XrayopsError, RuntimeError):
    """A GPU was asked for and CUDA cannot use it; the message names the driver requirement."""


def gpu_request(environ: dict[str, str] | None = None) -> str | None:
    """Why this container holds a GPU, or None: XRAYOPS_DEVICE=cuda[:N] set on the pod (the
    gpu-cloud overlay's GPU predictors and pipeline steps), or NVIDIA_VISIBLE_DEVICES naming the
    devices that the NVIDIA device plugin (a `nvidia.com/gpu` limit) or `docker --gpus` handed over."""
    env = os.environ if environ is None else environ
    asked = env.get("XRAYOPS_DEVICE", "").strip().lower()
    if asked.startswith("cuda"):
        return f"XRAYOPS_DEVICE={asked} is set"
    visible = env.get("NVIDIA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() not in _NO_GPU:
        return f"a GPU was given to this container (NVIDIA_VISIBLE_DEVICES={visible.strip()})"
    return None


def gpu_requested(environ: dict[str, str] | None = None) -> bool:
    return gpu_request(environ) is not None


def driver_requirement(cuda_version: str | None = None) -> str:
    """The driver this torch build needs, in words."""
    cuda_version = torch.version.cuda if cuda_version is None else cuda_version
    if not cuda_version:
        return f"this torch build ({torch.__version__}) has no CUDA support: install a CUDA build of torch"
    minor = ".".join(cuda_version.split(".")[:2])
    needed = MIN_DRIVER.get(minor)
    if needed is None:
        floor = MIN_DRIVER_OF_MAJOR.get(minor.split(".")[0], "the one NVIDIA lists for it")
        return (f"torch {torch.__version__} is built with CUDA {cuda_version}: it needs the NVIDIA driver that "
                f"CUDA {minor} lists in NVIDIA's release notes (at least {floor} with minor-version compatibility)")
    return f"torch {torch.__version__} is built with CUDA {cuda_version}, which needs NVIDIA driver >= {needed} (Linux)"


def installed_driver(path: str = DRIVER_VERSION_FILE) -> str | None:
    """The loaded NVIDIA kernel driver's version, when the container can see it."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def _cuda_unusable(why: str) -> DeviceError:
    found = installed_driver()
    driver = f"the node's driver is {found}" if found else f"no NVIDIA driver version is readable ({DRIVER_VERSION_FILE})"
    return DeviceError(f"{why} but CUDA is not available: {driver}; {driver_requirement()}. "
                       "Upgrade the node's driver (GPU operator: driver.version) or run a torch build for the "
                       "installed driver; refusing to fall back to the CPU while holding the GPU")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU, unless a GPU was asked for (gpu_request): then an
    unusable CUDA is an error, not a silent CPU run. Asking for CUDA without one is an error too."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        why = gpu_request()
        if why:
            raise _cuda_unusable(why)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _cuda_unusable(f"device {name!r} requested")
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
