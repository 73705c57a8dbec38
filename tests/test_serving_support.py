"""Shared helpers for the serving tests (no tests here): tiny bundles and DICOM files."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xrayops.bundle import save_bundle
from xrayops.contracts import Lineage, ModelBundleMeta, PreprocessingSpec
from xrayops.models.backbone import build_backbone
from xrayops.models.heads import RegionClassifier
from xrayops.regions import REGIONS

SIZE = 32
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation


def make_bundle(path: Path, seed: int = 0, ssl_method: str = "simclr", rotation_average: bool = False,
                size: int = SIZE, orientation: bool = False) -> Path:
    """A random-weights ResNet18 bundle; confidence threshold 0 so disagreement flags show.
    `orientation` adds paper 004's (cos, sin) head (random weights: some angle)."""
    torch.manual_seed(seed)
    backbone, dim = build_backbone("resnet18")
    model = RegionClassifier(backbone, dim, len(REGIONS), rotation_average, orientation=orientation)
    meta = ModelBundleMeta(
        name="xrayops-region", ssl_method=ssl_method, classes=list(REGIONS), orientation=orientation,
        preprocessing=PreprocessingSpec(size=size), ood_threshold=0.0, confidence_threshold=0.0,
        lineage=Lineage(dataset_md5="abc.dir", git_commit="deadbeef", pipeline_run=f"run-{ssl_method}",
                        metrics={"accuracy": 0.5}),
    )
    save_bundle(path, model, meta)
    return path


def make_dataset(body_part: str = "HAND", seed: int = 0, rows: int = 48, cols: int = 40, frames: int = 1,
                 with_pixels: bool = True, sop_uid: str | None = None) -> Dataset:
    """A 12-bit DX dataset in explicit VR little endian, as a modality would write it."""
    rng = np.random.default_rng(seed)
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    pixels = (rng.random(shape) * 4000).astype(np.uint16)
    sop_uid = sop_uid or generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = DX_CLASS
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_CLASS, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "PAT-0001", "Doe^Jane"
    ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "DX", body_part, "ACME"
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 12, 11, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [0.15, 0.15]
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_dicom(sop_uid: str | None = None, body_part: str = "HAND", seed: int = 0, with_pixels: bool = True,
               **kwargs) -> bytes:
    return to_bytes(make_dataset(body_part, seed, with_pixels=with_pixels, sop_uid=sop_uid, **kwargs))


def huge_header_dicom(rows: int = 10_000, cols: int = 10_000) -> bytes:
    """A 10k x 10k JPEG 2000 header with one tiny fragment: only a header check can refuse it
    cheaply (decoding would need 200 MB for the frame)."""
    ds = make_dataset(rows=8, cols=8)
    ds.Rows, ds.Columns = rows, cols
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def unsupported_codec_dicom() -> bytes:
    """Well-formed DICOM whose pixels are MPEG-2 video, which no installed decoder reads."""
    ds = make_dataset(rows=8, cols=8)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile @ Main Level
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)
