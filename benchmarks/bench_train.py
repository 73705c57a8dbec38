"""Training throughput: the end-to-end pretraining step (real data loading from the shards,
batched augmentation on the device, forward/backward/step) against the model-only step on
random tensors already on the device, same model, batch and precision.

ratio = end-to-end images/s / model-only images/s; 1.0 means loading and augmentation cost
nothing. Target on a GPU: >= 0.8. Both are measured in the same run, after warm-up steps.

    XRAYOPS_PROGRESS=0 .venv/bin/python benchmarks/bench_train.py --data-dir D --method simclr \
        --batch-size 64 --steps 10 --out benchmarks/results/bench_train.json

On a GPU (the issue's figure: SimCLR ResNet18 at 224 px in bf16, channels_last):

    .venv/bin/python benchmarks/bench_train.py --data-dir D --device cuda --size 224 --amp bf16 \
        --batch-size 256 --steps 30 --workers 4 --out benchmarks/results/bench_train_gpu.json

`--size` is the side of the views the model sees: the augmentation's random resized crop
resamples the stored images (`xrayops ingest --size 256` for 224 px crops) to that size, as
pretraining does. Both steps use the same size.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from xrayops.data.augment import PRETRAIN_AUG, TwoViews, make_pretrain_transform
from xrayops.data.dataset import ImageDataset
from xrayops.train.pretrain import PretrainConfig, autocast_dtype, build_training, epoch_batches, train_step
from xrayops.train.runtime import Distributed, configure_threads, resolve_device, step_generator


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run_step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step, after `warmup` untimed steps."""
    for i in range(warmup):
        run_step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        run_step(warmup + i)
    _sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--method", default="simclr", choices=["simclr", "byol", "supcon"])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, help="side of the views (default: the stored image size)")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 on CUDA where supported, fp32 on CPU (PretrainConfig's defaults)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    device = resolve_device(args.device)
    threads = configure_threads(args.workers)
    precision = {"auto": {}, "bf16": {"amp": True, "cpu_bf16": True}, "fp32": {"amp": False, "cpu_bf16": False}}
    cfg = PretrainConfig(method=args.method, arch=args.arch, batch_size=args.batch_size, epochs=1000, device=args.device,
                         **precision[args.amp])
    dataset = ImageDataset(args.data_dir, split=None)
    total = args.warmup + args.steps
    model, loss_module, optimizer, scheduler = build_training(cfg, device, Distributed(), total)
    amp = autocast_dtype(device, cfg)
    if args.amp == "bf16" and amp is None:
        raise SystemExit(f"--amp bf16: {device} does not support bf16")
    model.train()
    size = args.size or dataset.size

    # Model only: two random views per step, already on the device.
    view_a = torch.rand(args.batch_size, 1, size, size, device=device)
    view_b = torch.rand(args.batch_size, 1, size, size, device=device)
    labels = torch.randint(14, (args.batch_size,), device=device) if model.needs_labels else None

    def model_only(step: int) -> None:
        train_step(loss_module, optimizer, scheduler, view_a, view_b, labels, amp)
        model.after_step(step, total)

    model_s = measure(model_only, args.steps, args.warmup, device)

    # End to end: the training loop's own path (DataLoader over the epoch batches, GPU augmentation).
    views = TwoViews(make_pretrain_transform(size, PRETRAIN_AUG.model_copy(update={"full_rotation": True})))
    batches, epoch = [], 0
    while len(batches) < total:
        batches += epoch_batches(len(dataset), args.batch_size, 0, epoch)
        epoch += 1
    batches = batches[:total]
    loader = iter(DataLoader(dataset, batch_sampler=batches, num_workers=args.workers, pin_memory=device.type == "cuda"))

    def end_to_end(step: int) -> None:
        images, y = next(loader)
        images = images.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True) if model.needs_labels else None
        a, b = views(images, step_generator(device, 0, step))
        train_step(loss_module, optimizer, scheduler, a, b, y, amp)
        model.after_step(step, total)

    e2e_s = measure(end_to_end, args.steps, args.warmup, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86-64'}, {threads} threads)",
        "method": args.method,
        "arch": args.arch,
        "image_size": size,
        "stored_image_size": dataset.size,
        "channels_last": device.type == "cuda",
        "batch_size": args.batch_size,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "workers": args.workers,
        "model_only_images_per_s": round(args.batch_size / model_s, 1),
        "end_to_end_images_per_s": round(args.batch_size / e2e_s, 1),
        "ratio": round(model_s / e2e_s, 3),
        "steps": args.steps,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
