"""De-identification: keyed pseudonyms and an allow-list of non-PHI metadata.

PHI never leaves ingestion (docs/privacy.md). Nothing here copies a tag by default: `safe_metadata`
returns only the named technical fields, each bounded to its DICOM VR's character set and length,
and identifiers only as keyed HMAC pseudonyms, so without the key a pseudonym cannot be linked
back to a UID, a patient ID or a file name. Every hash that leaves ingestion is keyed too
(`keyed_hash`): an unkeyed hash of a file lets anyone who holds the file find its row.

The key: `require_key(settings)` is the one way the product obtains it (XRAYOPS_DEID_KEY, or
XRAYOPS_DEID_KEY_FILE such as a mounted Kubernetes Secret); there is no default. A key shorter
than MIN_KEY_BYTES, or one published with the code, is refused. `xrayops demo` alone uses
DEMO_KEY, which is public: its pseudonyms protect nothing and are for synthetic data only.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from xrayops.errors import XrayopsError
from xrayops.dicom.labels import code_string

# The key `xrayops demo` uses so its synthetic dataset (and data.dvc's md5) is the same on every
# machine. Public: anything pseudonymised with it can be recomputed by anyone.
DEMO_KEY = "xrayops-demo-key-public-synthetic-data-only"
# Keys that were published with the code and must never protect real data.
PUBLIC_KEYS = frozenset({"xrayops-dev-key-change-me"})
MIN_KEY_BYTES = 16
KEY_ENV, KEY_FILE_ENV = "XRAYOPS_DEID_KEY", "XRAYOPS_DEID_KEY_FILE"
HOW_TO_MAKE_A_KEY = (
    f"create one with `xrayops keygen --out FILE` (32 random bytes, hex, file mode 0600) and set "
    f"{KEY_FILE_ENV}=FILE (or {KEY_ENV} to its contents); on a cluster it comes from the xrayops-deid Secret. "
    "Keep it secret and keep it: a new key gives every image, study, patient and file a new pseudonym"
)


class DeidKeyError(XrayopsError, RuntimeError):
    """No usable de-identification key: the message says why and how to make one."""


def generate_key() -> str:
    """A new key: 32 random bytes as 64 hex digits."""
    return secrets.token_hex(32)


def check_key(key: str | bytes, origin: str = KEY_ENV) -> bytes:
    """The key's bytes, or DeidKeyError when it is too short or a published one."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    raw = raw.strip()
    if not raw:
        raise DeidKeyError(f"{origin} is empty; {HOW_TO_MAKE_A_KEY}")
    if raw.decode("utf-8", "replace") in PUBLIC_KEYS:
        raise DeidKeyError(f"{origin} holds a key published with the code, not a secret; {HOW_TO_MAKE_A_KEY}")
    if len(raw) < MIN_KEY_BYTES:
        raise DeidKeyError(f"{origin} is {len(raw)} bytes, a weak key (at least {MIN_KEY_BYTES}); {HOW_TO_MAKE_A_KEY}")
    return raw


def load_key(key: str | None, key_file: str | Path | None) -> bytes:
    """The key from its text or its file (exactly one of them); DeidKeyError otherwise."""
    from_file = None
    if key_file:
        try:
            from_file = Path(key_file).read_bytes().strip()
        except OSError as exc:
            raise DeidKeyError(f"{KEY_FILE_ENV} cannot be read ({type(exc).__name__}); {HOW_TO_MAKE_A_KEY}") from exc
    if key and from_file is not None and check_key(key) != check_key(from_file, KEY_FILE_ENV):
        raise DeidKeyError(f"{KEY_ENV} and {KEY_FILE_ENV} hold different keys; set one of them")
    if from_file is not None:
        return check_key(from_file, KEY_FILE_ENV)
    if key:
        return check_key(key)
    raise DeidKeyError(f"no de-identification key: {KEY_ENV} and {KEY_FILE_ENV} are unset; {HOW_TO_MAKE_A_KEY}")


def require_key(settings) -> bytes:
    """The configured key (xrayops.config.Settings deid_key / deid_key_file), checked.

    The one way the product obtains the key: ingestion, the listener, DICOMweb fetches and
    serving all call it before doing anything, so a missing or weak key stops them with a
    message instead of pseudonyms anyone can recompute.
    """
    secret = getattr(settings, "deid_key", None)
    text = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    raw = load_key(text or None, getattr(settings, "deid_key_file", None))
    if raw == DEMO_KEY.encode():
        _warn_demo_key()
    return raw


_warned_demo = False


def _warn_demo_key() -> None:
    global _warned_demo
    if not _warned_demo:
        _warned_demo = True
        from xrayops.logs import get_logger

        get_logger(__name__).warning("deid.demo_key", detail="the public demo key: pseudonyms anyone can recompute; synthetic data only")


def write_key_file(path: Path, key: str) -> Path:
    """Write `key` to a new file readable by its owner only (0600); an existing file is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)  # whatever the umask
    return path


# DICOM PS3.15 Annex E, Table E.1-1 (Basic Application Level Confidentiality Profile): how
# ingestion handles every attribute it reads for the manifest. The standard's action code for each
# is in the vendored table (ps315_table_e1_1.json, `basic_profile_action`); tests/test_deid_table.py
# checks each handling against it, attribute by attribute:
#   pseudonym  stored only as a keyed HMAC pseudonym: a consistent dummy (U, D; stricter than Z)
#   derived    read only to find a vocabulary term (the region); the text itself is never stored,
#              which is as strict as X and is what the Clean Descriptors option (C) asks
#   kept       stored as found, bounded to its VR's characters and length: only for attributes
#              Table E.1-1 does not list (technical or acquisition facts, not identifiers)
# Every attribute Table E.1-1 lists and this table does not (names, dates, times, institution,
# accession number, device serials, comments, private tags, overlays...) is never read: action X.
PS315_BASIC_PROFILE: dict[str, tuple[str, str]] = {
    "SOPInstanceUID": ("pseudonym", "keyed HMAC pseudonym img-"),
    "StudyInstanceUID": ("pseudonym", "keyed HMAC pseudonym stu-"),
    "PatientID": ("pseudonym", "keyed HMAC pseudonym pat-"),
    "StudyDescription": ("derived", "read only to derive the region; text never stored"),
    "SeriesDescription": ("derived", "read only to derive the region; text never stored"),
    "ProtocolName": ("derived", "read only to derive the region; text never stored"),
    "RequestedProcedureDescription": ("derived", "read only to derive the region; text never stored"),
    "BurnedInAnnotation": ("kept", "flags text burnt into the pixels (Clean Pixel Data option, E.3.1)"),
    "Modality": ("kept", "CS"),
    "PhotometricInterpretation": ("kept", "CS"),
    "BitsStored": ("kept", "US"),
    "BodyPartExamined": ("kept", "CS, and normalised to a region"),
    "ViewPosition": ("kept", "CS"),
    "ImageLaterality": ("kept", "CS"),
    "Laterality": ("kept", "CS"),
    "Manufacturer": ("kept", "LO"),
    "PixelSpacing": ("kept", "DS, as a finite positive float"),
    "ImagerPixelSpacing": ("kept", "DS, as a finite positive float"),
    "Rows": ("kept", "US"),
    "Columns": ("kept", "US"),
}
KEPT_AS_FOUND = frozenset(k for k, (handling, _) in PS315_BASIC_PROFILE.items() if handling == "kept")
# PS3.15 E.3 options this product claims. Clean Descriptors: a description is read for its body
# part and only the matched vocabulary term is kept. No other option (retained dates, UIDs, device
# or institution identity, patient characteristics, safe private tags) is claimed.
CLAIMED_OPTIONS = frozenset({"cleanDescOpt"})
PS315_TABLE_FILE = Path(__file__).with_name("ps315_table_e1_1.json")

# 16 hex digits = 64 bits: collision odds about n^2 / 2^65, negligible for millions of images.
PSEUDONYM_HEX_DIGITS = 16
PSEUDONYM_PATTERN = re.compile(r"^(img|stu|pat|src)-[0-9a-f]{16}$")
MAX_TEXT_CHARS = 64

# VR bounds (PS3.5 Table 6.2-1). CS: upper-case letters, digits, space, underscore, 16 chars; real
# PACS write lower case and hyphens too ("Knie re"), which carry no more than a code would, so those
# are allowed; anything else (a caret of a person name, a dot of a UID, a date's digits beyond 16
# chars, non-ASCII) makes the value free text, and it is dropped. LO: 64 chars; the characters of a
# maker's name only (no ^ or = of a person name, no backslash or control characters). UI: digits and dots.
VR_RULES: dict[str, tuple[re.Pattern, int]] = {
    "CS": (re.compile(r"[A-Za-z0-9 _-]+"), 16),
    "LO": (re.compile(r"[A-Za-z0-9 .,&()/+'_:-]+"), 64),
    "UI": (re.compile(r"[0-9.]+"), 64),
}


def bounded(value: object, vr: str) -> str:
    """`value` as text if it fits VR `vr`'s character set and length, else "" (never truncated:
    a cut value could still hold the start of a name)."""
    if not isinstance(value, str):
        return ""
    text = value.strip()
    pattern, max_chars = VR_RULES[vr]
    if not text or len(text) > max_chars or not pattern.fullmatch(text):
        return ""
    return text


def pseudonymize(value: str, key: bytes | str, prefix: str = "") -> str:
    """Stable keyed pseudonym `prefix + hex`; the prefix also separates namespaces (img-/stu-/pat-/src-)."""
    if key is None:  # e.g. DICOM sent to a cluster predictor, which holds no key: the transformer does
        raise DeidKeyError(f"no de-identification key in this process; {HOW_TO_MAKE_A_KEY}")
    key_bytes = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    message = f"{prefix}\x00{value}".encode()
    digest = hmac.new(key_bytes, message, hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:PSEUDONYM_HEX_DIGITS]}"


def keyed_hasher(key: bytes | str, purpose: str):
    """An HMAC-SHA256 object for hashing content (a file, a decoded frame) under `key`.

    `purpose` separates the uses, so a file hash never equals a pixel hash of the same bytes.
    """
    key_bytes = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return hmac.new(key_bytes, f"xrayops:{purpose}\x00".encode(), hashlib.sha256)


def keyed_hash(key: bytes | str, purpose: str, chunks: Iterable[bytes | memoryview]) -> str:
    """Hex HMAC-SHA256 of the concatenated chunks: equal content gives equal hashes under one key,
    and without the key nobody holding the content can find it."""
    hasher = keyed_hasher(key, purpose)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


# The suffixes a source pseudonym keeps: a DICOM file extension says nothing about the patient.
SAFE_SUFFIXES = (".dcm", ".dicom", ".dic")


def source_pseudonym(relative: str, key: bytes | str) -> str:
    """The manifest's source_name: `src-` + keyed HMAC of the path relative to the source root,
    plus the file's suffix when it is a DICOM extension.

    Export folders and file names hold patient IDs, names, accession numbers and dates
    (`DOE_JANE_19700101/ACC123/PAT987_ACC123_1.dcm`); none of it may reach the dataset. The
    pseudonym is stable for one key and path, so a quarantined file is found again through the
    source map (`xrayops ingest --source-map`, an access-controlled file) or by recomputing it.
    """
    posix = PurePosixPath(relative).as_posix()
    suffix = PurePosixPath(posix).suffix.lower()
    return pseudonymize(posix, key, "src-") + (suffix if suffix in SAFE_SUFFIXES else "")


def safe_metadata(ds: Dataset, key: bytes | str) -> dict:
    """The ManifestRow fields a Dataset may contribute, with identifiers pseudonymised.

    image_id/study_id/patient_id are "" when the file lacks the UID. A file without a Patient ID
    gets its study pseudonym as patient, so its images still share one split. Text fields are
    bounded to their VR (`bounded`): a value that is not a code is dropped, not cut.
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
        "modality": bounded(_text(ds, "Modality"), "CS"),
        "photometric_interpretation": bounded(_text(ds, "PhotometricInterpretation"), "CS"),
        "transfer_syntax": bounded(transfer_syntax, "UI"),
        "bits_stored": _int(ds, "BitsStored"),
        "body_part_raw": code_string(bounded(_text(ds, "BodyPartExamined"), "CS")),  # strict CS: no free text
        "view_position": bounded(_text(ds, "ViewPosition"), "CS"),
        "laterality": bounded(_text(ds, "ImageLaterality") or _text(ds, "Laterality"), "CS"),
        "manufacturer": bounded(_text(ds, "Manufacturer"), "LO"),
        "pixel_spacing": pixel_spacing_mm(ds),
        "original_rows": _int(ds, "Rows"),
        "original_cols": _int(ds, "Columns"),
        # Carried as found: "YES" means text burnt into the pixels (possible PHI) that no tag-level
        # profile removes (PS3.15 E.3.1, Clean Pixel Data option); downstream users filter on it.
        "burned_in_annotation": bounded(_text(ds, "BurnedInAnnotation").upper()[:3], "CS"),
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
    return str(value).strip()[: MAX_TEXT_CHARS + 1]  # one past the longest VR: too long stays too long


def _int(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def basic_profile_table() -> dict[str, dict[str, str]]:
    """PS3.15 Table E.1-1 as vendored: tag id (8 hex digits, lower case; x for a repeating group
    digit, e.g. 60xx3000) -> {"name", "basicProfile", and each option column that applies}."""
    import json

    return {row["id"]: row for row in json.loads(PS315_TABLE_FILE.read_text(encoding="utf-8"))["attributes"]}


def basic_profile_action(tag: int, table: dict[str, dict[str, str]] | None = None) -> str | None:
    """The Basic Profile action code of a tag (an int like 0x00100020), or None if Table E.1-1 does
    not list it. Private tags (odd group) are listed by the standard as X; repeating groups
    (50xx curves, 60xx overlays) match their pattern."""
    table = basic_profile_table() if table is None else table
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:
        return "X"  # private attributes: Table E.1-1 removes them (unless Retain Safe Private)
    exact = f"{group:04x}{element:04x}"
    if exact in table:
        return table[exact]["basicProfile"]
    for pattern, row in table.items():
        if "x" in pattern and all(p == "x" or p == c for p, c in zip(pattern, exact)):
            return row["basicProfile"]
    return None
