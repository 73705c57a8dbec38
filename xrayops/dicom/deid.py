"""De-identification: keyed pseudonyms and an allow-list of non-PHI metadata.

PHI never leaves ingestion (DESIGN.md). Nothing here copies a tag by default: `safe_metadata`
returns only the named technical fields, and identifiers only as keyed HMAC pseudonyms, so
without the key a pseudonym cannot be linked back to a UID or patient ID.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import re

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from xrayops.dicom.labels import code_string

# DICOM PS3.15 Annex E, Table E.1-1 (Basic Application Level Confidentiality Profile): the action
# for every attribute ingestion reads, and what it does. U: replace UIDs consistently; Z/D: replace
# with a (consistent) dummy; X: remove. Those marked "not listed" are not in Table E.1-1 (technical
# or acquisition attributes, not identifiers) and are kept, truncated to MAX_TEXT_CHARS.
# Every attribute Table E.1-1 lists and this table does not (names, dates, times, institution,
# accession number, device serials, comments...) is never read, which is action X.
PS315_BASIC_PROFILE: dict[str, tuple[str, str]] = {
    "SOPInstanceUID": ("U", "keyed HMAC pseudonym img-"),
    "StudyInstanceUID": ("U", "keyed HMAC pseudonym stu-"),
    "PatientID": ("Z", "keyed HMAC pseudonym pat-"),
    "StudyDate": ("Z", "removed"),
    "SeriesDate": ("X/D", "removed"),
    "AcquisitionDate": ("X/Z/D", "removed"),
    "ContentDate": ("Z/D", "removed"),
    "PatientBirthDate": ("Z", "removed"),
    "StudyDescription": ("X", "read only to derive the region; text removed"),
    "SeriesDescription": ("X", "read only to derive the region; text removed"),
    "ProtocolName": ("X/D", "read only to derive the region; text removed"),
    "BurnedInAnnotation": ("not listed", "kept: flags text burnt into the pixels (Clean Pixel Data option, E.3.1)"),
    "Modality": ("not listed", "kept"),
    "PhotometricInterpretation": ("not listed", "kept"),
    "BitsStored": ("not listed", "kept"),
    "BodyPartExamined": ("not listed", "kept, and normalised to a region"),
    "ViewPosition": ("not listed", "kept"),
    "ImageLaterality": ("not listed", "kept"),
    "Laterality": ("not listed", "kept"),
    "Manufacturer": ("not listed", "kept"),
    "PixelSpacing": ("not listed", "kept"),
    "ImagerPixelSpacing": ("not listed", "kept"),
    "Rows": ("not listed", "kept"),
    "Columns": ("not listed", "kept"),
}
KEPT_AS_FOUND = frozenset(k for k, (action, _) in PS315_BASIC_PROFILE.items() if action == "not listed")

# 16 hex digits = 64 bits: collision odds about n^2 / 2^65, negligible for millions of images.
PSEUDONYM_HEX_DIGITS = 16
MAX_TEXT_CHARS = 64


def pseudonymize(value: str, key: bytes | str, prefix: str = "") -> str:
    """Stable keyed pseudonym `prefix + hex`; the prefix also separates namespaces (img-/stu-/pat-)."""
    key_bytes = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    message = f"{prefix}\x00{value}".encode()
    digest = hmac.new(key_bytes, message, hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:PSEUDONYM_HEX_DIGITS]}"


def safe_metadata(ds: Dataset, key: bytes | str) -> dict:
    """The ManifestRow fields a Dataset may contribute, with identifiers pseudonymised.

    image_id/study_id/patient_id are "" when the file lacks the UID. A file without a Patient ID
    gets its study pseudonym as patient, so its images still share one split.
    """
    sop_uid = _text(ds, "SOPInstanceUID")
    study_uid = _text(ds, "StudyInstanceUID")
    patient = _text(ds, "PatientID")
    transfer_syntax = ""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
    return {
        "image_id": pseudonymize(sop_uid, key, "img-") if sop_uid else "",
        "study_id": pseudonymize(study_uid, key, "stu-") if study_uid else "",
        "patient_id": (
            pseudonymize(patient, key, "pat-")
            if patient
            else (pseudonymize(study_uid, key, "pat-") if study_uid else "")
        ),
        "modality": _text(ds, "Modality"),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation"),
        "transfer_syntax": transfer_syntax[:MAX_TEXT_CHARS],
        "bits_stored": _int(ds, "BitsStored"),
        "body_part_raw": code_string(_text(ds, "BodyPartExamined")),  # strict CS: no free text
        "view_position": _text(ds, "ViewPosition"),
        "laterality": _text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        "manufacturer": _text(ds, "Manufacturer"),
        "pixel_spacing": pixel_spacing_mm(ds),
        "original_rows": _int(ds, "Rows"),
        "original_cols": _int(ds, "Columns"),
        # Carried as found: "YES" means text burnt into the pixels (possible PHI) that no tag-level
        # profile removes (PS3.15 E.3.1, Clean Pixel Data option); downstream users filter on it.
        "burned_in_annotation": _text(ds, "BurnedInAnnotation").upper()[:3],
    }


def pixel_spacing_mm(ds: Dataset) -> float | None:
    """Row spacing in mm from PixelSpacing, else ImagerPixelSpacing (projection radiographs)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            first = value[0] if isinstance(value, (MultiValue, list, tuple)) else value
            spacing = float(first)
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(spacing) and spacing > 0:
            return spacing
    return None


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element must not stop ingestion of the rest
        return ""
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:MAX_TEXT_CHARS]


def _int(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


# A DICOM UID inside a file or folder name (PACS exports name files by SOP Instance UID).
_UID_IN_NAME = re.compile(r"(?<![0-9])[0-9]+(?:\.[0-9]+){3,}(?![0-9])")


def public_source_name(relative: str, key: bytes | str) -> str:
    """A source path safe for the manifest: every UID in it becomes a keyed pseudonym.

    PACS exports name files and folders by SOP/Study Instance UID; those UIDs must not reach the
    manifest. Other names are kept so a person can find a quarantined file; an export whose
    folder names hold patient names must be renamed (or landed by `xrayops listen`/DICOMweb,
    which name files by pseudonym) before ingestion.
    """
    return _UID_IN_NAME.sub(lambda m: pseudonymize(m.group(0), key, "uid-"), relative)
