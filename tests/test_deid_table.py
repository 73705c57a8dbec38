"""The de-identification table checked against DICOM PS3.15 Table E.1-1, attribute by attribute.

xrayops/dicom/ps315_table_e1_1.json is the standard's table (621 attributes, Basic Profile action
and option columns), vendored from a machine-readable copy (provenance and licence inside it;
regenerate with `python -m xrayops.dicom.ps315_vendor SOURCE`). Checked here:
  - the vendored copy equals the shared copy of the table where that is present (CI has it);
  - every attribute xrayops.dicom.deid.PS315_BASIC_PROFILE names is handled at least as strictly
    as its action: kept as found only where Table E.1-1 does not list it (or says K); a keyed
    pseudonym only where it allows a replacement (U, D, or Z); read-to-derive for the rest;
  - every attribute ingestion actually reads, recorded on a real run of process_file over a file
    carrying 60-odd identifying attributes, private tags and an overlay, is either not in Table
    E.1-1 or one of the above; no private tag and no overlay or curve group is read at all;
  - the one option claimed (Clean Descriptors) holds for every attribute it marks C that is read;
    no option that keeps dates, UIDs, device or institution identity, or patient characteristics
    is relied on.

Cross-check against an independent implementation: dicom-anonymizer 2.1.0 from PyPI (installed
into a scratch venv, not into this project), database dicomfields_2024b. It agrees with the
vendored table on every attribute compared (INDEPENDENT below): PatientID Z/D; SOP and Study
Instance UID U; StudyDescription and SeriesDescription X; ProtocolName X/D; Requested Procedure
Description X/Z; DeviceSerialNumber, StationName and InstitutionName X/Z/D; AccessionNumber,
PatientName and StudyDate Z. None of the attributes ingestion keeps as found (Manufacturer,
BodyPartExamined, ViewPosition, ImageLaterality, Laterality, BurnedInAnnotation, PixelSpacing,
ImagerPixelSpacing, Modality, PhotometricInterpretation, BitsStored, Rows, Columns) is in any of
its action lists, i.e. it keeps them too.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
from conftest import SHARED
from dicom_factory import FAKE_PHI, make_dataset, ramp
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

import xrayops.ingest as ingest_module
from xrayops.contracts import PreprocessingSpec
from xrayops.dicom.deid import (
    CLAIMED_OPTIONS,
    PS315_BASIC_PROFILE,
    PS315_TABLE_FILE,
    basic_profile_action,
    basic_profile_table,
)

SHARED_TABLE = SHARED / "dicom-standard" / "confidentiality_profile_attributes.json"
# dicom-anonymizer 2.1.0 (dicomfields_2024b), read from its action lists (see the module docstring).
INDEPENDENT = {
    "PatientID": "Z/D", "SOPInstanceUID": "U", "StudyInstanceUID": "U", "StudyDescription": "X",
    "SeriesDescription": "X", "ProtocolName": "X/D", "RequestedProcedureDescription": "X/Z",
    "DeviceSerialNumber": "X/Z/D", "StationName": "X/Z/D", "InstitutionName": "X/Z/D", "AccessionNumber": "Z",
    "PatientName": "Z", "StudyDate": "Z",
}  # fmt: skip
KEPT_BY_INDEPENDENT = ("Manufacturer", "BodyPartExamined", "ViewPosition", "ImageLaterality", "Laterality",
                       "BurnedInAnnotation", "PixelSpacing", "ImagerPixelSpacing", "Modality",
                       "PhotometricInterpretation", "BitsStored", "Rows", "Columns")  # fmt: skip
# Which handlings satisfy which Basic Profile action codes (PS3.15 Table E.1-1a).
ALLOWED = {
    "kept": {None, "K"},
    "pseudonym": {"U", "D", "Z", "Z/D", "X/D", "X/Z/D", "X/Z/U*"},  # a consistent keyed replacement
    "derived": "any",  # the value is never stored: as strict as X
}
TABLE = basic_profile_table()


def action(keyword: str) -> str | None:
    return basic_profile_action(tag_for_keyword(keyword), TABLE)


def test_vendored_table_is_the_standards_table():
    data = json.loads(PS315_TABLE_FILE.read_text(encoding="utf-8"))
    assert len(data["attributes"]) == 621
    assert "Innolitics" in data["provenance"]["licence"] and "PS3.15" in data["provenance"]["standard"]
    if not SHARED_TABLE.exists():
        pytest.skip(f"the shared copy of Table E.1-1 is not at {SHARED_TABLE}")
    shared = {r["id"]: r for r in json.loads(SHARED_TABLE.read_text(encoding="utf-8"))}
    assert set(shared) == set(TABLE)
    for tag_id, row in shared.items():
        ours = TABLE[tag_id]
        assert ours["basicProfile"] == row["basicProfile"], tag_id
        assert {k: v for k, v in ours.items() if k.endswith("Opt")} == {k: v for k, v in row.items() if k.endswith("Opt")}


@pytest.mark.parametrize("keyword", sorted(PS315_BASIC_PROFILE))
def test_each_handled_attribute_is_at_least_as_strict_as_its_action(keyword):
    handling, _ = PS315_BASIC_PROFILE[keyword]
    code = action(keyword)
    allowed = ALLOWED[handling]
    assert allowed == "any" or code in allowed, f"{keyword}: Table E.1-1 says {code}, handled as {handling}"
    row = TABLE.get(f"{tag_for_keyword(keyword):08x}", {})
    for option, value in row.items():
        if option.endswith("Opt") and option in CLAIMED_OPTIONS and value == "C":
            assert handling in ("derived", "pseudonym"), f"{keyword}: {option} cleans it; it must not be kept raw"


def test_lookup_covers_repeating_groups_and_private_tags():
    assert basic_profile_action(0x60223000, TABLE) == "X"  # overlay data of any 60xx group
    assert basic_profile_action(0x50000010, TABLE) == "X"  # curve data
    assert basic_profile_action(0x00191001, TABLE) == "X"  # private
    assert basic_profile_action(0x00280010, TABLE) is None  # Rows: not an identifier


@pytest.mark.parametrize("keyword", sorted(INDEPENDENT))
def test_an_independent_implementation_agrees(keyword):
    assert action(keyword) == INDEPENDENT[keyword]


def test_what_ingestion_keeps_the_independent_implementation_keeps_too():
    kept = {k for k, (h, _) in PS315_BASIC_PROFILE.items() if h == "kept"}
    assert kept <= set(KEPT_BY_INDEPENDENT)
    assert all(action(k) is None for k in KEPT_BY_INDEPENDENT)


class Recording(Dataset):
    """A Dataset that notes every attribute looked up, by tag."""

    read: set[int] = set()

    def _note(self, key) -> None:
        try:
            tag = tag_for_keyword(key) if isinstance(key, str) else int(pydicom.tag.Tag(key))
        except Exception:
            return
        if tag is not None:
            Recording.read.add(int(tag))

    def __getattr__(self, name):
        self._note(name)
        return super().__getattr__(name)

    def __getitem__(self, key):
        if not isinstance(key, slice):
            self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)

    def get_item(self, key, *args, **kwargs):
        self._note(key)
        return super().get_item(key, *args, **kwargs)


def _identifying_dataset() -> Dataset:
    """A radiograph carrying every kind of identifier Table E.1-1 names that pydicom can write."""
    ds = make_dataset(ramp(64, 56), body_part="HAND", StudyDescription="Roentgen Hand", SeriesDescription="Hand pa",
                      ProtocolName="Hand 2 Ebenen", RequestedProcedureDescription="Hand li",
                      BurnedInAnnotation="NO", ImageLaterality="L")  # fmt: skip
    for row in TABLE.values():
        if len(row["id"]) != 8 or "x" in row["id"]:
            continue
        tag = int(row["id"], 16)
        keyword = keyword_for_tag(tag)
        if not keyword or tag in ds or tag >> 16 in (0x0000, 0x0002, 0x7FE0):
            continue
        vr = pydicom.datadict.dictionary_VR(tag)
        value = {"PN": "Doe^Jane", "DA": "19700101", "TM": "120000", "DT": "19700101120000", "UI": "1.2.3.4.5",
                 "AS": "045Y", "CS": "PHI", "LO": "PHI text", "SH": "PHI", "ST": "PHI text", "LT": "PHI text",
                 "UT": "PHI text", "UC": "PHI", "AE": "PHIAE", "DS": "1", "IS": "1", "US": 1, "SS": 1, "UL": 1,
                 "FL": 1.0, "FD": 1.0, "UR": "http://phi"}.get(vr)  # fmt: skip
        if value is not None:
            ds.add_new(tag, vr, value)
    ds.add_new(0x00091010, "LO", "private PHI")
    ds.add_new(0x60003000, "OW", b"\x00\x00" * 8)
    ds.add_new(0x60004000, "LT", "overlay PHI")
    return ds


def test_ingestion_reads_only_what_the_table_allows(tmp_path, monkeypatch):
    ds = _identifying_dataset()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = tmp_path / "phi.dcm"
    path.write_bytes(buffer.getvalue())
    assert len([t for t in ds.keys() if basic_profile_action(int(t), TABLE) not in (None, "K")]) > 60

    real_read = ingest_module.read_dicom

    def recording_read(data):
        read = real_read(data)
        read.__class__ = Recording
        return read

    Recording.read = set()
    monkeypatch.setattr(ingest_module, "read_dicom", recording_read)
    process = getattr(ingest_module, "process_file", None) or ingest_module._process_file
    entries = process(path, "src-0000000000000000.dcm", PreprocessingSpec(size=16), "table-test-key-0123",
                      ingest_module.default_synonyms())  # fmt: skip
    assert entries and entries[0].row.status == "ok", entries[0].detail
    read = Recording.read
    assert read, "nothing recorded: the recording hook is broken"
    assert {tag_for_keyword(k) for k in ("SOPInstanceUID", "PatientID", "BodyPartExamined")} <= read
    offenders = []
    for tag in sorted(read):
        group = tag >> 16
        assert group % 2 == 0, f"private tag {tag:08x} read"
        assert not (0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF), f"overlay/curve {tag:08x} read"
        code = basic_profile_action(tag, TABLE)
        keyword = keyword_for_tag(tag)
        if code in (None, "K"):
            continue
        if keyword not in PS315_BASIC_PROFILE:
            offenders.append(f"{keyword or hex(tag)} ({code})")
    assert not offenders, f"ingestion reads attributes Table E.1-1 removes and PS315_BASIC_PROFILE does not handle: {offenders}"
    row = entries[0].row.model_dump()
    stored = " ".join(str(v) for v in row.values())
    for secret in ("Doe^Jane", "19700101", "PHI", "1.2.3.4.5", FAKE_PHI["PatientID"], ds.SOPInstanceUID):
        assert secret not in stored, secret


def test_the_table_file_ships_with_the_package():
    assert PS315_TABLE_FILE.parent == Path(ingest_module.__file__).parent / "dicom"
