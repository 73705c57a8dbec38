"""The endpoint answers real non-radiographs (CT, MR, US, NM, secondary captures) `applicable: false`
with the admission policy's reason and no region, the same on v1, v2 REST and gRPC, through kserve's
own clients, on the predictor and through the DICOM transformer; the other images of the request are
answered as usual."""
from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pandas as pd
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

from serving.schema import parse_infer_response
from serving.harness import start_server_process
from tests.conftest import DICOM_SAMPLES
from tests.test_serving_support import make_bundle, make_dicom
from xrayops.regions import REGIONS

OTHER = DICOM_SAMPLES / "other"
pytestmark = pytest.mark.skipif(not OTHER.is_dir(), reason=f"real DICOM samples not present at {OTHER}")
NAME = "xray-admission"
# One real file per kind the policy refuses, each with the reason it must give.
REAL = {
    "dicomParser__CT1_UNC.explicit_big_endian.dcm": ("not_radiograph", "modality CT"),
    "pydicom__MR_small_implicit.dcm": ("not_radiograph", "modality MR"),
    "dwv__gdcm-US-RGB-8-epicard.dcm": ("not_radiograph", "modality US"),
    "pydicom__JPGExtended.dcm": ("not_radiograph", "modality NM"),
    "pydicom-data-git__JLSL_16_15_1_1F.dcm": ("secondary_capture", "SOP class 1.2.840.10008.5.1.4.1.1.7"),
}


@pytest.fixture(scope="module")
def real_files() -> dict[str, bytes]:
    manifest = pd.read_csv(OTHER / "MANIFEST.tsv", sep="\t", dtype=str).fillna("")
    listed = {p.rsplit("/", 1)[-1] for p in manifest.path}
    assert set(REAL) <= listed
    return {name: (OTHER / name).read_bytes() for name in REAL}


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    bundle = make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")
    server = start_server_process(bundle, model_name=NAME)
    server.bundle = bundle
    yield server
    server.stop()


@pytest.fixture(scope="module")
def transformer(predictor):
    server = start_server_process(predictor.bundle, model_name=NAME, enable_grpc=False,
                                  extra_args=["--role", "transformer", "--predictor-host",
                                              predictor.url.removeprefix("http://")])
    yield server
    server.stop()


def dicom_request(blobs: list[bytes]) -> InferRequest:
    tensor = InferInput(name="dicom", shape=[len(blobs)], datatype="BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    return InferRequest(model_name=NAME, infer_inputs=[tensor], request_id="admission")


def rest_v2(url: str, blobs: list[bytes]):
    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0))
        try:
            return await client.infer(url, dicom_request(blobs), model_name=NAME)
        finally:
            await client.close()

    return asyncio.run(call())


def grpc_v2(address: str, blobs: list[bytes]):
    async def call():
        client = InferenceGRPCClient(address, timeout=120, retries=2)
        try:
            return await client.infer(dicom_request(blobs))
        finally:
            await client.close()

    return asyncio.run(call())


def v1(url: str, blobs: list[bytes]) -> list[dict]:
    body = {"instances": [{"b64": base64.b64encode(b).decode()} for b in blobs]}
    response = httpx.post(f"{url}/v1/models/{NAME}:predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def check_refused(answer, reason: str, detail: str) -> None:
    assert answer.applicable is False
    assert (answer.refusal_reason, answer.refusal_detail) == (reason, detail)
    assert answer.region is None and answer.confidence is None and answer.probabilities == {}
    assert not answer.label_disagreement


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_real_non_radiographs_are_answered_not_applicable(predictor, real_files, protocol):
    blobs = list(real_files.values())
    response = rest_v2(predictor.url, blobs) if protocol == "rest" else grpc_v2(predictor.grpc_address, blobs)
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    assert outputs["applicable"].tolist() == [False] * len(blobs)
    assert np.isnan(outputs["probabilities"]).all() and np.isnan(outputs["confidence"]).all()
    for answer, (reason, detail) in zip(parse_infer_response(response), REAL.values()):
        check_refused(answer, reason, detail)


def test_a_mixed_request_answers_the_radiographs_and_refuses_the_rest(predictor, real_files):
    blobs = [make_dicom(body_part="HAND", seed=1), real_files["dicomParser__CT1_UNC.explicit_big_endian.dcm"],
             make_dicom(body_part="KNEE", seed=2)]
    for response in (rest_v2(predictor.url, blobs), grpc_v2(predictor.grpc_address, blobs)):
        answers = parse_infer_response(response)
        assert [a.applicable for a in answers] == [True, False, True]
        assert answers[0].region in REGIONS and answers[2].region in REGIONS
        assert abs(sum(answers[0].probabilities.values()) - 1) < 1e-5
        assert [a.dicom_region for a in answers] == ["hand", "unknown", "knee"]
        check_refused(answers[1], "not_radiograph", "modality CT")
    predictions = v1(predictor.url, blobs)
    assert [p["applicable"] for p in predictions] == [True, False, True]
    assert predictions[1]["region"] is None and predictions[1]["refusal_reason"] == "not_radiograph"
    assert predictions[0]["region"] in REGIONS


def test_v1_answers_the_same_refusals(predictor, real_files):
    predictions = v1(predictor.url, list(real_files.values()))
    assert [(p["refusal_reason"], p["refusal_detail"]) for p in predictions] == list(REAL.values())
    assert all(p["region"] is None and p["confidence"] is None for p in predictions)


def test_the_transformer_refuses_before_the_predictor_sees_anything(transformer, predictor, real_files):
    ct = real_files["dicomParser__CT1_UNC.explicit_big_endian.dcm"]
    answers = parse_infer_response(rest_v2(transformer.url, [ct, make_dicom(body_part="HAND", seed=3)]))
    assert [a.applicable for a in answers] == [False, True]
    check_refused(answers[0], "not_radiograph", "modality CT")
    assert answers[1].region in REGIONS
    only_refused = parse_infer_response(rest_v2(transformer.url, [ct]))
    check_refused(only_refused[0], "not_radiograph", "modality CT")
    predictions = v1(transformer.url, [ct])
    assert predictions[0]["applicable"] is False and predictions[0]["refusal_detail"] == "modality CT"
    metrics = httpx.get(f"{transformer.url}/metrics", timeout=30).text
    assert 'xrayops_not_applicable_total{reason="not_radiograph"}' in metrics
