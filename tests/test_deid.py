"""De-identification: keyed pseudonyms, the metadata allow-list, and no PHI in any ingest output."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import structlog
from dicom_factory import FAKE_PHI, make_dataset, ramp, write
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from xrayops.contracts import ManifestRow, PreprocessingSpec
from xrayops.data.manifest import read_manifest
from xrayops.dicom.deid import KEPT_AS_FOUND, PS315_BASIC_PROFILE, pseudonymize, safe_metadata
from xrayops.ingest import default_journal_dir, ingest, write_contact_sheet
from xrayops.versioning import version_dataset

KEY = "test-key-not-secret"


def test_pseudonym_is_stable_keyed_and_namespaced():
    a = pseudonymize("1.2.3.4", KEY, "img-")
    assert a == pseudonymize("1.2.3.4", KEY, "img-")
    assert a.startswith("img-") and len(a) == 4 + 16
    int(a[4:], 16)  # hex
    assert a != pseudonymize("1.2.3.4", "another-key", "img-")
    assert a[4:] != pseudonymize("1.2.3.4", KEY, "stu-")[4:]
    assert pseudonymize("1.2.3.4", KEY.encode(), "img-") == a
    assert pseudonymize("1.2.3.5", KEY, "img-") != a


def test_safe_metadata_is_an_allow_list_of_manifest_fields():
    ds = make_dataset(body_part="HANDGELENK " + "x" * 80, ImageLaterality="L")
    meta = safe_metadata(ds, KEY)
    assert set(meta) <= set(ManifestRow.model_fields)
    assert meta["image_id"] == pseudonymize(ds.SOPInstanceUID, KEY, "img-")
    assert meta["study_id"] == pseudonymize(ds.StudyInstanceUID, KEY, "stu-")
    assert meta["patient_id"] == pseudonymize(FAKE_PHI["PatientID"], KEY, "pat-")
    assert meta["pixel_spacing"] == pytest.approx(0.143)  # from ImagerPixelSpacing
    assert meta["laterality"] == "L" and meta["modality"] == "CR" and meta["view_position"] == "PA"
    assert meta["body_part_raw"] == ""  # longer than a CS value (16): free text, not kept
    assert (meta["original_rows"], meta["original_cols"], meta["bits_stored"]) == (48, 40, 12)
    text = repr(meta)
    for value in [*FAKE_PHI.values(), ds.SOPInstanceUID, ds.StudyInstanceUID]:
        assert value not in text


def test_every_attribute_read_has_its_ps315_basic_profile_action():
    """safe_metadata reads only attributes listed in PS315_BASIC_PROFILE; only those Table E.1-1
    does not list are kept as found, the rest (UIDs, IDs, dates, descriptions) never appear."""
    read: set[str] = set()

    class Recording(Dataset):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

    ds = make_dataset(ImageLaterality="L", StudyDescription="Roentgen Hand PHI-DESC", ProtocolName="PHI-PROT",
                      SeriesDate="20240301", ContentDate="20240302", BurnedInAnnotation="YES")  # fmt: skip
    ds.__class__ = Recording
    meta = safe_metadata(ds, KEY)
    assert read and read <= set(PS315_BASIC_PROFILE)
    assert {"Modality", "BodyPartExamined", "Manufacturer", "ViewPosition"} <= read & KEPT_AS_FOUND
    values = " ".join(str(v) for v in meta.values())
    for keyword, (action, _) in PS315_BASIC_PROFILE.items():
        value = str(ds.get(keyword, "") or "")
        if action != "not listed" and value:
            assert value not in values, keyword  # U/Z/D/X: replaced or removed
    assert meta["burned_in_annotation"] == "YES" and meta["manufacturer"] == str(ds.Manufacturer)


def test_patient_without_id_falls_back_to_the_study():
    ds = make_dataset(patient_id="")
    assert safe_metadata(ds, KEY)["patient_id"] == pseudonymize(ds.StudyInstanceUID, KEY, "pat-")


def test_pixel_spacing_prefers_pixel_spacing_and_ignores_garbage():
    ds = make_dataset(PixelSpacing=[0.2, 0.2])
    assert safe_metadata(ds, KEY)["pixel_spacing"] == pytest.approx(0.2)
    ds = make_dataset()
    del ds.ImagerPixelSpacing
    assert safe_metadata(ds, KEY)["pixel_spacing"] is None


def test_no_phi_in_any_ingest_output_or_log(tmp_path, caplog, capfd):
    """Fake PHI goes in; not one of those strings (or the raw UIDs) comes out anywhere: manifest,
    shards, reports, journal, logs, the DVC-tracked files, the DVC remote and the contact sheet."""
    source = tmp_path / "export"
    uids = []
    for i, part in enumerate(["HAND", "Knie re", "ZZZ_UNMAPPED"]):
        sop, study = generate_uid(), generate_uid()
        uids += [sop, study]
        # PACS exports name folders and files by UID: the names must not carry them out either
        write(source / study / f"{sop}.dcm", make_dataset(ramp(48 + i, 40), body_part=part, sop_uid=sop,
                                                           study_uid=study, BurnedInAnnotation="YES"))  # fmt: skip
    broken = make_dataset(sop_uid=generate_uid())  # PHI-bearing file that gets quarantined
    uids.append(broken.SOPInstanceUID)
    del broken.PixelData
    write(source / "nopixels.dcm", broken)
    write(source / "copy.dcm", make_dataset(ramp(60, 40), sop_uid=uids[0], study_uid=uids[1]))  # duplicate UID

    data_dir = tmp_path / "data"
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = ingest(source, data_dir, PreprocessingSpec(size=16), KEY)
        frame = read_manifest(summary.manifest_path)
        sheet = write_contact_sheet(data_dir, tmp_path / "sheet.png")
        version = version_dataset(tmp_path, data_dir, remote_url=str(tmp_path / "remote"))
    assert summary.n_ok == 3 and summary.reasons == {"duplicate_sop_instance_uid": 1, "no_pixel_data": 1}
    assert set(frame[frame.status == "ok"].burned_in_annotation) == {"YES"}  # carried, for filtering
    assert version.n_files >= 5

    secrets = [*FAKE_PHI.values(), *uids]
    # the dates again in the other common spellings
    secrets += ["1945-03-17", "2024-02-29", "17.03.1945", "29.02.2024"]
    outputs = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(source)]
    names = {p.name for p in outputs}
    assert names >= {"manifest.parquet", "quarantine.csv", "unmapped_body_parts.csv", "data.dvc", "sheet.png"}
    assert any(p.is_relative_to(tmp_path / "remote") for p in outputs)
    assert any(p.is_relative_to(tmp_path / ".dvc" / "cache") for p in outputs)  # the DVC cache too
    assert any(p.is_relative_to(default_journal_dir(data_dir)) for p in outputs)
    for path in outputs:
        blob = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret!r} leaked into {path}"
            assert secret not in str(path.relative_to(tmp_path)), f"{secret!r} in the name {path}"
    # the parquet is compressed: check its decoded cells as well
    cells = " ".join(frame.astype(str).to_numpy().ravel())
    log_text = repr(events) + caplog.text + "".join(capfd.readouterr()) + repr([str(w.message) for w in caught])
    assert "ZZZ_UNMAPPED" in (data_dir / "unmapped_body_parts.csv").read_text()  # a CS body part value is kept
    assert any(e.get("reason") == "no_pixel_data" for e in events)  # the logs did record the run
    for secret in secrets:
        assert secret not in cells
        assert secret not in log_text
    assert np.load(summary.shards_dir / "shard-00000.npy").shape == (3, 16, 16)
    assert sheet.exists()
