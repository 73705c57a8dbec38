"""The DICOM routing node (xrayops.route): its logic with fakes for the network, its edges for real,
and one run end to end: dcmtk's storescu -> `xrayops route` -> `xrayops serve` -> Orthanc, the SRs
found again through Orthanc's DICOMweb QIDO-RS, the bad input in the log and the dead-letter folder.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import DICOM_SAMPLES, free_port, stop_process, wait_for_port
from dicom_factory import make_dataset, ramp
from highdicom.sr.utils import find_content_items
from phi_scanner import collect_secrets, report, scan, scan_text
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, ComprehensiveSRStorage
from test_serving_support import make_bundle
from test_sources import DICOMWEB_PLUGIN, ORTHANC, STORESCU

from serving.client import EndpointClient
from serving.harness import start_server_process
from xrayops.contracts import InferenceResponse
from xrayops.results import codes as c
from xrayops.results.identity import AlgorithmIdentity
from xrayops.results.sr import from_part10, image_sr, to_part10
from xrayops.route import EndpointAnswer, EndpointError, ReceivedInstance, StoreError, Study
from xrayops.route.deadletter import DeadLetter
from xrayops.route.grouping import StudyGrouper
from xrayops.route.health import start_health_server
from xrayops.route.node import NodeOptions, RouteNode
from xrayops.route.pacs import PacsStore
from xrayops.route.retry import RetryPolicy, with_retries
from xrayops.route.scp import start_scp

KEY = "route-test-key-not-secret-0001"
CT = DICOM_SAMPLES / "other" / "fodicom__IM-0001-0001-0001.dcm"  # a real CT, JPEG lossless SV1
needs_e2e = pytest.mark.skipif(
    None in (ORTHANC, DICOMWEB_PLUGIN, STORESCU) or not CT.is_file(),
    reason="Orthanc with DICOMweb, dcmtk's storescu and the real DICOM samples are needed (make system-deps)",
)
IDENTITY = AlgorithmIdentity(name="xray-route", version="0123456789ab", weights_sha256=("cd" * 32,))
FAST = RetryPolicy(attempts=3, base_seconds=0.0, max_seconds=0.0)


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def broken_dataset(study_uid: str) -> Dataset:
    """A CR whose JPEG 2000 codestream is garbage: the header is fine, no decoder can read the pixels."""
    ds = make_dataset(ramp(), study_uid=study_uid)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x13" * 200])
    ds["PixelData"].VR = "OB"
    return ds


def answer_for(ds: Dataset, response: InferenceResponse) -> bytes:
    return to_part10(image_sr(ds, response, IDENTITY))


ANSWERED = InferenceResponse(region="hand", confidence=0.9, probabilities={"hand": 0.9}, dicom_region="hand",
                             model_name="xray-route", model_version="0123456789ab")  # fmt: skip
REFUSED = InferenceResponse(region=None, confidence=None, applicable=False, refusal_reason="not_radiograph",
                            refusal_detail="modality CT", model_name="xray-route", model_version="0123456789ab")


class FakeEndpoint:
    """Answers like the endpoint from the files it is given (real SRs); `fail` is a list of
    EndpointErrors raised by the next calls, `bad` marks files it rejects (a 400 for the request)."""

    def __init__(self, fail=(), bad=b"BROKEN") -> None:
        self.fail, self.bad, self.calls = list(fail), bad, []

    def __call__(self, blobs: list[bytes]) -> EndpointAnswer:
        self.calls.append(len(blobs))
        if self.fail:
            raise self.fail.pop(0)
        if any(self.bad in b for b in blobs):
            raise EndpointError("rejected", "endpoint_rejected_decode_failed", "HTTP 400: element 0 is not usable DICOM")
        datasets = [dcmread(io.BytesIO(b)) for b in blobs]
        responses = [REFUSED if d.Modality == "CT" else ANSWERED for d in datasets]
        return EndpointAnswer(responses, [answer_for(d, r) for d, r in zip(datasets, responses)])


class FakeStore:
    def __init__(self, fail=()) -> None:
        self.fail, self.stored = list(fail), []

    def __call__(self, srs: list[bytes]) -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.stored += [from_part10(s) for s in srs]


def study_of(datasets: list[Dataset], node_key: str = KEY) -> Study:
    from xrayops.dicom.deid import pseudonymize

    uid = datasets[0].StudyInstanceUID
    return Study(uid, pseudonymize(uid, node_key, "stu-"),
                 [ReceivedInstance(d.SOPInstanceUID, part10(d), pseudonymize(d.SOPInstanceUID, node_key, "img-"))
                  for d in datasets])  # fmt: skip


# ---------------------------------------------------------------- grouping, retries, dead letter


def test_a_study_is_complete_after_the_quiet_period_and_the_grouper_is_bounded():
    now = [0.0]
    grouper = StudyGrouper(quiet_seconds=5, max_instances=3, clock=lambda: now[0])
    one = lambda uid: ReceivedInstance(uid, b"x", "img-" + uid)  # noqa: E731
    assert grouper.add("1.2.3", "stu-a", one("1")) and grouper.add("1.2.4", "stu-b", one("2"))
    now[0] = 4.0
    assert grouper.add("1.2.3", "stu-a", one("3"))  # study a heard from again at t=4
    assert grouper.add("1.2.3", "stu-a", one("3"))  # a resend replaces, holds no more
    assert not grouper.add("1.2.5", "stu-c", one("4")) and grouper.held == 3  # full: the SCP says out of resources
    now[0] = 5.0
    assert [s.study_id for s in grouper.complete()] == ["stu-b"]  # quiet since t=0
    now[0] = 9.0
    (a,) = grouper.complete()
    assert a.study_id == "stu-a" and [i.sop_instance_uid for i in a.instances] == ["1", "3"] and grouper.held == 0
    assert grouper.add("1.2.6", "stu-d", one("5")) and [s.study_id for s in grouper.drain()] == ["stu-d"]
    by_bytes = StudyGrouper(quiet_seconds=5, max_instances=100, clock=lambda: now[0], max_bytes=10)
    big = lambda uid, n: ReceivedInstance(uid, b"x" * n, "img-" + uid)  # noqa: E731
    assert by_bytes.add("1.2.7", "stu-e", big("6", 6)) and not by_bytes.add("1.2.7", "stu-e", big("7", 5))
    assert by_bytes.add("1.2.7", "stu-e", big("6", 10))  # a resend replaces: 10 bytes held, not 16
    assert not by_bytes.add("1.2.8", "stu-f", big("8", 1))
    by_bytes.drain()
    assert by_bytes.add("1.2.8", "stu-f", big("8", 10))  # drained: the bytes are free again


def test_backoff_grows_exponentially_with_full_jitter_and_only_retryable_failures_are_retried():
    policy = RetryPolicy(attempts=4, base_seconds=1.0, max_seconds=3.0)
    assert [policy.ceiling(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    rng = random.Random(0)
    assert all(0.0 <= policy.delay(n, rng) <= policy.ceiling(n) for n in range(1, 6) for _ in range(50))

    waits, outcomes = [], [EndpointError("retryable", "endpoint_http_503"), EndpointError("retryable", "endpoint_timeout")]

    def flaky():
        if outcomes:
            raise outcomes.pop(0)
        return "answer"

    assert with_retries(flaky, policy, sleep=waits.append, rng=random.Random(1)) == ("answer", 3)
    assert len(waits) == 2 and waits[0] <= 1.0 and waits[1] <= 2.0

    calls = []

    def rejected():
        calls.append(1)
        raise EndpointError("rejected", "endpoint_rejected_http_400")

    with pytest.raises(EndpointError) as caught:
        with_retries(rejected, policy, sleep=waits.append)
    assert len(calls) == 1 and caught.value.attempts == 1

    def down():
        raise StoreError("retryable", "pacs_unreachable")

    with pytest.raises(StoreError) as caught:
        with_retries(down, policy, sleep=lambda _: None)
    assert caught.value.attempts == 4


def test_dead_letter_items_are_named_by_pseudonym_owner_only_with_a_reason_file(tmp_path):
    ds = make_dataset(ramp())
    study = study_of([ds])
    folder = DeadLetter(tmp_path / "dead").put(study.study_id, "endpoint", "endpoint_rejected_decode_failed", "rejected",
                                               1, "HTTP 400:\n element 0\tis not usable", instances=study.instances,
                                               image_id=study.instances[0].image_id)  # fmt: skip
    assert re.fullmatch(r"\d{8}T\d{12}Z-stu-[0-9a-f]{16}-endpoint-img-[0-9a-f]{16}", folder.name)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (kept,) = (folder / "instances").iterdir()
    assert kept.name == f"{study.instances[0].image_id}.dcm" and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_bytes() == study.instances[0].data
    ((path, reason),) = DeadLetter(tmp_path / "dead").items()
    assert path == folder and reason.reason == "endpoint_rejected_decode_failed" and reason.stage == "endpoint"
    assert reason.detail == "HTTP 400: element 0 is not usable" and reason.image_ids == [study.instances[0].image_id]
    assert not list((tmp_path / "dead" / ".incoming").iterdir())
    source = tmp_path / "source.dcm"
    source.write_bytes(part10(ds))
    hits = scan([tmp_path / "dead"], collect_secrets([source]))
    assert [h for h in hits if h.location in ("file name", "text")] == []  # the names and reason.json; the .dcm is PHI


# ---------------------------------------------------------------- the node's logic


def node_with(endpoint, store, tmp_path, **options) -> RouteNode:
    opts = NodeOptions(**{"quiet_seconds": 0.2, "retry": FAST, **options})
    return RouteNode(endpoint, store, DeadLetter(tmp_path / "dead"), KEY, opts, sleep=lambda _: None)


def test_one_bad_file_is_isolated_dead_lettered_and_the_rest_of_the_study_is_reported(tmp_path):
    study_uid = generate_uid()
    good = [make_dataset(ramp(), study_uid=study_uid, body_part=p) for p in ("HAND", "KNEE")]
    bad = make_dataset(ramp(), study_uid=study_uid, StudyDescription="BROKEN")
    endpoint, store = FakeEndpoint(), FakeStore()
    node = node_with(endpoint, store, tmp_path)
    outcome = node.process(study_of([good[0], bad, good[1]]))
    assert endpoint.calls == [3, 1, 1, 1]  # the request, then each file alone
    assert (outcome.answered, outcome.refused, outcome.stored, outcome.dead_lettered) == (2, 0, 1, 1)
    (sr,) = store.stored  # one study SR over the two good images
    refs = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in find_content_items(sr, value_type="IMAGE", recursive=True)}
    assert refs == {d.SOPInstanceUID for d in good} and sr.StudyInstanceUID == study_uid
    ((folder, reason),) = node.dead_letter.items()
    assert reason.reason == "endpoint_rejected_decode_failed" and reason.stage == "endpoint"
    assert (folder / "instances" / f"{reason.image_ids[0]}.dcm").read_bytes() == part10(bad)
    assert node.metrics.failed.labels("endpoint", "endpoint_rejected_decode_failed")._value.get() == 1


def test_refused_images_are_reported_not_applicable_and_per_image_srs_when_asked(tmp_path):
    ct = dcmread(CT) if CT.is_file() else make_dataset(ramp(), Modality="CT")
    store = FakeStore()
    node = node_with(FakeEndpoint(), store, tmp_path, sr_per="image")
    outcome = node.process(study_of([ct]))
    assert (outcome.refused, outcome.stored, outcome.dead_lettered) == (1, 1, 0)
    (sr,) = store.stored
    item = find_content_items(sr, name=c.REFUSAL_REASON, recursive=True)[0]
    assert item.ConceptCodeSequence[0].CodeValue == "not_radiograph"
    assert node.metrics.refused.labels("not_radiograph")._value.get() == 1


def test_retryable_failures_are_retried_and_what_keeps_failing_is_dead_lettered_with_its_reason(tmp_path):
    ds = make_dataset(ramp())
    flaky = FakeEndpoint(fail=[EndpointError("retryable", "endpoint_http_503")])
    down = FakeStore(fail=[StoreError("retryable", "pacs_unreachable", "association rejected")] * 3)
    node = node_with(flaky, down, tmp_path)
    outcome = node.process(study_of([ds]))
    assert flaky.calls == [1, 1] and outcome.answered == 1  # the 503 was retried
    assert (outcome.stored, outcome.dead_lettered, outcome.reasons) == (0, 1, ["pacs_unreachable"])
    ((folder, reason),) = node.dead_letter.items()
    assert (reason.stage, reason.reason, reason.kind, reason.attempts) == ("store", "pacs_unreachable", "retryable", 3)
    (kept,) = (folder / "srs").iterdir()
    assert from_part10(kept.read_bytes()).StudyInstanceUID == ds.StudyInstanceUID  # the SR, ready to resend
    assert node.metrics.retries.labels("endpoint")._value.get() == 1
    assert node.metrics.retries.labels("store")._value.get() == 2

    refused = node_with(FakeEndpoint(fail=[EndpointError("refused", "endpoint_unauthorized", "HTTP 401")]), FakeStore(),
                        tmp_path / "other")  # fmt: skip
    outcome = refused.process(study_of([ds, make_dataset(ramp(), study_uid=ds.StudyInstanceUID)]))
    assert outcome.reasons == ["endpoint_unauthorized"] and outcome.dead_lettered == 2  # not retried, not split
    ((folder, reason),) = refused.dead_letter.items()
    assert reason.kind == "refused" and len(list((folder / "instances").iterdir())) == 2


def test_the_running_node_groups_processes_and_on_stop_processes_what_is_open(tmp_path):
    store = FakeStore()
    node = node_with(FakeEndpoint(), store, tmp_path, quiet_seconds=30)
    node.start()
    try:
        ds = make_dataset(ramp())
        assert node.receive(ds.StudyInstanceUID, ds.SOPInstanceUID, part10(ds))
        assert node.health()["status"] == "ok" and node.health()["instances_held"] == 1
    finally:
        node.stop()  # the study never went quiet: stop processes it instead of losing it
    assert [s.StudyInstanceUID for s in store.stored] == [ds.StudyInstanceUID]
    assert node.health()["status"] == "stopped"


# ---------------------------------------------------------------- the edges


def test_scp_holds_instances_refuses_past_its_limits_and_the_health_server_reports(tmp_path):
    node = node_with(FakeEndpoint(), FakeStore(), tmp_path, quiet_seconds=60, max_pending_instances=2)
    port, health_port = free_port(), free_port()
    scp = start_scp(node, "127.0.0.1", port, "ROUTE_TEST", max_associations=1)
    health = start_health_server("127.0.0.1", health_port, node.health, node.metrics.registry)
    node.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        first = ae.associate("127.0.0.1", port, ae_title="ROUTE_TEST")
        assert first.is_established
        second = ae.associate("127.0.0.1", port, ae_title="ROUTE_TEST")  # over the association limit
        assert second.is_rejected
        study = generate_uid()
        statuses = [first.send_c_store(make_dataset(ramp(), study_uid=study)).Status for _ in range(3)]
        no_study = make_dataset(ramp())
        del no_study.StudyInstanceUID
        statuses.append(first.send_c_store(no_study).Status)
        first.release()
        assert statuses == [0x0000, 0x0000, 0xA700, 0xC000]
        body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=5).read())
        assert body["status"] == "ok" and body["instances_held"] == 2 and body["open_studies"] == 1
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=5).read().decode()
        assert "xrayops_route_instances_received_total 2.0" in metrics
        assert "xrayops_route_instances_busy_total 1.0" in metrics
        assert 'xrayops_route_failures_total{reason="no_study_instance_uid",stage="receive"} 1.0' in metrics
    finally:
        scp.shutdown()
        node.stop()
        with pytest.raises(urllib.error.HTTPError) as down:
            urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=5)
        assert down.value.code == 503
        health.shutdown()
        health.server_close()


def test_pacs_store_stores_srs_and_classes_its_failures(tmp_path):
    received, statuses = [], [0x0000]

    def handle(event):
        received.append(event.dataset)
        return statuses[0]

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(ComprehensiveSRStorage)
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        sr = answer_for(make_dataset(ramp()), ANSWERED)
        PacsStore("127.0.0.1", port, "PACS", "XRAYOPS_ROUTE")([sr])
        assert received[0].SOPInstanceUID == from_part10(sr).SOPInstanceUID
        statuses[0] = 0xA700
        with pytest.raises(StoreError) as caught:
            PacsStore("127.0.0.1", port, "PACS", "XRAYOPS_ROUTE")([sr])
        assert (caught.value.kind, caught.value.reason) == ("retryable", "pacs_out_of_resources")
        statuses[0] = 0xC000
        with pytest.raises(StoreError) as caught:
            PacsStore("127.0.0.1", port, "PACS", "XRAYOPS_ROUTE")([sr])
        assert (caught.value.kind, caught.value.reason) == ("rejected", "pacs_refused")
    finally:
        server.shutdown()
    with pytest.raises(StoreError) as caught:
        PacsStore("127.0.0.1", port, "PACS", "XRAYOPS_ROUTE", timeout=5)([sr])
    assert (caught.value.kind, caught.value.reason) == ("retryable", "pacs_unreachable")


def test_endpoint_client_sends_the_bearer_token_and_classes_http_failures():
    seen, replies = [], []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return replies.pop(0)

    client = EndpointClient("http://endpoint.test", "xray-route", token="s3cr3t-token", transport=httpx.MockTransport(handler))
    try:
        cases = [
            (httpx.Response(400, json={"error": "input 'dicom' element 0 is not usable DICOM (decode_failed: bad)"}),
             "rejected", "endpoint_rejected_decode_failed"),
            (httpx.Response(413, json={"error": "too large"}), "rejected", "endpoint_rejected_http_413"),
            (httpx.Response(401, json={"error": "no"}), "refused", "endpoint_unauthorized"),
            (httpx.Response(503, text="overloaded"), "retryable", "endpoint_http_503"),
        ]  # fmt: skip
        for response, kind, reason in cases:
            replies.append(response)
            with pytest.raises(EndpointError) as caught:
                client([b"DICM"])
            assert (caught.value.kind, caught.value.reason) == (kind, reason)
        assert seen == ["Bearer s3cr3t-token"] * len(cases)
    finally:
        client.close()
    unreachable = EndpointClient(f"http://127.0.0.1:{free_port()}", "xray-route", timeout=5)
    try:
        with pytest.raises(EndpointError) as caught:
            unreachable([b"DICM"])
        assert (caught.value.kind, caught.value.reason) == ("retryable", "endpoint_unreachable")
    finally:
        unreachable.close()


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("route-serve")
    server = start_server_process(make_bundle(root / "bundle"), model_name="xray-route", log_path=root / "inference-log",
                                  output_path=root / "server.log", enable_grpc=False)  # fmt: skip
    server.root = root
    try:
        yield server
    finally:
        server.stop()


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, dict]:
    """Orthanc as tests/test_sources.py runs it: its own config in tmp, DICOMweb plugin, loopback only."""
    http_port, dicom_port = free_port(), free_port()
    config = {"Name": "xrayops-route-test", "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "HttpPort": http_port, "DicomPort": dicom_port,
              "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "DicomCheckCalledAet": True, "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(http_port, proc)
    wait_for_port(dicom_port, proc)
    return proc, {"http": f"http://127.0.0.1:{http_port}", "dicom_port": dicom_port}


def qido(orthanc: dict, path: str) -> list[dict]:
    answer = httpx.get(f"{orthanc['http']}/dicom-web/{path}", timeout=30, headers={"Accept": "application/dicom+json"})
    answer.raise_for_status()
    return answer.json() if answer.content else []


def wado(orthanc: dict, study: str, series: str, instance: str) -> Dataset:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(f"{orthanc['http']}/dicom-web").retrieve_instance(study, series, instance)


def srs_in(orthanc: dict, study: str) -> list[Dataset]:
    """The study's SR instances, found by QIDO-RS (series by Modality=SR), fetched by WADO-RS."""
    out = []
    for series in qido(orthanc, f"studies/{study}/series?Modality=SR"):
        series_uid = series["0020000E"]["Value"][0]
        for instance in qido(orthanc, f"studies/{study}/series/{series_uid}/instances"):
            out.append(wado(orthanc, study, series_uid, instance["00080018"]["Value"][0]))
    return out


def wait_until(check, timeout: float = 90.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def screenshot(orthanc: dict, study_uid: str, out: Path) -> None:
    """Orthanc's explorer showing the SR instance (headless chromium), when XRAYOPS_SR_SCREENSHOT names a file."""
    found = httpx.post(f"{orthanc['http']}/tools/find", timeout=30,
                       json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}).json()  # fmt: skip
    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
    if not found or chromium is None:
        return
    url = f"{orthanc['http']}/app/explorer.html#instance?uuid={found[0]}"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--virtual-time-budget=8000", f"--screenshot={out}", "--window-size=1200,900", url],
                   capture_output=True, timeout=120)  # fmt: skip


@needs_e2e
def test_storescu_to_route_to_serve_to_orthanc_with_bad_input_and_the_pacs_down(served, tmp_path):
    orthanc_proc, orthanc = start_orthanc(tmp_path / "orthanc")
    route_port, health_port = free_port(), free_port()
    dead = tmp_path / "dead-letter"
    env = {**os.environ, "XRAYOPS_DEID_KEY": KEY, "XRAYOPS_PROGRESS": "0", "XRAYOPS_ROUTE_TOKEN": "route-token-0001",
           "XRAYOPS_ROUTE_RETRY_ATTEMPTS": "2", "XRAYOPS_ROUTE_RETRY_BASE_SECONDS": "0.2"}  # fmt: skip
    node_log = (tmp_path / "route.log").open("w")
    route = subprocess.Popen(
        [sys.executable, "-m", "xrayops.app.cli", "route", "--host", "127.0.0.1", "--port", str(route_port),
         "--ae-title", "XRAYOPS_ROUTE", "--endpoint", served.url, "--model-name", "xray-route",
         "--pacs-port", str(orthanc["dicom_port"]), "--pacs-ae-title", "ORTHANC", "--quiet-seconds", "1",
         "--dead-letter", str(dead), "--health-port", str(health_port)],
        stdout=node_log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        wait_for_port(route_port, route, timeout=120)
        # A small study: two radiographs (the patient's identifiers in them) and a file no decoder can read.
        study_uid = generate_uid()
        inputs = tmp_path / "inputs"
        good = [make_dataset(ramp(60 + 8 * i, 52), study_uid=study_uid, body_part=p, PatientName="Weiss^Kassandra",
                             PatientID="ROUTE-PID-31337", AccessionNumber="ACC-ROUTE-99")
                for i, p in enumerate(("HAND", "KNEE"))]  # fmt: skip
        files = []
        for i, ds in enumerate(good + [broken_dataset(study_uid)]):
            files.append(inputs / f"Kassandra_{i}.dcm")
            files[-1].parent.mkdir(exist_ok=True)
            ds.save_as(files[-1], enforce_file_format=True)
        sent = subprocess.run([STORESCU, "-aec", "XRAYOPS_ROUTE", "127.0.0.1", str(route_port), *map(str, files[:2])],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        sent = subprocess.run([STORESCU, "-xv", "-aec", "XRAYOPS_ROUTE", "127.0.0.1", str(route_port), str(files[2])],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        # A real CT: its own study, which the admission policy refuses.
        sent = subprocess.run([STORESCU, "-xs", "-aec", "XRAYOPS_ROUTE", "127.0.0.1", str(route_port), str(CT)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr

        (sr,) = wait_until(lambda: srs_in(orthanc, study_uid), what="the study's SR in Orthanc")
        assert sr.StudyInstanceUID == study_uid and sr.Modality == "SR" and sr.PatientID == "ROUTE-PID-31337"
        refs = {(i.ReferencedSOPSequence[0].ReferencedSOPClassUID, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                for i in find_content_items(sr, value_type="IMAGE", recursive=True)}  # fmt: skip
        assert refs == {(d.SOPClassUID, d.SOPInstanceUID) for d in good}  # the broken file is not in it
        regions = [i.ConceptCodeSequence[0].CodeValue for i in find_content_items(sr, name=codes.DCM.TargetRegion, recursive=True)]
        assert len(regions) == 2 and set(regions) <= {code.value for code in c.region_codes().values()}
        assert [i.TextValue for i in find_content_items(sr, name=codes.DCM.AlgorithmName, recursive=True)] == ["xray-route"] * 2

        ct = dcmread(CT, stop_before_pixels=True)
        (ct_sr,) = wait_until(lambda: srs_in(orthanc, ct.StudyInstanceUID), what="the CT's SR in Orthanc")
        (reason,) = find_content_items(ct_sr, name=c.REFUSAL_REASON, recursive=True)
        assert reason.ConceptCodeSequence[0].CodeValue == "not_radiograph"
        if os.environ.get("XRAYOPS_SR_SCREENSHOT"):
            screenshot(orthanc, study_uid, Path(os.environ["XRAYOPS_SR_SCREENSHOT"]))

        # The broken file: in the log and the dead-letter folder with its reason, never dropped silently.
        items = wait_until(lambda: DeadLetter(dead).items(), what="the dead-lettered file")
        ((folder, why),) = items
        assert why.stage == "endpoint" and why.reason.startswith("endpoint_rejected_") and why.kind == "rejected"
        kept, original = dcmread(folder / "instances" / f"{why.image_ids[0]}.dcm"), dcmread(files[2])
        assert kept.SOPInstanceUID == original.SOPInstanceUID and kept.PixelData == original.PixelData  # as sent

        # The PACS goes down: the next study's SR is retried, then kept with its reason.
        stop_process(orthanc_proc)
        late = make_dataset(ramp(), body_part="FOOT", PatientName="Weiss^Kassandra", PatientID="ROUTE-PID-31337")
        files.append(inputs / "Kassandra_late.dcm")
        late.save_as(files[-1], enforce_file_format=True)
        sent = subprocess.run([STORESCU, "-aec", "XRAYOPS_ROUTE", "127.0.0.1", str(route_port), str(files[-1])],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        stored = wait_until(lambda: [i for i in DeadLetter(dead).items() if i[1].stage == "store"], what="the store failure")
        ((folder, why),) = stored
        assert (why.reason, why.kind, why.attempts) == ("pacs_unreachable", "retryable", 2)
        (kept,) = (folder / "srs").iterdir()
        assert from_part10(kept.read_bytes()).StudyInstanceUID == late.StudyInstanceUID

        health = httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        metrics = httpx.get(f"http://127.0.0.1:{health_port}/metrics", timeout=10).text
        for line in ("xrayops_route_instances_received_total 5.0", "xrayops_route_images_answered_total 3.0",
                     'xrayops_route_images_refused_total{reason="not_radiograph"} 1.0',
                     "xrayops_route_srs_stored_total 2.0",
                     'xrayops_route_failures_total{reason="pacs_unreachable",stage="store"} 1.0'):  # fmt: skip
            assert line in metrics, line
        assert re.search(r'xrayops_route_failures_total\{reason="endpoint_rejected_\w+",stage="endpoint"\} 1.0', metrics)
    finally:
        stop_process(route, timeout=60)
        node_log.close()
        if orthanc_proc.poll() is None:
            stop_process(orthanc_proc)
    text = (tmp_path / "route.log").read_text()
    assert re.search(r"route\.dead_letter .*reason=endpoint_rejected_\w+", text), text[-3000:]
    assert re.search(r"route\.dead_letter .*reason=pacs_unreachable", text) and "route.not_applicable" in text
    assert "route-token-0001" not in text
    # Identifiers stay in the SRs and the PACS: the node's log, the dead-letter names and reasons and the
    # inference log hold none.
    secrets = collect_secrets(files, tmp_path) | collect_secrets([CT])
    hits = scan_text("route log", text, secrets)
    hits += scan([served.root / "inference-log"], secrets)
    hits += [h for h in scan([dead], secrets) if h.location in ("file name", "text")]
    hits += scan_text("server output", served.output_tail(200_000), secrets)
    assert not hits, report(hits)


# ---------------------------------------------------------------- the cluster manifests


@pytest.mark.skipif(__import__("shutil").which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_the_route_manifests_open_only_the_nodes_flows_and_nothing_in_the_mesh_calls_it():
    from k8s_policies import Endpoint, Request, mesh_allows, network_allows

    from xrayops import deploy

    root = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "overlays"
    for overlay in ("local", "gpu-cloud"):
        docs = deploy.parse_manifests(deploy.kustomize(root / overlay))
        route = deploy.find(docs, "Deployment", "xrayops-route")
        labels = route["spec"]["template"]["metadata"]["labels"]
        node = Endpoint(labels, name="route")
        pacs, modality = Endpoint(ip="10.20.0.15", name="pacs"), Endpoint(ip="192.168.7.20", name="modality")
        gateway = Endpoint({"app": "istio-ingressgateway", "istio": "ingressgateway"}, "istio-system", name="gateway")
        ok = lambda src, dst, port: network_allows(docs, src, dst, port)  # noqa: E731
        assert ok(modality, node, 11113) and ok(pacs, node, 11113)
        assert ok(node, pacs, 104) and ok(node, gateway, 8443) and ok(node, Endpoint(ip="34.1.2.3"), 443)
        assert not ok(Endpoint(ip="8.8.8.8"), node, 11113)  # not from outside the hospital's networks
        assert not ok(Endpoint({"app": "anything"}, "default"), node, 11113) and not ok(gateway, node, 8095)
        mlflow = Endpoint({"app.kubernetes.io/name": "mlflow"}, name="mlflow")
        assert not ok(node, mlflow, 5000) and not ok(node, Endpoint(ip="169.254.169.254"), 443)
        assert not ok(node, Endpoint(ip="8.8.8.8"), 104)
        # The mesh: no caller, not even the gateway under a namespace-wide ALLOW another controller adds.
        owner = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": "ns-owner-access-istio", "namespace": "xrayops"},
                 "spec": {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/istio-system/sa/gw"]}}]}]}}
        for policies in (docs, docs + [owner]):
            assert not mesh_allows(policies, labels, Request(principal="cluster.local/ns/istio-system/sa/gw",
                                                             method="GET", path="/metrics", port=8095))
        pod = route["spec"]["template"]
        assert pod["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeInboundPorts"] == "11113"
        container = deploy.containers(route)[0]
        assert container["args"][0] == "route" and not pod["spec"]["automountServiceAccountToken"]
        env = {e["name"]: e for e in container["env"]}
        assert env["XRAYOPS_DEID_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "xrayops-deid", "key": "key"}
        assert env["XRAYOPS_ROUTE_TOKEN_FILE"]["value"] == "/run/secrets/xrayops-route/token"
        (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("xrayops-route")]
        assert config["data"]["XRAYOPS_ROUTE_ENDPOINT"].endswith(".invalid")  # nothing is sent until the site says where
