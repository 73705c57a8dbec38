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


def test_every_attribute_read_is_handled_at_least_as_strictly_as_table_e1_1():
    """safe_metadata reads only attributes PS315_BASIC_PROFILE names; only those kept as found may
    show their value, and the Table E.1-1 actions of the rest (U/Z/D/X) hold: pseudonymised or gone."""
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
    for keyword, (handling, _) in PS315_BASIC_PROFILE.items():
        value = str(ds.get(keyword, "") or "")
        if handling != "kept" and value:
            assert value not in values, keyword  # pseudonymised or derived: never as found
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
                                                           study_uid=study, BurnedInAnnotation="NO"))  # fmt: skip
    broken = make_dataset(sop_uid=generate_uid())  # PHI-bearing file that gets quarantined
    uids.append(broken.SOPInstanceUID)
    del broken.PixelData
    write(source / "nopixels.dcm", broken)
    write(source / "copy.dcm", make_dataset(ramp(60, 40), sop_uid=uids[0], study_uid=uids[1],
                                            BurnedInAnnotation="NO"))  # duplicate UID (which one is kept: key order)

    data_dir = tmp_path / "data"
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = ingest(source, data_dir, PreprocessingSpec(size=16), KEY)
        frame = read_manifest(summary.manifest_path)
        sheet = write_contact_sheet(data_dir, tmp_path / "sheet.png")
        version = version_dataset(tmp_path, data_dir, remote_url=str(tmp_path / "remote"))
    assert summary.n_ok == 3 and summary.reasons == {"duplicate_sop_instance_uid": 1, "no_pixel_data": 1}
    assert set(frame[frame.status == "ok"].burned_in_annotation) == {"NO"}  # carried, for filtering
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


# --- the key -------------------------------------------------------------------------------------


def _settings(monkeypatch, **env):
    from xrayops.config import Settings

    for name in ("XRAYOPS_DEID_KEY", "XRAYOPS_DEID_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_no_key_no_run_and_the_message_says_how_to_make_one(monkeypatch):
    from xrayops.dicom.deid import DeidKeyError, require_key

    with pytest.raises(DeidKeyError, match="xrayops keygen"):
        require_key(_settings(monkeypatch))
    with pytest.raises(DeidKeyError, match="weak key"):
        require_key(_settings(monkeypatch, XRAYOPS_DEID_KEY="short-key-15byt"))
    with pytest.raises(DeidKeyError, match="published with the code"):
        require_key(_settings(monkeypatch, XRAYOPS_DEID_KEY="xrayops-dev-key-change-me"))
    assert require_key(_settings(monkeypatch, XRAYOPS_DEID_KEY="sixteen-bytes-ok")) == b"sixteen-bytes-ok"


def test_key_from_a_file_such_as_a_mounted_secret(monkeypatch, tmp_path):
    from xrayops.dicom.deid import DeidKeyError, generate_key, require_key, write_key_file

    key = generate_key()
    assert len(bytes.fromhex(key)) == 32
    path = write_key_file(tmp_path / "deid.key", key)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_key_file(path, generate_key())  # a key in use is never overwritten
    assert require_key(_settings(monkeypatch, XRAYOPS_DEID_KEY_FILE=str(path))) == key.encode()
    assert require_key(_settings(monkeypatch, XRAYOPS_DEID_KEY_FILE=str(path), XRAYOPS_DEID_KEY=key)) == key.encode()
    with pytest.raises(DeidKeyError, match="different keys"):
        require_key(_settings(monkeypatch, XRAYOPS_DEID_KEY_FILE=str(path), XRAYOPS_DEID_KEY="x" * 32))
    with pytest.raises(DeidKeyError, match="cannot be read"):
        require_key(_settings(monkeypatch, XRAYOPS_DEID_KEY_FILE=str(tmp_path / "absent")))


def test_every_pseudonym_and_hash_changes_with_the_key():
    from xrayops.dicom.deid import keyed_hash, source_pseudonym

    other = "another-key-of-16+bytes"
    ds = make_dataset()
    a, b = safe_metadata(ds, KEY), safe_metadata(ds, other)
    for field in ("image_id", "study_id", "patient_id"):
        assert a[field] != b[field], field
    assert source_pseudonym("DOE_JANE/ACC1/PAT1_ACC1_1.dcm", KEY) != source_pseudonym("DOE_JANE/ACC1/PAT1_ACC1_1.dcm", other)
    assert keyed_hash(KEY, "file", [b"x"]) != keyed_hash(other, "file", [b"x"])
    import hashlib

    assert keyed_hash(KEY, "file", [b"x"]) != hashlib.sha256(b"x").hexdigest()  # not recomputable without the key
    assert keyed_hash(KEY, "file", [b"ab"]) == keyed_hash(KEY, "file", [b"a", b"b"])  # chunking does not matter
    assert keyed_hash(KEY, "file", [b"x"]) != keyed_hash(KEY, "pixels", [b"x"])


def test_source_pseudonym_keeps_only_a_dicom_suffix():
    from xrayops.dicom.deid import source_pseudonym

    name = source_pseudonym("DOE_JANE_19700101/ACC12345678/PAT987654_ACC12345678_1.DCM", KEY)
    assert name.startswith("src-") and name.endswith(".dcm") and len(name) == 4 + 16 + 4
    assert source_pseudonym("1.2.840.10008.5.1.4.1.1.1.12345", KEY).startswith("src-")  # ".12345" is no suffix
    assert "." not in source_pseudonym("1.2.840.10008.5.1.4.1.1.1.12345", KEY)


@pytest.mark.parametrize(
    ("value", "vr", "kept"),
    [("HAND", "CS", "HAND"), ("Knie re", "CS", "Knie re"), ("ZZZ-UNMAPPED", "CS", "ZZZ-UNMAPPED"),
     ("Doe^Jane", "CS", ""), ("Schädel", "CS", ""), ("A" * 17, "CS", ""), ("1.2.840.99", "CS", ""),
     ("GE Healthcare", "LO", "GE Healthcare"), ("Agfa-Gevaert, N.V.", "LO", "Agfa-Gevaert, N.V."),
     ("Doe^Jane", "LO", ""), ("x\\y", "LO", ""), ("A" * 65, "LO", ""), ("1.2.840.10008.1.2.1", "UI", "1.2.840.10008.1.2.1"),
     ("1.2.3 DOE", "UI", ""), (None, "CS", ""), (12, "LO", "")],
)
def test_text_fields_are_bounded_to_their_vr(value, vr, kept):
    from xrayops.dicom.deid import bounded

    assert bounded(value, vr) == kept


def test_safe_metadata_drops_free_text_in_code_fields():
    ds = make_dataset(body_part="DOE^JANE 19700101", ViewPosition="PA Doe Jane extra long", Manufacturer="Doe^Jane")
    meta = safe_metadata(ds, KEY)
    assert meta["body_part_raw"] == meta["view_position"] == meta["manufacturer"] == ""


# --- the landing folder ---------------------------------------------------------------------------


def test_landing_drops_private_tags_and_overlays_and_keeps_the_pixels(tmp_path):
    import io

    import pydicom

    from xrayops.sources import landing_bytes, write_atomically

    ds = make_dataset(ramp(40, 32))
    ds.add_new(0x00091010, "LO", "private PHI-PRIVATE")
    ds.add_new(0x60000010, "US", 32)
    ds.add_new(0x60004000, "LT", "overlay PHI-OVERLAY")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    sent = buffer.getvalue()
    landed = landing_bytes(sent)
    assert b"PHI-PRIVATE" not in landed and b"PHI-OVERLAY" not in landed
    back = pydicom.dcmread(io.BytesIO(landed))
    assert 0x00091010 not in back and 0x60000010 not in back and back.SOPInstanceUID == ds.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    assert landing_bytes(sent, keep_private=True) == sent  # a site's opt-in
    assert landing_bytes(b"garbage") == b"garbage"  # lands as received: ingestion quarantines it
    target = write_atomically(tmp_path / "landing", "x.dcm", landed)
    assert target.stat().st_mode & 0o777 == 0o600 and (tmp_path / "landing").stat().st_mode & 0o777 == 0o700


# --- the CLI ----------------------------------------------------------------------------------------


def _cli(args, env_key: str | None, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XRAYOPS_DEID_KEY", "XRAYOPS_DEID_KEY_FILE")}
    env["XRAYOPS_PROGRESS"] = "0"
    if env_key is not None:
        env["XRAYOPS_DEID_KEY"] = env_key
    return subprocess.run([sys.executable, "-m", "xrayops.app.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)  # fmt: skip


def test_cli_refuses_ingest_listen_and_serve_without_a_key_and_keygen_makes_one(tmp_path):
    source = tmp_path / "export"
    write(source / "a.dcm", make_dataset())
    for args in (["ingest", str(source), "--data-dir", str(tmp_path / "data")], ["listen", "--port", "0"],
                 ["serve", "--model", str(tmp_path / "no-bundle")]):
        result = _cli(args, None, tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "XRAYOPS_DEID_KEY" in result.stderr and "keygen" in result.stderr, args
    assert not (tmp_path / "data").exists()
    weak = _cli(["ingest", str(source), "--data-dir", str(tmp_path / "data")], "too-short", tmp_path)
    assert weak.returncode == 2 and "weak key" in weak.stderr

    made = _cli(["keygen", "--out", str(tmp_path / "keys" / "deid.key")], None, tmp_path)
    assert made.returncode == 0, made.stderr
    key_file = tmp_path / "keys" / "deid.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_text().strip()) == 64
    assert "XRAYOPS_DEID_KEY_FILE" in made.stderr
    assert _cli(["keygen", "--out", str(key_file)], None, tmp_path).returncode == 2  # never overwritten
    printed = _cli(["keygen"], None, tmp_path)
    assert printed.returncode == 0 and len(printed.stdout.strip()) == 64 and printed.stdout.strip() not in made.stderr


def test_demo_key_is_explicit_public_and_reaches_the_processes_the_demo_starts(monkeypatch):
    import os

    from xrayops.config import Settings
    from xrayops.app.demo import with_demo_key
    from xrayops.dicom.deid import DEMO_KEY, require_key

    monkeypatch.setenv("XRAYOPS_DEID_KEY", "a-real-site-key-of-enough-bytes")
    monkeypatch.setenv("XRAYOPS_DEID_KEY_FILE", "/nonexistent")
    settings = with_demo_key(Settings())
    assert require_key(settings) == DEMO_KEY.encode()
    assert os.environ["XRAYOPS_DEID_KEY"] == DEMO_KEY and "XRAYOPS_DEID_KEY_FILE" not in os.environ


def test_overlay_bits_in_the_unused_high_bits_never_reach_the_pixels():
    """The retired 'overlay in pixel data' puts burned text in bits above BitsStored: masked away."""
    import io

    from xrayops.dicom.decode import decode_pixels, read_dicom

    pixels = ramp(8, 8, bits=12).astype(np.uint16)
    pixels[0, :] |= 0x8000  # a line of overlay in bit 15
    ds = make_dataset(pixels, bits_stored=12)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    decoded = decode_pixels(read_dicom(buffer.getvalue()))
    assert decoded.max() <= 4095
    np.testing.assert_array_equal(decoded, ramp(8, 8, bits=12))
