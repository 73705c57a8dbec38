"""The body part of a DICOM image as one of the 14 regions of Langer et al. 2024, or "unknown".

Sources, most reliable first; the first that names a body part decides, even when the part lies
outside the label space (a chest code or BodyPartExamined "CHEST" gives "unknown" whatever a
description says):
1. Anatomic Region Sequence (0008,2218): a SNOMED CT code (scheme SCT, or the legacy SNOMED-RT
   ids under SRT/SNM3) looked up in anatomic_region_codes.json (CID 4009 DX Anatomy Imaged and
   CID 4031 Common Anatomic Regions, plus a few codes of earlier editions);
2. BodyPartExamined: free text in practice (one site in de Cid 2021 had 187 distinct values in
   several languages), matched against the synonym table body_parts.json;
3. StudyDescription, SeriesDescription, ProtocolName, RequestedProcedureDescription.

Free text matches only whole words of the vocabulary: "RANGE" is not the French "crane" and
"KNEEL" is not a knee. Exceptions, each narrow:
- a laterality word glued to a term ("HANDGELENKLI") is split off;
- BodyPartExamined alone (a field meant to name anatomy) also allows one typo in words of five
  or more letters: a letter left out, doubled or swapped ("SHOULDR", "ANKEL"), never a letter
  replaced or added (that turns words into other real words: "BECKER" is not "BECKEN", "HANDLE"
  not "HANDE"), and only towards a term of the label space, starting with the same letter.
Descriptions are never matched fuzzily: they hold names, test patterns and report titles.

What is kept is the source and the vocabulary term or code that matched, never the text itself
(descriptions can hold names). A site extends or overrides the synonyms with its own JSON/YAML.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset

from xrayops.regions import REGIONS, UNKNOWN

RegionSource = Literal["anatomic_region_code", "body_part_examined", "description", "none"]
# Free-text tags after BodyPartExamined, in order. All are removed by PS3.15 (X, X/D, X/Z).
DESCRIPTION_TAGS = ("StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription")
BODY_PART_TAGS = ("BodyPartExamined", *DESCRIPTION_TAGS)
# Coding schemes of Anatomic Region Sequence items we read: SNOMED CT, and SNOMED-RT ids ("T-D8700")
# that older devices write under SRT or SNM3.
SNOMED_SCHEMES = {"SCT": "SCT", "SRT": "SRT", "SNM3": "SRT"}
MAX_TEXT_CHARS = 256  # longer than any LO/LT value we read; bounds the work on garbage
MAX_TERM_WORDS = 6  # longest vocabulary term, in words, that is looked for
# CS: upper-case letters, digits, space and underscore, at most 16 characters (PS3.5 Table 6.2-1).
_CS = re.compile(r"[A-Z0-9 _]{1,16}")
# One typo: terms and words of at least this many letters; from TYPO2_CHARS two typos.
MIN_FUZZY_CHARS = 5
TYPO2_CHARS = 10
# Laterality words that PACS glue to a term ("HANDGELENKLI", "KNIERE"); split off, nothing else is.
GLUED_SUFFIXES = ("links", "rechts", "left", "right", "li", "re", "lt", "rt", "bds")
MIN_GLUED_STEM = 4
# Protocol phrases whose words would otherwise read as anatomy.
IGNORED_PHRASES = ("head first", "feet first")
# Laterality, view and protocol words in the languages of the table; never fuzzily matched.
NOISE_WORDS = frozenset(
    """
    left right lt rt li re links rechts bds beidseits bilateral bil both izq izquierda izquierdo
    derecha derecho der dcha gauche droit droite sinistra sinistro destra destro sx dx esquerda
    esquerdo direita direito esq dir ap pa lat lateral oblique obl view views std standard portable
    supine erect standing weight bearing routine series study xr rx cr dr xray ray rontgen roentgen
    radiography radiographie radiografia radiografie aufnahme ebenen ebene zwei two in und and et y e
    with mit con avec met com
    """.split()
)
_UMLAUTS = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "AE", "Ö": "OE", "Ü": "UE", "ß": "SS"})


class RegionMatch(BaseModel):
    """Which region a dataset shows, where that came from and what matched.

    `match` is a vocabulary term ("knie"), "~term" for a typo match, or "SCHEME:code" for coded
    anatomy ("SCT:72696002"); never the text of the tag. Empty when source is "none".
    """

    model_config = ConfigDict(frozen=True)

    region: str = UNKNOWN
    source: RegionSource = "none"
    match: str = ""

    def manifest_fields(self) -> dict[str, str]:
        """The ManifestRow fields this match fills."""
        return {"region": self.region, "region_source": self.source, "region_match": self.match}


NO_MATCH = RegionMatch()


def normalize_text(text: object) -> str:
    """Lower-case ASCII words: accents stripped, punctuation to spaces ("SCHÄDEL li." -> "schadel li")."""
    decomposed = unicodedata.normalize("NFKD", str(text or "").casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    words = "".join(c if ("a" <= c <= "z" or "0" <= c <= "9") else " " for c in plain)
    return " ".join(words.split())


def code_string(text: object) -> str:
    """`text` if it is a valid CS value (A-Z, 0-9, space, underscore; at most 16), else ""."""
    value = str(text or "").strip(" ")
    return value if _CS.fullmatch(value) else ""


def to_code_string(text: object) -> str:
    """Free text as the nearest valid CS value: "Hüfte li." -> "HUEFTE LI", "C-SPINE" -> "C SPINE"."""
    upper = unicodedata.normalize("NFKD", str(text or "").translate(_UMLAUTS)).upper()
    upper = "".join(c for c in upper if not unicodedata.combining(c))
    plain = "".join(c if ("A" <= c <= "Z" or "0" <= c <= "9" or c == "_") else " " for c in upper)
    return " ".join(plain.split())[:16].strip()


def load_synonyms(extra_path: Path | None = None) -> dict[str, str]:
    """Normalised term -> region, from the package table plus an optional site file.

    The site file (JSON or YAML) has the package table's shape, {region: [terms]}, with regions
    from xrayops.regions.REGIONS or "unknown"; its terms override the package's.
    """
    text = resources.files("xrayops.dicom").joinpath("body_parts.json").read_text(encoding="utf-8")
    terms = _terms_from_table(json.loads(text), source="body_parts.json", allow_override=False)
    if extra_path is not None:
        path = Path(extra_path)
        raw = path.read_text(encoding="utf-8")
        table = yaml.safe_load(raw) if path.suffix.lower() in (".yaml", ".yml") else json.loads(raw)
        terms.update(_terms_from_table(table, source=str(path), allow_override=True))
    return terms


@lru_cache(maxsize=1)
def default_synonyms() -> Mapping[str, str]:
    return load_synonyms(None)


@lru_cache(maxsize=1)
def anatomic_region_codes() -> Mapping[str, str]:
    """"SCT:code" / "SRT:code" -> region or "unknown", from anatomic_region_codes.json."""
    text = resources.files("xrayops.dicom").joinpath("anatomic_region_codes.json").read_text(encoding="utf-8")
    table = json.loads(text)
    codes: dict[str, str] = {}
    for region, entries in table.items():
        if region.startswith("_"):
            continue
        if region not in REGIONS and region != UNKNOWN:
            raise ValueError(f"anatomic_region_codes.json: {region!r} is not a region")
        for entry in entries:
            for key in (f"SCT:{entry['sct']}", f"SRT:{entry['srt']}" if entry.get("srt") else ""):
                if key and codes.setdefault(key, region) != region:
                    raise ValueError(f"anatomic_region_codes.json: {key} is listed under two regions")
    return codes


def normalize_body_part(text: object, synonyms: Mapping[str, str] | None = None) -> str:
    """Map BodyPartExamined-like text ("Hand li", "L-SPINE", "HANDGELENK", "SCHÄDEL") to a region or "unknown"."""
    return classify_body_part(text, synonyms) or UNKNOWN


def classify_body_part(text: object, synonyms: Mapping[str, str] | None = None) -> str | None:
    """A region; "unknown" for a recognised part outside the label space (CHEST); None if unrecognised."""
    found = match_text(text, synonyms, typos=True)
    return None if found is None else found[0]


def match_text(text: object, synonyms: Mapping[str, str] | None = None, typos: bool = False) -> tuple[str, str] | None:
    """(region, matched term) for free text, or None when no vocabulary term occurs in it.

    Whole words only, in order: the longest term of the label space; else a term of the "unknown"
    list (chest, abdomen, femur...); else, with `typos`, a one-typo match (module docstring).
    """
    synonyms = default_synonyms() if synonyms is None else synonyms
    words = _words(text, synonyms)
    if not words:
        return None
    longest = min(len(words), MAX_TERM_WORDS)
    phrases = [(" ".join(words[i:i + n]), i) for n in range(1, longest + 1) for i in range(len(words) - n + 1)]
    found = [(len(p), -i, p) for p, i in phrases if p in synonyms]
    for wanted_unknown in (False, True):
        hits = [h for h in found if (synonyms[h[2]] == UNKNOWN) == wanted_unknown]
        if hits:
            term = max(hits)[2]
            return synonyms[term], term
    if typos:
        near = _typo_match(words, synonyms)
        if near is not None:
            return synonyms[near], f"~{near}"
    return None


def region_from_code(ds: Dataset) -> RegionMatch | None:
    """The region of the first Anatomic Region Sequence item whose code is in our table, if any."""
    try:
        items = list(ds.get("AnatomicRegionSequence") or [])
    except Exception:  # a malformed sequence is no code, not a failed file
        return None
    codes = anatomic_region_codes()
    for item in items:
        scheme = SNOMED_SCHEMES.get(str(item.get("CodingSchemeDesignator", "") or "").strip().upper())
        value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
        key = f"{scheme}:{value}"
        if scheme and value and key in codes:
            return RegionMatch(region=codes[key], source="anatomic_region_code", match=key)
    return None


def region_from_dataset(ds: Dataset, synonyms: Mapping[str, str] | None = None) -> RegionMatch:
    """Region of a dataset from its coded anatomy, else BodyPartExamined, else the descriptions."""
    coded = region_from_code(ds)
    if coded is not None:
        return coded
    for tag in BODY_PART_TAGS:
        try:
            text = str(ds.get(tag, "") or "")[:MAX_TEXT_CHARS]
        except Exception:  # an undecodable value names nothing
            continue
        is_body_part = tag == "BodyPartExamined"
        found = match_text(text, synonyms, typos=is_body_part)
        if found is not None:
            source: RegionSource = "body_part_examined" if is_body_part else "description"
            return RegionMatch(region=found[0], source=source, match=found[1])
    return NO_MATCH


def unmapped_report(values: Iterable[str], synonyms: Mapping[str, str] | None = None) -> pd.DataFrame:
    """(value, count) of BodyPartExamined values that map to "unknown", most frequent first.

    A site reads this to decide which terms to add to its synonym file. Values that are not valid
    CS strings are counted as "" (free text there may hold anything, names included).
    """
    found = Counter(str(v or "") for v in values)
    counts: Counter[str] = Counter()
    for value, n in found.items():
        if normalize_body_part(value, synonyms) == UNKNOWN:
            counts[code_string(value)] += n
    rows = list(counts.items())
    rows.sort(key=lambda vn: (-vn[1], vn[0]))
    return pd.DataFrame(rows, columns=["value", "count"]).astype({"value": str, "count": "int64"})


def _words(text: object, synonyms: Mapping[str, str]) -> list[str]:
    """Normalised words with ignored phrases dropped and glued laterality split off."""
    normalized = f" {normalize_text(str(text or '')[:MAX_TEXT_CHARS])} "
    for phrase in IGNORED_PHRASES:
        normalized = normalized.replace(f" {phrase} ", " ")
    words: list[str] = []
    for word in normalized.split():
        if word not in synonyms:
            suffix = next((s for s in GLUED_SUFFIXES if word.endswith(s) and len(word) - len(s) >= MIN_GLUED_STEM
                           and word[: -len(s)] in synonyms), None)
            if suffix is not None:
                words += [word[: -len(suffix)], suffix]
                continue
        words.append(word)
    return words


def _typo_match(words: list[str], synonyms: Mapping[str, str]) -> str | None:
    """The term of the label space one typo (two from TYPO2_CHARS letters) away from a content word or
    from all content words run together ("C-SPNE"); None when there is none or the nearest are of two regions."""
    content = [w for w in words if w not in NOISE_WORDS and not w.isdigit()]
    queries = {q for q in [*content, "".join(content)] if len(q) >= MIN_FUZZY_CHARS}
    best: dict[int, set[str]] = {}
    for term in _typo_candidates(tuple(sorted(synonyms.items()))):
        for query in queries:
            if query[0] != term[0] or abs(len(query) - len(term)) > 2:
                continue
            allowed = 2 if min(len(query), len(term)) >= TYPO2_CHARS else 1
            distance = _typo_distance(query, term, allowed)
            if distance <= allowed:
                best.setdefault(distance, set()).add(term)
    if not best:
        return None
    terms = best[min(best)]
    if len({synonyms[t] for t in terms}) > 1:
        return None
    return max(terms, key=lambda t: (len(t), t))


@lru_cache(maxsize=4)
def _typo_candidates(items: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    return tuple(t for t, r in items if r != UNKNOWN and " " not in t and len(t) >= MIN_FUZZY_CHARS)


def _typo_distance(query: str, term: str, limit: int) -> int:
    """Typos between a word and a term: letters left out, neighbours swapped, letters doubled
    ("SHOULLDER"); not replaced and not inserted otherwise ("HANDLE" is not "HANDE"). Optimal string
    alignment; anything above `limit` is returned as limit + 1."""
    if query == term:
        return 0
    big = limit + 1
    previous2: list[int] = []
    previous = list(range(len(term) + 1))
    for i in range(1, len(query) + 1):
        letter = query[i - 1]
        doubled = letter in query[max(i - 2, 0):i - 1] + query[i:i + 1]
        current = [i if doubled and previous[0] < big else big] + [big] * len(term)
        for j in range(1, len(term) + 1):
            if letter == term[j - 1]:
                current[j] = previous[j - 1]
            else:
                current[j] = current[j - 1] + 1  # a letter of the term left out
                if doubled:
                    current[j] = min(current[j], previous[j] + 1)
                if i > 1 and j > 1 and letter == term[j - 2] and query[i - 2] == term[j - 1]:
                    current[j] = min(current[j], previous2[j - 2] + 1)
            current[j] = min(current[j], big)
        if min(current) > limit:
            return big
        previous2, previous = previous, current
    return previous[-1]


def _terms_from_table(table: object, source: str, allow_override: bool) -> dict[str, str]:
    if not isinstance(table, dict):
        raise ValueError(f"{source}: expected a mapping of region -> list of terms")
    terms: dict[str, str] = {}
    for region, words in table.items():
        if region not in REGIONS and region != UNKNOWN:
            raise ValueError(f"{source}: {region!r} is not one of {', '.join(REGIONS)} or {UNKNOWN!r}")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{source}: terms of {region!r} must be a list of strings")
        for word in words:
            for variant in _variants(word):
                previous = terms.setdefault(variant, region)
                if previous != region and not allow_override:
                    raise ValueError(f"{source}: {variant!r} is listed under {previous!r} and {region!r}")
                terms[variant] = region
    return terms


def _variants(word: str) -> set[str]:
    """"Hüfte" -> {"hufte", "huefte"}; "c spine" -> {"c spine", "cspine"}."""
    forms = {normalize_text(word), normalize_text(word.casefold().translate(_UMLAUTS))}
    forms |= {f.replace(" ", "") for f in forms}
    return {f for f in forms if f}
