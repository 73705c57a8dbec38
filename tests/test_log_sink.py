"""The inference-log sink (`xrayops log-sink`) fed the CloudEvents KServe's payload logger sends.

The events are real: the request body is what the DICOM transformer sends the predictor
(`pixels_request(...).to_rest()`), the response body is what a running predictor answered to it
over plain HTTP. The sink's parquet rows must equal the rows the predictor logged locally for
the same request: one record builder, one writer.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.schema import PARAM_EMBEDDING, infer_request_from_binary
from serving.harness import free_port, start_server_process
from serving.transformer import DecodeLimits, RequestDecoder, pixels_request
from test_serving_support import make_bundle, make_dicom
from xrayops.bundle_meta import read_bundle_meta
from xrayops.inference_log import read_log
from tests.conftest import stop_process

NAME = "xray-sink"
KEY = "sink-test-key-not-secret"
REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
SOP_UIDS = ["1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1002"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("sink-bundle") / "bundle", seed=3)


# Buffering is tested on its own (tests/test_log_buffer.py); here each event's rows are written at once.
WRITE_EACH_EVENT = {"XRAYOPS_SERVE_LOG_FLUSH_RECORDS": "1"}


@pytest.fixture(scope="module")
def predictor(bundle, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("predictor") / "inference-log"
    server = start_server_process(bundle, model_name=NAME, log_path=log_path, enable_grpc=False,
                                  env={"XRAYOPS_DEID_KEY": KEY, **WRITE_EACH_EVENT})
    server.log_path = log_path
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    """`xrayops log-sink` as hospital IT's cluster runs it, on 127.0.0.1; stopped by PID."""
    log_path = tmp_path_factory.mktemp("sink") / "inference-log"
    port = free_port()
    cli = Path(sys.executable).parent / "xrayops"
    output = tmp_path_factory.mktemp("sink-out") / "sink.log"
    with open(output, "wb") as out:
        process = subprocess.Popen([str(cli), "log-sink", "--log-path", str(log_path), "--port", str(port),
                                    "--max-event-mb", "4"], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **WRITE_EACH_EVENT})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, output.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"sink not healthy:\n{output.read_text()}")
        yield type("Sink", (), {"url": url, "log_path": log_path, "pid": process.pid})
    finally:
        stop_process(process, timeout=20)


def transformer_request(bundle: Path, request_id: str) -> bytes:
    """The JSON body the DICOM transformer posts to the predictor for two DICOM files."""
    blobs = [make_dicom(SOP_UIDS[0], "HAND", seed=21), make_dicom(SOP_UIDS[1], "KNEE", seed=22)]
    decoder = RequestDecoder(read_bundle_meta(bundle).preprocessing, DecodeLimits(), KEY)
    body = {"id": request_id, "inputs": [{"name": "dicom", "shape": [2], "datatype": "BYTES",
                                          "data": [base64.b64encode(b).decode() for b in blobs]}]}
    raw = json.dumps(body).encode()
    batch = decoder(infer_request_from_binary(raw, len(raw), NAME), {})
    payload, json_length = pixels_request(NAME, batch).to_rest()
    assert json_length is None  # JSON, as the transformer sends it
    return json.dumps(payload).encode()


def event_headers(ce_id: str, ce_type: str) -> dict:
    """Binary-mode CloudEvent headers as KServe's agent (payload logger) sets them."""
    return {
        "content-type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": ce_id,
        "ce-type": ce_type,
        "ce-source": "http://localhost:9081/",
        "ce-time": "2026-11-23T09:00:00.123456Z",
        "ce-inferenceservicename": "xrayops-region",
        "ce-namespace": "xrayops",
        "ce-component": "predictor",
        "ce-endpoint": "",
    }


@pytest.fixture(scope="module")
def logged_pair(bundle, predictor):
    """(request body, response body, request id) for one real predictor call."""
    request_id = f"req-{uuid.uuid4().hex[:8]}"
    request = transformer_request(bundle, request_id)
    answer = httpx.post(f"{predictor.url}/v2/models/{NAME}/infer", content=request,
                        headers={"content-type": "application/json"}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert "embedding" in {o["name"] for o in answer.json()["outputs"]}
    return request, answer.content, request_id


def post(sink, body: bytes, headers: dict) -> httpx.Response:
    return httpx.post(f"{sink.url}/", content=body, headers=headers, timeout=60)


def test_a_logged_pair_becomes_the_same_rows_as_local_serving(sink, predictor, logged_pair):
    request, response, request_id = logged_pair
    first = post(sink, request, event_headers("ev-1", REQUEST_TYPE))
    assert first.status_code == 202 and first.json()["status"] == "pending"
    second = post(sink, response, event_headers("ev-1", RESPONSE_TYPE))
    assert second.status_code == 201 and second.json() == {"status": "written", "records": 2}

    rows = read_log(sink.log_path)
    rows = rows[rows["request_id"] == request_id].reset_index(drop=True)
    local = read_log(predictor.log_path)
    local = local[local["request_id"] == request_id].reset_index(drop=True)
    assert len(rows) == len(local) == 2
    assert str(rows["timestamp"][0]) == "2026-11-23 09:00:00.123456+00:00"  # the request event's ce-time
    for column in ("model_name", "model_version", "image_id", "manufacturer", "photometric_interpretation",
                   "region", "dicom_region", "label_disagreement"):
        assert rows[column].tolist() == local[column].tolist(), column
    for column in ("pixel_spacing", "pixel_mean", "pixel_std", "confidence", "ood_score"):
        np.testing.assert_allclose(rows[column], local[column], rtol=1e-5, err_msg=column)
    np.testing.assert_allclose(np.stack(rows["embedding"]), np.stack(local["embedding"]), rtol=1e-5)
    # the values themselves: pseudonyms (never the raw UIDs), the file's own tags and the model
    assert rows["model_name"].tolist() == [NAME, NAME]
    assert rows["dicom_region"].tolist() == ["hand", "knee"]
    assert rows["manufacturer"].tolist() == ["ACME", "ACME"] and (rows["pixel_spacing"] == 0.15).all()
    assert rows["image_id"].str.startswith("img-").all() and not set(rows["image_id"]) & set(SOP_UIDS)
    assert all(len(e) == 512 for e in rows["embedding"])
    assert rows["pixel_mean"].between(0, 1).all() and (rows["pixel_std"] > 0).all()


def test_response_first_pairs_as_well(sink, logged_pair):
    request, response, request_id = logged_pair
    assert post(sink, response, event_headers("ev-2", RESPONSE_TYPE)).status_code == 202
    assert post(sink, request, event_headers("ev-2", REQUEST_TYPE)).status_code == 201
    health = httpx.get(f"{sink.url}/healthz", timeout=10).json()
    assert health["pending"] == 0 and health["records"] >= 4


def _dicom_request_body() -> bytes:
    blob = make_dicom(SOP_UIDS[0], "HAND", seed=1)
    return json.dumps({"inputs": [{"name": "dicom", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(blob).decode()]}]}).encode()


def test_raw_dicom_is_refused_and_never_written(sink):
    before = len(read_log(sink.log_path))
    answer = post(sink, _dicom_request_body(), event_headers("ev-phi", REQUEST_TYPE))
    assert answer.status_code == 422 and "PHI" in answer.json()["error"]
    assert len(read_log(sink.log_path)) == before
    assert not any(b"Doe^Jane" in p.read_bytes() for p in sink.log_path.glob("*.parquet"))


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (b"{}", {"ce-type": REQUEST_TYPE}, 400, "no ce-id"),
        (b"{}", {"ce-id": "x", "ce-type": "com.example.other"}, 400, "unexpected ce-type"),
        (b"", {"ce-id": "x", "ce-type": REQUEST_TYPE}, 400, "empty request"),
        (b"not json", {"ce-id": "x", "ce-type": REQUEST_TYPE}, 422, "not a v2 pixels request"),
        (b"not json", {"ce-id": "x", "ce-type": RESPONSE_TYPE}, 400, "not JSON"),
        (b'{"outputs": 3}', {"ce-id": "x", "ce-type": RESPONSE_TYPE}, 422, "no 'outputs' list"),
        (json.dumps({"inputs": [{"name": "pixels", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5] * 6}]}).encode(),
         {"ce-id": "x", "ce-type": REQUEST_TYPE}, 422, "must have shape"),
        (b"x" * (5 * 1024 * 1024), {"ce-id": "x", "ce-type": REQUEST_TYPE}, 413, "over the limit"),
    ],
)
def test_bad_events_are_4xx_with_a_message(sink, body, headers, status, message):
    answer = post(sink, body, headers)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_a_response_without_the_embedding_or_for_other_images_is_refused(sink, logged_pair):
    request, response, _ = logged_pair
    payload = json.loads(response)
    no_embedding = {**payload, "outputs": [o for o in payload["outputs"] if o["name"] != "embedding"]}
    answer = post(sink, json.dumps(no_embedding).encode(), event_headers("ev-3", RESPONSE_TYPE))
    assert answer.status_code == 422 and PARAM_EMBEDDING in answer.json()["error"]
    # the response answers one image, the request held two
    one = {**payload, "outputs": [{**o, "shape": [1, *o["shape"][1:]],
                                    "data": o["data"][: len(o["data"]) // 2]} for o in payload["outputs"]]}
    assert post(sink, request, event_headers("ev-4", REQUEST_TYPE)).status_code == 202
    answer = post(sink, json.dumps(one).encode(), event_headers("ev-4", RESPONSE_TYPE))
    assert answer.status_code == 422 and "held 2" in answer.json()["error"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048), kind=st.sampled_from([REQUEST_TYPE, RESPONSE_TYPE]))
def test_fuzzed_event_bodies_never_get_a_500(sink, body, kind):
    answer = post(sink, body, event_headers(f"fuzz-{uuid.uuid4().hex}", kind))
    assert 200 <= answer.status_code < 500, answer.text
