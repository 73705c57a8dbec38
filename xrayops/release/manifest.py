"""InferenceService manifests on disk, read and written round trip: a GitOps repository's
manifest keeps its comments and layout, and only the fields a release changes differ. A manifest
may hold several documents (serving/inferencegraph.yaml: one InferenceService per member, a
combiner and the graph)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import TextIO

from xrayops.release.plan import ReleaseError, live_release_id


# The repository's single-pod InferenceService (absent from an installed package, which has no infra/).
REPO_MANIFEST = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "base" / "serving" / "inferenceservice.yaml"


def _yaml():
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # the repository's manifest style
    return rt


def read_manifest(path: Path) -> list[dict]:
    """Every document of the manifest; it must hold at least one InferenceService."""
    if not Path(path).is_file():
        raise ReleaseError(f"manifest {path} not found")
    docs = [d for d in _yaml().load_all(Path(path).read_text()) if d is not None]
    if not any(isinstance(d, dict) and d.get("kind") == "InferenceService" for d in docs):
        raise ReleaseError(f"{path} holds no InferenceService")
    return docs


def primary_service(docs: list[dict]) -> dict:
    """The InferenceService whose annotations say what is live (all of a manifest's say the same
    after a release); the first one before any release."""
    services = [d for d in docs if d.get("kind") == "InferenceService"]
    return next((d for d in services if live_release_id(d)), services[0])


def dump_manifest(docs: list[dict], stream: TextIO) -> None:
    _yaml().dump_all(docs, stream)


def write_manifest(docs: list[dict], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    dump_manifest(docs, buffer)
    path.write_text(buffer.getvalue())
