"""Coded concepts of the xrayops Structured Reports.

Regions are SNOMED CT anatomy codes: one canonical code per region, taken from
`xrayops/dicom/anatomic_region_codes.json` (the table ingestion reads the Anatomic Region Sequence
with, CID 4009 DX Anatomy Imaged), so what an SR says is what ingestion would read back. Concepts
that no standard vocabulary names (the out-of-domain score, the admission refusal, the header's
region) are in the private coding scheme 99XRAYOPS, declared in each SR's Coding Scheme
Identification Sequence (PS3.3 C.12.1.1.4; "99" marks a private scheme, PS3.16 8.2).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from xrayops.regions import REGIONS

SCHEME = "99XRAYOPS"

# The code each region is reported with: the region's own name in CID 4009 where it has one;
# pelvis_hip (pelvis and hip views) as "Pelvis", elbow/wrist/ankle as the joint.
CANONICAL_SCT: dict[str, str] = {
    "clavicle": "51299004",
    "shoulder": "16982005",
    "skull": "89546000",
    "rib": "113197003",
    "elbow": "16953009",
    "knee": "72696002",
    "wrist": "74670003",
    "hand": "85562004",
    "foot": "56459004",
    "ankle": "70258002",
    "pelvis_hip": "816092008",
    "cervical_spine": "122494005",
    "thoracic_spine": "122495006",
    "lumbar_spine": "122496007",
}


@lru_cache(maxsize=1)
def region_codes() -> dict[str, CodedConcept]:
    """region -> its canonical SNOMED CT concept, checked against the ingestion code table."""
    text = resources.files("xrayops.dicom").joinpath("anatomic_region_codes.json").read_text(encoding="utf-8")
    table = json.loads(text)
    out: dict[str, CodedConcept] = {}
    for region in REGIONS:
        entries = {e["sct"]: e for e in table.get(region, [])}
        code = CANONICAL_SCT[region]
        if code not in entries:
            raise ValueError(f"canonical code {code} of {region} is not listed under it in anatomic_region_codes.json")
        out[region] = CodedConcept(code, "SCT", entries[code]["meaning"])
    return out


def region_of_code(value: str, scheme: str = "SCT") -> str | None:
    """The region a canonical code stands for (the inverse of `region_codes`), None for other codes."""
    for region, concept in region_codes().items():
        if concept.value == value and concept.scheme_designator == scheme:
            return region
    return None


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, SCHEME, meaning)


# Concept names.
PREDICTED_REGION = CodedConcept.from_code(codes.DCM.TargetRegion)  # DCM 123014
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)  # DCM 122157
ORIENTATION = CodedConcept.from_code(codes.DCM.Orientation)  # DCM 111354, in degrees (Baltruschat et al. 2018)
APPLICABLE = _private("APPLICABLE", "Model applicable to the image")
REFUSAL_REASON = _private("NOTAPPLICABLE", "Reason the model does not apply")
OUT_OF_DOMAIN = _private("OOD", "Out of the model's domain")
OOD_SCORE = _private("OODSCORE", "Out-of-domain score")
HEADER_REGION = _private("HDRREGION", "Region named by the image header")
HEADER_DISAGREES = _private("HDRDISAGREE", "Prediction disagrees with the header")
HEADER_REGION_UNKNOWN = _private("UNKNOWN", "No region named by the header")
REGION_CLASSIFICATION = _private("REGIONCLS", "Anatomic region classification")

# Values.
YES = CodedConcept.from_code(codes.SCT.Yes)
NO = CodedConcept.from_code(codes.SCT.No)
NO_UNITS = CodedConcept.from_code(codes.UCUM.NoUnits)  # UCUM "1": probabilities and scores
DEGREES = CodedConcept.from_code(codes.UCUM.Degree)
PROCEDURE = CodedConcept.from_code(codes.LN.XRUnspecifiedBodyRegion)  # LN 43468-8
DEVICE = CodedConcept.from_code(codes.DCM.Device)  # DCM 121007: the observer is a device
AI_FAMILY = CodedConcept.from_code(codes.DCM.ArtificialIntelligence)  # DCM 123110

# xrayops.dicom.admission reason codes, as they read in a report.
REFUSAL_TEXT: dict[str, str] = {
    "not_radiograph": "Not a radiograph",
    "secondary_capture": "Secondary capture",
    "colour_image": "Colour image",
    "localizer": "Localizer",
    "secondary_image": "Secondary (derived) image",
    "non_human": "Not a human subject",
    "burned_in_annotation": "Burned-in annotation",
    "recognizable_features": "Recognizable visual features",
}
MAX_MEANING = 64  # Code Meaning is LO


def refusal_code(reason: str, detail: str) -> CodedConcept:
    """The admission refusal as a coded value: the reason code itself (long ones go to Long Code
    Value), meaning the reason in words with the technical detail ("Not a radiograph (modality CT)")."""
    words = REFUSAL_TEXT.get(reason, reason.replace("_", " ").capitalize() or "Not applicable")
    meaning = f"{words} ({detail})" if detail else words
    if len(meaning) > MAX_MEANING:
        meaning = meaning[: MAX_MEANING - 3] + "..."
    return CodedConcept(reason or "not_applicable", SCHEME, meaning)


def finding_concept(head: str) -> CodedConcept:
    """A binary head's probability (abnormality: de Cid Rodríguez 2021; Ghalyan et al.; implant: Acitores 2022)."""
    return _private(f"P-{head.upper()}"[:16], f"Probability of {head.replace('_', ' ')}")


def coding_scheme_identification() -> Dataset:
    """The Coding Scheme Identification Sequence item that declares 99XRAYOPS."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "xrayops result concepts"
    item.CodingSchemeResponsibleOrganization = "xrayops"
    return item
