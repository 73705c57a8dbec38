"""Feast feature store: image metadata and statistics, embeddings, and timestamped label
events (PACS tag, model prediction, reviewer correction), with point-in-time training sets."""
from xrayops.features.definitions import ENTITY, JOIN_KEY, TIMESTAMP, VIEWS, feature_objects
from xrayops.features.repo import feature_store_config, write_feature_repo
from xrayops.features.store import (
    append_rows,
    dataset_training_labels,
    embedding_rows,
    historical_features,
    manifest_rows,
    open_store,
    prediction_rows,
    record_reviews,
    review_rows,
    training_labels,
    training_set,
)

__all__ = [
    "ENTITY",
    "JOIN_KEY",
    "TIMESTAMP",
    "VIEWS",
    "append_rows",
    "dataset_training_labels",
    "embedding_rows",
    "feature_objects",
    "feature_store_config",
    "historical_features",
    "manifest_rows",
    "open_store",
    "prediction_rows",
    "record_reviews",
    "review_rows",
    "training_labels",
    "training_set",
    "write_feature_repo",
]
