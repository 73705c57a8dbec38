"""Admission: is this DICOM instance a human projection radiograph the models are for?

One policy serves ingestion (a refused file is quarantined with the reason and never reaches a
split) and the endpoint (a refused DICOM is answered `applicable: false` with the reason, never with
a region). It decides from the header alone, before any pixel is decoded, and its details name
technical tag values only (modality, SOP class, photometric interpretation, image type, species),
never identifiers.

The policy is part of the preprocessing spec, so it is written into `preprocessing.json` and into
every model bundle: serving applies the policy the model was trained under, not the server's
settings.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
# Secondary captures: screenshots and scanned films, whatever their Modality says.
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
HOMO_SAPIENS_CODES = frozenset({"337915000", "L-85B00"})  # SNOMED CT, and its legacy SNOMED RT id
HUMAN_SPECIES = frozenset({"", "HUMAN", "HOMO SAPIENS", "HOMO SAPIENS SAPIENS"})
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
# ImageType value 3 and on: what an image is for. Localizers and scouts plan other acquisitions.
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "SCANOGRAM", "TOPOGRAM", "SURVIEW"})

Purpose = Literal["training", "inference"]

# Reason codes (quarantine.csv `reason`, the endpoint's `refusal_reason`), most basic first.
REASONS = {
    "not_radiograph": "not a projection radiograph (modality or SOP class outside the policy)",
    "secondary_capture": "a secondary capture (screenshot or scanned film), not an acquired radiograph",
    "colour_image": "a colour image; radiographs are greyscale",
    "localizer": "a localizer/scout image",
    "secondary_image": "a derived secondary image (ImageType SECONDARY)",
    "non_human": "not a human patient (species or breed given)",
    "burned_in_annotation": "text burned into the pixels (possible identifiers); refused from datasets",
    "recognizable_features": "recognizable visual features (possible identifiers); refused from datasets",
}


class AdmissionPolicy(BaseModel):
    """Which instances are admitted. Defaults: human CR and DX radiographs, greyscale, original.

    `pixels_cleaned=True` is a site's statement that burned-in text and recognisable features have
    been removed from the pixels upstream (the PS3.15 Clean Pixel Data option, which xrayops does not
    implement); only then do such images enter a dataset.
    """

    model_config = ConfigDict(frozen=True)

    modalities: tuple[str, ...] = ("CR", "DX")
    sop_classes: tuple[str, ...] = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING)
    refuse_localizers: bool = True
    refuse_secondary: bool = True
    pixels_cleaned: bool = False
    # Every instance that decodes, whatever it is: for conformance tests of the decode path and for
    # looking at an archive, never for a training set (the CLI has no flag for it).
    any_instance: bool = False


class Admission(BaseModel):
    """The decision for one instance: admitted, or the reason code and a one-line detail."""

    model_config = ConfigDict(frozen=True)

    admitted: bool
    reason: str = ""
    detail: str = ""

    @property
    def message(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


ADMITTED = Admission(admitted=True)


def admit(ds: Dataset, policy: AdmissionPolicy, purpose: Purpose = "training") -> Admission:
    """Decide from the header whether `ds` is an instance `policy` admits.

    Burned-in annotation and recognisable features are refused for training only: an identifier in
    the pixels must not enter a dataset, while the endpoint answers the client who sent the image.
    """
    if policy.any_instance:
        return ADMITTED
    for check in (_modality, _sop_class, _photometric, _image_type, _species):
        refusal = check(ds, policy)
        if refusal is not None:
            return refusal
    if purpose == "training" and not policy.pixels_cleaned:
        if _flag(ds, "BurnedInAnnotation"):
            return _refuse("burned_in_annotation", "BurnedInAnnotation YES and the site has not declared pixels cleaned")
        if _flag(ds, "RecognizableVisualFeatures"):
            return _refuse("recognizable_features", "RecognizableVisualFeatures YES and the site has not declared pixels cleaned")
    return ADMITTED


def _modality(ds: Dataset, policy: AdmissionPolicy) -> Admission | None:
    modality = _code(ds, "Modality")
    sop_class = _code(ds, "SOPClassUID")
    if not modality and not sop_class:
        return _refuse("not_radiograph", "neither Modality nor SOP Class UID is present")
    if modality and modality not in policy.modalities:
        return _refuse("not_radiograph", f"modality {modality}")
    return None


def _sop_class(ds: Dataset, policy: AdmissionPolicy) -> Admission | None:
    sop_class = _code(ds, "SOPClassUID")
    if not sop_class or sop_class in policy.sop_classes:
        return None
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return _refuse("secondary_capture", f"SOP class {sop_class}")
    return _refuse("not_radiograph", f"SOP class {sop_class}")


def _photometric(ds: Dataset, policy: AdmissionPolicy) -> Admission | None:
    photometric = _code(ds, "PhotometricInterpretation")
    if photometric and photometric not in GREYSCALE:
        return _refuse("colour_image", f"photometric interpretation {photometric}")
    samples = ds.get("SamplesPerPixel")
    try:
        if samples is not None and int(samples) != 1:
            return _refuse("colour_image", f"{int(samples)} samples per pixel")
    except (TypeError, ValueError):
        pass  # check_pixel_module reports a malformed pixel module with its own reason
    return None


def _image_type(ds: Dataset, policy: AdmissionPolicy) -> Admission | None:
    values = [v.strip().upper() for v in _values(ds, "ImageType")]
    if policy.refuse_localizers and any(v in LOCALIZER_TYPES for v in values[2:]):
        return _refuse("localizer", "ImageType " + "\\".join(_safe(v) for v in values[:4]))
    if policy.refuse_secondary and len(values) > 1 and values[1] == "SECONDARY":
        return _refuse("secondary_image", "ImageType " + "\\".join(_safe(v) for v in values[:2]))
    return None


def _species(ds: Dataset, policy: AdmissionPolicy) -> Admission | None:
    species = " ".join(str(ds.get("PatientSpeciesDescription", "") or "").split()).upper()
    if species not in HUMAN_SPECIES:
        return _refuse("non_human", f"species {_safe(species.title())}")
    for item in _sequence(ds, "PatientSpeciesCodeSequence"):
        code = str(item.get("CodeValue", "") or "").strip()
        if code and code not in HOMO_SAPIENS_CODES:
            return _refuse("non_human", f"species code {_safe(code)}")
    if str(ds.get("PatientBreedDescription", "") or "").strip() or _sequence(ds, "PatientBreedCodeSequence"):
        return _refuse("non_human", "a breed is given")
    return None


def _refuse(reason: str, detail: str) -> Admission:
    return Admission(admitted=False, reason=reason, detail=detail)


def _code(ds: Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip().upper()
    except Exception:  # a malformed element reads as absent; decode reports what it cannot parse
        return ""


def _values(ds: Dataset, keyword: str) -> list[str]:
    try:
        value = ds.get(keyword)
    except Exception:
        return []
    if value is None:
        return []
    if isinstance(value, str):
        return value.split("\\")
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


def _sequence(ds: Dataset, keyword: str) -> list:
    try:
        return list(ds.get(keyword) or [])
    except Exception:
        return []


def _flag(ds: Dataset, keyword: str) -> bool:
    return _code(ds, keyword) == "YES"


_UNSAFE = re.compile(r"[^A-Za-z0-9 ._-]")


def _safe(text: str, limit: int = 32) -> str:
    """Technical values only reach a detail through a narrow character set and length."""
    return _UNSAFE.sub("", text)[:limit]
