"""The Feast feature repository: feature_store.yaml generated from `Settings`.

Embedded default: parquet files as the offline store (under the repo's data/ folder) and a
sqlite online store. On a cluster the online store is Redis or Postgres
(XRAYOPS_FEAST_ONLINE_STORE / XRAYOPS_FEAST_ONLINE_CONNECTION); secrets never land in the
YAML: the Postgres password is read by Feast from ${XRAYOPS_FEAST_PASSWORD} at load time.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import yaml

from xrayops.config import Settings

YAML_NAME = "feature_store.yaml"
DATA_DIR = "data"  # offline parquet tables, registry.db and the sqlite online store
PASSWORD_ENV = "XRAYOPS_FEAST_PASSWORD"


def repo_dir(settings: Settings) -> Path:
    return Path(settings.feature_repo_dir or settings.output_dir / "feature_repo").resolve()


def online_store_config(settings: Settings, data_dir: Path) -> dict:
    kind, connection = settings.feast_online_store, settings.feast_online_connection
    if kind == "sqlite":
        return {"type": "sqlite", "path": str(data_dir / "online_store.db")}
    if kind == "redis":
        if not connection:
            raise ValueError("a Redis online store needs XRAYOPS_FEAST_ONLINE_CONNECTION, e.g. redis:6379")
        return {"type": "redis", "connection_string": connection}
    if kind == "postgres":
        url = urlparse(connection)
        if url.scheme not in ("postgres", "postgresql") or not (url.hostname and url.path.strip("/") and url.username):
            raise ValueError(
                f"a Postgres online store needs XRAYOPS_FEAST_ONLINE_CONNECTION=postgresql://USER@HOST:PORT/DB, got {connection!r}"
            )
        return {"type": "postgres", "host": url.hostname, "port": url.port or 5432,
                "database": url.path.strip("/"), "user": url.username, "password": f"${{{PASSWORD_ENV}}}"}
    raise ValueError(f"unknown online store {kind!r}: use sqlite, redis or postgres")


def feature_store_config(settings: Settings) -> dict:
    root = repo_dir(settings)
    data = root / DATA_DIR
    return {
        "project": settings.feast_project,
        "registry": str(data / "registry.db"),
        "provider": "local",
        "offline_store": {"type": "file"},
        "online_store": online_store_config(settings, data),
        "entity_key_serialization_version": 3,
    }


def write_feature_repo(settings: Settings) -> Path:
    """Create the repo folder with its feature_store.yaml; returns the folder."""
    root = repo_dir(settings)
    (root / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (root / YAML_NAME).write_text(yaml.safe_dump(feature_store_config(settings), sort_keys=False))
    return root
