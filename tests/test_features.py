"""The Feast feature store (real Feast: parquet offline store, sqlite online store)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import yaml

from xrayops.config import Settings
from xrayops.features import (
    append_rows,
    embedding_rows,
    historical_features,
    manifest_rows,
    open_store,
    prediction_rows,
    review_rows,
    training_labels,
    training_set,
)
from xrayops.features.repo import feature_store_config
from xrayops.features.store import store_data_dir
from xrayops.monitor.review import LabelEvent

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _manifest() -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": ["img-a", "img-b", "img-c", "img-q"],
        "status": ["ok", "ok", "ok", "quarantined"],
        "region": ["hand", "knee", "unknown", "unknown"],
        "body_part_raw": ["HAND", "KNIE", "", ""],
        "manufacturer": ["Nordlicht Medical", "Meridian Imaging Systems", "Nordlicht Medical", ""],
        "modality": "DX", "photometric_interpretation": "MONOCHROME2", "view_position": "AP", "laterality": "",
        "pixel_spacing": [0.1, None, 0.2, None], "split": ["train", "train", "val", ""],
        "pixel_mean": [0.4, 0.5, 0.3, None], "pixel_std": [0.2, 0.2, 0.1, None],
        "original_rows": [160, 120, 160, 0], "original_cols": [128, 120, 160, 0],
    })


def test_feature_store_yaml_from_settings(tmp_path):
    local = feature_store_config(Settings(output_dir=tmp_path))
    assert local["online_store"] == {"type": "sqlite", "path": str(tmp_path.resolve() / "feature_repo/data/online_store.db")}
    assert local["offline_store"] == {"type": "file"} and local["project"] == "xrayops"
    redis = feature_store_config(Settings(output_dir=tmp_path, feast_online_store="redis", feast_online_connection="redis:6379"))
    assert redis["online_store"] == {"type": "redis", "connection_string": "redis:6379"}
    pg = feature_store_config(Settings(output_dir=tmp_path, feast_online_store="postgres",
                                       feast_online_connection="postgresql://feast@db:5433/features"))
    assert pg["online_store"]["host"] == "db" and pg["online_store"]["port"] == 5433
    assert pg["online_store"]["password"] == "${XRAYOPS_FEAST_PASSWORD}"  # never the secret itself
    with pytest.raises(ValueError, match="needs XRAYOPS_FEAST_ONLINE_CONNECTION"):
        feature_store_config(Settings(output_dir=tmp_path, feast_online_store="redis"))
    with pytest.raises(ValueError, match="unknown online store"):
        feature_store_config(Settings(output_dir=tmp_path, feast_online_store="cassandra"))


def test_point_in_time_training_set_does_not_leak_later_corrections(tmp_path):
    store = open_store(Settings(output_dir=tmp_path))
    data_dir = store_data_dir(store)
    assert yaml.safe_load((data_dir.parent / "feature_store.yaml").read_text())["online_store"]["type"] == "sqlite"
    for view, rows in manifest_rows(_manifest(), T0, dataset_md5="abc123").items():
        append_rows(data_dir, view, rows)
    append_rows(data_dir, "embeddings", embedding_rows(["img-a", "img-b"], np.eye(2, 4, dtype=np.float32), T0, "simclr"))

    cutoff = T0 + timedelta(days=10)  # the training run's cutoff
    early = LabelEvent(image_id="img-b", event_timestamp=T0 + timedelta(days=5), source="reviewer",
                       region="ankle", actor="dr.x", decision="relabel")
    late = LabelEvent(image_id="img-a", event_timestamp=T0 + timedelta(days=20), source="reviewer",
                      region="wrist", actor="dr.y", decision="relabel")
    append_rows(data_dir, "reviewed_labels", review_rows([early, late]))
    log = pd.DataFrame({"image_id": ["img-a", ""], "timestamp": [T0 + timedelta(days=3)] * 2,
                        "region": ["wrist", "hand"], "confidence": [0.97, 0.5], "model_version": ["3", "3"]})
    append_rows(data_dir, "model_predictions", prediction_rows(log))

    ids = ["img-a", "img-b", "img-c"]
    at_cutoff = training_set(store, ids, cutoff)
    assert at_cutoff["image_id"].tolist() == ids
    # img-a's correction came after the cutoff: that run still trains on the PACS tag.
    assert at_cutoff["label"].tolist() == ["hand", "ankle", "unknown"]
    assert at_cutoff["label_source"].tolist() == ["pacs_tag", "reviewer", "pacs_tag"]
    assert at_cutoff["labelled"].tolist() == [True, True, False]
    assert at_cutoff["manufacturer"].tolist()[:2] == ["Nordlicht Medical", "Meridian Imaging Systems"]
    assert at_cutoff["dataset_md5"].eq("abc123").all() and at_cutoff["pixel_mean"].tolist() == [0.4, 0.5, 0.3]

    later = training_set(store, ids, T0 + timedelta(days=30))
    assert later["label"].tolist() == ["wrist", "ankle", "unknown"]
    # What finetune(labels=...) gets: only images with a label event by then; others keep their tag.
    assert training_labels(store, [*ids, "img-new"], cutoff) == {"img-a": "hand", "img-b": "ankle", "img-c": "unknown"}
    # Before ingestion nothing was known.
    before = training_set(store, ids, T0 - timedelta(days=1))
    assert before["labelled"].sum() == 0 and before["pacs_region"].isna().all()

    extra = historical_features(store, ["img-a", "img-b"], cutoff,
                                ["embeddings:embedding", "model_predictions:predicted_region"])
    assert np.allclose(np.stack(extra["embedding"].to_list()), np.eye(2, 4))
    assert extra["predicted_region"].tolist()[0] == "wrist" and pd.isna(extra["predicted_region"].iloc[1])

    # Re-appending the same rows is a no-op; a table refuses rows without an image id.
    n = len(pd.read_parquet(data_dir / "pacs_labels.parquet"))
    assert append_rows(data_dir, "pacs_labels", manifest_rows(_manifest(), T0)["pacs_labels"]) == n == 3
    with pytest.raises(ValueError, match="without an image_id"):
        append_rows(data_dir, "pacs_labels", manifest_rows(_manifest().assign(image_id=""), T0)["pacs_labels"])
    with pytest.raises(ValueError, match="unknown feature view"):
        append_rows(data_dir, "gossip", pd.DataFrame())
