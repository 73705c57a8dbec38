"""Results broken down by acquisition subgroup: site, manufacturer, modality, view position,
photometric interpretation and transfer-syntax family, as far as the manifest records them.

A model can be better overall and worse for one vendor's detector or one site's export
settings; a pooled number hides it (Oakden-Rayner et al. 2020, hidden stratification). Each
subgroup gets its n, its number of studies and a study-bootstrap interval
(xrayops.evaluate.intervals); the gate compares champion and challenger per subgroup too.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel

from xrayops.evaluate.intervals import MetricCI, commonest_per_cluster, ratio_interval

# Manifest column -> subgroup attribute; `site` where a manifest carries one (several sites' exports).
ATTRIBUTE_COLUMNS: dict[str, str] = {
    "site": "site",
    "manufacturer": "manufacturer",
    "modality": "modality",
    "view_position": "view_position",
    "photometric_interpretation": "photometric_interpretation",
    "transfer_syntax_family": "transfer_syntax",
}
NOT_RECORDED = "(not recorded)"

# Transfer Syntax UIDs (PS3.5 / PS3.6) by family: the codec, not the byte order, changes pixels.
_FAMILIES: dict[str, str] = {
    "1.2.840.10008.1.2": "native", "1.2.840.10008.1.2.1": "native", "1.2.840.10008.1.2.2": "native",
    "1.2.840.10008.1.2.1.99": "native",  # deflated: lossless, pixels as native
    "1.2.840.10008.1.2.5": "rle",
    "1.2.840.10008.1.2.4.57": "jpeg_lossless", "1.2.840.10008.1.2.4.70": "jpeg_lossless",
    "1.2.840.10008.1.2.4.50": "jpeg_lossy", "1.2.840.10008.1.2.4.51": "jpeg_lossy",
    "1.2.840.10008.1.2.4.80": "jpeg_ls", "1.2.840.10008.1.2.4.81": "jpeg_ls",
    "1.2.840.10008.1.2.4.90": "jpeg2000", "1.2.840.10008.1.2.4.91": "jpeg2000",
    "1.2.840.10008.1.2.4.92": "jpeg2000", "1.2.840.10008.1.2.4.93": "jpeg2000",
    "1.2.840.10008.1.2.4.201": "htj2k", "1.2.840.10008.1.2.4.202": "htj2k", "1.2.840.10008.1.2.4.203": "htj2k",
}


def transfer_syntax_family(uid: str) -> str:
    uid = str(uid or "").strip()
    if not uid:
        return NOT_RECORDED
    return _FAMILIES.get(uid, "other")


def _clean(value) -> str:
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
    return text or NOT_RECORDED


def subgroup_attributes(rows) -> dict[str, list[str]]:
    """Attribute -> one value per row of a manifest frame, for the attributes it has columns for
    and records for at least one row (a column empty everywhere says nothing about anyone)."""
    out: dict[str, list[str]] = {}
    for attribute, column in ATTRIBUTE_COLUMNS.items():
        if column not in rows.columns:
            continue
        values = rows[column].tolist()
        values = ([transfer_syntax_family(v) for v in values] if attribute == "transfer_syntax_family"
                  else [_clean(v) for v in values])
        if any(v != NOT_RECORDED for v in values):
            out[attribute] = values
    return out


class SubgroupAccuracy(BaseModel):
    """One subgroup's accuracy in an evaluation."""

    attribute: str
    value: str
    n: int
    n_studies: int
    accuracy: MetricCI


class SubgroupComparison(BaseModel):
    """Champion vs challenger in one subgroup of the gate's test set (paired, by study)."""

    attribute: str
    value: str
    n: int
    n_studies: int
    champion_accuracy: float
    challenger_accuracy: float
    difference: MetricCI  # challenger - champion
    checked: bool  # n >= the gate's minimum (and >= 2 studies): small subgroups are shown, not decided on
    refused: bool  # checked, and the difference's lower bound is below -margin

    def describe(self) -> str:
        d = self.difference
        interval = "" if d.low is None else f", CI [{d.low:+.3f}, {d.high:+.3f}]"
        return (f"{self.attribute}={self.value} (n={self.n}): {self.challenger_accuracy:.3f} vs "
                f"{self.champion_accuracy:.3f}, difference {d.value:+.3f}{interval}")


def _groups(attributes: Mapping[str, Sequence[str]]):
    for attribute, values in attributes.items():
        values = np.asarray(values, dtype=str)
        for value in sorted(set(values.tolist())):
            yield attribute, value, values == value


def _seed(seed: int, attribute: str, value: str) -> int:
    """A fixed seed per subgroup: the same data give the same intervals, run after run."""
    import hashlib

    return seed + int.from_bytes(hashlib.sha256(f"{attribute}={value}".encode()).digest()[:4], "big")


def subgroup_accuracies(
    correct: Sequence[bool], studies: Sequence[str], reference: Sequence[str], attributes: Mapping[str, Sequence[str]],
    samples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> list[SubgroupAccuracy]:
    """Accuracy per subgroup with a study-bootstrap interval stratified by the study's reference class."""
    correct = np.asarray(correct, dtype=np.float64)
    studies = np.asarray(studies, dtype=str)
    reference = np.asarray(reference, dtype=str)
    out = []
    for attribute, value, member in _groups(attributes):
        s, c, r = studies[member], correct[member], reference[member]
        strata = _row_strata(s, r)
        ci = ratio_interval(c, np.ones_like(c), s, strata, samples, confidence, _seed(seed, attribute, value))
        out.append(SubgroupAccuracy(attribute=attribute, value=value, n=int(member.sum()),
                                    n_studies=len(set(s.tolist())), accuracy=ci))
    return out


def _row_strata(studies: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each row's stratum: its study's commonest reference label."""
    ids, inverse = np.unique(studies, return_inverse=True)
    return commonest_per_cluster(studies, reference)[inverse]


def compare_subgroups(
    champion_correct: Sequence[bool], challenger_correct: Sequence[bool], studies: Sequence[str],
    reference: Sequence[str], attributes: Mapping[str, Sequence[str]], min_n: int, margin: float,
    samples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> list[SubgroupComparison]:
    """Per subgroup: both accuracies and the paired study-bootstrap interval of the difference;
    a subgroup of at least `min_n` images whose lower bound is below -`margin` is refused."""
    a = np.asarray(champion_correct, dtype=np.float64)
    b = np.asarray(challenger_correct, dtype=np.float64)
    studies = np.asarray(studies, dtype=str)
    reference = np.asarray(reference, dtype=str)
    out = []
    for attribute, value, member in _groups(attributes):
        s = studies[member]
        diff = b[member] - a[member]
        ci = ratio_interval(diff, np.ones_like(diff), s, _row_strata(s, reference[member]), samples, confidence,
                            _seed(seed, attribute, value))
        n = int(member.sum())
        checked = n >= min_n and ci.low is not None  # one study: no interval to decide on
        refused = checked and ci.low < -margin
        out.append(SubgroupComparison(
            attribute=attribute, value=value, n=n, n_studies=len(set(s.tolist())),
            champion_accuracy=float(a[member].mean()), challenger_accuracy=float(b[member].mean()),
            difference=ci, checked=checked, refused=refused))
    return out
