"""What changed between two dataset versions: images added and removed (by site and vendor), tags
that changed, and the label corrections reviewers made. Manifests only, never pixels or PHI.

The previous version's manifest is read straight from the DVC remote by the version's md5 (the
`.dir` listing names each file's md5; DVC 3 stores a file under files/md5/<2 hex>/<rest>), so a
pipeline step needs neither a git checkout nor a `dvc pull` of the whole dataset.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
from pydantic import BaseModel, Field

from xrayops.errors import XrayopsError
from xrayops.evaluate.subgroups import NOT_RECORDED

MANIFEST = "manifest.parquet"
# Who contributed the images: the breakdowns of images added and removed.
BREAKDOWN_COLUMNS = ("site", "manufacturer")
UNKNOWN = "unknown"


class DatasetDiffError(XrayopsError, RuntimeError):
    """A version's manifest cannot be read (remote unreachable, md5 unknown, not a dataset)."""


class DatasetDiff(BaseModel):
    previous_md5: str = ""
    current_md5: str = ""
    n_previous: int  # ok images
    n_current: int
    added: int
    removed: int
    kept: int
    added_by: dict[str, dict[str, int]] = Field(default_factory=dict)  # column -> value -> images
    removed_by: dict[str, dict[str, int]] = Field(default_factory=dict)
    tag_changes: int = 0  # kept images whose region tag (as ingested) differs between the versions


class Transition(BaseModel):
    from_label: str
    to_label: str
    n: int


class LabelCorrections(BaseModel):
    """Training labels that differ from the PACS tags: reviewers' corrections (`relabel`: another
    region; `exclude`: out of labelled training, e.g. out of domain or unusable)."""

    n_labels: int  # images with a label event (reviewed or tag)
    by_reason: dict[str, int]
    transitions: list[Transition]  # tag -> corrected label, commonest first


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"] if "status" in frame.columns else frame


def _counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    out = {}
    for column in BREAKDOWN_COLUMNS:
        if column in frame.columns and len(frame):
            values = frame[column].fillna("").astype(str).str.strip().replace("", NOT_RECORDED)
            out[column] = {str(k): int(v) for k, v in values.value_counts().sort_index().items()}
    return out


def diff_manifests(previous: pd.DataFrame | None, current: pd.DataFrame, previous_md5: str = "",
                   current_md5: str = "") -> DatasetDiff:
    """Images (by image_id, the keyed pseudonym of the SOP Instance UID: stable across versions
    under one key) added, removed and kept among the ok rows; no previous version: all added."""
    cur = _ok(current)
    prev = _ok(previous) if previous is not None else cur.iloc[0:0]
    ids_prev, ids_cur = set(prev["image_id"].astype(str)), set(cur["image_id"].astype(str))
    added = cur[cur["image_id"].astype(str).isin(ids_cur - ids_prev)]
    removed = prev[prev["image_id"].astype(str).isin(ids_prev - ids_cur)]
    both = cur.merge(prev[["image_id", "region"]], on="image_id", suffixes=("", "_previous"))
    return DatasetDiff(
        previous_md5=previous_md5, current_md5=current_md5, n_previous=len(prev), n_current=len(cur),
        added=len(added), removed=len(removed), kept=len(both), added_by=_counts(added), removed_by=_counts(removed),
        tag_changes=int((both["region"].astype(str) != both["region_previous"].astype(str)).sum()),
    )


def label_corrections(tags: dict[str, str], labels: dict[str, str], top: int = 10) -> LabelCorrections:
    """`labels` (image_id -> the label trained on, e.g. the feature store's point-in-time labels)
    against `tags` (image_id -> the PACS tag): the corrections, counted by reason and transition."""
    reasons: Counter = Counter()
    moves: Counter = Counter()
    for image, label in labels.items():
        tag = tags.get(image, UNKNOWN)
        if label == tag:
            continue
        reasons["exclude" if label == UNKNOWN else "relabel"] += 1
        moves[(tag, label)] += 1
    return LabelCorrections(
        n_labels=len(labels), by_reason=dict(sorted(reasons.items())),
        transitions=[Transition(from_label=a, to_label=b, n=n) for (a, b), n in moves.most_common(top)],
    )


# --- a version's manifest from the DVC remote ---


def _object_key(md5: str) -> str:
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def _read_object(remote_url: str, key: str, endpoint_url: str = "") -> bytes:
    parsed = urlparse(remote_url)
    if parsed.scheme == "s3":
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        full = "/".join(p for p in (prefix, key) if p)
        try:
            body = boto3.client("s3", endpoint_url=endpoint_url or None).get_object(Bucket=bucket, Key=full)["Body"]
            return body.read()
        except (ClientError, BotoCoreError) as exc:
            raise DatasetDiffError(f"cannot read s3://{bucket}/{full} from the DVC remote: {exc}") from exc
    if parsed.scheme not in ("", "file"):
        raise DatasetDiffError(f"unsupported DVC remote {remote_url!r}: a folder or s3://BUCKET/PREFIX")
    path = Path(parsed.path if parsed.scheme == "file" else remote_url) / key
    if not path.is_file():
        raise DatasetDiffError(f"{path} is not in the DVC remote")
    return path.read_bytes()


def read_version_manifest(remote_url: str, dataset_md5: str, endpoint_url: str = "") -> pd.DataFrame:
    """The manifest of the dataset version `dataset_md5` (a DVC directory hash, `...dir`)."""
    if not dataset_md5.endswith(".dir"):
        raise DatasetDiffError(f"{dataset_md5!r} is not a DVC directory hash (ending in .dir): no dataset version to read")
    try:
        listing = json.loads(_read_object(remote_url, _object_key(dataset_md5), endpoint_url))
    except json.JSONDecodeError as exc:
        raise DatasetDiffError(f"the DVC listing of {dataset_md5} is not JSON: {exc}") from exc
    entry = next((e for e in listing if e.get("relpath") == MANIFEST), None)
    if entry is None:
        raise DatasetDiffError(f"dataset version {dataset_md5} has no {MANIFEST}")
    return pd.read_parquet(io.BytesIO(_read_object(remote_url, _object_key(entry["md5"]), endpoint_url)))
