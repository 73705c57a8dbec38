"""Regenerate xrayops/dicom/ps315_table_e1_1.json from a machine-readable PS3.15 Table E.1-1.

    python -m xrayops.dicom.ps315_vendor SOURCE.json

SOURCE is innolitics/dicom-standard's standard/confidentiality_profile_attributes.json (MIT
licence, Copyright (c) 2017 Innolitics, LLC), which parses the DICOM Standard (NEMA, freely
usable with attribution). The vendored file keeps, per attribute, the tag id, name, Basic Profile
action and the option columns that change it, and records its provenance.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from xrayops.dicom.deid import PS315_TABLE_FILE

PROVENANCE = {
    "standard": "DICOM PS3.15 Annex E, Table E.1-1 (Application Level Confidentiality Profile Attributes); "
    "DICOM is a registered trademark of NEMA, and the Standard's text is freely usable with attribution",
    "parsed_by": "innolitics/dicom-standard, standard/confidentiality_profile_attributes.json, commit "
    "8670abdd9ad16c61af5146ef857899699bdd9c5f (2024-04-18); MIT licence, Copyright (c) 2017 Innolitics, LLC",
    "columns": "id: tag as 8 hex digits (x: any digit of a repeating group); basicProfile and option columns "
    "hold the action codes of PS3.15 Table E.1-1a (D, Z, X, K, C, U and combinations)",
}
# The MIT licence asks that its notice travel with copies of the parsed table.
MIT_NOTICE = (
    "Copyright (c) 2017 Innolitics, LLC. Permission is hereby granted, free of charge, to any person obtaining a copy "
    "of this software and associated documentation files (the \"Software\"), to deal in the Software without "
    "restriction, including without limitation the rights to use, copy, modify, merge, publish, distribute, "
    "sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do "
    "so, subject to the following conditions: The above copyright notice and this permission notice shall be "
    "included in all copies or substantial portions of the Software. THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT "
    "WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, "
    "FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE "
    "LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING "
    "FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."
)
KEEP = ("id", "tag", "name", "basicProfile")


def vendor(source: Path, out: Path = PS315_TABLE_FILE) -> Path:
    rows = json.loads(Path(source).read_text(encoding="utf-8"))
    attributes = []
    for row in sorted(rows, key=lambda r: r["id"]):
        kept = {k: row[k] for k in KEEP}
        kept.update({k: v for k, v in sorted(row.items()) if k.endswith("Opt")})
        attributes.append(kept)
    provenance = {**PROVENANCE, "licence": MIT_NOTICE}
    out.write_text(json.dumps({"provenance": provenance, "attributes": attributes}, indent=0) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    print(vendor(Path(sys.argv[1])))
