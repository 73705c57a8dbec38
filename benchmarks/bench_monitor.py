"""Monitoring cost over 10k, 100k and 1M inference-log records: time and peak memory, and how
they grow against linear.

Each size runs `xrayops.monitor.window.monitor_window` (the code `xrayops monitor` runs): the
Evidently drift report of the window against a fixed training manifest, the online label-noise
rate overall, per site and per vendor, the OOD rate, the retrain decision, and the window's
snapshot in an Evidently workspace (drift report on a sample of at most 50,000 rows a side,
plus the xrayops signals; see xrayops.monitor.workspace). Records carry no embeddings here
(a 512-float embedding is 2 KB a record, 2 GB at 1M: the embedding drift samples 1,000 rows a
side, so it costs the same at every size and is left out to keep the run on a small machine).

Every size runs in a fresh subprocess, so peak RSS (VmHWM) is that size's own; the
baseline is the same process's RSS after a 1,000-record warm-up (imports), before the
window is read, so the increment covers reading the window and monitoring it. Growth is reported per record against the smallest run (1.0 = linear; below 1 the
fixed cost of a report still dominates) and as the marginal cost per 100k added records
between consecutive sizes (about constant = linear).

Writes benchmarks/results/monitor.json. Usage:
  .venv/bin/python benchmarks/bench_monitor.py --sizes 10000 100000 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

REGIONS = ["skull", "clavicle", "shoulder", "elbow", "wrist", "hand", "knee", "ankle", "foot", "chest"]
REFERENCE_ROWS = 31_011  # Langer et al. 2024's training images: a realistic training manifest


def synthetic_log(n: int, seed: int) -> pd.DataFrame:
    """n inference-log records: a third from a shifted vendor with brighter images and 15 % of
    confident predictions against their tag (vectorised, so generation is not what is measured)."""
    rng = np.random.default_rng(seed)
    shifted = rng.random(n) < 1 / 3
    tag = rng.choice(REGIONS, n)
    wrong = rng.random(n) < np.where(shifted, 0.15, 0.04)
    predicted = np.where(wrong, np.roll(tag, 1), tag)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return pd.DataFrame({
        "timestamp": pd.to_datetime(start) + pd.to_timedelta(np.arange(n) * (3600 / n), unit="s"),
        "request_id": np.char.add("r", (np.arange(n) // 8).astype(str)),
        "model_name": "xrayops-region", "model_version": "1",
        "image_id": np.char.add("img", np.arange(n).astype(str)),
        "site": rng.choice(["north", "south", "east"], n),
        "manufacturer": np.where(shifted, "Initech", rng.choice(["ACME", "Globex"], n)),
        "photometric_interpretation": rng.choice(["MONOCHROME2", "MONOCHROME1"], n, p=[0.8, 0.2]),
        "pixel_spacing": np.where(shifted, 0.2, rng.choice([0.10, 0.15], n)),
        "pixel_mean": rng.normal(np.where(shifted, 0.5, 0.4), 0.05),
        "pixel_std": rng.normal(0.2, 0.03, n),
        "region": predicted, "confidence": rng.uniform(0.6, 1.0, n), "dicom_region": tag,
        "label_disagreement": wrong, "ood_score": rng.normal(0.0, 1.0, n),
    })


def synthetic_manifest(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "image_id": np.char.add("m", np.arange(n).astype(str)), "status": "ok", "split": "train",
        "region": rng.choice(REGIONS, n), "manufacturer": rng.choice(["ACME", "Globex"], n),
        "photometric_interpretation": rng.choice(["MONOCHROME2", "MONOCHROME1"], n, p=[0.8, 0.2]),
        "pixel_spacing": rng.choice([0.10, 0.15], n), "pixel_mean": rng.normal(0.4, 0.05, n),
        "pixel_std": rng.normal(0.2, 0.03, n),
    })


def rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM, which exec resets (ru_maxrss keeps the parent's
    peak across fork+exec, so a child launched after generating 1M rows would report that)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(reference: Path, current: Path, work: Path) -> dict:
    """One size, in this (fresh) process."""
    from xrayops.config import Settings
    from xrayops.contracts import ModelBundleMeta, PreprocessingSpec
    from xrayops.monitor.window import monitor_window

    meta = ModelBundleMeta(classes=REGIONS, preprocessing=PreprocessingSpec(), ood_threshold=1.64)
    # Warm-up on 1,000 records in another workspace: Evidently's imports and first-use costs,
    # paid once per process, are reported apart (fixed_seconds) and kept out of the timed run.
    work.mkdir(parents=True, exist_ok=True)
    small = work / "warmup.parquet"
    synthetic_log(1000, 99).to_parquet(small)
    t0 = time.perf_counter()
    monitor_window(reference, small, work / "warmup", Settings(), bundle_meta=meta, workspace=work / "warmup-ws")
    fixed = time.perf_counter() - t0
    baseline = rss_mb()  # imports and first-use costs; the window itself is read inside the timed run
    t0 = time.perf_counter()
    result = monitor_window(reference, current, work / "monitor", Settings(), bundle_meta=meta,
                            workspace=work / "evidently")
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "warmup_seconds": round(fixed, 2), "peak_rss_mb": round(rss_mb(), 1), "baseline_rss_mb": round(baseline, 1),
            "drift_share": round(result.drift.drift_share, 3), "label_noise_rate": round(result.label_noise_rate, 4),
            "groups": {" ".join(b.by): len(b.rows) for b in result.label_noise.breakdowns},
            "retrain": result.decision.retrain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "monitor.json")
    parser.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        work = Path(tmp)
        reference = work / "manifest.parquet"
        synthetic_manifest(REFERENCE_ROWS, args.seed).to_parquet(reference)
        for n in args.sizes:
            current = work / f"log-{n}.parquet"
            synthetic_log(n, args.seed + 1).to_parquet(current)
            env = {**os.environ, "XRAYOPS_PROGRESS": "0", "XRAYOPS_LOG_LEVEL": "WARNING"}
            proc = subprocess.run([sys.executable, __file__, "--child", str(reference), str(current), str(work / str(n))],
                                  capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"size {n} failed:\n{proc.stderr[-3000:]}")
            run = {"records": n, **json.loads(proc.stdout.strip().splitlines()[-1])}
            runs.append(run)
            print(json.dumps(run), flush=True)
    base = runs[0]
    for run in runs:
        # Per-record cost against the smallest size: 1.0 = linear, below 1 = sub-linear.
        scale = run["records"] / base["records"]
        run["time_ratio"] = round(run["seconds"] / base["seconds"], 2)
        run["time_per_record_vs_base"] = round(run["seconds"] / base["seconds"] / scale, 3)
        extra, extra_base = run["peak_rss_mb"] - run["baseline_rss_mb"], base["peak_rss_mb"] - base["baseline_rss_mb"]
        run["monitor_rss_mb"] = round(extra, 1)
        run["memory_per_record_vs_base"] = round(extra / max(extra_base, 1e-9) / scale, 3)
    for prev, run in zip(runs, runs[1:]):
        # Marginal cost of the added records: flat across sizes = linear growth past the fixed part.
        added = (run["records"] - prev["records"]) / 100_000
        run["marginal_seconds_per_100k"] = round((run["seconds"] - prev["seconds"]) / added, 3)
        run["marginal_rss_mb_per_100k"] = round((run["monitor_rss_mb"] - prev["monitor_rss_mb"]) / added, 1)
    result = {"benchmark": "monitor", "reference_rows": REFERENCE_ROWS, "runs": runs,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
