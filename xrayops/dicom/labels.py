"""Free-text DICOM body-part tags to the 14 regions of paper 000, or "unknown".

BodyPartExamined is free text: one site in paper 001 had 187 distinct values in mixed
languages, case and accents, so matching has to be fuzzy. The synonym table lives in
body_parts.json (package data); a site extends or overrides it with its own JSON/YAML file.

Matching, in order, on accent-stripped lower-case words; the first step that finds a term wins:
1. region terms found as whole words; the longest term wins, so "HANDGELENK" is wrist, not
   hand, and "CHEST RIBS" is rib;
2. terms of the "unknown" list (chest, abdomen, spine, femur...) found as whole words;
3. any term as the start or end of a compound word ("Beckenuebersicht", "Handgelenkli"), longest
   first, so "Oberschenkelschaft" stays unknown rather than matching the Dutch "enkel" (ankle);
4. a fuzzy match (difflib) of each word against all terms, for typos ("SHOULDR").
Laterality and view words ("li", "RT", "LEFT", "AP") never match a term, so they drop out.
"""
from __future__ import annotations

import difflib
import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml
from pydicom.dataset import Dataset

from xrayops.regions import REGIONS, UNKNOWN

# Tags that may name the body part, most specific first.
BODY_PART_TAGS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")
MAX_RAW_CHARS = 64
# Compound-word (prefix/suffix) matches need terms this long: shorter ones ("kopf", "main",
# "teen") occur inside unrelated words.
MIN_AFFIX_CHARS = 5
# Fuzzy matching starts at five letters: "test" is one edit from the Italian "testa" (head).
MIN_FUZZY_CHARS = 5
FUZZY_CUTOFF = 0.8
# Laterality, view and protocol words in the languages of the table; ignored by the fuzzy step.
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
_UMLAUTS = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue"})


def normalize_text(text: object) -> str:
    """Lower-case ASCII words: accents stripped, punctuation to spaces ("SCHÄDEL li." -> "schadel li")."""
    decomposed = unicodedata.normalize("NFKD", str(text or "").casefold())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    words = "".join(c if ("a" <= c <= "z" or "0" <= c <= "9") else " " for c in plain)
    return " ".join(words.split())


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


def normalize_body_part(text: object, synonyms: Mapping[str, str] | None = None) -> str:
    """Map free text ("Hand li", "L-SPINE", "HANDGELENK", "SCHÄDEL") to a region or "unknown"."""
    return classify_body_part(text, synonyms) or UNKNOWN


def classify_body_part(text: object, synonyms: Mapping[str, str] | None = None) -> str | None:
    """A region; "unknown" for a recognised part outside the label space (CHEST); None if unrecognised."""
    synonyms = default_synonyms() if synonyms is None else synonyms
    normalized = normalize_text(text)
    if not normalized:
        return None
    regions = {t: r for t, r in synonyms.items() if r != UNKNOWN}
    found = _longest_match(normalized, regions, compounds=False)
    if found is not None:
        return found
    unknowns = {t: r for t, r in synonyms.items() if r == UNKNOWN}
    if _longest_match(normalized, unknowns, compounds=False) is not None:
        return UNKNOWN
    found = _longest_match(normalized, synonyms, compounds=True)
    if found is not None:
        return found
    return _fuzzy_match(normalized, synonyms)


def region_from_dataset(ds: Dataset, synonyms: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(raw text, region) from the first of BODY_PART_TAGS whose text names a body part.

    A recognised part outside the label space stops the search: BodyPartExamined "CHEST" gives
    "unknown" even if a description mentions a head. When no tag names a part, the raw text is
    the first non-empty tag and the region "unknown".
    """
    first_raw = ""
    for tag in BODY_PART_TAGS:
        raw = str(ds.get(tag, "") or "").strip()[:MAX_RAW_CHARS]
        if not raw:
            continue
        first_raw = first_raw or raw
        region = classify_body_part(raw, synonyms)
        if region is not None:
            return raw, region
    return first_raw, UNKNOWN


def unmapped_report(values: Iterable[str], synonyms: Mapping[str, str] | None = None) -> pd.DataFrame:
    """(value, count) of the raw texts that map to "unknown", most frequent first.

    A site reads this to decide which terms to add to its synonym file.
    """
    counts = Counter(str(v or "") for v in values)
    rows = [(v, n) for v, n in counts.items() if normalize_body_part(v, synonyms) == UNKNOWN]
    rows.sort(key=lambda vn: (-vn[1], vn[0]))
    return pd.DataFrame(rows, columns=["value", "count"]).astype({"value": str, "count": "int64"})


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


def _longest_match(normalized: str, terms: Mapping[str, str], compounds: bool) -> str | None:
    """Region of the longest term present as whole words (or, with `compounds`, as a word's start or end)."""
    padded = f" {normalized} "
    words = normalized.split()
    best: tuple[int, int] | None = None
    best_region = None
    for term, region in terms.items():
        position = padded.find(f" {term} ")
        if position < 0 and compounds and len(term) >= MIN_AFFIX_CHARS and " " not in term:
            position = next(
                (padded.find(w) for w in words if w != term and (w.startswith(term) or w.endswith(term))), -1
            )
        if position < 0:
            continue
        key = (len(term), -position)
        if best is None or key > best:
            best, best_region = key, region
    return best_region


def _fuzzy_match(normalized: str, synonyms: Mapping[str, str]) -> str | None:
    """Closest term to any content word (or to all content words run together), if close enough."""
    words = [w for w in normalized.split() if w not in NOISE_WORDS and not w.isdigit()]
    queries = [q for q in [*words, "".join(words)] if len(q) >= MIN_FUZZY_CHARS]
    candidates = sorted(t for t in synonyms if len(t) >= MIN_FUZZY_CHARS - 1)
    best_ratio, best_region = 0.0, None
    for query in queries:
        for term in difflib.get_close_matches(query, candidates, n=1, cutoff=FUZZY_CUTOFF):
            ratio = difflib.SequenceMatcher(None, query, term).ratio()
            if ratio > best_ratio:
                best_ratio, best_region = ratio, synonyms[term]
    return best_region
