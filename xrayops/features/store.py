"""Feature tables in, point-in-time-correct training sets out (Feast).

Writers append timestamped rows to the parquet offline tables (data/<view>.parquet); a
training run asks `get_historical_features` for its images AS OF its cutoff time, so a
label correction or a prediction made after the cutoff never leaks into that run's dataset.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xrayops.config import Settings
from xrayops.features.definitions import JOIN_KEY, TIMESTAMP, VIEWS, feature_objects, table_path
from xrayops.features.repo import DATA_DIR, write_feature_repo
from xrayops.logs import get_logger
from xrayops.regions import REGIONS

log = get_logger(__name__)

_ARROW = {"String": pa.string(), "Float64": pa.float64(), "Int64": pa.int64(), "Array(Float32)": pa.list_(pa.float32())}
TRAINING_FEATURES = [f"{view}:{column}" for view in ("image_metadata", "image_statistics", "pacs_labels", "reviewed_labels")
                     for column, _ in VIEWS[view]]


def table_schema(view: str) -> pa.Schema:
    return pa.schema([(JOIN_KEY, pa.string()), (TIMESTAMP, pa.timestamp("us", tz="UTC"))]
                     + [(c, _ARROW[t]) for c, t in VIEWS[view]])


def _utc(when: datetime) -> pd.Timestamp:
    ts = pd.Timestamp(when)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def conform(view: str, frame: pd.DataFrame) -> pa.Table:
    """`frame` as the view's arrow table: its columns, its types, UTC timestamps; missing ids refused."""
    schema = table_schema(view)
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise ValueError(f"rows for feature view {view!r} lack columns {missing}")
    frame = frame[schema.names].copy()
    if frame[JOIN_KEY].isna().any() or (frame[JOIN_KEY].astype(str) == "").any():
        raise ValueError(f"rows for feature view {view!r} without an image_id")
    frame[TIMESTAMP] = pd.to_datetime(frame[TIMESTAMP], utc=True)
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def append_rows(data_dir: Path, view: str, frame: pd.DataFrame) -> int:
    """Append rows to a view's offline table (rewritten atomically); identical rows are kept once."""
    if view not in VIEWS:
        raise ValueError(f"unknown feature view {view!r}; known: {sorted(VIEWS)}")
    path = table_path(data_dir, view)
    new = conform(view, frame)
    table = pa.concat_tables([pq.read_table(path, schema=new.schema), new]) if path.exists() else new
    merged = table.to_pandas()
    key = merged.drop(columns=[c for c, t in VIEWS[view] if t.startswith("Array")]).astype(str)
    merged = merged[~key.duplicated()]
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(merged, schema=new.schema, preserve_index=False), tmp)
    tmp.replace(path)
    return len(merged)


def ensure_tables(data_dir: Path) -> None:
    """Every view's table exists (empty at first), so every view can be joined from day one."""
    for view in VIEWS:
        path = table_path(data_dir, view)
        if not path.exists():
            pq.write_table(table_schema(view).empty_table(), path)


def open_store(settings: Settings):
    """The FeatureStore of the settings' repo: writes feature_store.yaml, creates empty tables
    and applies the entity and feature views (idempotent)."""
    from feast import FeatureStore

    root = write_feature_repo(settings)
    data_dir = root / DATA_DIR
    ensure_tables(data_dir)
    store = FeatureStore(repo_path=str(root))
    store.apply(feature_objects(data_dir))
    return store


def store_data_dir(store) -> Path:
    return Path(store.repo_path) / DATA_DIR


# --- writers: the stage outputs as feature rows ------------------------------------------------


def manifest_rows(manifest: pd.DataFrame, known_at: datetime, dataset_md5: str = "") -> dict[str, pd.DataFrame]:
    """image_metadata, image_statistics and pacs_labels rows for the ok images of a manifest,
    all known at `known_at` (the ingestion time)."""
    ok = manifest[manifest["status"] == "ok"] if "status" in manifest.columns else manifest
    base = pd.DataFrame({JOIN_KEY: ok["image_id"].astype(str).to_numpy(), TIMESTAMP: _utc(known_at)})

    def take(column: str, default):
        return ok[column].to_numpy() if column in ok.columns else np.full(len(ok), default)

    metadata = base.assign(**{c: take(c, "") for c, _ in VIEWS["image_metadata"] if c not in ("pixel_spacing", "dataset_md5")},
                           pixel_spacing=pd.to_numeric(pd.Series(take("pixel_spacing", np.nan)), errors="coerce").to_numpy(),
                           dataset_md5=dataset_md5)
    statistics = base.assign(pixel_mean=take("pixel_mean", np.nan), pixel_std=take("pixel_std", np.nan),
                             original_rows=take("original_rows", 0), original_cols=take("original_cols", 0))
    labels = base.assign(pacs_region=take("region", "unknown"), body_part_raw=take("body_part_raw", ""))
    return {"image_metadata": metadata, "image_statistics": statistics, "pacs_labels": labels}


def embedding_rows(image_ids: Sequence[str], embeddings: np.ndarray, known_at: datetime, backbone: str) -> pd.DataFrame:
    if len(image_ids) != len(embeddings):
        raise ValueError(f"{len(image_ids)} image ids but {len(embeddings)} embeddings")
    return pd.DataFrame({JOIN_KEY: list(map(str, image_ids)), TIMESTAMP: _utc(known_at),
                         "embedding": [np.asarray(e, np.float32) for e in embeddings], "backbone": backbone})


def prediction_rows(log_df: pd.DataFrame) -> pd.DataFrame:
    """Model predictions from inference-log rows that carry an image id (DICOM requests)."""
    known = log_df[log_df["image_id"].fillna("").astype(str) != ""]
    return pd.DataFrame({JOIN_KEY: known["image_id"].astype(str), TIMESTAMP: pd.to_datetime(known["timestamp"], utc=True),
                         "predicted_region": known["region"], "prediction_confidence": known["confidence"],
                         "model_version": known["model_version"]})


def review_rows(events: Iterable) -> pd.DataFrame:
    """reviewed_labels rows from reviewer `LabelEvent`s (xrayops.monitor.review)."""
    events = [e for e in events if e.source == "reviewer"]
    return pd.DataFrame({JOIN_KEY: [e.image_id for e in events], TIMESTAMP: [_utc(e.event_timestamp) for e in events],
                         "reviewed_region": [e.region for e in events], "review_decision": [e.decision for e in events],
                         "reviewer": [e.actor for e in events]})


def record_reviews(store, manifest: pd.DataFrame, events: Iterable, known_at: datetime) -> int:
    """Store reviewers' label events, with the manifest's tags (known at `known_at`) beside them
    so a training set has a PACS label to fall back on; returns the review rows written."""
    tables = store_data_dir(store)
    for view, rows in manifest_rows(manifest, known_at).items():
        append_rows(tables, view, rows)
    reviews = review_rows(events)
    append_rows(tables, "reviewed_labels", reviews)
    return len(reviews)


# --- readers --------------------------------------------------------------------------------------


def historical_features(store, image_ids: Sequence[str], cutoff: datetime, features: Sequence[str]) -> pd.DataFrame:
    """Point-in-time join: each image's latest value of each feature at or before `cutoff`."""
    entity_df = pd.DataFrame({JOIN_KEY: list(map(str, image_ids)), TIMESTAMP: _utc(cutoff)})
    by_view: dict[str, list[str]] = {}
    for ref in features:
        view, _, _column = ref.partition(":")
        by_view.setdefault(view, []).append(ref)
    # One join per view, merged here: Feast 0.67's file (dask) offline store drops an entity
    # row outright when all of its rows in a view are newer than the entity timestamp (the
    # TTL filter removes the left-join match instead of blanking it), which would also lose
    # that image's other views. Per view, such an image simply gets no value.
    frame = entity_df
    for refs in by_view.values():
        part = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
        part[TIMESTAMP] = pd.to_datetime(part[TIMESTAMP], utc=True)
        frame = frame.merge(part, on=[JOIN_KEY, TIMESTAMP], how="left")
    return frame.sort_values(JOIN_KEY, kind="stable").reset_index(drop=True)


def training_set(store, image_ids: Sequence[str], cutoff: datetime, features: Sequence[str] = TRAINING_FEATURES) -> pd.DataFrame:
    """The training rows as of `cutoff`: features plus `label` = the reviewer's region where a
    review exists by then, else the PACS tag; `labelled` says whether it names a region
    (excluded and unknown images stay for self-supervised pretraining)."""
    wanted = list(features)
    for needed in ("pacs_labels:pacs_region", "reviewed_labels:reviewed_region"):
        if needed not in wanted:
            wanted.append(needed)
    frame = historical_features(store, image_ids, cutoff, wanted)
    reviewed = frame["reviewed_region"].astype(object).where(frame["reviewed_region"].notna() & (frame["reviewed_region"] != ""))
    frame["label"] = [r if isinstance(r, str) else (p if isinstance(p, str) else "unknown")
                      for r, p in zip(reviewed, frame["pacs_region"])]
    frame["label_source"] = np.where(reviewed.notna(), "reviewer", np.where(frame["pacs_region"].notna(), "pacs_tag", ""))
    frame["labelled"] = frame["label"].isin(REGIONS)
    log.info("training set", images=len(frame), labelled=int(frame["labelled"].sum()),
             reviewed=int(reviewed.notna().sum()), cutoff=str(cutoff))
    return frame



def training_labels(store, image_ids: Sequence[str], cutoff: datetime) -> dict[str, str]:
    """image_id -> region label as of `cutoff` (a reviewer's decision, else the PACS tag), for the
    images the store has a label event for; `finetune(labels=...)` falls back to the manifest's
    tag for the rest."""
    frame = training_set(store, image_ids, cutoff, features=["pacs_labels:pacs_region"])
    known = frame[frame["label_source"] != ""]
    return dict(zip(known[JOIN_KEY].astype(str), known["label"].astype(str)))


def dataset_training_labels(store, data_dir: Path, cutoff: datetime) -> dict[str, str]:
    """`training_labels` for the images a head trains and selects on: the ok train and val rows
    of the ingested dataset at `data_dir`."""
    from xrayops.data.dataset import read_ok_rows

    ids = read_ok_rows(Path(data_dir), ["train", "val"])["image_id"].astype(str).tolist()
    return training_labels(store, ids, cutoff)
