"""Small synthetic DICOM files for the ingestion tests, built with pydicom (no other generator)."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

# Fake PHI, distinctive enough to grep for in every output byte.
FAKE_PHI = {
    "PatientName": "Mustermann^Erika^PHIMARKER",
    "PatientID": "PHI-PID-424242",
    "PatientBirthDate": "19450317",
    "AccessionNumber": "ACC-PHI-777",
    "InstitutionName": "Sankt Fakename Klinikum",
    "ReferringPhysicianName": "Doktor^Geheim",
    "StudyDate": "20240229",
    "StudyTime": "134501",
    "OperatorsName": "Operator^Verborgen",
}


def ramp(rows: int = 48, cols: int = 40, bits: int = 12) -> np.ndarray:
    """A diagonal ramp over the full stored range: every image is distinct but deterministic."""
    y, x = np.mgrid[0:rows, 0:cols]
    values = (x + y) / (rows + cols - 2) * (2**bits - 1)
    return values.round().astype(np.uint16 if bits > 8 else np.uint8)


def make_dataset(
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    body_part: str = "HAND",
    patient_id: str = FAKE_PHI["PatientID"],
    sop_uid: str | None = None,
    study_uid: str | None = None,
    phi: bool = True,
    **tags: object,
) -> Dataset:
    """A native (uncompressed) Explicit VR Little Endian dataset; `tags` are set last.

    Free text such as "Knie re" breaks the CS rules just like real PACS data; pydicom's
    validation warnings about it are silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _make_dataset(pixels, photometric, bits_stored, body_part, patient_id, sop_uid, study_uid, phi, tags)


def _make_dataset(pixels, photometric, bits_stored, body_part, patient_id, sop_uid, study_uid, phi, tags) -> Dataset:
    if pixels is None:
        pixels = ramp(bits=bits_stored)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Manufacturer = "ACME Radiography"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    if phi:
        for keyword, value in FAKE_PHI.items():
            setattr(ds, keyword, value)
    ds.PatientID = patient_id
    ds.ImagerPixelSpacing = [0.143, 0.143]
    if pixels.ndim == 3 and photometric == "RGB":
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        rows, cols = pixels.shape[:2]
    else:
        ds.SamplesPerPixel = 1
        rows, cols = pixels.shape[-2:]
        if pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = rows, cols
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored if pixels.dtype.itemsize > 1 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset, *, part10: bool = True) -> bytes:
    """Serialise: Part 10 (preamble + file meta) or raw (no preamble, no meta, like old exports)."""
    buffer = io.BytesIO()
    if part10:
        dcmwrite(buffer, ds, enforce_file_format=True)
    else:
        raw = Dataset()
        raw.update(ds)
        dcmwrite(buffer, raw, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def write(path: Path, ds: Dataset, *, part10: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(ds, part10=part10))
    return path
