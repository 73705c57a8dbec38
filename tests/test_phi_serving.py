"""No identifier reaches the inference log or the server's output: DICOMs full of PHI and a pixel
request whose image_meta carries a name and a UID, sent to the real server, then the log scanned."""
from __future__ import annotations

import asyncio
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from dicom_factory import make_dataset, ramp
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from phi_scanner import Secret, collect_secrets, report, scan, scan_text

from xrayops.bundle import save_bundle
from xrayops.contracts import ModelBundleMeta, PreprocessingSpec
from xrayops.inference_log import read_log, sanitize_image_meta
from xrayops.models.backbone import build_backbone
from xrayops.models.heads import RegionClassifier
from xrayops.regions import REGIONS

try:  # the server harness moved out of serving.server; either place starts the same process
    from serving.harness import start_server_process
except ImportError:  # pragma: no cover
    from serving.server import start_server_process

SIZE = 32
NAME, UID = "Doe^Jane", "1.2.840.113619.2.55.3.604688119"
PHI_META = {"image_id": f"{NAME} {UID}", "manufacturer": NAME, "photometric_interpretation": "DOE JANE 19700101",
            "pixel_spacing": "1970-01-01", "patient_name": "Roe^Richard"}  # fmt: skip
GOOD_META = {"image_id": "img-0123456789abcdef", "manufacturer": "ACME Radiography",
             "photometric_interpretation": "MONOCHROME2", "pixel_spacing": 0.143}  # fmt: skip


def test_sanitize_image_meta_keeps_known_formats_and_names_the_rest():
    clean = sanitize_image_meta(GOOD_META)
    assert clean.fields == GOOD_META and clean.rejected == ()
    dirty = sanitize_image_meta(PHI_META)
    assert dirty.fields == {}
    assert sorted(dirty.rejected) == ["image_id", "manufacturer", "other", "photometric_interpretation", "pixel_spacing"]
    assert NAME not in repr(dirty.rejected) and UID not in repr(dirty.rejected)
    for bad in ({"pixel_spacing": float("nan")}, {"pixel_spacing": -1.0}, {"pixel_spacing": True},
                {"image_id": "img-0123456789ABCDEF"}, {"image_id": "img-0123"}, {"manufacturer": "x" * 65}):
        assert sanitize_image_meta(bad).fields == {}, bad
    assert sanitize_image_meta("not a dict").rejected == ("image_meta",)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    meta = ModelBundleMeta(classes=list(REGIONS), preprocessing=PreprocessingSpec(size=SIZE))
    root = tmp_path_factory.mktemp("phi-serve")
    save_bundle(root / "bundle", RegionClassifier(backbone, dim, len(REGIONS)), meta)
    server = start_server_process(root / "bundle", log_path=root / "inference-log", model_name="xray-phi",
                                  output_path=root / "server.log", enable_grpc=False)  # fmt: skip
    try:
        yield server, root
    finally:
        server.stop()


def _infer(url: str, request: InferRequest):
    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0))
        try:
            return await client.infer(url, request, model_name="xray-phi")
        finally:
            await client.close()

    return asyncio.run(call())


def test_served_window_leaves_no_phi_in_the_log_or_the_output(served, tmp_path):
    server, root = served
    files = []
    for i, part in enumerate(["HAND", "KNEE"]):
        ds = make_dataset(ramp(60 + 4 * i, 52), body_part=part, PatientName=NAME, PatientID=f"PAT98765{i}",
                          AccessionNumber="ACC12345678", StudyDescription=f"Hand {NAME}", Modality="DX",
                          InstitutionName="Klinikum Geheimstadt", BurnedInAnnotation="NO")  # fmt: skip
        path = tmp_path / "DOE_JANE_19700101" / f"PAT98765{i}_ACC12345678_{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    tensor = InferInput(name="dicom", shape=[len(files)], datatype="BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in files], dtype=np.object_), binary_data=True)
    _infer(server.url, InferRequest(model_name="xray-phi", infer_inputs=[tensor], request_id="req-dicom"))

    pixels = InferInput(name="pixels", shape=[2, SIZE, SIZE], datatype="FP32")
    pixels.set_data_from_numpy(np.random.default_rng(0).random((2, SIZE, SIZE)).astype(np.float32), binary_data=True)
    meta = InferInput(name="image_meta", shape=[2], datatype="BYTES")
    meta.set_data_from_numpy(np.array([json.dumps(PHI_META), json.dumps(GOOD_META)], dtype=np.object_), binary_data=False)
    _infer(server.url, InferRequest(model_name="xray-phi", infer_inputs=[pixels, meta], request_id="req-pixels"))

    deadline = time.monotonic() + 60  # the log part may land just after the answer
    while set(read_log(root / "inference-log")["request_id"]) < {"req-dicom", "req-pixels"} and time.monotonic() < deadline:
        time.sleep(0.2)
    log = read_log(root / "inference-log")
    by_request = {r: g for r, g in log.groupby("request_id")}
    assert len(by_request["req-dicom"]) == 2 and by_request["req-dicom"]["image_id"].str.match(r"^img-[0-9a-f]{16}$").all()
    phi_row, good_row = by_request["req-pixels"].iloc[0], by_request["req-pixels"].iloc[1]
    assert phi_row["image_id"] in ("", None) and phi_row["manufacturer"] in ("", None)
    assert np.isnan(phi_row["pixel_spacing"]) if phi_row["pixel_spacing"] is not None else True
    assert good_row["image_id"] == GOOD_META["image_id"] and good_row["manufacturer"] == "ACME Radiography"

    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'xrayops_image_meta_rejected_total{field="image_id",model="xray-phi"} 1.0' in metrics
    assert 'field="other"' in metrics

    secrets = collect_secrets(files, tmp_path) | {Secret("image_meta", v) for v in ("Doe^Jane", UID, "Roe^Richard",
                                                                                   "DOE JANE 19700101", "1970-01-01")}
    hits = scan([root / "inference-log"], secrets, allow={"ACME Radiography"})
    hits += scan_text("server output", (root / "server.log").read_text(errors="replace") + metrics, secrets,
                      allow={"ACME Radiography"})
    assert not hits, report(hits)
