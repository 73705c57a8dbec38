"""A PHI scanner for tests: every identifying value of the input DICOM files (and of their paths),
searched for in every output file. Zero hits is the bar.

`collect_secrets(files, root)` reads each input with pydicom and collects:
  - every value of an attribute PS3.15 Table E.1-1 removes, empties, replaces or cleans (the
    vendored xrayops/dicom/ps315_table_e1_1.json: patient IDs, accession number, institution,
    station, device serial, descriptions, ...), whole, as found;
  - person names (VR PN) whole and by component (family, given, middle... split on ^ = and space);
  - dates (VR DA, and the date of DT) as YYYYMMDD and YYYY-MM-DD;
  - UIDs (VR UI) except the standard's own (transfer syntaxes, SOP classes);
  - the path of each file relative to `root`: every folder name, the file's stem, and their
    tokens split on _ - . and space of length >= 4 that are not generic words (GENERIC).
Values shorter than 4 characters (name components: 3) are not searched: "F" or "P1" would match
everywhere. Private tags are read too (their text values count like any other).

`scan(outputs, secrets, allow)` searches files and folders:
  parquet cell by cell (and column names); CSV, text, JSON, YAML, HTML, logs as text; PNG text
  chunks (tEXt, zTXt, iTXt); sqlite databases as their text dump; anything else (pickles, .pt,
  .npy) as bytes, for values of 6 characters or more (shorter ones turn up in pixel bytes by
  chance). Matching ignores case and needs a non-alphanumeric (for numbers also non-dot)
  neighbour on each side, so "1234" does not hit inside a hex pseudonym or "0.12345". Output
  file and folder names are scanned too. `allow` lists known technical values that look like
  identifiers but are not (a manufacturer named like an institution).
"""
from __future__ import annotations

import bisect
import json
import re
import sqlite3
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.uid import UID_dictionary

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "xrayops" / "dicom" / "ps315_table_e1_1.json"
MIN_CHARS, MIN_NAME_CHARS, MIN_BINARY_CHARS = 4, 3, 6
# Path tokens that say nothing about a patient (export and PACS vocabulary).
GENERIC = frozenset(
    "dcm dicom dic image images img series study studies export exports data file files scan scans "
    "test tests train instance instances patient patients pacs archive orthanc modality accession "
    "radiographs other copy part frame frames".split()
)
TEXT_SUFFIXES = {".csv", ".txt", ".json", ".jsonl", ".yaml", ".yml", ".html", ".htm", ".log", ".md", ".tsv", ".xml",
                 ".dvc", ".ini", ".cfg", ".toml", ".lock", ".sql"}  # fmt: skip
# Binary formats known by their first bytes (DVC's cache names files by hash, without a suffix).
BINARY_MAGIC = (b"\x93NUMPY", b"PK\x03\x04", b"\x80", b"\x1f\x8b", b"(\xb5/\xfd")


@dataclass(frozen=True)
class Secret:
    kind: str  # patient_id, name, date, uid, path, tag:<keyword> ...
    value: str


@dataclass(frozen=True)
class Hit:
    kind: str
    value: str
    file: str
    location: str


def _listed_tags() -> dict[str, str]:
    rows = json.loads(TABLE.read_text(encoding="utf-8"))["attributes"]
    return {r["id"]: r["basicProfile"] for r in rows}


def _is_listed(tag: int, listed: dict[str, str]) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:
        return True  # private attributes: X
    exact = f"{group:04x}{element:04x}"
    if exact in listed:
        return listed[exact] != "K"
    return any("x" in p and len(p) == 8 and all(a == "x" or a == b for a, b in zip(p, exact)) for p in listed)


def collect_secrets(files: Iterable[Path], root: Path | None = None) -> set[Secret]:
    """The identifying values of the input files and of their paths below `root` (see module doc)."""
    listed = _listed_tags()
    found: set[Secret] = set()
    for path in files:
        path = Path(path)
        if root is not None:
            found |= path_secrets(path.relative_to(root))
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            continue
        datasets = [ds]
        if getattr(ds, "file_meta", None) is not None:
            datasets.append(ds.file_meta)
        for dataset in datasets:
            for elem in dataset.iterall():
                found |= _element_secrets(elem, listed)
    return {s for s in found if len(s.value) >= (MIN_NAME_CHARS if s.kind == "name_part" else MIN_CHARS)}


def _element_secrets(elem, listed: dict[str, str]) -> set[Secret]:
    if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.value is None:
        return set()
    values = elem.value if isinstance(elem.value, (list, tuple, pydicom.multival.MultiValue)) else [elem.value]
    keyword = keyword_for_tag(elem.tag) or f"{int(elem.tag):08x}"
    out: set[Secret] = set()
    for value in values:
        text = str(value).strip()
        if not text:
            continue
        if elem.VR == "PN":
            out.add(Secret("name", text))
            out |= {Secret("name_part", part) for part in re.split(r"[\^= ]+", text) if part}
        elif elem.VR in ("DA", "DT"):
            digits = re.sub(r"[^0-9]", "", text)[:8]
            if len(digits) == 8:
                out |= {Secret("date", digits), Secret("date", f"{digits[:4]}-{digits[4:6]}-{digits[6:]}")}
        elif elem.VR == "UI":
            if text not in UID_dictionary:
                out.add(Secret("uid", text))
        elif elem.VR in ("LO", "SH", "ST", "LT", "UT", "CS", "AE", "UC", "AS") and _is_listed(int(elem.tag), listed):
            out.add(Secret(f"tag:{keyword}", text))
    return out


def path_secrets(relative: Path) -> set[Secret]:
    """Folder names, the file stem, and their non-generic tokens of length >= 4."""
    parts = list(relative.parts[:-1]) + [relative.stem]
    out = {Secret("path", p) for p in parts}
    for part in parts:
        for token in re.split(r"[_\-. ]+", part):
            if len(token) >= MIN_CHARS and token.lower() not in GENERIC:
                out.add(Secret("path_token", token))
    return out


def _pattern(value: str) -> re.Pattern:
    edge = r"[0-9A-Za-z.]" if value[:1].isdigit() or value[-1:].isdigit() else r"[0-9A-Za-z]"
    return re.compile(rf"(?<!{edge}){re.escape(value)}(?!{edge})", re.IGNORECASE)


class _Matcher:
    """All secrets in two alternations (numeric-edged values also refuse a neighbouring dot), so
    each text is scanned once whatever the number of secrets."""

    def __init__(self, secrets: list[Secret]) -> None:
        self.by_value = {s.value.lower(): s for s in secrets}
        numeric = [s.value for s in secrets if s.value[:1].isdigit() or s.value[-1:].isdigit()]
        other = [s.value for s in secrets if s.value not in set(numeric)]
        self.patterns = []
        for values, edge in ((numeric, r"[0-9A-Za-z.]"), (other, r"[0-9A-Za-z]")):
            if values:
                alternation = "|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True))
                self.patterns.append(re.compile(rf"(?<!{edge})(?:{alternation})(?!{edge})", re.IGNORECASE))

    def find(self, text: str) -> list[tuple[Secret, int]]:
        found = []
        for pattern in self.patterns:
            for m in pattern.finditer(text):
                found.append((self.by_value[m.group(0).lower()], m.start()))
        return found


PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{%d,}" % MIN_BINARY_CHARS)


LIBRARY_SUFFIXES = (".js", ".css", ".html")
CONTEXT = 24


def library_text(roots: Iterable[Path]) -> str:
    """The JavaScript/CSS/HTML assets of packages whose bundles reports embed (Evidently's plotly:
    month names, colour names, "smith" charts), to tell library code from data."""
    parts = []
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.suffix in LIBRARY_SUFFIXES and path.is_file():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def scan(outputs: Iterable[Path], secrets: Iterable[Secret], allow: Iterable[str] = (),
         library: str = "") -> list[Hit]:
    """Every occurrence of a secret in the output files (folders are walked), as hits. A hit in a
    text file whose surrounding characters occur verbatim in `library` (see library_text) is
    embedded library code, not data, and is skipped."""
    allowed = {a.lower() for a in allow}
    wanted = sorted({s for s in secrets if s.value.lower() not in allowed}, key=lambda s: (s.kind, s.value))
    matcher = _Matcher(wanted)
    binary_matcher = _Matcher([s for s in wanted if len(s.value) >= MIN_BINARY_CHARS])
    hits: list[Hit] = []
    for base in outputs:
        base = Path(base)
        if not base.exists():
            continue
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            name = str(path.relative_to(base.parent))
            hits += [Hit(s.kind, s.value, str(path), "file name") for s, _ in matcher.find(name)]
            for location, text, binary in _contents(path):
                if binary:  # the printable runs of a binary file: where strings live in a pickle or .pt
                    runs = "\n".join(r.decode("ascii") for r in PRINTABLE_RUN.findall(text))
                    hits += [Hit(s.kind, s.value, str(path), location) for s, _ in binary_matcher.find(runs)]
                elif isinstance(text, list):  # a parquet column: rows joined, positions mapped back
                    joined, starts, position = [], [], 0
                    for cell in text:
                        starts.append(position)
                        joined.append(cell)
                        position += len(cell) + 1
                    for s, at in matcher.find("\x00".join(joined)):
                        row = bisect.bisect_right(starts, at) - 1
                        hits.append(Hit(s.kind, s.value, str(path), f"{location}[{row}]"))
                else:
                    for secret, at in matcher.find(text):
                        window = text[max(0, at - CONTEXT): at + len(secret.value) + CONTEXT]
                        if library and window in library:
                            continue
                        hits.append(Hit(secret.kind, secret.value, str(path), location))
    return hits


def _contents(path: Path):
    """(location, text | list of cell texts | bytes, is_binary) pieces of one file."""
    suffix = path.suffix.lower()
    raw = path.read_bytes()
    if suffix == ".parquet" or raw[:4] == b"PAR1":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        yield "columns", " ".join(table.column_names), False
        for name in table.column_names:
            cells = [c if isinstance(c, str) else json.dumps(c, default=str) for c in table.column(name).to_pylist()]
            yield name, ["" if c == "null" else c for c in cells], False
        return
    if suffix == ".png" or raw[:8] == b"\x89PNG\r\n\x1a\n":
        yield from (("png " + k, v, False) for k, v in _png_text(raw))
        yield "bytes", raw, True
        return
    if raw[:16] == b"SQLite format 3\x00":
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            yield "sqlite dump", "\n".join(db.iterdump()), False
        return
    if suffix in TEXT_SUFFIXES or (not raw.startswith(BINARY_MAGIC) and _looks_textual(raw)):
        yield "text", raw.decode("utf-8", "replace"), False
        return
    yield "bytes", raw, True


def _looks_textual(raw: bytes) -> bool:
    head = raw[:4096]
    return bool(head) and b"\x00" not in head and sum(32 <= b < 127 or b in (9, 10, 13) for b in head) / len(head) > 0.95


def _png_text(raw: bytes) -> list[tuple[str, str]]:
    out, pos = [], 8
    while pos + 8 <= len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        kind = raw[pos + 4 : pos + 8]
        data = raw[pos + 8 : pos + 8 + length]
        pos += 12 + length
        try:
            if kind == b"tEXt":
                key, _, text = data.partition(b"\x00")
                out.append((key.decode("latin-1"), text.decode("latin-1")))
            elif kind == b"zTXt":
                key, _, rest = data.partition(b"\x00")
                out.append((key.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")))
            elif kind == b"iTXt":
                key, _, rest = data.partition(b"\x00")
                compressed, rest = rest[0], rest[2:]
                _, _, rest = rest.partition(b"\x00")  # language tag
                _, _, text = rest.partition(b"\x00")  # translated keyword
                out.append((key.decode("latin-1"), (zlib.decompress(text) if compressed else text).decode("utf-8")))
        except (zlib.error, UnicodeDecodeError, IndexError):
            out.append((kind.decode("latin-1"), "<undecodable>"))
    return out


def scan_text(label: str, text: str, secrets: Iterable[Secret], allow: Iterable[str] = ()) -> list[Hit]:
    """The same search over captured text (logs, stderr) that is not a file."""
    allowed = {a.lower() for a in allow}
    matcher = _Matcher([s for s in set(secrets) if s.value.lower() not in allowed])
    return [Hit(s.kind, s.value, label, "text") for s, _ in matcher.find(text)]


def report(hits: list[Hit], limit: int = 20) -> str:
    return "\n".join(f"{h.kind} {h.value!r} in {h.file} at {h.location}" for h in hits[:limit])


def description_vocabulary(files: Iterable[Path]) -> set[str]:
    """Description values that are body-part vocabulary, not PHI: those equal (ignoring case) to a
    BodyPartExamined value or a region name of the same inputs. Synthetic exports describe studies
    with region synonyms ("Knie"), which the manifest rightly keeps as BodyPartExamined elsewhere."""
    from xrayops.regions import REGIONS

    vocabulary = {r.lower() for r in REGIONS} | {r.replace("_", " ").lower() for r in REGIONS}
    described = set()
    for path in files:
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            continue
        vocabulary.add(str(ds.get("BodyPartExamined", "") or "").strip().lower())
        for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription"):
            described.add(str(ds.get(keyword, "") or "").strip())
    return {d for d in described if d and d.lower() in vocabulary}
