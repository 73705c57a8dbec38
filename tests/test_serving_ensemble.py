"""An ensemble of three member bundles (paper 000: SimCLR, BYOL, SupCon) served by one process,
and the cluster split run locally: a DICOM transformer process in front of a pixel predictor
process. Called through kserve's REST and gRPC clients, plain HTTP and the `xrayops predict` CLI."""
from __future__ import annotations

import asyncio
import base64
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from typer.testing import CliRunner

from serving.schema import parse_infer_response
from serving.harness import free_port, start_server_process
from serving.transformer import DecodeLimits, decode_dicom
from test_serving_support import SIZE, make_bundle, make_dicom
from xrayops.bundle import load_bundle
from xrayops.app.cli import app
from xrayops.ensemble import ensemble_version
from xrayops.gradcam import png_to_heatmap
from xrayops.inference import model_version, predict_arrays
from xrayops.inference_log import read_log
from xrayops.upright import upright_image

METHODS = ("simclr", "byol", "supcon")
NAME = "xray-ens"


# The log's buffering has its own test; here every request's records are written at once.
WRITE_EACH_REQUEST = {"XRAYOPS_SERVE_LOG_FLUSH_RECORDS": "1"}


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    # SupCon carries paper 004's orientation head: the ensemble's angle is that member's.
    return [make_bundle(root / m, seed=i, ssl_method=m, orientation=m == "supcon") for i, m in enumerate(METHODS)]


@pytest.fixture(scope="module")
def predictor(members, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("log") / "inference-log"
    server = start_server_process(members, model_name=NAME, log_path=log_path, env=WRITE_EACH_REQUEST)
    server.log_path = log_path
    yield server
    server.stop()


@pytest.fixture(scope="module")
def transformer(predictor, members):
    host_port = predictor.url.removeprefix("http://")
    server = start_server_process(members[0], model_name=NAME, enable_grpc=False,
                                  extra_args=["--role", "transformer", "--predictor-host", host_port])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dicoms():
    return [make_dicom(body_part="HAND", seed=11), make_dicom(body_part="KNEE", seed=12)]


def expected_probabilities(members, dicoms) -> np.ndarray:
    """In-process: the same decode, each member's own predict_arrays, the mean of the softmax."""
    loaded = [load_bundle(m) for m in members]
    images = [decode_dicom(b, loaded[0].meta.preprocessing, DecodeLimits(), "k", "x").pixels for b in dicoms]
    per_member = []
    for bundle in loaded:
        responses, _ = predict_arrays(bundle, images)
        per_member.append([[r.probabilities[c] for c in bundle.meta.classes] for r in responses])
    return np.mean(per_member, axis=0)


def rest_infer(url: str, blobs: list[bytes], gradcam: bool = False, upright: bool = False):
    tensor = InferInput(name="dicom", shape=[len(blobs)], datatype="BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    parameters = {k: True for k, on in (("gradcam", gradcam), ("upright", upright)) if on}
    request = InferRequest(model_name=NAME, infer_inputs=[tensor], parameters=parameters or None)

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0))
        try:
            return await client.infer(url, request, model_name=NAME)
        finally:
            await client.close()

    return parse_infer_response(asyncio.run(call()))


def probs_of(responses) -> np.ndarray:
    return np.array([list(r.probabilities.values()) for r in responses])


def test_rest_answer_is_the_mean_of_the_members(predictor, members, dicoms):
    responses = rest_infer(predictor.url, dicoms)
    np.testing.assert_allclose(probs_of(responses), expected_probabilities(members, dicoms), atol=1e-5)
    versions = [model_version(load_bundle(m)) for m in members]
    assert {r.model_version for r in responses} == {ensemble_version(versions)}
    assert [r.dicom_region for r in responses] == ["hand", "knee"]
    (supcon,) = [load_bundle(m) for m in members if m.name == "supcon"]
    spec = supcon.meta.preprocessing
    images = [decode_dicom(b, spec, DecodeLimits(), "k", "x").pixels for b in dicoms]
    angles = [r.orientation_deg for r in predict_arrays(supcon, images)[0]]
    np.testing.assert_allclose([r.orientation_deg for r in responses], angles, atol=1e-3)  # the one member with a head


def test_grpc_gives_the_same_answer(predictor, dicoms):
    tensor = InferInput(name="dicom", shape=[len(dicoms)], datatype="BYTES")
    tensor.set_data_from_numpy(np.array(dicoms, dtype=np.object_), binary_data=True)

    async def call():
        client = InferenceGRPCClient(predictor.grpc_address, timeout=120, retries=0)
        try:
            return await client.infer(InferRequest(model_name=NAME, infer_inputs=[tensor]))
        finally:
            await client.close()

    grpc_responses = parse_infer_response(asyncio.run(call()))
    np.testing.assert_allclose(probs_of(grpc_responses), probs_of(rest_infer(predictor.url, dicoms)), atol=1e-6)


def test_metadata_has_version_and_every_members_lineage(predictor, members):
    metadata = httpx.get(f"{predictor.url}/v2/models/{NAME}", timeout=10).json()
    versions = [model_version(load_bundle(m)) for m in members]
    assert metadata["versions"] == [ensemble_version(versions)]
    listed = metadata["parameters"]["members"]
    assert [m["ssl_method"] for m in listed] == list(METHODS) and [m["version"] for m in listed] == versions
    assert [m["lineage"]["pipeline_run"] for m in listed] == [f"run-{m}" for m in METHODS]


def test_gradcam_on_request(predictor, dicoms):
    plain = rest_infer(predictor.url, dicoms[:1])
    assert plain[0].gradcam_png is None
    (with_map,) = rest_infer(predictor.url, dicoms[:1], gradcam=True)
    heatmap = png_to_heatmap(base64.b64decode(with_map.gradcam_png))
    assert heatmap.shape == (SIZE, SIZE) and heatmap.max() == pytest.approx(1.0) and heatmap.min() >= 0.0
    body = {"instances": [{"b64": base64.b64encode(dicoms[0]).decode()}], "parameters": {"gradcam": True}}
    v1 = httpx.post(f"{predictor.url}/v1/models/{NAME}:predict", json=body, timeout=60).json()["predictions"][0]
    np.testing.assert_allclose(png_to_heatmap(base64.b64decode(v1["gradcam_png"])), heatmap, atol=1 / 255)


def test_upright_image_on_request(predictor, members, dicoms):
    """Paper 004: the image turned back by the predicted angle, over v2 (kserve client) and v1."""
    plain = rest_infer(predictor.url, dicoms[:1])
    assert plain[0].upright_png is None
    (answer,) = rest_infer(predictor.url, dicoms[:1], upright=True)
    spec = load_bundle(members[0]).meta.preprocessing
    pixels = decode_dicom(dicoms[0], spec, DecodeLimits(), "k", "x").pixels
    expected = upright_image(pixels.astype(np.float32) / 255.0, answer.orientation_deg)
    got = png_to_heatmap(base64.b64decode(answer.upright_png))
    assert got.shape == (SIZE, SIZE)
    np.testing.assert_allclose(got, expected, atol=1.5 / 255)
    body = {"instances": [{"b64": base64.b64encode(dicoms[0]).decode()}], "parameters": {"upright": True}}
    v1 = httpx.post(f"{predictor.url}/v1/models/{NAME}:predict", json=body, timeout=60).json()["predictions"][0]
    assert v1["upright_png"] == answer.upright_png and v1["orientation_deg"] == pytest.approx(answer.orientation_deg)


def test_grpc_model_metadata_reports_the_version(predictor, members):
    """The v2 ModelMetadata RPC (kserve 0.21 leaves `versions` empty; the server fills it)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    async def call():
        client = InferenceGRPCClient(predictor.grpc_address, timeout=60, retries=0)
        try:
            ready = await client.is_model_ready(NAME)
            metadata = await GRPCInferenceServiceStub(client._channel).ModelMetadata(pb.ModelMetadataRequest(name=NAME))
            return ready, metadata
        finally:
            await client.close()

    ready, metadata = asyncio.run(call())
    versions = [model_version(load_bundle(m)) for m in members]
    assert ready and metadata.name == NAME and list(metadata.versions) == [ensemble_version(versions)]
    assert {i.name for i in metadata.inputs} >= {"dicom", "pixels"}


def test_concurrent_requests_get_their_own_answers(predictor, members):
    blobs = [make_dicom(body_part="WRIST", seed=100 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: rest_infer(predictor.url, [b])[0], blobs))
    np.testing.assert_allclose(probs_of(answers), expected_probabilities(members, blobs), atol=1e-5)


def test_transformer_in_front_of_the_predictor(transformer, predictor, dicoms):
    direct = rest_infer(predictor.url, dicoms)
    via_transformer = rest_infer(transformer.url, dicoms)
    np.testing.assert_allclose(probs_of(via_transformer), probs_of(direct), atol=1e-6)
    assert [r.dicom_region for r in via_transformer] == ["hand", "knee"]
    body = {"instances": [{"b64": base64.b64encode(b).decode()} for b in dicoms]}
    v1 = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json=body, timeout=60)
    assert v1.status_code == 200, v1.text
    assert [p["region"] for p in v1.json()["predictions"]] == [r.region for r in direct]
    bad = httpx.post(f"{transformer.url}/v1/models/{NAME}:predict", json={"instances": [{"b64": "AAAA"}]}, timeout=30)
    assert bad.status_code == 400 and "not_dicom" in bad.json()["error"]  # refused in the transformer


def test_predictor_logs_pseudonymised_header_fields_sent_by_the_transformer(transformer, predictor):
    blob = make_dicom(body_part="ELBOW", seed=21)
    tensor = InferInput(name="dicom", shape=[1], datatype="BYTES")
    tensor.set_data_from_numpy(np.array([blob], dtype=np.object_), binary_data=True)
    body, n = InferRequest(model_name=NAME, infer_inputs=[tensor], request_id="via-transformer").to_rest()
    response = httpx.post(f"{transformer.url}/v2/models/{NAME}/infer", content=body, timeout=60,
                          headers={"content-type": "application/octet-stream", "inference-header-content-length": str(n)})
    assert response.status_code == 200, response.text
    # the predictor answered the transformer with the embedding (for the payload logger); the client never sees it
    assert "embedding" not in {o["name"] for o in response.json()["outputs"]}
    log = read_log(predictor.log_path)
    row = log[log["request_id"] == "via-transformer"].iloc[0]
    assert row["dicom_region"] == "elbow" and row["manufacturer"] == "ACME" and row["image_id"].startswith("img-")
    assert row["pixel_spacing"] == pytest.approx(0.15) and len(row["embedding"]) == 512
    assert "PAT-0001" not in log.to_string() and "Doe^Jane" not in log.to_string()


def test_health_readiness_and_prometheus_metrics(predictor, transformer):
    for server in (predictor, transformer):
        assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
        assert httpx.get(f"{server.url}/v2/models/{NAME}/ready", timeout=10).status_code == 200
    metrics = httpx.get(f"{predictor.url}/metrics", timeout=10).text
    images = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("xrayops_images_total{"))
    assert images >= 2
    assert "xrayops_batch_images_count" in metrics and "request_predict_seconds" in metrics


def test_cli_predict_prints_json(predictor, tmp_path, dicoms):
    files = []
    for i, blob in enumerate(dicoms):
        files.append(tmp_path / f"image{i}.dcm")
        files[-1].write_bytes(blob)
    result = CliRunner().invoke(app, ["predict", *map(str, files), "--url", predictor.url, "--model-name", NAME])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert [p["dicom_region"] for p in printed] == ["hand", "knee"]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in printed)
    assert all(p["upright_png"] is None for p in printed)
    upright = CliRunner().invoke(app, ["predict", str(files[0]), "--url", predictor.url, "--model-name", NAME,
                                       "--upright"])
    assert upright.exit_code == 0, upright.output
    (turned,) = json.loads(upright.output)
    assert png_to_heatmap(base64.b64decode(turned["upright_png"])).shape == (SIZE, SIZE)
    missing = CliRunner().invoke(app, ["predict", str(files[0]), "--url", predictor.url, "--model-name", "nope"])
    assert missing.exit_code == 2 and "404" in missing.output


def test_cli_serve_refuses_a_tampered_member(members, tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "bundle.json").write_text((members[1] / "bundle.json").read_text())
    weights = bytearray((members[1] / "weights.pt").read_bytes())
    weights[-1] ^= 0xFF
    (tampered / "weights.pt").write_bytes(bytes(weights))
    port = free_port()
    result = CliRunner().invoke(app, ["serve", "--bundle", str(members[0]), "--bundle", str(tampered),
                                      "--http-port", str(port), "--grpc-port", str(free_port())])
    assert result.exit_code == 2 and "sha256" in result.output
