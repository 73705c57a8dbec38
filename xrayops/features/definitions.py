"""Feast objects: the `image` entity and the feature views over the parquet offline tables.

Every table is keyed by the pseudonymous image id (never a raw UID) and carries
`event_timestamp`, the time the fact became known: point-in-time joins then give a training
run exactly what was known at its cutoff. Labels come from three sources kept in separate
views, so that the latest event of one source never hides another's:
  pacs_labels       the PACS tag normalised at ingestion,
  model_predictions what a served model said (region, confidence, model version),
  reviewed_labels   a radiologist's decision (xrayops.monitor.review).
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

ENTITY = "image"
JOIN_KEY = "image_id"
TIMESTAMP = "event_timestamp"
# Facts about an image do not expire: a tag set years ago is still the tag.
TTL = timedelta(days=3650)

# view name -> [(column, feast type name)]; the parquet table of a view is data/<view>.parquet.
VIEWS: dict[str, list[tuple[str, str]]] = {
    "image_metadata": [("modality", "String"), ("manufacturer", "String"), ("photometric_interpretation", "String"),
                       ("view_position", "String"), ("laterality", "String"), ("pixel_spacing", "Float64"),
                       ("split", "String"), ("dataset_md5", "String")],
    "image_statistics": [("pixel_mean", "Float64"), ("pixel_std", "Float64"), ("original_rows", "Int64"),
                         ("original_cols", "Int64")],
    "embeddings": [("embedding", "Array(Float32)"), ("backbone", "String")],
    "pacs_labels": [("pacs_region", "String"), ("body_part_raw", "String")],
    "model_predictions": [("predicted_region", "String"), ("prediction_confidence", "Float64"),
                          ("model_version", "String")],
    "reviewed_labels": [("reviewed_region", "String"), ("review_decision", "String"), ("reviewer", "String")],
}


def table_path(data_dir: Path, view: str) -> Path:
    return Path(data_dir) / f"{view}.parquet"


def _dtype(name: str):
    from feast import types

    if name.startswith("Array(") and name.endswith(")"):
        return types.Array(getattr(types, name[len("Array("):-1]))
    return getattr(types, name)


def feature_objects(data_dir: Path) -> list:
    """The entity and one FeatureView per table under `data_dir` (for FeatureStore.apply)."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType

    image = Entity(name=ENTITY, join_keys=[JOIN_KEY], value_type=ValueType.STRING,
                   description="one radiograph, by its pseudonymous image id")
    objects: list = [image]
    for view, columns in VIEWS.items():
        source = FileSource(name=f"{view}_source", path=str(table_path(data_dir, view)), timestamp_field=TIMESTAMP)
        objects.append(FeatureView(
            name=view, entities=[image], ttl=TTL, online=True, source=source,
            schema=[Field(name=c, dtype=_dtype(t)) for c, t in columns],
        ))
    return objects
