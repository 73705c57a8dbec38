"""Folder source: a DICOMDIR medium (files without extension, nested folders) is followed."""
from __future__ import annotations

import warnings

from dicom_factory import make_dataset, ramp, write
from pydicom.fileset import FileSet
from pydicom.uid import DigitalXRayImageStorageForPresentation

from xrayops.contracts import PreprocessingSpec
from xrayops.data.manifest import read_manifest
from xrayops.dicom.deid import source_pseudonym
from xrayops.ingest import find_dicom_files, ingest

KEY = "dicomdir-test-key"


def make_medium(root):
    """A CD/DVD-style export written by pydicom's FileSet: DICOMDIR + PT*/ST*/SE*/IM* (no suffix)."""
    fileset = FileSet()
    for i, part in enumerate(["HAND", "KNEE", "SKULL"]):
        ds = make_dataset(ramp(40 + i, 40), body_part=part, patient_id=f"P{i}")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, i + 1
        fileset.add(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fileset.write(root / "medium")
    return root / "medium"


def test_dicomdir_is_followed_to_files_without_extension(tmp_path):
    medium = make_medium(tmp_path)
    listed = [p.relative_to(medium).as_posix() for p in find_dicom_files(tmp_path)]
    images = [p for p in (medium).rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    assert len(images) == 3 and all("." not in p.name for p in images)  # IM000000 style names
    assert sorted(listed) == sorted(p.relative_to(medium).as_posix() for p in images)  # DICOMDIR itself is an index
    assert all(name.count("/") >= 3 for name in listed)  # PT/ST/SE/IM: found through nested folders

    summary = ingest(tmp_path, tmp_path / "data", PreprocessingSpec(size=16), KEY)
    assert (summary.n_files, summary.n_ok) == (3, 3)
    assert summary.regions == {"hand": 1, "knee": 1, "skull": 1}


def test_file_listed_in_dicomdir_but_absent_is_quarantined_as_missing(tmp_path):
    medium = make_medium(tmp_path)
    gone = sorted(p for p in medium.rglob("*") if p.is_file() and p.name != "DICOMDIR")[0]
    gone.unlink()
    write(tmp_path / "loose" / "extra.dcm", make_dataset(ramp(50, 40), body_part="HAND", patient_id="P9"))
    summary = ingest(tmp_path, tmp_path / "data", PreprocessingSpec(size=16), KEY)
    frame = read_manifest(summary.manifest_path).set_index("source_name")
    assert frame.loc[source_pseudonym(gone.relative_to(tmp_path).as_posix(), KEY), "reason"] == "missing_file"
    assert (summary.n_files, summary.n_ok, summary.reasons) == (4, 3, {"missing_file": 1})
