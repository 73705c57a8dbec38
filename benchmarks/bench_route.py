"""The routing node's cost: its added latency per study and its throughput, against the endpoint alone,
in one run on one machine.

Setup: `xrayops serve` (REST, a random-weights ResNet18 bundle at `--size`) on 127.0.0.1; a PACS
stand-in (a pynetdicom C-STORE SCP in this process that notes when each SR arrives); `xrayops route`
as its own process between them (`--quiet-seconds`, `--workers`). Studies: `--studies` studies of
`--images` 12-bit DX images each (`--rows` x `--rows`, explicit VR little endian).

  (a) endpoint alone: the study's files in one REST v2 request with sr=true, through the same client
      the node uses (serving.client.EndpointClient), timed from request to answer;
  (b) through the node: the study C-STOREd to the node (pynetdicom SCU, one association), timed from
      the association's release to the SR's arrival at the PACS stand-in. It includes the quiet
      period by design (a study is complete when no instance came for that long); the node's
      added time is (b) - quiet - (a).
Latency: one study at a time, (a) and (b) alternating study by study. Throughput: every study at
once, `--workers` requests in flight for (a), every study sent back to back for (b); studies per
second from the first send to the last answer / SR, and the same less one quiet period.
Writes benchmarks/results/route-<sr-per>.json. Usage:
  .venv/bin/python benchmarks/bench_route.py --studies 8 --images 3 --rows 512 --quiet-seconds 1
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEY = "bench-route-key-not-secret-0001"


def make_study(n: int, rows: int, seed: int) -> list:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    study = generate_uid()
    out = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "Bench^Patient", f"BENCH{seed:04d}", "20261205", "120000"
        ds.AccessionNumber, ds.StudyID, ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "A1", "1", "", "", ""
        ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "DX", ["HAND", "KNEE", "FOOT"][i % 3], "ACME"
        ds.Rows = ds.Columns = rows
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 12, 11, 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = rng.integers(0, 4096, (rows, rows), dtype=np.uint16).tobytes()
        out.append(ds)
    return out


def part10(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class PacsStandIn:
    """A C-STORE SCP that notes, by study, how many SRs arrived and when the last one did."""

    def __init__(self, port: int, per_study: int = 1) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage

        self.per_study = per_study  # SRs a study is done with: 1 (per study) or its images (per image)
        self.arrived: dict[str, list[float]] = {}
        self.cond = threading.Condition()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        study = str(event.dataset.StudyInstanceUID)
        with self.cond:
            self.arrived.setdefault(study, []).append(time.perf_counter())
            self.cond.notify_all()
        return 0x0000

    def wait(self, studies: set[str], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        with self.cond:
            def done() -> set[str]:
                return {s for s in studies if len(self.arrived.get(s, ())) >= self.per_study}

            while done() != studies and time.monotonic() < deadline:
                self.cond.wait(timeout=0.5)
            if done() != studies:
                raise RuntimeError(f"{len(studies - done())} studies' SRs did not arrive within {timeout:.0f}s")
            return {s: self.arrived[s][self.per_study - 1] for s in studies}


def send(port: int, datasets: list) -> float:
    """C-STORE the study in one association; returns the time of its release."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="XRAYOPS_ROUTE")
    if not assoc.is_established:
        raise RuntimeError("the node refused the association")
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if int(status.Status) != 0:
            raise RuntimeError(f"C-STORE status 0x{int(status.Status):04X}")
    assoc.release()
    return time.perf_counter()


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError("the node did not listen in time")


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": statistics.median(values), "mean": statistics.fmean(values), "min": values[0], "max": values[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--size", type=int, default=64, help="the model's input size")
    parser.add_argument("--quiet-seconds", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sr-per", choices=("study", "image"), default="study",
                        help="the node's SRs: one per study (merged from the per-image SRs) or the endpoint's per image")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/route-<sr-per>.json")
    args = parser.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / f"route-{args.sr_per}.json"
    os.environ.setdefault("XRAYOPS_DEID_KEY", KEY)

    import torch

    from serving.client import EndpointClient
    from serving.harness import free_port, start_server_process
    from xrayops.bundle import save_bundle
    from xrayops.contracts import ModelBundleMeta, PreprocessingSpec
    from xrayops.models.backbone import build_backbone
    from xrayops.models.heads import RegionClassifier
    from xrayops.regions import REGIONS

    tmp = Path(tempfile.mkdtemp(prefix="bench-route-"))
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    save_bundle(tmp / "bundle", RegionClassifier(backbone, dim, len(REGIONS)),
                ModelBundleMeta(name="xray-bench", classes=list(REGIONS), preprocessing=PreprocessingSpec(size=args.size)))
    server = start_server_process(tmp / "bundle", model_name="xray-bench", enable_grpc=False)
    pacs_port, route_port, health_port = free_port(), free_port(), free_port()
    pacs = PacsStandIn(pacs_port, 1 if args.sr_per == "study" else args.images)
    env = {**os.environ, "XRAYOPS_PROGRESS": "0", "XRAYOPS_LOG_LEVEL": "WARNING"}
    route = subprocess.Popen(
        [sys.executable, "-m", "xrayops.app.cli", "route", "--host", "127.0.0.1", "--port", str(route_port),
         "--endpoint", server.url, "--model-name", "xray-bench", "--pacs-port", str(pacs_port), "--pacs-ae-title", "PACS",
         "--quiet-seconds", str(args.quiet_seconds), "--workers", str(args.workers), "--dead-letter", str(tmp / "dead"),
         "--health-port", str(health_port), "--sr-per", args.sr_per],
        stdout=subprocess.DEVNULL, stderr=(tmp / "route.log").open("w"), env=env,
    )  # fmt: skip
    client = EndpointClient(server.url, "xray-bench", timeout=300)
    try:
        wait_port(route_port, route)
        studies = [make_study(args.images, args.rows, seed) for seed in range(2 * args.studies + 1)]
        blobs = [[part10(d) for d in s] for s in studies]
        client(blobs[-1])  # warm-up: first request, model and connection
        send(route_port, studies[-1])
        pacs.wait({str(studies[-1][0].StudyInstanceUID)}, 180)

        alone, through = [], []
        for i in range(args.studies):  # latency, alternating
            start = time.perf_counter()
            answer = client(blobs[i])
            alone.append(time.perf_counter() - start)
            assert len(answer.srs) == args.images
            study = str(studies[i][0].StudyInstanceUID)
            sent = send(route_port, studies[i])
            through.append(pacs.wait({study}, 120)[study] - sent)

        batch = range(args.studies, 2 * args.studies)  # throughput
        start = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda i: client(blobs[i]), batch))
        alone_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for i in batch:
            send(route_port, studies[i])
        arrived = pacs.wait({str(studies[i][0].StudyInstanceUID) for i in batch}, 300)
        node_seconds = max(arrived.values()) - start
    finally:
        client.close()
        route.terminate()
        try:
            route.wait(timeout=60)
        except subprocess.TimeoutExpired:
            route.kill()
            route.wait()
        server.stop()
        pacs.server.shutdown()

    a, b = summary(alone), summary(through)
    added = [t - args.quiet_seconds - e for t, e in zip(through, alone)]
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "setup": {"studies": args.studies, "images_per_study": args.images, "rows": args.rows, "model_size": args.size,
                  "quiet_seconds": args.quiet_seconds, "workers": args.workers, "sr_per": args.sr_per},
        "latency_seconds": {"endpoint_alone": a, "through_node": b, "node_added": summary(added)},
        "latency_ratio_p50": (b["p50"] - args.quiet_seconds) / a["p50"],
        "throughput_studies_per_second": {
            "endpoint_alone": args.studies / alone_seconds, "through_node": args.studies / node_seconds,
            "through_node_less_one_quiet_period": args.studies / max(node_seconds - args.quiet_seconds, 1e-9)},
        "throughput_ratio": alone_seconds / node_seconds,
        "throughput_ratio_less_one_quiet_period": alone_seconds / max(node_seconds - args.quiet_seconds, 1e-9),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
