"""The admission policy: only human projection radiographs enter a dataset, everything else is
quarantined with a reason code (ingestion) and never gets a split or a region label."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.conftest import DICOM_SAMPLES
import numpy as np

from tests.dicom_factory import make_dataset as factory_dataset
from tests.dicom_factory import write
from xrayops.config import Settings
from xrayops.contracts import PreprocessingSpec
from xrayops.data.manifest import read_manifest
from xrayops.dicom.admission import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    REASONS,
    AdmissionPolicy,
    admit,
)
from xrayops.ingest import ingest, scan_source

KEY = "admission-test-key-0123456789"
OTHER = DICOM_SAMPLES / "other"
needs_samples = pytest.mark.skipif(not OTHER.is_dir(), reason=f"real DICOM samples not present at {OTHER}")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def make_dataset(seed: int = 0, rows: int = 48, cols: int = 40, body_part: str = "HAND") -> Dataset:
    """A CR file with its own pixels (so that no two are duplicates)."""
    pixels = (np.random.default_rng(seed).random((rows, cols)) * 4000).astype(np.uint16)
    return factory_dataset(pixels, body_part=body_part)


def header(**tags) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.SOPClassUID, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", CR_IMAGE_STORAGE, "MONOCHROME1", 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "tags, reason, detail",
    [
        ({"Modality": "CT", "SOPClassUID": CT_IMAGE_STORAGE}, "not_radiograph", "modality CT"),
        ({"Modality": "MR"}, "not_radiograph", "modality MR"),
        ({"Modality": None, "SOPClassUID": CT_IMAGE_STORAGE}, "not_radiograph", f"SOP class {CT_IMAGE_STORAGE}"),
        ({"Modality": None, "SOPClassUID": None}, "not_radiograph", "neither Modality nor SOP Class UID is present"),
        ({"SOPClassUID": SECONDARY_CAPTURE}, "secondary_capture", f"SOP class {SECONDARY_CAPTURE}"),
        ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "colour_image", "photometric interpretation RGB"),
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour_image", "photometric interpretation PALETTE COLOR"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer", "ImageType ORIGINAL\\PRIMARY\\LOCALIZER"),
        ({"ImageType": ["DERIVED", "SECONDARY"]}, "secondary_image", "ImageType DERIVED\\SECONDARY"),
        ({"PatientSpeciesDescription": "Feline"}, "non_human", "species Feline"),
        ({"PatientBreedDescription": "Labrador"}, "non_human", "a breed is given"),
        ({"BurnedInAnnotation": "YES"}, "burned_in_annotation", None),
        ({"RecognizableVisualFeatures": "YES"}, "recognizable_features", None),
    ],
)
def test_refusals_name_their_reason(tags, reason, detail):
    decision = admit(header(**tags), AdmissionPolicy())
    assert not decision.admitted
    assert decision.reason == reason and reason in REASONS
    if detail is not None:
        assert decision.detail == detail


@pytest.mark.parametrize(
    "tags",
    [
        {},
        {"Modality": "DX", "SOPClassUID": DX_FOR_PRESENTATION, "PhotometricInterpretation": "MONOCHROME2"},
        {"Modality": None},  # raw files without Modality: the SOP class decides
        {"ImageType": ["DERIVED", "PRIMARY", "POST_PROCESSED"]},  # a processed DX for presentation
        {"PatientSpeciesDescription": "Homo sapiens"},
        {"BurnedInAnnotation": "NO"},
    ],
)
def test_human_cr_and_dx_radiographs_are_admitted(tags):
    assert admit(header(**tags), AdmissionPolicy()).admitted


def test_species_codes_other_than_human_are_refused():
    ds = header()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "448169003", "SCT", "Domestic cat"
    ds.PatientSpeciesCodeSequence = Sequence([code])
    assert admit(ds, AdmissionPolicy()).reason == "non_human"
    code.CodeValue, code.CodeMeaning = "337915000", "Homo sapiens"
    assert admit(ds, AdmissionPolicy()).admitted


def test_burned_in_text_is_refused_for_datasets_only_and_only_until_the_site_says_it_cleaned_it():
    ds = header(BurnedInAnnotation="YES")
    assert admit(ds, AdmissionPolicy(), "training").reason == "burned_in_annotation"
    assert admit(ds, AdmissionPolicy(), "inference").admitted  # the client sent it; nothing is stored
    assert admit(ds, AdmissionPolicy(pixels_cleaned=True), "training").admitted


def test_a_site_widens_and_narrows_the_policy_by_settings(monkeypatch):
    rg = header(Modality="RG", SOPClassUID=None)
    assert admit(rg, Settings().admission_policy()).reason == "not_radiograph"
    monkeypatch.setenv("XRAYOPS_ADMIT_MODALITIES", '["CR", "DX", "RG"]')
    assert admit(rg, Settings().admission_policy()).admitted
    monkeypatch.setenv("XRAYOPS_ADMIT_MODALITIES", '["DX"]')
    assert admit(header(), Settings().admission_policy()).detail == "modality CR"
    monkeypatch.setenv("XRAYOPS_ADMIT_LOCALIZERS", "true")
    localizer = header(Modality="DX", SOPClassUID=DX_FOR_PRESENTATION, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert admit(localizer, Settings().admission_policy()).admitted


def test_refusal_details_carry_no_free_text_beyond_a_narrow_character_set():
    decision = admit(header(PatientSpeciesDescription="Doe^Jane <script>"), AdmissionPolicy())
    assert decision.reason == "non_human" and "^" not in decision.detail and "<" not in decision.detail


def test_ingestion_quarantines_refused_files_with_no_split_and_no_region(tmp_path):
    source = tmp_path / "export"
    write(source / "cr.dcm", make_dataset(body_part="HAND", seed=1))
    ct = make_dataset(body_part="HEAD", seed=2)
    ct.Modality, ct.SOPClassUID = "CT", CT_IMAGE_STORAGE
    ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    write(source / "ct.dcm", ct)
    cat = make_dataset(body_part="KNEE", seed=3)
    cat.PatientSpeciesDescription = "Feline"
    write(source / "cat.dcm", cat)
    burned = make_dataset(body_part="CHEST", seed=4)
    burned.BurnedInAnnotation = "YES"
    write(source / "burned.dcm", burned)

    summary = ingest(source, tmp_path / "data", PreprocessingSpec(size=16), KEY)
    frame = read_manifest(summary.manifest_path)
    ok = frame[frame.status == "ok"]
    assert len(ok) == 1 and ok.region.tolist() == ["hand"]
    refused = frame[frame.status != "ok"]
    assert sorted(refused.reason) == ["burned_in_annotation", "non_human", "not_radiograph"]
    assert set(refused.split) == {""} and set(refused.region) == {"unknown"}  # a CT "HEAD" is not a skull
    assert summary.refused == {"burned_in_annotation": 1, "non_human": 1, "not_radiograph": 1}
    quarantine = pd.read_csv(summary.quarantine_path)
    assert "modality CT" in set(quarantine.detail) and "species Feline" in set(quarantine.detail)
    spec = json.loads((tmp_path / "data" / "preprocessing.json").read_text())
    assert spec["admission"]["modalities"] == ["CR", "DX"] and spec["admission"]["pixels_cleaned"] is False

    cleaned = PreprocessingSpec(size=16, admission=AdmissionPolicy(pixels_cleaned=True))
    again = ingest(source, tmp_path / "data-cleaned", cleaned, KEY)
    assert again.n_ok == 2 and again.refused == {"non_human": 1, "not_radiograph": 1}


@needs_samples
def test_real_non_radiographs_never_enter_a_dataset(tmp_path):
    """Every CT/MR/US/NM/OT/secondary-capture file of the real samples is refused with a reason."""
    manifest = pd.read_csv(OTHER / "MANIFEST.tsv", sep="\t", dtype=str).fillna("")
    summary = ingest(OTHER, tmp_path / "data", PreprocessingSpec(size=32), KEY, workers=2)
    frame = read_manifest(summary.manifest_path)
    assert len(frame) == len(manifest) and summary.n_ok == 0
    assert set(frame.split) == {""} and set(frame.region) == {"unknown"}
    assert set(frame.reason) <= {"not_radiograph", "secondary_capture", "colour_image"}
    by_modality = dict(zip(manifest.Modality, manifest.SOPClass))
    assert {"CT", "MR", "US", "NM", "OT"} <= set(by_modality)
    assert summary.refused["not_radiograph"] == (manifest.Modality != "").sum()
    assert summary.refused["secondary_capture"] == (manifest.Modality == "").sum()


def test_files_passed_over_before_decoding_are_counted_by_reason(tmp_path):
    source = tmp_path / "export"
    write(source / "a" / "one.dcm", make_dataset(seed=1))
    (source / ".DS_Store").write_bytes(b"\0")
    (source / "a" / "report.pdf").write_bytes(b"%PDF")
    (source / "a" / "dangling.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (source / "a" / "loop.dcm").symlink_to(source / "a" / "loop.dcm")
    (source / "back").symlink_to(source, target_is_directory=True)  # a folder link to its own parent
    scan = scan_source(source)
    assert [p.name for p in scan.paths] == ["one.dcm"]
    assert scan.skipped == {"dangling_link": 1, "folder_link": 1, "hidden": 1, "not_dicom_extension": 1,
                            "symlink_loop": 1}
    summary = ingest(source, tmp_path / "data", PreprocessingSpec(size=16), KEY)
    assert summary.skipped == scan.skipped and summary.n_files == 1


def _decode_workers(parent: psutil.Process) -> list[psutil.Process]:
    return [c for c in parent.children(recursive=True) if "python" in c.name().lower()]


def test_a_killed_ingest_leaves_no_decode_workers(tmp_path):
    source = tmp_path / "export"
    for i in range(400):
        write(source / f"img{i:04d}.dcm", make_dataset(seed=i, rows=512, cols=512))
    env = {**os.environ, "XRAYOPS_DEID_KEY": KEY, "XRAYOPS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xrayops.app.cli", "ingest", str(source), "--data-dir", str(tmp_path / "data"),
         "--workers", "2", "--size", "256", "--batch-size", "1000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(proc.pid)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
            workers = _decode_workers(parent)
            time.sleep(0.2)
        assert len(workers) >= 2, "the decode workers never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"{len(alive)} decode workers outlived a SIGKILLed ingest"
    finally:
        for worker in workers:  # only the processes this test started
            if worker.is_running():
                worker.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
