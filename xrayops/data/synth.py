"""Synthetic PACS export: phantom radiographs as messy, realistic DICOM files plus a truth table.

The embedded default data set. It reproduces what Langer et al. 2024 and de Cid 2021 report about
real exports: BodyPartExamined in several languages, abbreviations and typos, free-text
descriptions, coded anatomy that is sometimes missing, a known share of wrong region tags (the
code, BodyPartExamined and description of a mislabelled study are wrong alike),
rotated captures with burnt-in white borders, surgery-planning gauges, laterality markers,
MONOCHROME1/2, 8/12/16-bit pixels, compressed transfer syntaxes, CR and DX objects, fake PHI,
out-of-domain images, and an optional second vendor (domain shift).

Every nuisance attribute (exposure, noise, framing, format, vendor, clutter) is drawn
independently of the region, so only the anatomy's shape identifies the class.

The files pass the DICOM standard's IOD checks (dciodvfy: no errors) for CR and DX For
Presentation: messiness lives in the values (languages, typos, wrong tags), not in broken
encodings, so BodyPartExamined is always a valid CS string.
"""
from __future__ import annotations

import csv
import math
import multiprocessing
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel
from pydicom import config as dicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from scipy.ndimage import gaussian_filter, zoom

from xrayops.data.phantoms import OOD_KINDS, bitmap_font, draw_out_of_domain, draw_region
from xrayops.dicom.labels import to_code_string
from xrayops.logs import get_logger
from xrayops.progress import track
from xrayops.regions import REGIONS, UNKNOWN

log = get_logger(__name__)

# --- site vocabulary ------------------------------------------------------------------------------
# de Cid 2021: one site's BodyPartExamined had 187 distinct values: languages, case, accents, typos.
# Written into BodyPartExamined as CS (to_code_string: "Schädel" -> "SCHAEDEL"); descriptions keep them as they are.
BODY_PART_VOCABULARY: dict[str, dict[str, tuple[str, ...]]] = {
    "clavicle": {
        "en": ("CLAVICLE", "Clavicle", "CLAV", "CLAVICEL"),
        "de": ("CLAVICULA", "Clavicula", "Klavikula", "SCHLUESSELBEIN", "Schlüsselbein"),
        "es": ("CLAVICULA", "CLAVÍCULA"),
        "fr": ("CLAVICULE",),
        "it": ("CLAVICOLA",),
        "nl": ("SLEUTELBEEN", "CLAVICULA"),
        "pt": ("CLAVÍCULA", "CLAVICULA"),
    },
    "shoulder": {
        "en": ("SHOULDER", "Shoulder", "SHLDR", "SHOULDR"),
        "de": ("SCHULTER", "Schulter", "SCHULTERGELENK"),
        "es": ("HOMBRO", "Hombro"),
        "fr": ("EPAULE", "ÉPAULE"),
        "it": ("SPALLA",),
        "nl": ("SCHOUDER",),
        "pt": ("OMBRO",),
    },
    "skull": {
        "en": ("SKULL", "Skull", "HEAD", "SKUL"),
        "de": ("SCHAEDEL", "Schaedel", "Schädel", "KOPF"),
        "es": ("CRANEO", "CRÁNEO"),
        "fr": ("CRANE", "CRÂNE"),
        "it": ("CRANIO",),
        "nl": ("SCHEDEL",),
        "pt": ("CRÂNIO", "CRANIO"),
    },
    "rib": {
        "en": ("RIBS", "RIB", "Rib cage", "RIBBS"),
        "de": ("RIPPEN", "THORAX RIPPEN", "Rippen"),
        "es": ("COSTILLAS", "PARRILLA COSTAL"),
        "fr": ("COTES", "CÔTES", "GRIL COSTAL"),
        "it": ("COSTOLE", "COSTE"),
        "nl": ("RIBBEN",),
        "pt": ("COSTELAS", "GRADE COSTAL"),
    },
    "elbow": {
        "en": ("ELBOW", "Elbow", "ELBW"),
        "de": ("ELLBOGEN", "Ellenbogen", "ELLENBOGEN", "ELLBOGENGELENK"),
        "es": ("CODO", "Codo"),
        "fr": ("COUDE",),
        "it": ("GOMITO",),
        "nl": ("ELLEBOOG",),
        "pt": ("COTOVELO",),
    },
    "knee": {
        "en": ("KNEE", "Knee", "KNE"),
        "de": ("KNIE", "Knie", "KNIEGELENK"),
        "es": ("RODILLA", "Rodilla"),
        "fr": ("GENOU", "GENOUX"),
        "it": ("GINOCCHIO",),
        "nl": ("KNIE",),
        "pt": ("JOELHO",),
    },
    "wrist": {
        "en": ("WRIST", "Wrist", "WRST"),
        "de": ("HANDGELENK", "Handgelenk", "HAND GELENK", "HGL"),
        "es": ("MUÑECA", "MUNECA"),
        "fr": ("POIGNET",),
        "it": ("POLSO",),
        "nl": ("POLS",),
        "pt": ("PUNHO",),
    },
    "hand": {
        "en": ("HAND", "Hand", "HND"),
        "de": ("HAND", "Hand", "HAND GANZ"),
        "es": ("MANO", "Mano"),
        "fr": ("MAIN",),
        "it": ("MANO",),
        "nl": ("HAND", "HANDEN"),
        "pt": ("MÃO", "MAO"),
    },
    "foot": {
        "en": ("FOOT", "Foot", "FOOOT"),
        "de": ("FUSS", "Fuß", "VORFUSS"),
        "es": ("PIE", "Pie"),
        "fr": ("PIED",),
        "it": ("PIEDE",),
        "nl": ("VOET",),
        "pt": ("PÉ", "PE"),
    },
    "ankle": {
        "en": ("ANKLE", "Ankle", "ANKEL"),
        "de": ("SPRUNGGELENK", "OSG", "Sprunggelenk", "OBERES SPRUNGG"),
        "es": ("TOBILLO", "Tobillo"),
        "fr": ("CHEVILLE",),
        "it": ("CAVIGLIA",),
        "nl": ("ENKEL",),
        "pt": ("TORNOZELO",),
    },
    "pelvis_hip": {
        "en": ("PELVIS", "HIP", "Hip", "HIPS", "PELVIS/HIP"),
        "de": ("BECKEN", "Becken", "HUEFTE", "Hüfte"),
        "es": ("PELVIS", "CADERA", "Cadera"),
        "fr": ("BASSIN", "HANCHE"),
        "it": ("BACINO", "ANCA"),
        "nl": ("BEKKEN", "HEUP"),
        "pt": ("BACIA", "QUADRIL"),
    },
    "cervical_spine": {
        "en": ("C-SPINE", "CSPINE", "C SPINE", "CERVICAL SPINE", "C-SPNE"),
        "de": ("HWS", "Hws", "HALSWIRBELSAEULE", "Halswirbelsäule"),
        "es": ("COLUMNA CERVICAL", "COL CERVICAL"),
        "fr": ("RACHIS CERVICAL",),
        "it": ("RACHIDE CERVICALE", "COLONNA CERVICALE"),
        "nl": ("CERVICALE WERVELKOLOM", "CWK"),
        "pt": ("COLUNA CERVICAL",),
    },
    "thoracic_spine": {
        "en": ("T-SPINE", "T SPINE", "TSPINE", "THORACIC SPINE", "DORSAL SPINE"),
        "de": ("BWS", "Bws", "BRUSTWIRBELSAEULE", "Brustwirbelsäule"),
        "es": ("COLUMNA DORSAL", "COLUMNA TORACICA"),
        "fr": ("RACHIS DORSAL",),
        "it": ("RACHIDE DORSALE", "COLONNA DORSALE"),
        "nl": ("THORACALE WERVELKOLOM", "TWK"),
        "pt": ("COLUNA TORÁCICA", "COLUNA DORSAL"),
    },
    "lumbar_spine": {
        "en": ("L-SPINE", "LSPINE", "L SPINE", "LUMBAR SPINE", "L-SPIEN"),
        "de": ("LWS", "Lws", "LENDENWIRBELSAEULE", "Lendenwirbelsäule"),
        "es": ("COLUMNA LUMBAR", "COL LUMBAR"),
        "fr": ("RACHIS LOMBAIRE",),
        "it": ("RACHIDE LOMBARE", "COLONNA LOMBARE"),
        "nl": ("LUMBALE WERVELKOLOM", "LWK"),
        "pt": ("COLUNA LOMBAR",),
    },
}
# Tags a PACS carries on images that show none of the 14 regions.
NON_REGION_TAGS: tuple[str, ...] = ("ABDOMEN", "Abdomen", "CHEST", "THORAX", "OTHER", "UNKNOWN", "SONSTIGE",
                                    "OTRO", "AUTRE", "ALTRO", "OVERIG", "OUTRO", "SCAN", "DOKUMENT")
_GENERIC_DESCRIPTIONS = ("Skelett", "TRAUMA", "Kontrolle", "RX CONTROL", "XR OUTSIDE FILMS", "Röntgen", "Radiographie")
_PAIRED = frozenset({"clavicle", "shoulder", "elbow", "knee", "wrist", "hand", "foot", "ankle", "pelvis_hip"})
_SIDE_SUFFIX: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # (left, right) suffixes per language
    "en": ((" L", " LEFT", " LT"), (" R", " RIGHT", " RT")),
    "de": ((" li", " links", " LI"), (" re", " rechts", " RE")),
    "es": ((" izq", " IZQ"), (" der", " DCHA")),
    "fr": ((" G", " gauche"), (" D", " droit")),
    "it": ((" sx", " SX"), (" dx", " DX")),
    "nl": ((" links", " L"), (" rechts", " R")),
    "pt": ((" esq", " ESQ"), (" dir", " DIR")),
}
_DESCRIPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("XR {t}", "{t} 2 VIEWS", "DX {t}"),
    "de": ("Röntgen {t}", "RÖ {t} in 2 Ebenen", "{t} ap/seitl."),
    "es": ("RX {t}", "Radiografía de {t}"),
    "fr": ("Radiographie {t}", "RX {t}"),
    "it": ("RX {t}", "Radiografia {t}"),
    "nl": ("Röntgen {t}", "X-{t}"),
    "pt": ("RX {t}", "Radiografia de {t}"),
}
# Langer et al. 2024 label audit: wrong tags cluster in spine levels, clavicle/shoulder and hand/wrist.
_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "clavicle": ("shoulder", "rib"),
    "shoulder": ("clavicle", "elbow"),
    "skull": ("cervical_spine",),
    "rib": ("thoracic_spine", "clavicle"),
    "elbow": ("wrist", "shoulder"),
    "knee": ("ankle", "pelvis_hip"),
    "wrist": ("hand", "elbow"),
    "hand": ("wrist", "foot"),
    "foot": ("ankle", "hand"),
    "ankle": ("foot", "knee"),
    "pelvis_hip": ("lumbar_spine", "knee"),
    "cervical_spine": ("thoracic_spine", "skull"),
    "thoracic_spine": ("cervical_spine", "lumbar_spine", "rib"),
    "lumbar_spine": ("thoracic_spine", "pelvis_hip"),
}
_PLAUSIBLE_CONFUSION_P = 0.75
# Anatomic Region Sequence codes a device writes for the region it was told (SNOMED CT, DICOM CID 4009
# DX Anatomy Imaged); the older vendor B writes the legacy SNOMED-RT ids of the same concepts.
REGION_CODES: dict[str, tuple[tuple[str, str, str], ...]] = {  # region -> (SCT code, SRT id, meaning)
    "clavicle": (("51299004", "T-12310", "Clavicle"),),
    "shoulder": (("16982005", "T-D2220", "Shoulder"), ("79601000", "T-12280", "Scapula")),
    "skull": (("89546000", "T-11100", "Skull"), ("69536005", "T-D1100", "Head")),
    "rib": (("113197003", "T-11300", "Rib"),),
    "elbow": (("16953009", "T-15430", "Elbow joint"),),
    "knee": (("72696002", "T-D9200", "Knee"),),
    "wrist": (("74670003", "T-15460", "Wrist joint"),),
    "hand": (("85562004", "T-D8700", "Hand"),),
    "foot": (("56459004", "T-D9700", "Foot"),),
    "ankle": (("70258002", "T-15750", "Ankle joint"),),
    "pelvis_hip": (("29836001", "T-D2500", "Hip"), ("24136001", "T-15710", "Hip joint"),
                   ("12921003", "T-D6000", "Pelvis")),
    "cervical_spine": (("122494005", "T-11501", "Cervical spine"),),
    "thoracic_spine": (("122495006", "T-11502", "Thoracic spine"),),
    "lumbar_spine": (("122496007", "T-11503", "Lumbar spine"),),
}
# Codes for the tags of images outside the label space: chest and abdomen as tagged, else a long bone.
_NON_REGION_CODES: dict[str, tuple[str, str, str]] = {
    "chest": ("51185008", "T-D3000", "Chest"), "abdomen": ("113345001", "T-D4000", "Abdomen"),
    "femur": ("71341001", "T-12710", "Femur"), "humerus": ("85050009", "T-12410", "Humerus"),
    "lower leg": ("30021000", "T-D9400", "Lower leg"), "forearm": ("14975008", "T-D8500", "Forearm"),
}
# Laterality follows what the tags name (PS3.3 General Series: required for a paired part, absent
# for an unpaired one, empty when unknown): the code decides; without one, DICOM's unpaired
# BodyPartExamined terms mean none, and other words leave it unknown unless a paired region is named.
_SIDED_REGIONS = _PAIRED | {"rib"}
_PAIRED_CODE_MEANINGS = frozenset({"Clavicle", "Shoulder", "Scapula", "Rib", "Elbow joint", "Knee", "Wrist joint",
                                   "Hand", "Foot", "Ankle joint", "Hip", "Hip joint", "Femur", "Humerus",
                                   "Lower leg", "Forearm"})
_UNPAIRED_BODY_PARTS = frozenset({"ABDOMEN", "CHEST", "CSPINE", "HEAD", "LSPINE", "PELVIS", "SKULL", "SPINE", "TSPINE"})
# Share of CR studies whose device writes no Anatomic Region Sequence (older digitisers). DX must
# code what BodyPartExamined names (PS3.3 General Anatomy macro: empty only when the part is
# unknown), so a DX study lacks a code only when it lacks BodyPartExamined too.
_CODE_ABSENT_P = 0.5

# --- fake PHI (no real persons; small built-in lists) ----------------------------------------------
_SURNAMES = ("MUELLER", "SCHMIDT", "SCHNEIDER", "FISCHER", "WEBER", "BECKER", "HOFFMANN", "GARCIA", "MARTINEZ",
             "LOPEZ", "FERNANDEZ", "DUBOIS", "LEROY", "MOREAU", "ROSSI", "RUSSO", "BIANCHI", "ESPOSITO", "DE JONG",
             "JANSEN", "VAN DIJK", "BAKKER", "SILVA", "SANTOS", "FERREIRA", "PEREIRA", "SMITH", "TAYLOR", "BROWN")
_GIVEN = {"F": ("ANNA", "MARIA", "SOFIA", "LAURA", "EMMA", "JULIA", "CARMEN", "LUCIA", "CHIARA", "CLAIRE", "SANNE",
                "INES"),
          "M": ("PETER", "THOMAS", "JUAN", "CARLOS", "LUCA", "MARCO", "PIERRE", "JAN", "PEDRO", "JOHN", "STEFAN",
                "JOAO")}
_INSTITUTIONS = ("St. Elisabeth Klinikum Nord", "Kreiskrankenhaus Talheim", "Hospital Universitario San Rafael",
                 "Clinique du Parc Lyon-Est", "Ospedale Santa Chiara", "Ziekenhuis Rijnoever",
                 "Hospital de Santa Luzia")
_PHYSICIANS = ("WEBER^KLAUS^^DR", "GARCIA^ELENA^^DRA", "MARTIN^PAUL^^DR", "COLOMBO^GIULIA^^DOTT",
               "VISSER^DAAN^^DR", "COSTA^RITA^^DRA", "HUBER^MARTINA^^DR")
_STATIONS = ("XR-ROOM1", "XR-ROOM2", "TRAUMA-DR", "CR-READER")

# --- vendors and formats ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Vendor:
    name: str
    manufacturer: str
    models: tuple[tuple[str, str], ...]  # (model name, SOP class UID)
    gamma: tuple[float, float]  # tone curve exponent range (log-uniform)
    noise: tuple[float, float]  # additive noise sigma range, fraction of full scale
    field_mm: tuple[float, float]  # detector field of view
    matrix: float  # rows/cols relative to the requested size
    blur_px: float  # detector unsharpness, in output pixels


VENDORS: dict[str, Vendor] = {
    "A": Vendor("A", "Nordlicht Medical", (("NL-DR 4343", DigitalXRayImageStorageForPresentation),
                                           ("NL-CR Digitizer 35", ComputedRadiographyImageStorage)),
                (0.65, 1.5), (0.003, 0.015), (240.0, 430.0), 1.0, 0.0),
    # The shifted site: another vendor, harder tone curve, noisier, coarser detector.
    "B": Vendor("B", "Meridian Imaging Systems", (("Meridian FlatPanel 2430", DigitalXRayImageStorageForPresentation),),
                (1.3, 2.2), (0.02, 0.04), (300.0, 430.0), 0.75, 0.8),
}
TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless)
PHOTOMETRICS: tuple[str, ...] = ("MONOCHROME1", "MONOCHROME2")
BITS_STORED: tuple[int, ...] = (8, 12, 16)
_VIEWS = ("AP", "PA", "LL", "RL", "RLO", "LLO", "")  # ViewPosition defined terms (CR and DX)
# View Code Sequence (CID 4010 DX View) of each view but "".
_VIEW_CODES = {"AP": ("399348003", "antero-posterior"), "PA": ("272479007", "postero-anterior"),
               "LL": ("399173006", "left lateral"), "RL": ("399198007", "right lateral"),
               "RLO": ("399236003", "right oblique"), "LLO": ("399184004", "left oblique")}
# Patient Orientation (row, column direction) of the unrotated pose as seen from the tube.
_ORIENTATION = {"PA": ("R", "F"), "LL": ("P", "F"), "RL": ("A", "F"), "RLO": ("L", "F"), "LLO": ("R", "F")}

# Clutter rates in synth. Langer et al. 2024 pastes 0/1/2 gauges with p = 1/3 each as augmentation; a PACS
# export has far fewer, so the gauge rate here is lower.
_GAUGE_COUNT_P = (0.8, 0.12, 0.08)
_GAUGE_SCALE = (0.8, 1.2)  # Langer et al. 2024
_GAUGE_OPACITY = (0.75, 1.0)  # Langer et al. 2024
_GAUGE_DIAMETER_MM = 25.0  # common calibration sphere
_BORDER_P = 0.25
_MARKER_P = 0.5
_COLLIMATION_P = 0.3
_PORTRAIT_P = 0.3
_EMPTY_TAG_P = 0.1
MIN_SIZE = 42  # smallest `size` whose every image is at least 32 pixels a side (OpenJPEG's default 6 levels)

TRUTH_COLUMNS: tuple[str, ...] = (
    "file", "sop_instance_uid", "study_instance_uid", "patient_id", "patient_name", "true_region", "tag_text",
    "study_description", "tag_region", "mislabeled", "angle_deg", "mirrored", "photometric", "bits_stored",
    "transfer_syntax", "sop_class", "modality", "manufacturer", "vendor", "rows", "cols", "pixel_spacing_mm", "ood",
    "ood_kind", "has_gauge", "n_gauges", "has_border", "has_marker", "marker_text", "collimated",
    "region_code",
)


class SynthSummary(BaseModel):
    out_dir: Path
    dicom_dir: Path
    truth_path: Path
    n_files: int
    counts: dict[str, int]  # true region -> images, `unknown` for out-of-domain
    n_mislabeled: int
    n_ood: int
    n_patients: int


# --- the plan: who, what, which format -------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    sex: str
    birth_date: date


@dataclass(frozen=True)
class Study:
    index: int
    patient: Patient
    n_images: int
    region: str  # true region, or UNKNOWN when out of domain
    ood_kind: str
    label_region: str  # the region the PACS tags denote (wrong when mislabeled)
    tag_text: str  # BodyPartExamined
    description: str  # StudyDescription
    left: bool
    vendor: str
    model: str
    sop_class: str
    study_date: date
    institution: str
    physician: str
    accession: str
    region_code: tuple[str, str, str] = ("", "", "")  # (scheme, code, meaning) written; scheme "" when absent


@dataclass(frozen=True)
class ImagePlan:
    index: int
    study: Study
    angle_deg: float
    photometric: str
    bits_stored: int
    transfer_syntax: str


def _patients_and_sizes(n: int, rng: np.random.Generator) -> list[tuple[Patient, list[int]]]:
    """Patients with 1-3 studies of 1-2 images each, until n images exist."""
    out: list[tuple[Patient, list[int]]] = []
    total = 0
    used_ids: set[str] = set()
    while total < n:
        sex = "F" if rng.random() < 0.5 else "M"
        name = f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN[sex])}"
        pid = f"PID{int(rng.integers(1_000_000, 9_999_999))}"
        while pid in used_ids:
            pid = f"PID{int(rng.integers(1_000_000, 9_999_999))}"
        used_ids.add(pid)
        birth = date(1935, 1, 1) + timedelta(days=int(rng.integers(0, 80 * 365)))
        sizes = []
        for _ in range(int(rng.integers(1, 4))):
            m = min(int(rng.integers(1, 3)), n - total)
            if m <= 0:
                break
            sizes.append(m)
            total += m
        out.append((Patient(pid, name, sex, birth), sizes))
    return out


def _pick_studies(sizes: list[int], target: int, rng: np.random.Generator, allowed: list[bool]) -> list[bool]:
    """Mark studies (in random order) until their images add up to `target` (exact when possible)."""
    chosen = [False] * len(sizes)
    count = 0
    for i in rng.permutation(len(sizes)):
        if count >= target:
            break
        if allowed[i] and count + sizes[i] <= target:
            chosen[i] = True
            count += sizes[i]
    return chosen


def _wrong_region(region: str, rng: np.random.Generator) -> str:
    if rng.random() < _PLAUSIBLE_CONFUSION_P:
        return str(rng.choice(_CONFUSIONS[region]))
    others = [r for r in REGIONS if r != region]
    return str(rng.choice(others))


def _tag_text(region: str, left: bool, rng: np.random.Generator) -> tuple[str, str]:
    """A messy BodyPartExamined value for `region` (a valid CS string: upper case, at most 16
    characters, as PACS truncate), and the language it came from."""
    vocab = BODY_PART_VOCABULARY[region]
    lang = str(rng.choice(sorted(vocab)))
    text = str(rng.choice(vocab[lang]))
    if region in _PAIRED and rng.random() < 0.35:
        text += str(rng.choice(_SIDE_SUFFIX[lang][0 if left else 1]))
    return to_code_string(text), lang


def _description(label_region: str, tag_text: str, lang: str, rng: np.random.Generator) -> str:
    """StudyDescription: names the region (another synonym) or, when the tag carries it, maybe nothing."""
    if tag_text and rng.random() < 0.3:
        return str(rng.choice(_GENERIC_DESCRIPTIONS))
    if label_region == UNKNOWN:
        word = str(rng.choice(NON_REGION_TAGS))
    else:
        vocab = BODY_PART_VOCABULARY[label_region]
        lang = lang if lang in vocab else str(rng.choice(sorted(vocab)))
        word = str(rng.choice(vocab[lang]))
    u = rng.random()  # descriptions are LO: any case
    word = word.lower() if u < 0.12 else (word.title() if u < 0.2 else word)
    return str(rng.choice(_DESCRIPTION_TEMPLATES.get(lang, _DESCRIPTION_TEMPLATES["en"]))).format(t=word)


def _region_balance(sizes: list[int], ood: list[bool], rng: np.random.Generator) -> list[str]:
    """Give in-domain studies regions so image counts per region stay within one study of each other."""
    counts = dict.fromkeys(REGIONS, 0)
    priority = [REGIONS[i] for i in rng.permutation(len(REGIONS))]
    out = []
    for m, is_ood in zip(sizes, ood):
        if is_ood:
            out.append(UNKNOWN)
            continue
        region = min(priority, key=lambda r: counts[r])  # ties: earliest in the rotating priority
        priority.remove(region)
        priority.append(region)
        counts[region] += m
        out.append(region)
    return out


def _stratified(values: tuple, n: int, rng: np.random.Generator) -> list:
    """Each value about n/len(values) times, in random order: every value occurs once n >= len(values)."""
    reps = [values[i % len(values)] for i in range(n)]
    return [reps[i] for i in rng.permutation(n)]


def plan_images(n: int, seed: int, mislabel_rate: float, shift: float, ood_rate: float) -> list[ImagePlan]:
    """Decide everything about every image except its pixels. Pure and deterministic in `seed`."""
    root = np.random.SeedSequence(seed)
    rng_people, rng_ood, rng_region, rng_label, rng_vendor, rng_format, rng_site, rng_code = (
        np.random.default_rng(s) for s in root.spawn(8))
    patients = _patients_and_sizes(n, rng_people)
    owners = [p for p, sizes in patients for _ in sizes]
    sizes = [m for _, s in patients for m in s]
    n_studies = len(sizes)

    ood = _pick_studies(sizes, round(ood_rate * n), rng_ood, [True] * n_studies)
    regions = _region_balance(sizes, ood, rng_region)
    n_in = sum(m for m, o in zip(sizes, ood) if not o)
    wrong = _pick_studies(sizes, round(mislabel_rate * n_in), rng_label, [not o for o in ood])

    studies: list[Study] = []
    for k in range(n_studies):
        left = bool(rng_site.random() < 0.5)
        region = regions[k]
        ood_kind = ""
        if region == UNKNOWN:
            ood_kind = str(rng_site.choice(OOD_KINDS))
            u = rng_site.random()
            label = str(rng_site.choice(REGIONS)) if u < 0.4 else UNKNOWN
        else:
            label = _wrong_region(region, rng_label) if wrong[k] else region
        if label == UNKNOWN:
            tag, lang = to_code_string(rng_site.choice(NON_REGION_TAGS)), "en"
        else:
            tag, lang = _tag_text(label, left, rng_site)
        if rng_site.random() < _EMPTY_TAG_P and region != UNKNOWN:
            tag = ""  # the region then only shows in StudyDescription
        description = _description(label, tag, lang, rng_site)
        vendor = VENDORS["B" if rng_vendor.random() < shift else "A"]
        model, sop_class = vendor.models[int(rng_vendor.integers(0, len(vendor.models)))]
        code = _region_code(label, tag, vendor.name, sop_class == DigitalXRayImageStorageForPresentation, rng_code)
        studies.append(Study(
            index=k, patient=owners[k], n_images=sizes[k], region=region, ood_kind=ood_kind, label_region=label,
            tag_text=tag, description=description, left=left, vendor=vendor.name, model=model, sop_class=sop_class,
            study_date=date(2019, 1, 1) + timedelta(days=int(rng_site.integers(0, 6 * 365))),
            institution=str(rng_site.choice(_INSTITUTIONS)), physician=str(rng_site.choice(_PHYSICIANS)),
            accession=f"A{int(rng_site.integers(10_000_000, 99_999_999))}", region_code=code,
        ))

    # angles: one per stratum of the circle, shuffled, so even small n spans [0, 360)
    strata = rng_format.permutation(n)
    angles = (strata + rng_format.random(n)) * 360.0 / n
    photometric = _stratified(PHOTOMETRICS, n, rng_format)
    bits = _stratified(BITS_STORED, n, rng_format)
    syntaxes = _stratified(TRANSFER_SYNTAXES, n, rng_format)
    plans, i = [], 0
    for study in studies:
        for _ in range(study.n_images):
            plans.append(ImagePlan(i, study, round(float(angles[i]), 3) % 360.0, photometric[i], bits[i], syntaxes[i]))
            i += 1
    return plans


def _region_code(label: str, tag: str, vendor: str, is_dx: bool, rng: np.random.Generator) -> tuple[str, str, str]:
    """(scheme, code, meaning) of the Anatomic Region Sequence for a study tagged `label`, or
    ("", "", "") when the device writes none. A wrong label has the wrong code too: both come from
    what the operator selected."""
    absent = rng.random() < _CODE_ABSENT_P and not (is_dx and tag)
    if label == UNKNOWN:
        kind = next((k for k in ("chest", "abdomen") if k in tag.lower() or (k == "chest" and "THORAX" in tag)), "")
        sct, srt, meaning = _NON_REGION_CODES[kind or str(rng.choice(["femur", "humerus", "lower leg", "forearm"]))]
    else:
        options = REGION_CODES[label]
        sct, srt, meaning = options[int(rng.integers(0, len(options)))]
    if absent:
        return "", "", ""
    return ("SRT", srt, meaning) if vendor == "B" else ("SCT", sct, meaning)


def tag_region(study: Study) -> str:
    """The region the file's own tags denote: the code, BodyPartExamined or StudyDescription
    (a mislabelled study's are wrong alike), else unknown."""
    if study.region_code[0] or study.tag_text or study.label_region == UNKNOWN:
        return study.label_region
    return UNKNOWN if study.description in _GENERIC_DESCRIPTIONS else study.label_region


# --- pixels ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # float32 (rows, cols) in [0, 1], bone bright, ready to store
    pixel_spacing_mm: float
    mirrored: bool
    n_gauges: int
    has_border: bool
    marker_text: str
    collimated: bool


def _marker(letter: str, height: int) -> np.ndarray:
    """A lead letter (L/R) as a float mask, drawn with PIL's bitmap font and scaled up."""
    font = bitmap_font()
    box = font.getbbox(letter)
    w, h = max(box[2] - box[0], 1), max(box[3] - box[1], 1)
    small = Image.new("L", (w + 2, h + 2), 0)
    ImageDraw.Draw(small).text((1 - box[0], 1 - box[1]), letter, fill=255, font=font)
    k = max(1, round(height / (h + 2)))
    big = small.resize(((w + 2) * k, (h + 2) * k), Image.Resampling.NEAREST)
    return np.asarray(big, np.float32) / 255.0


def _sigmoid_tone(img: np.ndarray, slope: float, mid: float) -> np.ndarray:
    """Vendor S-curve LUT mapping [0, 1] onto [0, 1]; slope 0 is the identity."""
    if slope < 1e-3:
        return img

    def f(x: np.ndarray | float) -> np.ndarray | float:
        return 1.0 / (1.0 + np.exp(-slope * (x - mid)))

    return (f(img) - f(0.0)) / (f(1.0) - f(0.0))


def _low_pass(img: np.ndarray, sigma: float) -> np.ndarray:
    """Wide Gaussian blur, computed on a grid of about 64 pixels (the result is smooth anyway)."""
    k = max(1, min(img.shape) // 64)
    rows, cols = img.shape
    small = img[: rows // k * k, : cols // k * k].reshape(rows // k, k, cols // k, k).mean(axis=(1, 3))
    small = gaussian_filter(small, sigma / k, mode="nearest")
    return zoom(small, (rows / small.shape[0], cols / small.shape[1]), order=1, mode="nearest", grid_mode=True)


def _expose(att: np.ndarray, vendor: Vendor, rng: np.random.Generator) -> np.ndarray:
    """Detector + vendor processing: tone curve, large-scale contrast equalisation, exposure level,
    heel-effect ramp, unsharpness and noise. All parameters are drawn without looking at the region."""
    gamma = math.exp(rng.uniform(math.log(vendor.gamma[0]), math.log(vendor.gamma[1])))
    img = _sigmoid_tone(att.astype(np.float64) ** gamma, rng.uniform(0.0, 8.0), rng.uniform(0.3, 0.7))
    rows, cols = img.shape
    # multi-scale processing flattens thick/thin body parts: subtract part of the low-pass image
    strength = rng.uniform(0.0, 0.7)
    if strength > 0.05:
        low = _low_pass(img, rng.uniform(0.05, 0.15) * max(rows, cols))
        img = img - strength * (low - low.mean())
        img = (img - img.min()) / max(float(np.ptp(img)), 1e-6)
    lo, hi = rng.uniform(0.02, 0.15), rng.uniform(0.7, 0.9)
    img = lo + (hi - lo) * img
    yy, xx = np.mgrid[0:rows, 0:cols]
    phi = rng.uniform(0, 2 * math.pi)
    ramp = (xx / cols - 0.5) * math.cos(phi) + (yy / rows - 0.5) * math.sin(phi)
    img = img * (1.0 + rng.uniform(-0.08, 0.08) * ramp)  # anode heel effect
    if vendor.blur_px > 0:
        img = gaussian_filter(img, vendor.blur_px)
    return img + rng.normal(0.0, rng.uniform(*vendor.noise), img.shape)


def _add_gauge(img: np.ndarray, center: tuple[float, float], radius: float, opacity: float) -> None:
    """A metal calibration sphere: nearly flat bright disc with a soft rim."""
    rows, cols = img.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    u = np.hypot(yy + 0.5 - center[0], xx + 0.5 - center[1]) / radius
    disc = np.clip(2.0 * np.sqrt(np.clip(1.0 - u * u, 0.0, None)), 0.0, 1.0) * opacity
    img *= 1.0 - disc
    img += disc * 0.97


def render_image(plan: ImagePlan, seed: int, size: int) -> Rendered:
    """The stored picture of one planned image. Pure: same (plan, seed, size) -> same pixels."""
    study = plan.study
    vendor = VENDORS[study.vendor]
    anatomy = np.random.default_rng([seed, plan.index, 1])
    nuisance = np.random.default_rng([seed, plan.index, 2])

    side = max(16, int(round(size * vendor.matrix / 2)) * 2)
    portrait = vendor.name == "A" and nuisance.random() < _PORTRAIT_P
    rows, cols = side, (int(round(side * 0.8 / 2)) * 2 if portrait else side)
    field_mm = nuisance.uniform(*vendor.field_mm)
    spacing = round(field_mm / side, 4)
    flip = bool(nuisance.random() < 0.5)
    mirrored = study.left if study.region in _PAIRED else (flip and study.region != UNKNOWN)

    if study.region == UNKNOWN:
        att = draw_out_of_domain(anatomy, side, kind=study.ood_kind, angle_deg=plan.angle_deg)
    else:
        att = draw_region(study.region, anatomy, side, angle_deg=plan.angle_deg, mirror=mirrored)
    c0 = (side - cols) // 2
    img = _expose(att[:, c0:c0 + cols], vendor, nuisance)

    collimated = bool(nuisance.random() < _COLLIMATION_P)
    if collimated:  # shutters: outside the exposed field stays nearly unexposed (bright, quiet)
        t, b, lft, rgt = (int(f * d) for f, d in zip(nuisance.uniform(0.0, 0.15, 4), (rows, rows, cols, cols)))
        level = nuisance.uniform(0.7, 0.88)
        mask = np.ones((rows, cols), bool)
        mask[t:rows - b, lft:cols - rgt] = False
        img[mask] = level + nuisance.normal(0.0, 0.003, int(mask.sum()))

    n_gauges = int(nuisance.choice(3, p=_GAUGE_COUNT_P))
    for _ in range(n_gauges):
        radius = _GAUGE_DIAMETER_MM / 2 / spacing * nuisance.uniform(*_GAUGE_SCALE)
        center = (nuisance.uniform(0.15, 0.85) * rows, nuisance.uniform(0.15, 0.85) * cols)
        _add_gauge(img, center, radius, nuisance.uniform(*_GAUGE_OPACITY))

    marker_text = ""
    if nuisance.random() < _MARKER_P:
        marker_text = ("L" if mirrored else "R") if study.region in _PAIRED else str(nuisance.choice(["L", "R"]))
        mask = _marker(marker_text, max(6, int(rows * nuisance.uniform(0.05, 0.09))))
        mh, mw = mask.shape
        if mh < rows and mw < cols:
            r0 = int(nuisance.choice([nuisance.uniform(0.02, 0.12), nuisance.uniform(0.78, 0.95)]) * (rows - mh))
            q0 = int(nuisance.choice([nuisance.uniform(0.02, 0.12), nuisance.uniform(0.78, 0.95)]) * (cols - mw))
            patch = img[r0:r0 + mh, q0:q0 + mw]
            np.maximum(patch, mask * nuisance.uniform(0.93, 0.99), out=patch)

    has_border = bool(nuisance.random() < _BORDER_P)
    if has_border:  # Langer et al. 2024: rotated capture inside a burnt-in white frame
        theta = math.radians(plan.angle_deg)
        yy, xx = np.mgrid[0:rows, 0:cols]
        x = (xx + 0.5) / cols * 2 - 1
        y = (yy + 0.5) / rows * 2 - 1
        u = x * math.cos(theta) - y * math.sin(theta)
        v = x * math.sin(theta) + y * math.cos(theta)
        fx, fy = nuisance.uniform(0.82, 0.95, 2)
        img[(np.abs(u) > fx) | (np.abs(v) > fy)] = 1.0
    return Rendered(np.clip(img, 0.0, 1.0).astype(np.float32), spacing, mirrored, n_gauges, has_border,
                    marker_text, collimated)


def to_stored(image: np.ndarray, photometric: str, bits_stored: int) -> np.ndarray:
    """Quantise a bone-bright [0, 1] image to stored values; MONOCHROME1 is stored inverted."""
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"unsupported photometric interpretation {photometric!r}")
    if bits_stored not in BITS_STORED:
        raise ValueError(f"unsupported BitsStored {bits_stored}; expected one of {BITS_STORED}")
    top = (1 << bits_stored) - 1
    stored = np.rint(np.clip(image, 0.0, 1.0).astype(np.float64) * top)
    if photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint8 if bits_stored == 8 else np.uint16)


# --- DICOM -----------------------------------------------------------------------------------------


def _uid(seed_key: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=["xrayops-synth", seed_key, *map(str, parts)])


def _laterality(study: Study, mirrored: bool) -> str | None:
    """"L"/"R" when the tags name a part of one side, "" when it is not known whether they do,
    None when they name an unpaired part. The side is the image's own for a paired region."""
    side = ("L" if mirrored else "R") if study.region in _PAIRED else ("L" if study.left else "R")
    scheme, _, meaning = study.region_code
    if scheme:
        return side if meaning in _PAIRED_CODE_MEANINGS else None
    if study.tag_text in _UNPAIRED_BODY_PARTS:
        return None
    return side if study.region in _PAIRED or study.label_region in _SIDED_REGIONS else ""


def _code_item(code: str, scheme: str, meaning: str) -> Dataset:
    """A Code Sequence item (Basic Code Sequence Macro)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, scheme, meaning
    return item


def _messy(ds: Dataset, keyword_tag: int, vr: str, value: str) -> None:
    """Write free text as a PACS does, without pydicom's value-validation warnings (case, length)."""
    ds.add(DataElement(keyword_tag, vr, value, validation_mode=dicom_config.IGNORE))


def build_dataset(plan: ImagePlan, rendered: Rendered, stored: np.ndarray, seed_key: str,
                  rng: np.random.Generator) -> Dataset:
    """A CR or DX (for presentation) object with realistic tags, fake PHI and deterministic UIDs."""
    study = plan.study
    is_dx = study.sop_class == DigitalXRayImageStorageForPresentation
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = _uid(seed_key, "image", plan.index)
    ds.file_meta.MediaStorageSOPClassUID = study.sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = study.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(seed_key, "study", study.index)
    ds.SeriesInstanceUID = _uid(seed_key, "series", plan.index)
    ds.Modality = "DX" if is_dx else "CR"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date.strftime("%Y%m%d")
    minutes, seconds = int(rng.integers(7 * 60, 20 * 60)), int(rng.integers(0, 60))
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{minutes // 60:02d}{minutes % 60:02d}{seconds:02d}"
    ds.AccessionNumber = study.accession
    ds.StudyID = study.accession[-6:]
    ds.SeriesNumber = plan.index % 1000 + 1
    ds.InstanceNumber = 1
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.physician
    ds.StationName = str(rng.choice(_STATIONS))
    ds.Manufacturer = VENDORS[study.vendor].manufacturer
    ds.ManufacturerModelName = study.model
    ds.DeviceSerialNumber = f"SN{zlib.crc32(study.model.encode()) % 100_000:05d}"
    ds.SoftwareVersions = "4.2.1" if study.vendor == "A" else "11.0"
    _messy(ds, 0x00081030, "LO", study.description)  # StudyDescription
    ds.BodyPartExamined = study.tag_text  # a site's own words, as a valid CS string
    view = str(rng.choice(_VIEWS))
    ds.ViewPosition = view
    side = _laterality(study, rendered.mirrored)
    if is_dx:
        ds.ImageLaterality = side or "U"  # U: unpaired (or not known)
    elif side is not None:
        ds.Laterality = side
    ds.PatientOrientation = list(_ORIENTATION.get(view, ("L", "F")))
    scheme, code, meaning = study.region_code
    if scheme:
        ds.AnatomicRegionSequence = [_code_item(code, scheme, meaning)]
    elif is_dx:
        ds.AnatomicRegionSequence = []  # Type 2 in DX: present, empty when the device wrote none
    ds.KVP = f"{float(rng.uniform(50, 90)):.0f}"
    _patient_module(ds, study)
    _pixel_and_presentation(ds, plan, rendered, stored, view, rng)
    return ds


def _patient_module(ds: Dataset, study: Study) -> None:
    """The Patient module and the patient's age at the study: the fake PHI ingestion must remove."""
    patient = study.patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    age = (study.study_date - patient.birth_date).days // 365
    ds.PatientAge = f"{max(age, 0):03d}Y"


def _pixel_and_presentation(ds: Dataset, plan: ImagePlan, rendered: Rendered, stored: np.ndarray, view: str,
                            rng: np.random.Generator) -> None:
    """Pixel data, spacing, rescale and VOI window; for DX also the For Presentation attributes."""
    is_dx = plan.study.sop_class == DigitalXRayImageStorageForPresentation
    spacing = f"{rendered.pixel_spacing_mm:.4f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    if rng.random() < 0.6:
        ds.PixelSpacing = [spacing, spacing]
    ds.set_pixel_data(stored, plan.photometric, plan.bits_stored, generate_instance_uid=False)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    slope, intercept = (1.0, 0.0) if is_dx else [(1.0, 0.0), (2.0, 0.0), (1.0, -512.0)][int(rng.integers(0, 3))]
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"  # unspecified: stored values are not calibrated to a physical unit
    if is_dx:  # DX For Presentation: required presentation attributes and a VOI window
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if plan.photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if plan.photometric == "MONOCHROME1" else -1
        ds.PositionerType = "COLUMN"
        ds.AcquisitionContextSequence = []  # Type 2: no acquisition context recorded
        if view in _VIEW_CODES:
            view_code, view_meaning = _VIEW_CODES[view]
            ds.ViewCodeSequence = [_code_item(view_code, "SCT", view_meaning)]
    if is_dx or rng.random() < 0.5:
        lo, hi = np.percentile(stored, (1.0, 99.0)) * slope + intercept
        width = max(float(hi - lo) * float(rng.uniform(1.0, 1.3)), 2.0)
        ds.WindowCenter = f"{float(lo + hi) / 2:.1f}"
        ds.WindowWidth = f"{width:.1f}"


def encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Put `ds` (in place) into `transfer_syntax`; compressed syntaxes use lossless codecs (deterministic)."""
    out = ds
    if transfer_syntax == RLELossless:
        plugin = "pylibjpeg" if "pylibjpeg" in RLELosslessEncoder.available_plugins else ""
        out.compress(RLELossless, encoding_plugin=plugin, generate_instance_uid=False)
    elif transfer_syntax == JPEG2000Lossless:
        out.compress(JPEG2000Lossless, generate_instance_uid=False)
    elif transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        out.file_meta.TransferSyntaxUID = transfer_syntax
    else:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    return out


def _check_args(n: int, seed: int, mislabel_rate: float, shift: float, ood_rate: float, size: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    for name, value in (("mislabel_rate", mislabel_rate), ("shift", shift), ("ood_rate", ood_rate)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels (JPEG 2000 needs 32 a side after vendor B's coarser "
                         f"matrix and the portrait crop), got {size}")


def write_image(plan: ImagePlan, seed: int, size: int, seed_key: str, dicom_dir: Path) -> dict:
    """Render, encode and write one planned image; its truth row. Pure in (plan, seed, size): the
    same file whichever process writes it."""
    study = plan.study
    rendered = render_image(plan, seed, size)
    stored = to_stored(rendered.image, plan.photometric, plan.bits_stored)
    meta_rng = np.random.default_rng([seed, plan.index, 3])
    ds = encode(build_dataset(plan, rendered, stored, seed_key, meta_rng), plan.transfer_syntax)
    name = f"img-{plan.index:06d}.dcm"
    ds.save_as(Path(dicom_dir) / name, enforce_file_format=True)
    denoted = tag_region(study)
    return {
        "file": name, "sop_instance_uid": ds.SOPInstanceUID, "study_instance_uid": ds.StudyInstanceUID,
        "patient_id": study.patient.patient_id, "patient_name": study.patient.name, "true_region": study.region,
        "tag_text": study.tag_text, "study_description": study.description, "tag_region": denoted,
        "mislabeled": study.region != UNKNOWN and denoted != study.region, "angle_deg": f"{plan.angle_deg:.3f}",
        "mirrored": rendered.mirrored, "photometric": plan.photometric, "bits_stored": plan.bits_stored,
        "transfer_syntax": plan.transfer_syntax, "sop_class": study.sop_class, "modality": ds.Modality,
        "manufacturer": ds.Manufacturer, "vendor": study.vendor, "rows": stored.shape[0], "cols": stored.shape[1],
        "pixel_spacing_mm": f"{rendered.pixel_spacing_mm:.4f}", "ood": study.region == UNKNOWN,
        "ood_kind": study.ood_kind, "has_gauge": rendered.n_gauges > 0, "n_gauges": rendered.n_gauges,
        "has_border": rendered.has_border, "has_marker": bool(rendered.marker_text),
        "marker_text": rendered.marker_text, "collimated": rendered.collimated,
        "region_code": f"{study.region_code[0]}:{study.region_code[1]}" if study.region_code[0] else "",
    }


def _write_images(plans: list[ImagePlan], seed: int, size: int, seed_key: str, dicom_dir: Path,
                  workers: int) -> Iterator[dict]:
    """Truth rows in plan order; with `workers` > 1 the images are rendered by that many processes
    (every image depends only on its plan and the seed, so the files are the same)."""
    if workers <= 1 or len(plans) <= 1:
        for plan in plans:
            yield write_image(plan, seed, size, seed_key, dicom_dir)
        return
    # spawn, as ingestion: forking a parent that holds torch/BLAS threads can deadlock the children.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        chunk = max(1, min(64, len(plans) // (4 * workers)))
        yield from pool.map(write_image, plans, repeat(seed), repeat(size), repeat(seed_key), repeat(dicom_dir),
                            chunksize=chunk)


def synthesize(out_dir: Path, n: int, seed: int = 0, mislabel_rate: float = 0.0, shift: float = 0.0,
               ood_rate: float = 0.05, size: int = 256, workers: int = 1) -> SynthSummary:
    """Write `n` synthetic radiographs to out_dir/dicom/img-NNNNNN.dcm and their truth to out_dir/truth.csv
    (`workers` processes render them; the files do not depend on how many)."""
    _check_args(n, seed, mislabel_rate, shift, ood_rate, size)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    seed_key = f"{seed}:{n}:{mislabel_rate}:{shift}:{ood_rate}:{size}"
    plans = plan_images(n, seed, mislabel_rate, shift, ood_rate)
    rows = list(track(_write_images(plans, seed, size, seed_key, dicom_dir, workers), "synthesizing radiographs",
                      total=len(plans)))

    truth_path = out_dir / "truth.csv"
    with truth_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TRUTH_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    counts = {r: 0 for r in (*REGIONS, UNKNOWN)}
    for row in rows:
        counts[row["true_region"]] += 1
    summary = SynthSummary(
        out_dir=out_dir, dicom_dir=dicom_dir, truth_path=truth_path, n_files=len(rows), counts=counts,
        n_mislabeled=sum(r["mislabeled"] for r in rows), n_ood=sum(r["ood"] for r in rows),
        n_patients=len({r["patient_id"] for r in rows}),
    )
    log.info("synth.done", out_dir=str(out_dir), n_files=summary.n_files, n_mislabeled=summary.n_mislabeled,
             n_ood=summary.n_ood, n_patients=summary.n_patients, seed=seed, shift=shift)
    return summary
