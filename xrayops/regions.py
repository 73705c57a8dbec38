"""The anatomical label space of Langer et al. 2024 (14 regions) plus the reject value."""
from __future__ import annotations

# Langer et al. 2024: 14 regions, in the paper's order. Index = class id everywhere.
REGIONS: tuple[str, ...] = (
    "clavicle",
    "shoulder",
    "skull",
    "rib",
    "elbow",
    "knee",
    "wrist",
    "hand",
    "foot",
    "ankle",
    "pelvis_hip",
    "cervical_spine",
    "thoracic_spine",
    "lumbar_spine",
)
UNKNOWN = "unknown"
REGION_INDEX: dict[str, int] = {r: i for i, r in enumerate(REGIONS)}


def region_index(region: str) -> int:
    """Class id of a region; -1 for `unknown` or anything outside the label space."""
    return REGION_INDEX.get(region, -1)
