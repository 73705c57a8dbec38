"""Ingestion throughput and memory, as ratios against baselines taken in the same run.

Input: N synthetic radiographs of realistic size (2000-2600 x 2000-3000 px, 12/14/16 bits stored,
quantum noise so that they compress like real ones) in a mix of transfer syntaxes: explicit VR
little endian, deflate, RLE, JPEG 2000 lossless and JPEG 2000 lossy. Generated once and cached.

  (a) baseline, de Cid Rodríguez 2021 style: one file at a time, dcmread + pixel_array + linear 8-bit
      conversion + resize + save PNG + one CSV row;
  (b) bare decode: dcmread + pixel_array, one file at a time;
  (c) `xrayops ingest` with --workers processes (decode, pixel pipeline, de-identification,
      dedup, journal, shards, manifest), from an empty journal.

Each is run in its own subprocess (generation too: a child inherits its parent's peak RSS); peak RSS
(parent and largest worker) and CPU seconds (user + system, workers included) are read from getrusage.
On a shared machine the wall-clock ratios move with the load; images per CPU-second do much less.
(c) is also run on N/4 files, to show that peak memory does not grow with the dataset.
Writes benchmarks/results/ingest.json. Usage:
  .venv/bin/python benchmarks/bench_ingest.py --n 500 --workers 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYNTAXES = ("explicit", "deflate", "rle", "j2k_lossless", "j2k_lossy")
OUTPUT_SIZE = 256


def make_file(path: Path, index: int, seed: int) -> None:
    """One realistic radiograph as DICOM, deterministic in (index, seed)."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        JPEG2000,
        JPEG2000Lossless,
        RLELossless,
        generate_uid,
    )

    from xrayops.data.phantoms import draw_region
    from xrayops.regions import REGIONS

    rng = np.random.default_rng([seed, index])
    rows, cols = int(rng.integers(2000, 2601)), int(rng.integers(2000, 3001))
    bits = int(rng.choice([12, 14, 16]))
    base = draw_region(REGIONS[index % len(REGIONS)], rng, 512)
    image = np.asarray(Image.fromarray(base, mode="F").resize((cols, rows), Image.Resampling.BILINEAR))
    full = 2**bits - 1
    signal = 0.1 + 0.8 * image
    noisy = signal * full + rng.normal(0.0, 0.004 * full, size=image.shape) * np.sqrt(signal)
    stored = np.clip(noisy, 0, full).astype(np.uint16)
    syntax = SYNTAXES[index % len(SYNTAXES)]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(seed), str(index), "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(seed), str(index // 3), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(seed), str(index), "series"])
    ds.PatientID = f"BENCH{index // 3:06d}"
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "DX", REGIONS[index % len(REGIONS)].upper(), "BENCH"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.ImagerPixelSpacing = [0.139, 0.139]
    if index % 2:
        ds.WindowCenter, ds.WindowWidth = int(full * 0.5), int(full * 0.8)
    ds.PixelData = stored.tobytes()
    if syntax == "rle":
        ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    elif syntax == "j2k_lossless":
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    elif syntax == "j2k_lossy":
        ds.compress(JPEG2000, j2k_cr=[15], generate_instance_uid=False)
    elif syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    os.replace(tmp, path)


def bench_paths(directory: Path, n: int) -> list[Path]:
    return [directory / f"bench-{i:05d}.dcm" for i in range(n)]


def generate(directory: Path, n: int, seed: int) -> list[Path]:
    paths = bench_paths(directory, n)
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    for count, (i, path) in enumerate(missing, 1):
        make_file(path, i, seed)
        if count % 50 == 0:
            print(f"generated {count}/{len(missing)}", file=sys.stderr, flush=True)
    return paths


# --- the three measured runs; each runs in a fresh interpreter (`--run NAME`) ---

def run_baseline(files: list[Path], out: Path) -> None:
    """de Cid Rodríguez 2021's raw stage: read once with pydicom, 8-bit linear, resize, PNG + a CSV row per file."""
    import pydicom
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    with (out / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "rows", "cols", "body_part"])
        for path in files:
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array.astype(np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            eight = ((arr - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
            Image.fromarray(eight).resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.BILINEAR).save(
                out / f"{path.stem}.png"
            )
            writer.writerow([path.name, ds.Rows, ds.Columns, ds.get("BodyPartExamined", "")])


def run_decode(files: list[Path]) -> None:
    import pydicom

    for path in files:
        pydicom.dcmread(path).pixel_array


def run_ingest(source: Path, out: Path, workers: int) -> None:
    from xrayops.contracts import PreprocessingSpec
    from xrayops.ingest import ingest

    summary = ingest(source, out / "data", PreprocessingSpec(size=OUTPUT_SIZE), "bench-key", workers=workers)
    assert summary.n_ok == summary.n_files, summary.reasons


def child(args: argparse.Namespace) -> None:
    files = sorted(Path(args.source).glob("*.dcm"))[: args.limit]
    start = time.perf_counter()
    if args.run == "baseline":
        run_baseline(files, Path(args.out))
    elif args.run == "decode":
        run_decode(files)
    else:
        source = Path(args.source)
        if args.limit < len(sorted(source.glob("*.dcm"))):  # a subset: link it into its own folder
            source = Path(args.out) / "subset"
            source.mkdir(parents=True, exist_ok=True)
            for f in files:
                (source / f.name).symlink_to(f)
        run_ingest(source, Path(args.out), args.workers)
    seconds = time.perf_counter() - start
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print(json.dumps({"files": len(files), "seconds": seconds, "cpu_seconds": round(cpu, 2),
                      "peak_rss_mib": round(own.ru_maxrss / 1024, 1),
                      "peak_worker_rss_mib": round(children.ru_maxrss / 1024, 1)}))  # fmt: skip


def measure(run: str, source: Path, out: Path, limit: int, workers: int) -> dict:
    env = {**os.environ, "XRAYOPS_PROGRESS": "0", "XRAYOPS_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, __file__, "--run", run, "--source", str(source), "--out", str(out),
           "--limit", str(limit), "--workers", str(workers)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{run} failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["images_per_s"] = round(result["files"] / result["seconds"], 2)
    result["images_per_cpu_s"] = round(result["files"] / result["cpu_seconds"], 2)
    print(run, limit, result, file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "xrayops-bench-ingest")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ingest.json")
    parser.add_argument("--run", choices=["generate", "baseline", "decode", "ingest"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    source = args.cache / f"n{args.n}-seed{args.seed}"
    if args.run == "generate":
        generate(source, args.n, args.seed)
        return None
    if args.run:
        return child(args)

    cmd = [sys.executable, __file__, "--run", "generate", "--n", str(args.n), "--seed", str(args.seed),
           "--cache", str(args.cache)]  # fmt: skip
    subprocess.run(cmd, check=True)  # in a child: the measured runs must not inherit its peak RSS
    files = bench_paths(source, args.n)
    sizes = [f.stat().st_size for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = measure("baseline", source, tmp / "baseline", args.n, 1)
        decode = measure("decode", source, tmp / "decode", args.n, 1)
        small = measure("ingest", source, tmp / "ingest-small", max(1, args.n // 4), args.workers)
        full = measure("ingest", source, tmp / "ingest", args.n, args.workers)

    result = {
        "command": f".venv/bin/python benchmarks/bench_ingest.py --n {args.n} --workers {args.workers}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), python {platform.python_version()}",
        "files": args.n,
        "mean_file_mib": round(float(np.mean(sizes)) / 2**20, 2),
        "syntaxes": list(SYNTAXES),
        "output_size": OUTPUT_SIZE,
        "a_baseline_paper001_images_per_s": baseline["images_per_s"],
        "b_bare_decode_images_per_s": decode["images_per_s"],
        f"c_ingest_{args.workers}_workers_images_per_s": full["images_per_s"],
        "ratio_c_over_a": round(full["images_per_s"] / baseline["images_per_s"], 2),
        "ratio_c_over_b": round(full["images_per_s"] / decode["images_per_s"], 2),
        "cpu_seconds": {"a": baseline["cpu_seconds"], "b": decode["cpu_seconds"], "c": full["cpu_seconds"]},
        # Images per CPU-second: what one core does, whatever else shares the machine.
        "cpu_ratio_c_over_a": round(full["images_per_cpu_s"] / baseline["images_per_cpu_s"], 2),
        "peak_rss_mib": {
            f"ingest_{small['files']}_files": {"main": small["peak_rss_mib"], "worker": small["peak_worker_rss_mib"]},
            f"ingest_{full['files']}_files": {"main": full["peak_rss_mib"], "worker": full["peak_worker_rss_mib"]},
            "baseline": baseline["peak_rss_mib"],
            "bare_decode": decode["peak_rss_mib"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
