"""Serving latency, throughput and memory, as ratios against an in-process baseline in the same run.

Input: one 2000x2000 12-bit DX DICOM (explicit VR little endian, ~8 MB) and Langer et al. 2024's
ensemble: three random-weights ResNet18 bundles (simclr, byol, supcon; `--members`) at the spec
size (default 224, as Baltruschat et al. 2018), averaged softmax in one process. The same work is timed three ways,
sequentially and round-robin (a, b, c, a, b, c, ...), each image one request:
  (a) in-process baseline: `serving.transformer.decode_dicom` (read_dicom + the ingestion pixel
      function) + `xrayops.ensemble.predict_ensemble` (the model forward), no server;
  (b) REST v2 with the binary data extension, kserve's InferenceRESTClient, against
      `xrayops serve` on 127.0.0.1 (which also appends the inference log);
  (c) gRPC v2, kserve's InferenceGRPCClient, same server.
Server overhead at p50 = p50(server) / p50(in-process) - 1 (target <= 15%).
Then a bounded load run: `--concurrency` threads posting REST v2 for `--duration` s, counting
errors and reading the server's RSS (psutil) at start and end.
Writes benchmarks/results/serving.json. Usage:
  .venv/bin/python benchmarks/bench_serving.py --iterations 30 --duration 90 --concurrency 8 --threads 1
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_dicom(rows: int = 2000, cols: int = 2000, seed: int = 0) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    body = 1500 + 1500 * np.exp(-(((x - cols / 2) / (cols / 4)) ** 2 + ((y - rows / 2) / (rows / 3)) ** 2))
    pixels = np.clip(body + rng.normal(0, 60, (rows, cols)), 0, 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "DX", "HAND", "ACME"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 12, 11, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [0.15, 0.15]
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


MEMBERS = ("simclr", "byol", "supcon")


def make_bundle(path: Path, size: int, ssl_method: str = "simclr", seed: int = 0) -> Path:
    import torch

    from xrayops.bundle import save_bundle
    from xrayops.contracts import ModelBundleMeta, PreprocessingSpec
    from xrayops.models.backbone import build_backbone
    from xrayops.models.heads import RegionClassifier
    from xrayops.regions import REGIONS

    torch.manual_seed(seed)
    backbone, dim = build_backbone("resnet18")
    meta = ModelBundleMeta(classes=list(REGIONS), preprocessing=PreprocessingSpec(size=size), ood_threshold=0.0,
                           ssl_method=ssl_method)
    save_bundle(path, RegionClassifier(backbone, dim, len(REGIONS)), meta)
    return path


def stats(latencies_s: list[float]) -> dict:
    ms = np.array(latencies_s) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "mean_ms": round(float(ms.mean()), 1),
            "throughput_per_s": round(len(ms) / float(np.sum(latencies_s)), 2)}


WRK_SCRIPT = """
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("XRAYOPS %d %d %d %d %d %d %d %.1f %.1f\\n", summary.requests, e.connect, e.read, e.write,
    e.status, e.timeout, summary.duration, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def run_wrk(url: str, body_path: Path, headers: dict, concurrency: int, duration: float, work: Path) -> dict:
    """A bounded wrk run posting the same v2 binary request; every non-2xx, socket error or timeout
    counts as an error (wrk's own default 2 s timeout would count queueing as failure, so 120 s)."""
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT.replace(
        "{headers}", "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())))
    proc = subprocess.run(
        ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{int(duration)}s", "--timeout", "120s",
         "-s", str(script), url],
        capture_output=True, text=True, env={**os.environ, "WRK_BODY": str(body_path)}, check=True)
    fields = next(line for line in proc.stdout.splitlines() if line.startswith("XRAYOPS ")).split()[1:]
    requests, connect, read, write, status, timeout, duration_us = (int(v) for v in fields[:7])
    errors = connect + read + write + status + timeout
    return {"requests": requests - status, "errors": errors,
            "error_kinds": {"connect": connect, "read": read, "write": write, "non_2xx": status, "timeout": timeout},
            "throughput_per_s": round((requests - status) / (duration_us / 1e6), 2),
            "p50_ms": float(fields[7]), "p99_ms": float(fields[8])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--size", type=int, default=224, help="model input size (PreprocessingSpec.size)")
    parser.add_argument("--duration", type=float, default=60.0, help="load run seconds")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--load-tool", choices=("auto", "wrk", "httpx"), default="auto",
                        help="load generator: wrk (Debian package) when installed, else an httpx thread pool")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in both processes (OMP_NUM_THREADS for the server); 0: torch's default. "
                        "On a shared, oversubscribed machine 1 avoids OpenMP spin-barrier stalls (10x slower at 2)")
    parser.add_argument("--members", type=int, default=3, choices=(1, 2, 3), help="ensemble members (Langer et al. 2024: 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json")
    args = parser.parse_args()

    import httpx
    import psutil
    import torch
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    from serving.harness import start_server_process
    from serving.transformer import DecodeLimits, decode_dicom
    from xrayops.bundle import load_bundle
    from xrayops.ensemble import predict_ensemble

    if args.threads:
        torch.set_num_threads(args.threads)
    server_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    bundle_dirs = [make_bundle(work / m, args.size, m, seed) for seed, m in enumerate(MEMBERS[: args.members])]
    blob = make_dicom()
    name = "bench"

    bundles = [load_bundle(d) for d in bundle_dirs]
    spec = bundles[0].meta.preprocessing

    def in_process():
        image = decode_dicom(blob, spec, DecodeLimits(), "bench-key", "x")
        predict_ensemble(bundles, [image.pixels], [image.dicom_region])

    server = start_server_process(bundle_dirs, model_name=name, log_path=work / "inference-log", env=server_env)
    try:
        process = psutil.Process(server.pid)
        tensor = InferInput(name="dicom", shape=[1], datatype="BYTES")
        tensor.set_data_from_numpy(np.array([blob], dtype=np.object_), binary_data=True)
        request = InferRequest(model_name=name, infer_inputs=[tensor])
        loop = asyncio.new_event_loop()
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0))

        async def make_grpc_client():  # a grpc.aio channel belongs to the loop it is made in
            return InferenceGRPCClient(server.grpc_address, timeout=120, retries=0,
                                       channel_args=[("grpc.max_send_message_length", 64 << 20)])

        grpc_client = loop.run_until_complete(make_grpc_client())
        calls = {
            "in_process": in_process,
            "rest": lambda: loop.run_until_complete(rest.infer(server.url, request, model_name=name)),
            "grpc": lambda: loop.run_until_complete(grpc_client.infer(request)),
        }
        # Round-robin, so that load from other jobs on a shared machine hits all three alike.
        timed = {k: [] for k in calls}
        for i in range(args.iterations + 3):
            for key, fn in calls.items():
                start = time.perf_counter()
                fn()
                if i >= 3:  # warm-up
                    timed[key].append(time.perf_counter() - start)
        baseline, rest_lat, grpc_lat = timed["in_process"], timed["rest"], timed["grpc"]
        loop.run_until_complete(rest.close())
        loop.run_until_complete(grpc_client.close())
        loop.close()

        body, json_length = request.to_rest()
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(json_length)}
        rss_start = process.memory_info().rss
        counts = {"ok": 0, "errors": 0}
        latencies: list[float] = []
        lock = threading.Lock()
        deadline = time.monotonic() + args.duration

        def worker():
            with httpx.Client(timeout=120) as client:
                while time.monotonic() < deadline:
                    start = time.perf_counter()
                    try:
                        ok = client.post(f"{server.url}/v2/models/{name}/infer", content=body,
                                         headers=headers).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    with lock:
                        counts["ok" if ok else "errors"] += 1
                        latencies.append(time.perf_counter() - start)

        rss_samples: list[float] = []

        def sample_rss():  # every 10 s: stable memory is a plateau, not just two end points
            while time.monotonic() < deadline:
                rss_samples.append(round(process.memory_info().rss / 2**20, 1))
                time.sleep(10)

        tool = args.load_tool if args.load_tool != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
        load_start = time.monotonic()
        if tool == "wrk":
            body_path = work / "request.bin"
            body_path.write_bytes(body)
            wrk_result: dict = {}
            threads = [threading.Thread(target=lambda: wrk_result.update(
                run_wrk(f"{server.url}/v2/models/{name}/infer", body_path, headers, args.concurrency, args.duration, work)))]
        else:
            threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        threads.append(threading.Thread(target=sample_rss))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - load_start
        rss_end = process.memory_info().rss
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    base, rest_s, grpc_s = stats(baseline), stats(rest_lat), stats(grpc_lat)
    result = {
        "input": {"dicom": "2000x2000 12-bit DX, explicit VR LE", "dicom_bytes": len(blob), "model": "resnet18",
                  "members": [m for m in MEMBERS[: args.members]], "size": args.size, "iterations": args.iterations},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version(),
                    "note": "load_average_at_end shows whether other jobs shared the machine"},
        "in_process": base, "rest_v2": rest_s, "grpc_v2": grpc_s,
        "overhead_p50": {"rest": round(rest_s["p50_ms"] / base["p50_ms"] - 1, 3),
                         "grpc": round(grpc_s["p50_ms"] / base["p50_ms"] - 1, 3)},
        "load": {"tool": tool, "duration_s": round(elapsed, 1), "concurrency": args.concurrency,
                 **(wrk_result if tool == "wrk" else {
                     "requests": counts["ok"], "errors": counts["errors"],
                     "throughput_per_s": round(counts["ok"] / elapsed, 2),
                     **{k: v for k, v in stats(latencies).items() if k in ("p50_ms", "p99_ms")}}),
                 "server_rss_mb_start": round(rss_start / 2**20, 1), "server_rss_mb_end": round(rss_end / 2**20, 1),
                 "server_rss_mb_every_10s": rss_samples},
        "command": "XRAYOPS_PROGRESS=0 .venv/bin/python benchmarks/bench_serving.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
