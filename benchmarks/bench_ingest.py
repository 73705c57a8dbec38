"""Ingestion throughput, as ratios against baselines taken in the same run.

  baseline A: pydicom decode alone (`decode_pixels`) over the same files;
  measured:   `ingest` (decode + pixel pipeline + de-identification + shards + manifest), 1 worker;
  measured:   `ingest` with --workers processes.

Writes benchmarks/results/ingest.json. Usage:
  .venv/bin/python benchmarks/bench_ingest.py --n 300 --workers 2
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from xrayops.contracts import PreprocessingSpec
from xrayops.data.synth import synthesize
from xrayops.dicom.decode import decode_pixels, read_dicom
from xrayops.ingest import find_dicom_files, ingest


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ingest.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth = synthesize(tmp / "synth", n=args.n, seed=7, size=args.size)
        files = find_dicom_files(synth.dicom_dir)
        spec = PreprocessingSpec(size=64)
        decode_s = timed(lambda: [decode_pixels(read_dicom(f)) for f in files])
        one_s = timed(lambda: ingest(synth.dicom_dir, tmp / "d1", spec, "bench-key", workers=1))
        many_s = timed(lambda: ingest(synth.dicom_dir, tmp / "dn", spec, "bench-key", workers=args.workers))

    result = {
        "command": f"python benchmarks/bench_ingest.py --n {args.n} --size {args.size} --workers {args.workers}",
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "files": len(files),
        "decode_only_images_per_s": round(len(files) / decode_s, 1),
        "ingest_1_worker_images_per_s": round(len(files) / one_s, 1),
        f"ingest_{args.workers}_workers_images_per_s": round(len(files) / many_s, 1),
        "ingest_cost_over_decode": round(one_s / decode_s, 2),
        "parallel_speedup": round(one_s / many_s, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
