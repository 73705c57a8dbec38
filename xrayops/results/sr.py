"""The endpoint's answers as DICOM Structured Reports, filed into the source study.

One TID 1500 Measurement Report (highdicom, Comprehensive SR) per image, or one per study with a
measurement group per image. Each group (TID 1501) holds:
  - the algorithm (TID 4019: model name, served version; registry version, release, weights hash
    as parameters) and the source image (SOP class and instance) it is about;
  - applicable yes/no; when not, the admission policy's reason (xrayops.dicom.admission) coded,
    with its detail in the code meaning, and nothing else;
  - the predicted region as a SNOMED CT code (Target Region) and its probability, the
    orientation in degrees (Baltruschat et al. 2018) when the model predicts one, the out-of-domain score and
    flag, each binary head's probability;
  - the region the image header names and whether the prediction disagrees with it.
The SR copies the source's Patient and General Study modules (highdicom does, from the first
evidence dataset): it is the hospital's own document and goes back into the hospital's PACS.
It is never logged. Its UIDs are derived from the source UIDs and the served version, so the same
image answered by the same model gives the same SR instance (a PACS keeps one copy on a resend).

Pure: datasets and responses in, a pydicom Dataset out. `source_header` keeps from a received
instance only what an SR needs (no pixels, no private tags).
"""
from __future__ import annotations

import io
import math
import uuid
from collections.abc import Sequence

import logging

import highdicom as hd
from pydicom import dcmread
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom import config as pydicom_config
from pydicom.valuerep import validate_value

from xrayops.errors import XrayopsError
from xrayops.contracts import InferenceResponse
from xrayops.dicom.decode import quiet_pydicom
from xrayops.errors import XrayopsError
from xrayops.regions import REGIONS
from xrayops.results import codes as c
from xrayops.results.identity import MANUFACTURER, AlgorithmIdentity

# highdicom logs and warns with attribute values in the message (a patient's name it finds odd):
# identifiers must not reach a log, so its logger is off and its warnings are caught (`report`).
logging.getLogger("highdicom").disabled = True

SR_SERIES_NUMBER = 9901  # high, so the AI results sort after the acquisition series
SR_SERIES_DESCRIPTION = "xrayops region AI results"

# Attributes of a received instance the SR needs: Patient, General/Patient Study, the series and
# SOP identity it references, and the image descriptors TID 1500's Image Library shows.
PATIENT = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "QualityControlSubject",
)
STUDY = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PatientAge", "PatientSize", "PatientWeight",
)
INSTANCE = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
    "InstanceNumber", "ImageType", "Rows", "Columns", "NumberOfFrames", "PatientOrientation", "ViewPosition",
    "ImageLaterality", "Laterality", "PixelSpacing", "ImagerPixelSpacing", "FrameOfReferenceUID",
)
# Type 2 attributes highdicom reads from the first evidence dataset: present, empty when unknown.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
         "StudyTime", "ReferringPhysicianName")  # fmt: skip


TEXT_VRS = frozenset("AE AS CS DA DT LO LT PN SH ST TM UC UR UT".split())


class SRError(XrayopsError, ValueError):
    """A source that cannot be reported on (no Study/SOP UIDs), or responses that do not match it."""


def source_header(ds: Dataset) -> Dataset:
    """What an SR needs of a received instance: no pixel data, no private tags, no overlays."""
    out = Dataset()
    for keyword in PATIENT + STUDY + INSTANCE:
        if keyword in ds:
            out[keyword] = ds[keyword]
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in out and getattr(ds, "file_meta", None) is not None:
            media = "MediaStorage" + keyword
            if media in ds.file_meta:
                setattr(out, keyword, ds.file_meta[media].value)
    return out


def _checked(source: Dataset) -> Dataset:
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
               if not str(source.get(k, "") or "").strip()]  # fmt: skip
    if missing:
        raise SRError(f"the source instance has no {', '.join(missing)}: nothing to file an SR under")
    header = source_header(source)
    for keyword in TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    # A value invalid for its VR (an accession number over 16 characters, a date that is no date,
    # a sex outside M/F/O) would make the SR invalid or stop highdicom: the SR gets it empty (type 2)
    # or without it. Never truncated: a cut identifier could name another study.
    for elem in list(header):
        if elem.VR not in TEXT_VRS or elem.value is None or elem.value == "":
            continue
        try:
            values = elem.value if elem.VM > 1 else [elem.value]
            for value in values:
                validate_value(elem.VR, str(value), pydicom_config.RAISE)
        except (ValueError, TypeError):
            if elem.keyword in TYPE2:
                header[elem.tag].value = ""
            else:
                del header[elem.tag]
    if str(header.PatientSex or "").strip() not in ("", "M", "F", "O"):
        header.PatientSex = ""
    if "Modality" not in header:
        header.Modality = ""
    return header


# Name-based UUIDs (RFC 4122 version 5) under this namespace, as 2.25 UIDs (PS3.5 B.2).
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/xrayops/xrayops/results/sr")


def _uid(*parts: str) -> str:
    """A UID derived from `parts`: same parts, same UID."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(parts)).int}"


def _algorithm(identity: AlgorithmIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=identity.name, version=identity.version or "unversioned", parameters=identity.parameters(),
        family=c.AI_FAMILY, manufacturer=MANUFACTURER,
    )


def _yes_no(name, value: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name, c.YES if value else c.NO)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def measurement_group(
    source: Dataset, response: InferenceResponse, identity: AlgorithmIdentity
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image's answer (see the module doc for what it holds)."""
    sop_instance = str(source.SOPInstanceUID)
    evaluations = [_yes_no(c.APPLICABLE, response.applicable)]
    measurements: list[hd.sr.Measurement] = []
    if not response.applicable:
        evaluations.append(hd.sr.QualitativeEvaluation(
            c.REFUSAL_REASON, c.refusal_code(response.refusal_reason, response.refusal_detail)))  # fmt: skip
    else:
        if response.region not in REGIONS:
            raise SRError(f"answered region {response.region!r} is not one of the {len(REGIONS)} regions")
        region = c.region_codes()[response.region]
        evaluations.append(hd.sr.QualitativeEvaluation(c.PREDICTED_REGION, region))
        site = [hd.sr.FindingSite(region)]
        if _finite(response.confidence):
            measurements.append(hd.sr.Measurement(c.PROBABILITY, float(response.confidence), c.NO_UNITS,
                                                  finding_sites=site))  # fmt: skip
        if _finite(response.orientation_deg):
            measurements.append(hd.sr.Measurement(c.ORIENTATION, float(response.orientation_deg), c.DEGREES))
        if _finite(response.ood_score):
            measurements.append(hd.sr.Measurement(c.OOD_SCORE, float(response.ood_score), c.NO_UNITS))
        if response.ood is not None:
            evaluations.append(_yes_no(c.OUT_OF_DOMAIN, bool(response.ood)))
        for head, probability in sorted(response.findings.items()):
            if _finite(probability):
                measurements.append(hd.sr.Measurement(c.finding_concept(head), float(probability), c.NO_UNITS))
        tag_region = c.region_codes().get(response.dicom_region, c.HEADER_REGION_UNKNOWN)
        evaluations.append(hd.sr.QualitativeEvaluation(c.HEADER_REGION, tag_region))
        evaluations.append(_yes_no(c.HEADER_DISAGREES, bool(response.label_disagreement)))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(sop_instance, identity.version, "group"), identifier="region classification"
        ),
        finding_type=c.REGION_CLASSIFICATION,
        algorithm_id=_algorithm(identity),
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), sop_instance)],
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
    )


def _observation_context(identity: AlgorithmIdentity) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_uid(identity.name, identity.version, "device"), name=identity.name[:64],
        manufacturer_name=MANUFACTURER, model_name=(identity.version or "unversioned")[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=c.DEVICE, observer_identifying_attributes=device),
    )


def _measurement_report(headers: list[Dataset], groups, identity: AlgorithmIdentity) -> hd.sr.MeasurementReport:
    """TID 1500 with an Image Library (TID 1600) when every source has the descriptors its modality's
    entry needs (projection radiographs: Patient Orientation, Imager Pixel Spacing; cross-sectional:
    the plane's position and orientation); without one otherwise (the library is optional, the
    references are in the groups and the evidence sequence either way)."""
    for library in (headers, None):
        try:
            return hd.sr.MeasurementReport(
                observation_context=_observation_context(identity), procedure_reported=c.PROCEDURE,
                imaging_measurements=list(groups), referenced_images=library,
            )
        except (AttributeError, IndexError, TypeError, ValueError):
            if library is None:
                raise
    raise AssertionError("unreachable")


def report(
    sources: Sequence[Dataset], responses: Sequence[InferenceResponse], identity: AlgorithmIdentity,
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations] | None = None,
) -> hd.sr.ComprehensiveSR:
    """One Measurement Report over `sources` (one study), a group per image, filed into their study."""
    if not sources:
        raise SRError("no source instance to report on")
    with quiet_pydicom():
        headers = [_checked(s) for s in sources]
    studies = {str(h.StudyInstanceUID) for h in headers}
    if len(studies) != 1:
        raise SRError(f"the sources belong to {len(studies)} studies; an SR is filed into one")
    if groups is None:
        if len(responses) != len(headers):
            raise SRError(f"{len(responses)} answers for {len(headers)} source instances")
        groups = [measurement_group(h, r, identity) for h, r in zip(headers, responses)]
    with quiet_pydicom():  # pydicom's and highdicom's warnings can quote values (a patient's name)
        sr = _comprehensive_sr(headers, _measurement_report(headers, groups, identity), identity)
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = [c.coding_scheme_identification()]
    return sr


def _comprehensive_sr(headers: list[Dataset], content, identity: AlgorithmIdentity) -> hd.sr.ComprehensiveSR:
    study_uid = headers[0].StudyInstanceUID
    instances = sorted(str(h.SOPInstanceUID) for h in headers)
    return hd.sr.ComprehensiveSR(
        evidence=headers,
        content=content[0],
        series_instance_uid=_uid(str(study_uid), identity.name, identity.version, "series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(*instances, identity.version, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # pydicom decoded the source's text with its character set; the SR writes it as UTF-8.
        specific_character_set="ISO_IR 192",
        is_complete=True,
        is_final=False,  # an algorithm's preliminary result until a radiologist verifies it
    )


def image_sr(source: Dataset, response: InferenceResponse, identity: AlgorithmIdentity) -> hd.sr.ComprehensiveSR:
    """The SR of one image's answer."""
    return report([source], [response], identity)


def study_sr(
    sources: Sequence[Dataset], responses: Sequence[InferenceResponse], identity: AlgorithmIdentity
) -> hd.sr.ComprehensiveSR:
    """The SR of a study's answers: one measurement group per image."""
    return report(sources, responses, identity)


def merge_image_srs(sources: Sequence[Dataset], image_srs: Sequence[Dataset]) -> hd.sr.ComprehensiveSR:
    """One study SR from the endpoint's per-image SRs (what the routing node stores per study):
    their measurement groups and algorithm, read back with highdicom, over the study's sources.
    The SR datasets are read in place (not copied): pass ones the caller owns."""
    if not image_srs:
        raise SRError("no image SR to merge")
    groups = [g for sr in image_srs for g in _groups(sr)]
    if not groups:
        raise SRError("the SRs hold no measurement group")
    return report(sources, [], _identity_of_group(groups[0]), groups=groups)


def _groups(sr: Dataset) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    parsed = hd.sr.ComprehensiveSR.from_dataset(sr, copy=False)
    return hd.sr.MeasurementReport.from_sequence([parsed]).get_image_measurement_groups()


def identity_of_sr(sr: Dataset) -> AlgorithmIdentity:
    """The AlgorithmIdentity an SR was written with (its first group's TID 4019)."""
    import copy

    groups = _groups(copy.deepcopy(sr))
    if not groups:
        raise SRError("the SR has no measurement group")
    return _identity_of_group(groups[0])


def _identity_of_group(group) -> AlgorithmIdentity:
    def texts(code) -> list[str]:
        return [str(i.TextValue) for i in find_content_items(group[0], name=code, value_type="TEXT")]

    name, version, parameters = texts(codes.DCM.AlgorithmName), texts(codes.DCM.AlgorithmVersion), \
        texts(codes.DCM.AlgorithmParameters)
    if not name:
        raise SRError("the SR has no algorithm identification")
    registry = tuple(p.removeprefix("registry version ") for p in parameters
                     if p.startswith("registry version ") and p != "registry version none")  # fmt: skip
    release = next((p.removeprefix("release ") for p in parameters if p.startswith("release ")), "")
    hashes = tuple(p.removeprefix("weights sha256 ") for p in parameters if p.startswith("weights sha256 "))
    version_text = version[0] if version else ""
    return AlgorithmIdentity(name=name[0], version="" if version_text == "unversioned" else version_text,
                             registry_versions=registry, release_id="" if release == "none" else release,
                             weights_sha256=hashes)  # fmt: skip


def to_part10(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    buffer = io.BytesIO()
    with quiet_pydicom():
        sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def from_part10(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


def image_srs(sources: Sequence[Dataset], responses: Sequence[InferenceResponse],
              identity: AlgorithmIdentity) -> list[bytes]:  # fmt: skip
    """One Part 10 SR per image, in order. Raises SRError naming the image's position; never with a
    value of the header in the message (highdicom's own messages can quote one)."""
    if len(sources) != len(responses):
        raise SRError(f"{len(responses)} answers for {len(sources)} source instances")
    out = []
    for i, (source, response) in enumerate(zip(sources, responses)):
        try:
            out.append(to_part10(image_sr(source, response, identity)))
        except SRError as exc:
            raise SRError(f"image {i}: {exc}") from None
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise SRError(f"image {i}: its header cannot be written into an SR ({type(exc).__name__})") from None
    return out
