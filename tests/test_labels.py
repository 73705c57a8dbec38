"""Body-part free text to the 14 regions of paper 000."""
from __future__ import annotations

import json

import pytest
from dicom_factory import make_dataset

from xrayops.dicom.labels import (
    load_synonyms,
    normalize_body_part,
    normalize_text,
    region_from_dataset,
    unmapped_report,
)
from xrayops.regions import REGIONS, UNKNOWN

REQUIRED = {
    "HAND": "hand", "Hand li": "hand", "MANO": "hand",
    "L-SPINE": "lumbar_spine", "LWS": "lumbar_spine", "HWS": "cervical_spine", "BWS": "thoracic_spine",
    "Schaedel": "skull", "SCHÄDEL": "skull", "CRANEO": "skull", "SKULL": "skull",
    "Becken": "pelvis_hip", "PELVIS": "pelvis_hip", "HIP": "pelvis_hip", "HÜFTE": "pelvis_hip",
    "CLAVICULA": "clavicle",
    "SCHULTER": "shoulder", "EPAULE": "shoulder", "SPALLA": "shoulder",
    "ELLBOGEN": "elbow", "CODO": "elbow", "GOMITO": "elbow",
    "HANDGELENK": "wrist", "POLSO": "wrist", "MUÑECA": "wrist", "PUNHO": "wrist", "POIGNET": "wrist", "PULS": "wrist",
    "FUSS": "foot", "PIE": "foot", "VOET": "foot", "PIED": "foot",
    "SPRUNGGELENK": "ankle", "TOBILLO": "ankle", "CHEVILLE": "ankle", "ENKEL": "ankle",
    "KNIE": "knee", "GENOU": "knee", "RODILLA": "knee",
    "RIPPEN": "rib", "COSTILLAS": "rib", "RIBS": "rib",
    "CHEST": UNKNOWN, "ABDOMEN": UNKNOWN, "": UNKNOWN,
}  # fmt: skip

MORE = {
    # laterality and view words, glued or not
    "Knie re": "knee", "LEFT KNEE": "knee", "KNEE RT": "knee", "Handgelenk li.": "wrist",
    "HANDGELENKLI": "wrist", "Kniegelenk in 2 Ebenen": "knee", "XR HAND 3+ VIEWS LEFT": "hand",
    # spine abbreviations
    "C-SPINE": "cervical_spine", "T-SPINE": "thoracic_spine", "LSPINE": "lumbar_spine", "CWS": "cervical_spine",
    "CSPINE": "cervical_spine", "LWS 2 Ebenen": "lumbar_spine", "SPINE": UNKNOWN,
    # languages
    "colonne lombaire": "lumbar_spine", "Rachis cervical": "cervical_spine", "columna dorsal": "thoracic_spine",
    "pé esquerdo": "foot", "mão direita": "hand", "ginocchio dx": "knee", "Pols links": "wrist",
    "hanche droite": "pelvis_hip", "heup": "pelvis_hip", "Huefte links": "pelvis_hip",
    # compounds
    "Mittelhand re": "hand", "Beckenübersicht": "pelvis_hip", "Vorfuss": "foot", "OBERSCHENKEL": UNKNOWN,
    # typos
    "SHOULDR": "shoulder", "ELBWO": "elbow", "CLAVICAL": "clavicle", "KNEEE": "knee", "ANKEL": "ankle",
    # longest / most specific wins, out-of-space terms stay unknown
    "CHEST RIBS": "rib", "Thorax pa": UNKNOWN, "head of femur": "pelvis_hip", "EXTREMITY": UNKNOWN,
    "BREAST": UNKNOWN, "Test CT": UNKNOWN,
}  # fmt: skip


@pytest.mark.parametrize("text, region", list(REQUIRED.items()))
def test_required_examples(text, region):
    assert normalize_body_part(text) == region


@pytest.mark.parametrize("text, region", list(MORE.items()))
def test_laterality_abbreviations_languages_typos(text, region):
    assert normalize_body_part(text) == region


def test_none_and_non_text_are_unknown():
    assert normalize_body_part(None) == UNKNOWN
    assert normalize_body_part("   -- ") == UNKNOWN


def test_normalize_text_strips_accents_case_and_punctuation():
    assert normalize_text("  SCHÄDEL, li.") == "schadel li"
    assert normalize_text("Muñeca/Épaule") == "muneca epaule"
    assert normalize_text("Fuß") == "fuss"


def test_package_table_covers_every_region_without_conflicts():
    terms = load_synonyms()
    assert set(terms.values()) == set(REGIONS) | {UNKNOWN}
    # umlauts are matched both stripped and transliterated
    assert terms["schadel"] == terms["schaedel"] == "skull"
    assert terms["hufte"] == terms["huefte"] == "pelvis_hip"


def test_site_file_extends_and_overrides(tmp_path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"hand": ["Pfote"], "unknown": ["puls"]}), encoding="utf-8")
    terms = load_synonyms(site)
    assert normalize_body_part("PFOTE RE", terms) == "hand"
    assert normalize_body_part("PULS", terms) == UNKNOWN
    assert normalize_body_part("PULS") == "wrist"  # the default table is untouched


def test_site_file_in_yaml(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("knee:\n  - kniescheibchen\n", encoding="utf-8")
    assert normalize_body_part("Kniescheibchen", load_synonyms(site)) == "knee"


def test_site_file_with_a_bad_region_is_rejected(tmp_path):
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"forearm": ["unterarm"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="forearm"):
        load_synonyms(site)


def test_region_from_dataset_falls_back_through_descriptions():
    ds = make_dataset(body_part="", StudyDescription="XR KNEE LEFT", SeriesDescription="HAND")
    assert region_from_dataset(ds) == ("XR KNEE LEFT", "knee")
    ds = make_dataset(body_part="", StudyDescription="Routine", SeriesDescription="", ProtocolName="LWS ap")
    assert region_from_dataset(ds) == ("LWS ap", "lumbar_spine")


def test_out_of_space_body_part_is_not_overridden_by_a_description():
    ds = make_dataset(body_part="CHEST", StudyDescription="HEAD")
    assert region_from_dataset(ds) == ("CHEST", UNKNOWN)


def test_nothing_recognised_returns_first_text_and_unknown():
    ds = make_dataset(body_part="ZZZ", StudyDescription="Study 12")
    assert region_from_dataset(ds) == ("ZZZ", UNKNOWN)
    assert region_from_dataset(make_dataset(body_part="")) == ("", UNKNOWN)


def test_raw_text_is_truncated():
    raw, region = region_from_dataset(make_dataset(body_part="HAND " + "x" * 100))
    assert len(raw) == 64 and region == "hand"


def test_unmapped_report_counts_only_unmapped_values():
    report = unmapped_report(["HAND", "EXTREMITY", "EXTREMITY", "", "Knie", "ZZZ"])
    assert list(report.columns) == ["value", "count"]
    assert report.to_dict("records") == [
        {"value": "EXTREMITY", "count": 2},
        {"value": "", "count": 1},
        {"value": "ZZZ", "count": 1},
    ]
