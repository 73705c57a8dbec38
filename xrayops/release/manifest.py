"""InferenceService manifests on disk, read and written round trip: a GitOps repository's
manifest keeps its comments and layout, and only the fields a release changes differ."""
from __future__ import annotations

from pathlib import Path
from typing import TextIO

from xrayops.release.plan import ReleaseError


def _yaml():
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # the repository's manifest style
    return rt


def read_inference_service(path: Path) -> dict:
    if not Path(path).is_file():
        raise ReleaseError(f"manifest {path} not found")
    docs = [d for d in _yaml().load_all(Path(path).read_text()) if d and d.get("kind") == "InferenceService"]
    if len(docs) != 1:
        raise ReleaseError(f"{path} must hold exactly one InferenceService, found {len(docs)}")
    return docs[0]


def dump_inference_service(isvc: dict, stream: TextIO) -> None:
    _yaml().dump(isvc, stream)


def write_inference_service(isvc: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        dump_inference_service(isvc, handle)
