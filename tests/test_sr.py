"""DICOM Structured Reports of the answers (xrayops.results.sr) and the endpoint's `sr` output.

Every SR written here is checked with dciodvfy (dicom3tools): any "Error" line fails. Its two kinds
of warning are expected and allowed: the private coding scheme 99XRAYOPS (declared in the Coding
Scheme Identification Sequence, which dciodvfy does not read) and attributes a DICOMDIR would want
that the source itself lacks (Study ID, Study Date...).
"""
from __future__ import annotations

import asyncio
import io
import logging
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import DICOM_SAMPLES
from dicom_factory import FAKE_PHI, make_dataset, ramp
from highdicom.sr.utils import find_content_items
from kserve import InferenceGRPCClient, InferInput, InferRequest
from phi_scanner import collect_secrets, report, scan, scan_text
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from test_serving_support import make_bundle

from serving.client import build_infer_request, predict_files_with_sr
from serving.harness import start_server_process
from serving.schema import parse_infer_response, parse_sr_output
from xrayops.contracts import InferenceResponse
from xrayops.dicom.labels import anatomic_region_codes, region_from_dataset
from xrayops.inference_log import read_log
from xrayops.regions import REGIONS
from xrayops.results import codes as c
from xrayops.results.identity import AlgorithmIdentity
from xrayops.results.sr import (
    SRError,
    from_part10,
    identity_of_sr,
    image_sr,
    image_srs,
    merge_image_srs,
    source_header,
    study_sr,
    to_part10,
)

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
OTHER = DICOM_SAMPLES / "other"
RADIOGRAPHS = DICOM_SAMPLES / "radiographs"
needs_samples = pytest.mark.skipif(not OTHER.is_dir(), reason=f"real DICOM samples not present at {OTHER}")
CT = "fodicom__IM-0001-0001-0001.dcm"  # a real CT (Philips, JPEG lossless): refused as not_radiograph
NAME = "xray-sr"
IDENTITY = AlgorithmIdentity(name="xrayops-region", version="0123456789ab", registry_versions=("models:/xrayops-region/7",),
                             release_id="r-5e1ec7ed0001", weights_sha256=("ab" * 32,))  # fmt: skip
ANSWER = InferenceResponse(
    region="knee", confidence=0.87, probabilities={r: (0.87 if r == "knee" else 0.01) for r in REGIONS},
    orientation_deg=-92.5, ood_score=-3.25, ood=False, dicom_region="hand", label_disagreement=True,
    findings={"abnormal": 0.25}, model_name="xrayops-region", model_version="0123456789ab",
)
REFUSED = InferenceResponse(region=None, confidence=None, applicable=False, refusal_reason="not_radiograph",
                            refusal_detail="modality CT", model_name="xrayops-region", model_version="0123456789ab")


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / f"sr-{time.monotonic_ns()}.dcm"
    path.write_bytes(data)
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def codes_named(sr: Dataset, name) -> list[tuple[str, str, str]]:
    items = find_content_items(sr, name=name, value_type="CODE", recursive=True)
    return [(i.ConceptCodeSequence[0].CodeValue if "CodeValue" in i.ConceptCodeSequence[0]
             else i.ConceptCodeSequence[0].LongCodeValue, i.ConceptCodeSequence[0].CodingSchemeDesignator,
             i.ConceptCodeSequence[0].CodeMeaning) for i in items]  # fmt: skip


def numbers_named(sr: Dataset, name) -> list[tuple[float, str]]:
    items = find_content_items(sr, name=name, value_type="NUM", recursive=True)
    return [(float(i.MeasuredValueSequence[0].NumericValue),
             i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue) for i in items]  # fmt: skip


def texts_named(sr: Dataset, name) -> list[str]:
    return [str(i.TextValue) for i in find_content_items(sr, name=name, value_type="TEXT", recursive=True)]


def referenced_instances(sr: Dataset) -> set[tuple[str, str]]:
    """(SOP class, SOP instance) of every IMAGE content item."""
    items = find_content_items(sr, value_type="IMAGE", recursive=True)
    return {(i.ReferencedSOPSequence[0].ReferencedSOPClassUID, i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for i in items}  # fmt: skip


def evidence(sr: Dataset) -> set[tuple[str, str, str]]:
    """(series, SOP class, SOP instance) of the Current Requested Procedure Evidence Sequence."""
    return {(series.SeriesInstanceUID, sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence for series in study.ReferencedSeriesSequence
            for sop in series.ReferencedSOPSequence}  # fmt: skip


# ---------------------------------------------------------------- codes


def test_every_region_has_a_canonical_snomed_code_that_ingestion_reads_back_as_that_region():
    table = anatomic_region_codes()
    assert set(c.region_codes()) == set(REGIONS)
    assert len({code.value for code in c.region_codes().values()}) == len(REGIONS)
    for region, code in c.region_codes().items():
        assert code.scheme_designator == "SCT" and table[f"SCT:{code.value}"] == region
        assert c.region_of_code(code.value) == region
        ds = make_dataset(body_part="", phi=False)  # no BodyPartExamined: the coded anatomy alone decides
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, "SCT", code.meaning
        ds.AnatomicRegionSequence = [item]
        assert region_from_dataset(ds).region == region


def test_refusal_codes_keep_the_reason_as_code_and_the_detail_in_the_meaning():
    code = c.refusal_code("not_radiograph", "modality CT")
    assert (code.value, code.scheme_designator, code.meaning) == ("not_radiograph", "99XRAYOPS", "Not a radiograph (modality CT)")
    long = c.refusal_code("recognizable_features", "x" * 200)
    assert long.value == "recognizable_features" and len(long.meaning) == 64 and long.meaning.endswith("...")


# ---------------------------------------------------------------- the SR documents


@needs_dciodvfy
def test_image_sr_holds_the_answer_coded_filed_into_the_source_study(tmp_path):
    source = make_dataset(ramp(), body_part="HAND", PatientOrientation=["A", "F"], PatientSex="F",
                          StudyID="S1", SeriesNumber=3, InstanceNumber=2)  # fmt: skip
    data = to_part10(image_sr(source, ANSWER, IDENTITY))
    assert dciodvfy_errors(data, tmp_path) == []
    sr = from_part10(data)
    # Filed into the source study, the patient module copied: it goes back into the hospital's PACS.
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.Modality == "SR"  # Comprehensive SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (str(sr.PatientName), sr.PatientID, sr.PatientBirthDate, sr.PatientSex, sr.AccessionNumber) == (
        FAKE_PHI["PatientName"], FAKE_PHI["PatientID"], FAKE_PHI["PatientBirthDate"], "F", FAKE_PHI["AccessionNumber"])
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99XRAYOPS"
    assert "PixelData" not in sr
    # References: the source instance in the group and in the evidence.
    assert referenced_instances(sr) >= {(source.SOPClassUID, source.SOPInstanceUID)}
    assert evidence(sr) == {(source.SeriesInstanceUID, source.SOPClassUID, source.SOPInstanceUID)}
    # The answer, coded.
    assert codes_named(sr, codes.DCM.TargetRegion) == [("72696002", "SCT", "Knee")]
    assert numbers_named(sr, codes.DCM.Probability) == [(pytest.approx(0.87), "1")]
    site = find_content_items(sr, name=codes.DCM.Probability, value_type="NUM", recursive=True)[0]
    assert site.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "72696002"  # the probability's finding site
    assert numbers_named(sr, codes.DCM.Orientation) == [(pytest.approx(-92.5), "deg")]
    assert numbers_named(sr, c.OOD_SCORE) == [(pytest.approx(-3.25), "1")]
    assert numbers_named(sr, c.finding_concept("abnormal")) == [(pytest.approx(0.25), "1")]
    assert codes_named(sr, c.APPLICABLE) == [("373066001", "SCT", "Yes")]
    assert codes_named(sr, c.OUT_OF_DOMAIN) == [("373067005", "SCT", "No")]
    assert codes_named(sr, c.HEADER_REGION) == [("85562004", "SCT", "Hand")]
    assert codes_named(sr, c.HEADER_DISAGREES) == [("373066001", "SCT", "Yes")]
    assert codes_named(sr, c.REFUSAL_REASON) == []
    # TID 4019: model name, served version, registry version, release, weights hash.
    assert texts_named(sr, codes.DCM.AlgorithmName) == ["xrayops-region"]
    assert texts_named(sr, codes.DCM.AlgorithmVersion) == ["0123456789ab"]
    assert texts_named(sr, codes.DCM.AlgorithmParameters) == [
        "registry version models:/xrayops-region/7", "release r-5e1ec7ed0001", "weights sha256 " + "ab" * 32]
    assert identity_of_sr(sr) == IDENTITY
    # With Patient Orientation and Imager Pixel Spacing the Image Library describes the radiograph.
    assert find_content_items(sr, name=codes.DCM.ImageLibrary, recursive=True)


def test_the_same_image_and_model_give_the_same_sr_instance_and_another_model_another():
    source = make_dataset(ramp())
    first, again = image_sr(source, ANSWER, IDENTITY), image_sr(source, ANSWER, IDENTITY)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    other = image_sr(source, ANSWER, IDENTITY.model_copy(update={"version": "ffffffffffff"}))
    assert other.SOPInstanceUID != first.SOPInstanceUID and other.SeriesInstanceUID != first.SeriesInstanceUID


@needs_dciodvfy
@needs_samples
def test_a_refused_real_ct_gets_an_sr_that_says_not_applicable_and_why(tmp_path):
    ct = dcmread(OTHER / CT)
    data = to_part10(image_sr(ct, REFUSED, IDENTITY))
    assert dciodvfy_errors(data, tmp_path) == []
    sr = from_part10(data)
    assert sr.StudyInstanceUID == ct.StudyInstanceUID
    assert codes_named(sr, c.APPLICABLE) == [("373067005", "SCT", "No")]
    assert codes_named(sr, c.REFUSAL_REASON) == [("not_radiograph", "99XRAYOPS", "Not a radiograph (modality CT)")]
    assert codes_named(sr, codes.DCM.TargetRegion) == [] and numbers_named(sr, codes.DCM.Probability) == []
    assert referenced_instances(sr) == {(ct.SOPClassUID, ct.SOPInstanceUID)}


@needs_dciodvfy
@needs_samples
@pytest.mark.parametrize("name", ["dwv__gdcm-CR-MONO1-10-chest.dcm", "wg04__RG2_J2KR.dcm", "pylibjpeg-data__966.dcm",
                                  "covid-chest-imaging-database__1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"])
def test_srs_of_real_radiographs_pass_dciodvfy(name, tmp_path):
    ds = dcmread(RADIOGRAPHS / name, stop_before_pixels=True)
    data = to_part10(image_sr(ds, ANSWER, IDENTITY))
    assert dciodvfy_errors(data, tmp_path) == []
    assert from_part10(data).StudyInstanceUID == ds.StudyInstanceUID


@needs_dciodvfy
def test_study_sr_has_one_group_per_image_and_equals_the_merge_of_the_image_srs(tmp_path):
    study = make_dataset(ramp()).StudyInstanceUID
    sources = [make_dataset(ramp(), study_uid=study, body_part=p) for p in ("HAND", "KNEE", "FOOT")]
    answers = [ANSWER, ANSWER.model_copy(update={"region": "foot", "label_disagreement": False}), REFUSED]
    built = study_sr(sources, answers, IDENTITY)
    merged = merge_image_srs(sources, [image_sr(s, a, IDENTITY) for s, a in zip(sources, answers)])
    for sr in (built, merged):
        data = to_part10(sr)
        assert dciodvfy_errors(data, tmp_path) == []
        sr = from_part10(data)
        assert sr.StudyInstanceUID == study
        assert referenced_instances(sr) >= {(s.SOPClassUID, s.SOPInstanceUID) for s in sources}
        assert {e[2] for e in evidence(sr)} == {s.SOPInstanceUID for s in sources}
        assert len(find_content_items(sr, name=codes.DCM.MeasurementGroup, recursive=True)) == 3
        assert sorted(codes_named(sr, codes.DCM.TargetRegion)) == [("56459004", "SCT", "Foot"), ("72696002", "SCT", "Knee")]
        assert [v for v, _, _ in codes_named(sr, c.REFUSAL_REASON)] == ["not_radiograph"]
        assert identity_of_sr(sr) == IDENTITY
    assert built.SOPInstanceUID == merged.SOPInstanceUID  # one study, one model: one document


def test_sources_that_cannot_be_reported_on_are_refused_with_a_reason():
    no_study = make_dataset(ramp())
    del no_study.StudyInstanceUID
    with pytest.raises(SRError, match="StudyInstanceUID"):
        image_sr(no_study, ANSWER, IDENTITY)
    with pytest.raises(SRError, match="2 studies"):
        study_sr([make_dataset(ramp()), make_dataset(ramp())], [ANSWER, ANSWER], IDENTITY)
    with pytest.raises(SRError, match="1 answers for 2"):
        image_srs([make_dataset(ramp()), make_dataset(ramp())], [ANSWER], IDENTITY)
    with pytest.raises(SRError, match="'unknown' is not one of"):
        image_sr(make_dataset(ramp()), ANSWER.model_copy(update={"region": "unknown"}), IDENTITY)


@needs_dciodvfy
def test_odd_header_values_give_a_valid_sr_and_no_identifier_in_any_log_or_warning(tmp_path, caplog):
    source = make_dataset(ramp(), PatientName="Geheimnisvoll", PatientSex="Weiblich", PatientBirthDate="unbekannt",
                          StudyTime="spät")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        data = image_srs([source], [ANSWER], IDENTITY)[0]
    said = " ".join(str(w.message) for w in caught) + caplog.text
    assert "Geheimnisvoll" not in said and "PHI" not in said
    assert dciodvfy_errors(data, tmp_path) == []
    sr = from_part10(data)
    assert str(sr.PatientName) == "Geheimnisvoll" and sr.PatientSex == "" and sr.PatientBirthDate == ""


def test_source_header_keeps_what_the_sr_needs_and_no_pixels_private_tags_or_overlays():
    ds = make_dataset(ramp())
    ds.add_new(0x00091001, "LO", "vendor secret")
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    header = source_header(ds)
    assert "PixelData" not in header and 0x00091001 not in header and 0x60003000 not in header
    assert header.StudyInstanceUID == ds.StudyInstanceUID and header.PatientID == ds.PatientID
    assert header.SOPInstanceUID == ds.SOPInstanceUID and header.SeriesInstanceUID == ds.SeriesInstanceUID


# ---------------------------------------------------------------- the endpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr-serve")
    bundle = make_bundle(root / "bundle")
    process = start_server_process(bundle, model_name=NAME, log_path=root / "inference-log",
                                   output_path=root / "server.log")  # fmt: skip
    process.bundle, process.root = bundle, root
    try:
        yield process
    finally:
        process.stop()


def phi_files(folder: Path, n: int = 2) -> list[Path]:
    study = make_dataset(ramp()).StudyInstanceUID
    files = []
    for i in range(n):
        ds = make_dataset(ramp(48 + 4 * i, 40), body_part=["HAND", "KNEE"][i % 2], study_uid=study, Modality="CR")
        path = folder / f"img{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@needs_dciodvfy
@needs_samples
def test_rest_v2_answers_an_sr_per_image_refused_ct_included_and_logs_no_identifier(server, tmp_path):
    files = phi_files(tmp_path) + [OTHER / CT]
    responses, srs = predict_files_with_sr(server.url, NAME, files)
    assert len(srs) == 3 and [r.applicable for r in responses] == [True, True, False]
    for path, response, data in zip(files, responses, srs):
        assert dciodvfy_errors(data, tmp_path) == []
        source, sr = dcmread(path, stop_before_pixels=True), from_part10(data)
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
        assert referenced_instances(sr) == {(source.SOPClassUID, source.SOPInstanceUID)}
        if response.applicable:
            assert codes_named(sr, codes.DCM.TargetRegion) == [(c.region_codes()[response.region].value, "SCT",
                                                                c.region_codes()[response.region].meaning)]
            assert numbers_named(sr, codes.DCM.Probability) == [(pytest.approx(response.confidence, abs=1e-6), "1")]
        else:
            assert codes_named(sr, c.REFUSAL_REASON)[0][0] == "not_radiograph"
        identity = identity_of_sr(sr)
        assert identity.name == NAME and identity.version == response.model_version
        assert identity.weights_sha256 and identity.release_id == ""  # served from a training bundle
    # The SRs hold the identifiers; the inference log and the server's output never do.
    deadline = time.monotonic() + 60
    while len(read_log(server.root / "inference-log")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(read_log(server.root / "inference-log")) >= 2
    secrets = collect_secrets(files[:2], tmp_path)
    hits = scan([server.root / "inference-log"], secrets, allow={"ACME Radiography"})
    hits += scan_text("server output", server.output_tail(200_000), secrets, allow={"ACME Radiography"})
    assert not hits, report(hits)


def test_grpc_carries_the_srs_as_raw_part10_bytes(server, tmp_path):
    files = phi_files(tmp_path, 1)

    async def call():
        client = InferenceGRPCClient(server.grpc_address, timeout=120, retries=0)
        try:
            return await client.infer(build_infer_request(NAME, [files[0].read_bytes()], sr=True))
        finally:
            await client.close()

    response = asyncio.run(call())
    (raw,) = [o for o in response.outputs if o.name == "sr"][0].as_numpy().reshape(-1)
    assert raw[128:132] == b"DICM"  # the file itself, not base64
    (sr,) = [from_part10(d) for d in parse_sr_output(response)]
    assert sr.StudyInstanceUID == dcmread(files[0]).StudyInstanceUID
    assert parse_infer_response(response)[0].applicable


def test_binary_data_extension_returns_raw_bytes_to_tritonclient(server, tmp_path):
    tritonclient = pytest.importorskip("tritonclient.http")
    files = phi_files(tmp_path, 1)
    client = tritonclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    try:
        tensor = tritonclient.InferInput("dicom", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([files[0].read_bytes()], dtype=np.object_), binary_data=True)
        result = client.infer(NAME, [tensor], parameters={"sr": True},
                              outputs=[tritonclient.InferRequestedOutput("sr", binary_data=True),
                                       tritonclient.InferRequestedOutput("region", binary_data=False)])  # fmt: skip
    finally:
        client.close()
    (raw,) = result.as_numpy("sr").reshape(-1)
    assert raw[128:132] == b"DICM"
    sr = dcmread(io.BytesIO(raw))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == dcmread(files[0]).StudyInstanceUID
    region = result.as_numpy("region").reshape(-1)[0]
    region = region.decode() if isinstance(region, bytes) else str(region)
    assert codes_named(sr, codes.DCM.TargetRegion)[0][0] == c.region_codes()[region].value


def test_pixels_and_v1_requests_asking_for_an_sr_get_a_400_that_says_why(server):
    body = {"inputs": [{"name": "pixels", "shape": [1, 32, 32], "datatype": "FP32", "data": [0.5] * 1024}],
            "parameters": {"sr": True}}
    answer = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=60)
    assert answer.status_code == 400 and "'sr' needs the DICOM input" in answer.json()["error"]
    answer = httpx.post(f"{server.url}/v1/models/{NAME}:predict", timeout=60,
                        json={"instances": [{"b64": "AAAA"}], "parameters": {"sr": True}})  # fmt: skip
    assert answer.status_code == 400 and "v2 protocol only" in answer.json()["error"]


def test_an_answer_without_sr_has_no_sr_output(server, tmp_path):
    files = phi_files(tmp_path, 1)
    body = {"inputs": [{"name": "dicom", "shape": [1], "datatype": "BYTES",
                        "data": [__import__("base64").b64encode(files[0].read_bytes()).decode()]}]}
    answer = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=60)
    assert answer.status_code == 200 and "sr" not in {o["name"] for o in answer.json()["outputs"]}


@needs_samples
def test_the_dicom_transformer_makes_the_srs_of_what_the_predictor_answered(server, tmp_path):
    transformer = start_server_process(server.bundle, model_name=NAME, enable_grpc=False,
                                       extra_args=["--role", "transformer", "--predictor-host",
                                                   server.url.removeprefix("http://")])  # fmt: skip
    try:
        files = phi_files(tmp_path) + [OTHER / CT]
        responses, srs = predict_files_with_sr(transformer.url, NAME, files)
    finally:
        transformer.stop()
    assert [r.applicable for r in responses] == [True, True, False] and len(srs) == 3
    direct, _ = predict_files_with_sr(server.url, NAME, files)
    for path, response, same, data in zip(files, responses, direct, srs):
        sr = from_part10(data)
        assert sr.StudyInstanceUID == dcmread(path, stop_before_pixels=True).StudyInstanceUID
        assert response.region == same.region  # the transformer's SR says what the predictor answered
        assert identity_of_sr(sr).version == same.model_version


def test_xrayops_predict_sr_writes_each_sr_owner_only_named_by_its_own_uid(server, tmp_path):
    from typer.testing import CliRunner

    from xrayops.app.cli import app

    (tmp_path / "in").mkdir()
    files = phi_files(tmp_path / "in")
    out = tmp_path / "srs"
    result = CliRunner().invoke(app, ["predict", *map(str, files), "--url", server.url, "--model-name", NAME, "--sr", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(p for p in out.iterdir() if p.is_file())  # (and the empty .incoming of atomic writes)
    assert len(written) == 2 and oct(out.stat().st_mode & 0o777) == "0o700"
    assert all(p.stat().st_mode & 0o777 == 0o600 and p.name == f"sr-{dcmread(p).SOPInstanceUID}.dcm" for p in written)
    sources = {dcmread(f).SOPInstanceUID for f in files}
    assert {ref[1] for p in written for ref in referenced_instances(dcmread(p))} == sources
    assert [h for h in scan([out], collect_secrets(files, tmp_path / "in")) if h.location == "file name"] == []
