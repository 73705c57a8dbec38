"""The KServe server end to end: a tiny random-weights bundle served by `xrayops serve`
on 127.0.0.1, called through kserve's own REST and gRPC clients."""
from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from serving.model import XrayModel
from serving.schema import dicom_bytes
from serving.harness import start_server_process
from serving.server import serve
from xrayops.bundle import save_bundle
from xrayops.contracts import Lineage, ModelBundleMeta, PreprocessingSpec
from xrayops.inference_log import read_log
from xrayops.models.backbone import build_backbone
from xrayops.models.heads import RegionClassifier
from xrayops.regions import REGIONS

SIZE = 32
SOP_UIDS = [generate_uid() for _ in range(3)]


def make_dicom(sop_uid: str, body_part: str, seed: int, with_pixels: bool = True) -> bytes:
    """A small 12-bit DX file in explicit VR little endian, as a modality would write it."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((48, 40)) * 4000).astype(np.uint16)
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID, ds.SOPInstanceUID = file_meta.MediaStorageSOPClassUID, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "PAT-0001", "Doe^Jane"
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "DX", body_part, "ACME"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 12, 11, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [0.15, 0.15]
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# The log's buffering has its own test; here every request's records are written at once.
WRITE_EACH_REQUEST = {"XRAYOPS_SERVE_LOG_FLUSH_RECORDS": "1"}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    model = RegionClassifier(backbone, dim, len(REGIONS))
    meta = ModelBundleMeta(
        classes=list(REGIONS), preprocessing=PreprocessingSpec(size=SIZE), ood_threshold=0.0,
        # Random weights are never confident; a low bar lets the disagreement flag show.
        confidence_threshold=0.0,
        lineage=Lineage(
            dataset_md5="abc.dir", git_commit="deadbeef", pipeline_run="test-run", metrics={"accuracy": 0.5}
        ),
    )
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    save_bundle(path, model, meta)
    return path


@pytest.fixture(scope="module")
def dicoms() -> list[bytes]:
    return [make_dicom(SOP_UIDS[0], "HAND", 1), make_dicom(SOP_UIDS[1], "KNEE", 2), make_dicom(SOP_UIDS[2], "", 3)]


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "inference-log"
    server = start_server_process(bundle_dir, log_path=log_path, model_name="xray-test", env=WRITE_EACH_REQUEST)
    server.log_path = log_path
    yield server
    server.stop()


def v2_client() -> InferenceRESTClient:
    return InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0))


def infer_v2(server, request: InferRequest):
    async def call():
        client = v2_client()
        try:
            return await client.infer(server.url, request, model_name=server.model_name)
        finally:
            await client.close()

    return asyncio.run(call())


def dicom_request(blobs: list[bytes], binary: bool) -> InferRequest:
    tensor = InferInput(name="dicom", shape=[len(blobs)], datatype="BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    else:
        tensor.data = [base64.b64encode(b).decode() for b in blobs]
    request_id = "req-binary" if binary else "req-json"
    return InferRequest(model_name="xray-test", infer_inputs=[tensor], request_id=request_id)


def outputs_of(response) -> dict[str, np.ndarray]:
    return {o.name: o.as_numpy() for o in response.outputs}


def test_v2_binary_dicom_through_kserve_client(server, dicoms, bundle_dir):
    out = outputs_of(infer_v2(server, dicom_request(dicoms, binary=True)))
    probs = out["probabilities"]
    assert probs.shape == (3, len(REGIONS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    regions = [r.decode() if isinstance(r, bytes) else r for r in out["region"]]
    assert all(r in REGIONS for r in regions)
    assert regions == [REGIONS[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(out["confidence"], probs.max(axis=1), rtol=1e-6)
    dicom_regions = [r.decode() if isinstance(r, bytes) else r for r in out["dicom_region"]]
    assert dicom_regions == ["hand", "knee", "unknown"]
    # Threshold 0: any known tag that differs from the prediction is a disagreement.
    expected = [d != "unknown" and d != r for d, r in zip(dicom_regions, regions)]
    assert out["label_disagreement"].tolist() == expected
    assert out["ood_score"].shape == (3,) and np.isfinite(out["ood_score"]).all()
    assert out["ood"].tolist() == (out["ood_score"] > 0.0).tolist()


def test_v2_base64_json_gives_the_same_answer(server, dicoms):
    binary = outputs_of(infer_v2(server, dicom_request(dicoms[:2], binary=True)))
    text = outputs_of(infer_v2(server, dicom_request(dicoms[:2], binary=False)))
    np.testing.assert_allclose(text["probabilities"], binary["probabilities"], rtol=1e-5)


def test_not_dicom_is_a_400_with_a_message(server):
    request = dicom_request([b"%PDF-1.7 definitely not a radiograph"], binary=True)
    with pytest.raises(httpx.HTTPStatusError) as caught:
        infer_v2(server, request)
    assert caught.value.response.status_code == 400
    assert "element 0 is not usable DICOM (not_dicom" in caught.value.response.json()["error"]


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"inputs": [{"name": "pixels", "shape": [1, SIZE - 1, SIZE], "datatype": "FP32",
                         "data": [0.5] * SIZE * (SIZE - 1)}]},
            "must have shape [N, 32, 32]",
        ),
        (
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}]},
            "expected one input named",
        ),
        ({"inputs": [{"name": "dicom", "shape": [0], "datatype": "BYTES", "data": []}]}, "no images"),
        ({"inputs": [{"name": "dicom", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}, "not valid base64"),
    ],
)
def test_bad_v2_requests_are_400s(server, body, message):
    response = httpx.post(f"{server.url}/v2/models/{server.model_name}/infer", json=body, timeout=60)
    assert response.status_code == 400
    assert message in response.json()["error"]


def binary_body(declared_size: int, payload: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "dicom", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": declared_size}}]}).encode()
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}
    return header + payload, headers


@pytest.mark.parametrize(
    "body_and_headers, message",
    [
        (binary_body(100, b"\x04\x00\x00\x00abcd"), "declares 100 bytes but the body holds 8"),
        # The element claims 255 bytes but only 4 follow.
        (binary_body(8, b"\xff\x00\x00\x00abcd"), "cannot be read as BYTES"),
        ((b"\x00\x01 not json", {"content-type": "application/octet-stream"}), "inference-header-content-length"),
    ],
)
def test_malformed_binary_requests_are_400s(server, body_and_headers, message):
    body, headers = body_and_headers
    url = f"{server.url}/v2/models/{server.model_name}/infer"
    response = httpx.post(url, content=body, headers=headers, timeout=60)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_dicom_without_pixel_data_is_a_400(server):
    blob = make_dicom(generate_uid(), "HAND", 4, with_pixels=False)
    body = {"instances": [{"b64": base64.b64encode(blob).decode()}]}
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=60)
    assert response.status_code == 400
    assert "no_pixel_data" in response.json()["error"]


def test_empty_v1_body_is_a_400(server):
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", content=b"", timeout=60)
    assert response.status_code == 400
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json={"instances": []}, timeout=60)
    assert response.status_code == 400 and "no images" in response.json()["error"]


def test_v1_predict_returns_inference_responses(server, dicoms):
    body = {"instances": [{"b64": base64.b64encode(b).decode()} for b in dicoms[:2]]}
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=60)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["dicom_region"] for p in predictions] == ["hand", "knee"]
    for p in predictions:
        assert p["region"] in REGIONS
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["model_version"] == p["model_version"].lower() and len(p["model_version"]) == 12


def test_v2_pixels_input(server):
    pixels = np.random.default_rng(0).random((2, SIZE, SIZE)).astype(np.float32)
    tensor = InferInput(name="pixels", shape=[2, SIZE, SIZE], datatype="FP32")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    request = InferRequest(model_name="xray-test", infer_inputs=[tensor], request_id="req-pixels")
    out = outputs_of(infer_v2(server, request))
    assert out["probabilities"].shape == (2, len(REGIONS))
    assert [r.decode() if isinstance(r, bytes) else r for r in out["dicom_region"]] == ["unknown", "unknown"]


def test_grpc_with_raw_dicom_bytes(server, dicoms):
    async def call():
        client = InferenceGRPCClient(server.grpc_address, timeout=120, retries=2)
        try:
            return await client.infer(dicom_request(dicoms[:1], binary=True))
        finally:
            await client.close()

    out = outputs_of(asyncio.run(call()))
    assert out["probabilities"].shape == (1, len(REGIONS))
    assert out["dicom_region"][0] in (b"hand", "hand")


def test_every_request_is_logged_without_phi(server, dicoms):
    infer_v2(server, dicom_request(dicoms, binary=True))
    log = read_log(server.log_path)
    binary = log[log["request_id"] == "req-binary"]
    assert len(binary) >= 3
    assert set(binary["dicom_region"]) == {"hand", "knee", "unknown"}
    assert set(binary["manufacturer"]) == {"ACME"}
    assert (binary["pixel_spacing"] == 0.15).all()
    assert all(len(e) == 512 for e in binary["embedding"])
    assert binary["image_id"].str.len().gt(0).all()
    assert not set(binary["image_id"]) & set(SOP_UIDS)  # pseudonyms, never the raw UIDs
    assert "PAT-0001" not in log.to_string() and "Doe^Jane" not in log.to_string()
    pixels = log[log["request_id"] == "req-pixels"]
    assert len(pixels) == 2 and pixels["pixel_mean"].between(0, 1).all()


def test_metadata_exposes_version_and_lineage(server, bundle_dir):
    sha = json.loads((bundle_dir / "bundle.json").read_text())["weights_sha256"]
    with urllib.request.urlopen(f"{server.url}/v2/models/{server.model_name}") as response:
        metadata = json.load(response)
    assert metadata["versions"] == [sha[:12]]
    assert {"name": "dicom", "datatype": "BYTES", "shape": [-1]} in metadata["inputs"]
    assert {o["name"] for o in metadata["outputs"]} >= {"region", "probabilities", "label_disagreement"}
    with urllib.request.urlopen(f"{server.url}/v2/models/{server.model_name}/bundle") as response:
        info = json.load(response)
    assert info["version"] == sha[:12]
    assert info["bundle"]["lineage"] == {"dataset_md5": "abc.dir", "git_commit": "deadbeef", "pipeline_run": "test-run",
                                         "metrics": {"accuracy": 0.5}}


def plain_ip(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    return str(getattr(address, "ipv4_mapped", None) or address)


def test_upright_without_an_orientation_head_is_a_400(server, dicoms):
    body = {"instances": [{"b64": base64.b64encode(dicoms[0]).decode()}], "parameters": {"upright": True}}
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=60)
    assert response.status_code == 400 and "orientation head" in response.json()["error"]
    body["parameters"] = {"upright": "sideways"}
    response = httpx.post(f"{server.url}/v1/models/{server.model_name}:predict", json=body, timeout=60)
    assert response.status_code == 400 and "'upright' must be true or false" in response.json()["error"]


def test_sockets_are_bound_to_loopback_only(server):
    process = psutil.Process(server.pid)
    # psutil renamed connections() to net_connections() in 6.0.
    connections = (process.net_connections if hasattr(process, "net_connections") else process.connections)("inet")
    listening = [c.laddr for c in connections if c.status == psutil.CONN_LISTEN]
    http_port = int(server.url.rsplit(":", 1)[1])
    grpc_port = int(server.grpc_address.rsplit(":", 1)[1])
    assert {addr.port for addr in listening} == {http_port, grpc_port}
    # gRPC core may hold an IPv6 socket with the v4-mapped loopback address: still 127.0.0.1 only.
    assert {plain_ip(addr.ip) for addr in listening} == {"127.0.0.1"}


def test_server_stops_by_pid_and_is_gone(server):
    pid = server.pid
    assert psutil.pid_exists(pid)
    server.stop()
    assert server.process.poll() is not None
    assert not psutil.pid_exists(pid)


def test_tampered_bundle_never_becomes_ready(bundle_dir, tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "bundle.json").write_text((bundle_dir / "bundle.json").read_text())
    weights = bytearray((bundle_dir / "weights.pt").read_bytes())
    weights[-1] ^= 0xFF
    (tampered / "weights.pt").write_bytes(bytes(weights))
    model = XrayModel("xray-test", tampered)
    assert model.load() is False
    model.start()
    assert model.ready is False and "sha256" in model.load_error
    with pytest.raises(RuntimeError, match="not ready: .*sha256"):
        serve(tampered, http_port=1, grpc_port=None)
    # The real entry point exits with a message instead of serving.
    with pytest.raises(RuntimeError, match="exited with code 2(.|\n)*sha256"):
        start_server_process(tampered, enable_grpc=False)


def test_dicom_bytes_accepts_raw_and_base64(dicoms):
    raw = dicoms[0]
    assert dicom_bytes(raw, 0) == raw
    assert dicom_bytes(base64.b64encode(raw), 0) == raw
    assert dicom_bytes(base64.b64encode(raw).decode(), 0) == raw

