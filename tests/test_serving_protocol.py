"""The endpoint against clients this project did not write, and the guards a client's mistakes meet.

NVIDIA's tritonclient (HTTP binary, HTTP JSON without a Content-Type, gRPC) checks server and
model metadata, versions, requested outputs and inference; then chunked over-limit bodies, quiet
client errors, out-of-range pixels, oversized batches, and an inference log that is buffered yet
loses nothing when the server gets SIGTERM."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.harness import start_server_process
from tests.test_serving_support import make_bundle, make_dicom
from xrayops.inference_log import log_parts, read_log
from xrayops.regions import REGIONS

NAME = "xray-protocol"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def server(bundle):
    # A 2 MB body limit, so that an over-limit chunked body is cheap to send.
    server = start_server_process(bundle, model_name=NAME, env={"XRAYOPS_SERVE_MAX_REQUEST_MB": "2"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def triton(server, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("dicom")
    files = []
    for i, part in enumerate(("HAND", "KNEE")):
        path = folder / f"{i}.dcm"
        path.write_bytes(make_dicom(body_part=part, seed=40 + i))
        files.append(str(path))
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "clients" / "triton_checks.py"), server.url.removeprefix("http://"),
         server.grpc_address, NAME, *files],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tritonclient_reads_server_and_model_metadata(triton):
    assert triton["http_server"]["name"] == triton["grpc_server"]["name"] == "kserve"
    for meta in (triton["http_model"], triton["grpc_model"]):
        assert meta["name"] == NAME and meta["versions"] == [triton["version"]]
        assert {"dicom", "pixels"} <= {i["name"] for i in meta["inputs"]}
        assert {"region", "probabilities", "applicable"} <= {o["name"] for o in meta["outputs"]}
    assert len(triton["version"]) == 12


def test_tritonclient_infers_over_http_binary_http_json_and_grpc(triton):
    answers = [triton[k] for k in ("http_binary", "http_json", "grpc")]
    assert all(a["ok"] for a in answers), answers
    regions = [a["value"]["region"] for a in answers]
    assert regions[0] == regions[1] == regions[2] and all(r in REGIONS for r in regions[0])
    np.testing.assert_allclose(answers[0]["value"]["probabilities"], answers[2]["value"]["probabilities"], atol=1e-6)
    np.testing.assert_allclose(answers[0]["value"]["probabilities"], answers[1]["value"]["probabilities"], atol=1e-6)


def test_requested_outputs_are_honoured_on_both_protocols(triton):
    assert triton["http_requested"]["value"]["outputs"] == ["region", "confidence"]
    assert triton["http_json_requested"]["value"]["outputs"] == ["region"]
    assert triton["grpc_requested"]["value"]["outputs"] == ["region", "confidence"]
    assert triton["http_unknown_output"] == {**triton["http_unknown_output"], "ok": False, "status": "400"}
    assert "no_such_output" in triton["http_unknown_output"]["message"]
    assert triton["grpc_unknown_output"]["ok"] is False
    assert triton["grpc_unknown_output"]["status"] == "StatusCode.INVALID_ARGUMENT"


def test_the_served_version_is_accepted_and_any_other_is_not_found(triton):
    assert triton["http_model_version"] == {"ok": True, "value": NAME}
    assert triton["http_version"]["ok"] and triton["grpc_version"]["ok"]
    assert triton["http_ready_version"] is True and triton["grpc_ready_version"] is True
    assert triton["http_ready_bad_version"] is False
    for key in ("http_model_bad_version", "http_bad_version"):
        assert triton[key]["ok"] is False and triton[key]["status"] == "404", triton[key]
        assert "no-such" in triton[key]["message"]
    for key in ("grpc_model_bad_version", "grpc_bad_version"):
        assert triton[key]["ok"] is False and triton[key]["status"] == "StatusCode.NOT_FOUND", triton[key]


def test_an_over_limit_chunked_body_is_a_413(server):
    def chunks():
        for _ in range(48):
            yield b"\0" * 65536  # 3 MB in all, over the 2 MB limit, with no Content-Length

    response = httpx.post(f"{server.url}/v2/models/{NAME}/infer", content=chunks(),
                          headers={"content-type": "application/octet-stream"}, timeout=60)
    assert response.status_code == 413 and "over the limit" in response.json()["error"]


def test_client_errors_are_one_log_line_without_a_traceback(server):
    for body in ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["Doe^Jane"]}]},
                 {"inputs": [{"name": "dicom", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}):
        assert httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=60).status_code == 400
    assert httpx.get(f"{server.url}/v2/models/{NAME}/versions/no-such", timeout=30).status_code == 404
    time.sleep(0.5)
    output = server.output_tail(200_000)
    assert "client error" in output
    assert "Traceback" not in output and "Doe^Jane" not in output


@pytest.mark.parametrize(
    "values, message",
    [
        (np.full((1, 32, 32), 3000.0, dtype=np.float32), "within [0, 1]"),  # raw 12-bit values
        (np.full((1, 32, 32), -0.5, dtype=np.float32), "within [0, 1]"),
        (np.full((257, 32, 32), 0.5, dtype=np.float32), "at most 256 per request"),
    ],
)
def test_pixels_out_of_range_and_oversized_batches_are_400s(server, values, message):
    body = {"inputs": [{"name": "pixels", "shape": list(values.shape), "datatype": "FP32",
                        "data": values.ravel().tolist()}]}
    response = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=120)
    assert response.status_code == 400 and message in response.json()["error"]


def test_the_inference_log_is_buffered_and_flushed_on_sigterm(bundle, tmp_path):
    log_path = tmp_path / "inference-log"
    server = start_server_process(bundle, model_name=NAME, log_path=log_path, enable_grpc=False,
                                  env={"XRAYOPS_SERVE_LOG_FLUSH_RECORDS": "4", "XRAYOPS_SERVE_LOG_FLUSH_SECONDS": "3600"})
    try:
        body = {"instances": [{"b64": __import__("base64").b64encode(make_dicom(seed=60 + i)).decode()}
                              for i in range(3)]}
        for _ in range(3):  # 9 records: one part of 6 written when 4 or more waited, then 3 waiting
            assert httpx.post(f"{server.url}/v1/models/{NAME}:predict", json=body, timeout=60).status_code == 200
        deadline = time.monotonic() + 30
        while not log_parts(log_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(log_parts(log_path)) == 1 and len(read_log(log_path)) == 6
    finally:
        code = server.stop()
    assert code == 0
    assert len(read_log(log_path)) == 9, "records waiting in the buffer were lost on SIGTERM"
    assert len(log_parts(log_path)) == 2
