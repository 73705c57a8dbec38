"""Body part of a DICOM image: coded anatomy, BodyPartExamined, then descriptions; no false positives."""
from __future__ import annotations

import json

import pytest
from dicom_factory import make_dataset
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr._concepts_dict import concepts
from pydicom.sr._snomed_dict import mapping as snomed_rt

from tests.conftest import DICOM_SAMPLES
from xrayops.dicom.labels import (
    DESCRIPTION_TAGS,
    RegionMatch,
    anatomic_region_codes,
    code_string,
    load_synonyms,
    match_text,
    normalize_body_part,
    normalize_text,
    region_from_dataset,
    to_code_string,
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
    "HANDGELENKLI": "wrist", "KNIERE": "knee", "Kniegelenk in 2 Ebenen": "knee", "XR HAND 3+ VIEWS LEFT": "hand",
    # spine abbreviations and DICOM's own BodyPartExamined terms
    "C-SPINE": "cervical_spine", "T-SPINE": "thoracic_spine", "LSPINE": "lumbar_spine", "CWS": "cervical_spine",
    "CSPINE": "cervical_spine", "LWS 2 Ebenen": "lumbar_spine", "SPINE": UNKNOWN, "ACJOINT": "shoulder",
    "SCJOINT": "clavicle", "TMJ": "skull", "SSPINE": UNKNOWN, "HIP JOINT": "pelvis_hip",
    # languages
    "colonne lombaire": "lumbar_spine", "Rachis cervical": "cervical_spine", "columna dorsal": "thoracic_spine",
    "pé esquerdo": "foot", "mão direita": "hand", "ginocchio dx": "knee", "Pols links": "wrist",
    "hanche droite": "pelvis_hip", "heup": "pelvis_hip", "Huefte links": "pelvis_hip",
    # compounds in the table
    "Mittelhand re": "hand", "Beckenübersicht": "pelvis_hip", "Vorfuss": "foot", "OBERSCHENKEL": UNKNOWN,
    # one typo: a letter left out, doubled or swapped
    "SHOULDR": "shoulder", "ELBWO": "elbow", "CLAVICEL": "clavicle", "ANKEL": "ankle", "SHOULLDER": "shoulder",
    "SCHUTLER": "shoulder", "L-SPIEN": "lumbar_spine", "C-SPNE": "cervical_spine",
    # longest / most specific wins, out-of-space terms stay unknown
    "CHEST RIBS": "rib", "Thorax pa": UNKNOWN, "head of femur": "pelvis_hip", "EXTREMITY": UNKNOWN,
    "BREAST": UNKNOWN, "Test CT": UNKNOWN,
}  # fmt: skip

# Real-world text of DICOM description tags that names no body part (several from public sample
# files: LUT test patterns, QC objects, Siemens report series), and words that hold a region term
# inside a longer word or one letter away from one. Each must stay "unknown" whatever tag holds it.
NOT_ANATOMY = [
    "LUT test pattern range", "12 in 16,range -2048 to +2047,signed,mono2,modality lut",
    "8 in 8,range 0 to 255,unsigned,mono2,voi lut slope +1", "Modality LUT Test", "VOI LUT Test", "SMPTE",
    "SMPTE RP133 test pattern", "Dose Report", "Dose Info", "Scout", "Localizer", "Topogram 0.6 T20f",
    "Patient Protocol", "Screen Save", "Phoenix ZIPReport", "Exam Summary", "Key Images", "Secondary Capture",
    "Flat field calibration", "No Finding", "Unbekannt", "MODALITYLUT - TEETH", "RANGE", "ARRANGE", "ORANGE",
    "HANDLING", "Handle with care", "HANDHELD", "KNEEL", "Kneeling", "SHIPPING", "FOOTPRINT", "TRACE",
    "Doe^Jane", "BECKER^PETER", "Mainz", "Teens", "Hipaa notice", "Head first supine",
]  # fmt: skip


@pytest.mark.parametrize("text, region", list(REQUIRED.items()))
def test_required_examples(text, region):
    assert normalize_body_part(text) == region


@pytest.mark.parametrize("text, region", list(MORE.items()))
def test_laterality_abbreviations_languages_typos(text, region):
    assert normalize_body_part(text) == region


@pytest.mark.parametrize("text", NOT_ANATOMY)
def test_non_anatomy_text_is_unknown_in_every_tag(text):
    assert normalize_body_part(text) == UNKNOWN
    assert match_text(text, typos=True) is None  # not even a recognised out-of-space part
    for tag in ("BodyPartExamined", *DESCRIPTION_TAGS):
        ds = make_dataset(body_part="", **{tag: text})
        assert region_from_dataset(ds) == RegionMatch(region=UNKNOWN, source="none", match=""), tag


def test_the_test_pattern_that_became_skull():
    # "range" is one letter from the French "crâne" by a replacement; replacements are not typos here
    ds = make_dataset(body_part="", SeriesDescription="LUT test pattern range")
    assert region_from_dataset(ds).region == UNKNOWN


@pytest.mark.parametrize(
    "text, region, term",
    [
        ("CHEST PA", UNKNOWN, "chest"), ("THORAX", UNKNOWN, "thorax"), ("Thorax-free", UNKNOWN, "thorax"),
        ("Knie links", "knee", "knie"), ("L-SPINE", "lumbar_spine", "l spine"),
        ("C SPINE", "cervical_spine", "c spine"),
        ("XRAY RIGHT HAND", "hand", "hand"), ("Röntgen Hüfte li", "pelvis_hip", "hufte"),
        ("RÖ Schädel in 2 Ebenen", "skull", "schadel"), ("Radiografía de MUÑECA", "wrist", "muneca"),
        ("Radiographie ÉPAULE gauche", "shoulder", "epaule"), ("RX GINOCCHIO dx", "knee", "ginocchio"),
        ("X-ENKEL links", "ankle", "enkel"), ("Radiografia de PÉ", "foot", "pe"),
        ("HANDGELENKLI", "wrist", "handgelenk"),
    ],
)  # fmt: skip
def test_descriptions_that_name_a_part_still_map(text, region, term):
    assert match_text(text) == (region, term)
    ds = make_dataset(body_part="", StudyDescription=text)
    assert region_from_dataset(ds) == RegionMatch(region=region, source="description", match=term)


def test_none_and_non_text_are_unknown():
    assert normalize_body_part(None) == UNKNOWN
    assert normalize_body_part("   -- ") == UNKNOWN


def test_typos_only_in_body_part_examined_never_in_descriptions():
    assert region_from_dataset(make_dataset(body_part="SHOULDR")) == RegionMatch(
        region="shoulder", source="body_part_examined", match="~shoulder"
    )
    assert region_from_dataset(make_dataset(body_part="", StudyDescription="XR SHOULDR")).source == "none"
    # letters replaced or added are not accepted: they make other real words ("KNEEL", "BECKER")
    assert normalize_body_part("KNEEE") == UNKNOWN and normalize_body_part("CLAVICAL") == UNKNOWN


def test_normalize_text_strips_accents_case_and_punctuation():
    assert normalize_text("  SCHÄDEL, li.") == "schadel li"
    assert normalize_text("Muñeca/Épaule") == "muneca epaule"
    assert normalize_text("Fuß") == "fuss"


def test_code_strings():
    assert [code_string(v) for v in ("HAND LI", " KNEE ", "L_SPINE", "C SPINE 2")] == ["HAND LI", "KNEE", "L_SPINE",
                                                                                       "C SPINE 2"]  # fmt: skip
    for bad in ("Hand li", "L-SPINE", "SCHÄDEL", "PELVIS/HIP", "X" * 17, "Doe^Jane", "", None):
        assert code_string(bad) == "", bad
    assert to_code_string("Hüfte li.") == "HUEFTE LI"
    assert to_code_string("ÉPAULE") == "EPAULE" and to_code_string("MUÑECA") == "MUNECA"
    assert to_code_string("Fuß") == "FUSS" and to_code_string("C-SPINE") == "C SPINE"
    assert to_code_string("Lendenwirbelsäule") == "LENDENWIRBELSAEU"  # 16 characters
    assert all(code_string(to_code_string(t)) == to_code_string(t) for t in [*REQUIRED, *MORE] if t.strip(" -"))


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


# --- coded anatomy ----------------------------------------------------------------------------------


def _coded(code: str, scheme: str = "SCT", long: bool = False, **tags: object) -> Dataset:
    item = Dataset()
    if long:
        item.LongCodeValue = code
    else:
        item.CodeValue = code
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = "as the device wrote it"
    ds = make_dataset(**tags)
    ds.AnatomicRegionSequence = Sequence([item])
    return ds


# The codes of DICOM CID 4031 / CID 4009 (and of earlier editions) that real DX/CR files carry.
CODES = {
    "51185008": UNKNOWN, "816094009": UNKNOWN, "818981001": UNKNOWN, "113345001": UNKNOWN,  # chest, abdomen
    "89546000": "skull", "69536005": "skull", "85562004": "hand", "7569003": "hand", "56459004": "foot",
    "72696002": "knee", "344001": "ankle", "70258002": "ankle", "127949000": "elbow", "16953009": "elbow",
    "16982005": "shoulder", "51299004": "clavicle", "113197003": "rib", "29836001": "pelvis_hip",
    "12921003": "pelvis_hip", "816092008": "pelvis_hip", "74670003": "wrist", "8205005": "wrist",
    "122494005": "cervical_spine", "122495006": "thoracic_spine", "122496007": "lumbar_spine",
    "71341001": UNKNOWN, "85050009": UNKNOWN, "421060004": UNKNOWN,  # femur, humerus, whole spine
}  # fmt: skip


@pytest.mark.parametrize("code, region", list(CODES.items()))
def test_snomed_codes_map_to_regions(code, region):
    assert region_from_dataset(_coded(code, body_part="")) == RegionMatch(
        region=region, source="anatomic_region_code", match=f"SCT:{code}"
    )


def test_code_wins_over_a_contradicting_body_part_and_description():
    ds = _coded("72696002", body_part="HAND", StudyDescription="XR HAND")
    assert region_from_dataset(ds) == RegionMatch(region="knee", source="anatomic_region_code", match="SCT:72696002")
    # an out-of-space code decides too: a chest code is not overridden by a hand tag
    assert region_from_dataset(_coded("816094009", body_part="HAND")).region == UNKNOWN


def test_legacy_snomed_rt_codes_and_long_code_values():
    assert region_from_dataset(_coded("T-D8700", "SRT", body_part="")).region == "hand"
    assert region_from_dataset(_coded("T-11503", "SNM3", body_part="")).match == "SRT:T-11503"
    assert region_from_dataset(_coded("T-11503", "SNM3", body_part="")).region == "lumbar_spine"
    assert region_from_dataset(_coded("85562004", long=True, body_part="")).region == "hand"


@pytest.mark.parametrize(
    "code, scheme",
    [("999999999", "SCT"), ("85562004", "LN"), ("85562004", "SRT"), ("T-D8700", "SCT"), ("", "SCT"),
     ("hand", "99LOCAL")],
)
def test_unknown_codes_fall_back_to_the_tags(code, scheme):
    ds = _coded(code, scheme, body_part="KNIE")
    assert region_from_dataset(ds) == RegionMatch(region="knee", source="body_part_examined", match="knie")


def test_empty_or_malformed_sequence_falls_back():
    ds = make_dataset(body_part="", StudyDescription="XR KNEE LEFT")
    ds.AnatomicRegionSequence = Sequence([])
    assert region_from_dataset(ds) == RegionMatch(region="knee", source="description", match="knee")
    ds.AnatomicRegionSequence = Sequence([Dataset()])  # an item without a code
    assert region_from_dataset(ds).source == "description"


def test_first_known_item_of_several_decides():
    ds = _coded("999999999", body_part="")
    second = Dataset()
    second.CodeValue, second.CodingSchemeDesignator, second.CodeMeaning = "56459004", "SCT", "Foot"
    ds.AnatomicRegionSequence.append(second)
    assert region_from_dataset(ds).region == "foot"


def test_code_table_holds_cid_4009_and_4031_with_their_snomed_rt_ids():
    """Cross-check against pydicom's copy of PS3.16: every concept of CID 4009 (DX Anatomy Imaged) and
    CID 4031 (Common Anatomic Regions) is in our table under its SCT code and its legacy SRT id."""
    codes = anatomic_region_codes()
    for cid in (4009, 4031):
        for name in cid_concepts[cid]["SCT"]:
            ((sct, _),) = concepts["SCT"][name].items()
            assert f"SCT:{sct}" in codes, (cid, name)
            if sct in snomed_rt["SCT"]:
                assert codes[f"SRT:{snomed_rt['SCT'][sct]}"] == codes[f"SCT:{sct}"], name
    assert set(codes.values()) == set(REGIONS) | {UNKNOWN}


# --- what region_from_dataset reports ------------------------------------------------------------------


def test_region_from_dataset_falls_back_through_descriptions():
    ds = make_dataset(body_part="", StudyDescription="XR KNEE LEFT", SeriesDescription="HAND")
    assert region_from_dataset(ds) == RegionMatch(region="knee", source="description", match="knee")
    ds = make_dataset(body_part="", StudyDescription="Routine", SeriesDescription="", ProtocolName="LWS ap")
    assert region_from_dataset(ds) == RegionMatch(region="lumbar_spine", source="description", match="lws")
    ds = make_dataset(body_part="", RequestedProcedureDescription="Roentgen Sprunggelenk re")
    assert region_from_dataset(ds) == RegionMatch(region="ankle", source="description", match="sprunggelenk")


def test_out_of_space_body_part_is_not_overridden_by_a_description():
    ds = make_dataset(body_part="CHEST", StudyDescription="HEAD")
    assert region_from_dataset(ds) == RegionMatch(region=UNKNOWN, source="body_part_examined", match="chest")


def test_nothing_recognised_is_source_none_and_stores_no_text():
    ds = make_dataset(body_part="ZZZ", StudyDescription="Mustermann^Erika Study 12")
    assert region_from_dataset(ds) == RegionMatch()
    assert region_from_dataset(make_dataset(body_part="")).model_dump() == {
        "region": UNKNOWN, "source": "none", "match": ""
    }


def test_the_match_is_a_vocabulary_term_never_the_tag_text():
    ds = make_dataset(body_part="", StudyDescription="Mustermann Erika Knie re 12.03.")
    found = region_from_dataset(ds)
    assert found.match == "knie" and found.manifest_fields() == {
        "region": "knee", "region_source": "description", "region_match": "knie"
    }


needs_samples = pytest.mark.skipif(not DICOM_SAMPLES.is_dir(), reason=f"real DICOM samples not at {DICOM_SAMPLES}")


@needs_samples
def test_real_samples():
    import pydicom

    def read(name: str) -> Dataset:
        return pydicom.dcmread(DICOM_SAMPLES / name, stop_before_pixels=True, force=True)

    # a mammogram coded as breast with the legacy SNOMED-RT id under SNM3
    assert region_from_dataset(read("radiographs/fodicom__GH133.dcm")) == RegionMatch(
        region=UNKNOWN, source="anatomic_region_code", match="SRT:T-04000"
    )
    assert region_from_dataset(read("radiographs/pylibjpeg-data__NM_Kakadu44_SOTmarkerincons.dcm")).region == "hand"
    assert region_from_dataset(read("radiographs/wg04__RG2_UNC.dcm")).match == "hip"
    assert region_from_dataset(read("other/pydicom-data-git__mlut_18.dcm")).source == "none"  # the "range" LUT test


def test_unmapped_report_counts_only_unmapped_values():
    report = unmapped_report(["HAND", "EXTREMITY", "EXTREMITY", "", "Knie", "ZZZ", "Doe^Jane", "zzz"])
    assert list(report.columns) == ["value", "count"]
    assert report.to_dict("records") == [
        {"value": "", "count": 3},  # "", and the two values that are not CS strings
        {"value": "EXTREMITY", "count": 2},
        {"value": "ZZZ", "count": 1},
    ]
