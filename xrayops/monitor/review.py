"""Reviewer decisions -> label events.

A label event is one timestamped statement about an image's region by one source: the PACS
tag at ingestion, a model prediction, or a radiologist's review. The feature store keeps
them all (`xrayops.features`), so a training run built for a cutoff time sees only the
events made before it.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel

from xrayops.regions import REGIONS, UNKNOWN

Decision = Literal["keep", "relabel", "exclude"]
DECISIONS: tuple[str, ...] = ("keep", "relabel", "exclude")
REQUIRED = ("image_id", "decision", "corrected_region", "reviewer", "timestamp")


class LabelEvent(BaseModel):
    image_id: str
    event_timestamp: datetime
    source: Literal["pacs_tag", "model", "reviewer"]
    region: str  # a region, or "unknown" (excluded from labelled training)
    actor: str = ""  # reviewer, model version, or ingestion
    decision: str = ""


class RejectedDecision(BaseModel):
    line: int  # 1-based data line of the CSV (header excluded)
    image_id: str
    reason: str


class ReviewImport(BaseModel):
    events: list[LabelEvent]
    rejected: list[RejectedDecision]


def _timestamp(value: str) -> datetime:
    ts = pd.Timestamp(value)  # raises ValueError on garbage
    if pd.isna(ts):
        raise ValueError("empty timestamp")
    ts = ts.tz_localize(timezone.utc) if ts.tzinfo is None else ts.tz_convert(timezone.utc)
    return ts.to_pydatetime()


def decisions_to_events(decisions: pd.DataFrame, given_regions: dict[str, str]) -> ReviewImport:
    """Validate reviewer rows and turn each into a label event; bad rows are rejected with a reason.

    keep -> the given tag confirmed; relabel -> `corrected_region`; exclude -> `unknown` (the
    image leaves labelled training, e.g. out of domain or unusable; Langer et al. 2024 found 36 OOD
    and 2 unusable among 328 errors). Rows without a decision are not reviewed yet and skipped.
    """
    missing = [c for c in REQUIRED if c not in decisions.columns]
    if missing:
        raise ValueError(f"reviewer CSV lacks columns {missing}; expected {list(REQUIRED)}")
    events, rejected = [], []
    frame = decisions.fillna("").astype(str)
    for line, row in enumerate(frame.to_dict(orient="records"), start=1):
        image_id, decision = row["image_id"].strip(), row["decision"].strip().lower()
        if not decision:
            continue

        def reject(reason: str) -> None:
            rejected.append(RejectedDecision(line=line, image_id=image_id, reason=reason))

        if image_id not in given_regions:
            reject(f"unknown image_id {image_id!r}")
            continue
        if decision not in DECISIONS:
            reject(f"decision {decision!r} is not one of {list(DECISIONS)}")
            continue
        corrected = row["corrected_region"].strip()
        if decision == "relabel" and corrected not in REGIONS:
            reject(f"relabel needs corrected_region to be a region, got {corrected!r}")
            continue
        if not row["reviewer"].strip():
            reject("reviewer is empty")
            continue
        try:
            when = _timestamp(row["timestamp"])
        except ValueError as exc:
            reject(f"bad timestamp {row['timestamp']!r}: {exc}")
            continue
        region = {"keep": given_regions[image_id], "relabel": corrected, "exclude": UNKNOWN}[decision]
        events.append(LabelEvent(image_id=image_id, event_timestamp=when, source="reviewer", region=region,
                                 actor=row["reviewer"].strip(), decision=decision))
    return ReviewImport(events=events, rejected=rejected)


def read_decisions(path: str | Path, given_regions: dict[str, str]) -> ReviewImport:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reviewer decisions CSV {path} not found")
    return decisions_to_events(pd.read_csv(path, dtype=str, keep_default_na=False), given_regions)


def events_frame(events: list[LabelEvent]) -> pd.DataFrame:
    columns = list(LabelEvent.model_fields)
    frame = pd.DataFrame([e.model_dump() for e in events], columns=columns)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    return frame


def pacs_events(manifest: pd.DataFrame, when: datetime) -> list[LabelEvent]:
    """The PACS tag of every ok image as a label event at ingestion time `when`."""
    ok = manifest[manifest["status"] == "ok"] if "status" in manifest.columns else manifest
    return [LabelEvent(image_id=str(i), event_timestamp=when, source="pacs_tag", region=str(r), actor="ingest")
            for i, r in zip(ok["image_id"], ok["region"])]

