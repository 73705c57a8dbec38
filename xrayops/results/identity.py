"""Which model answered: what an SR's Algorithm Identification (TID 4019) says.

Built by the server from what it loaded (the bundles' weights hashes, and the serving release the
folders came from with its members' registry versions), never from anything the client sent.
"""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from xrayops.contracts import ModelBundleMeta
from xrayops.release.plan import Release

MANUFACTURER = "xrayops"


class AlgorithmIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # the served model name
    version: str  # the served version (weights content hash, or the one the server was given)
    registry_versions: tuple[str, ...] = ()  # models:/NAME/VERSION of each member, when served from a release
    release_id: str = ""  # the serving release (xrayops.release), "" for a bundle served from a training run
    weights_sha256: tuple[str, ...] = Field(default_factory=tuple)  # each member's, in member order

    def parameters(self) -> list[str]:
        """TID 4019 Algorithm Parameters: one line each, "key value"."""
        lines = [f"registry version {v}" for v in self.registry_versions] or ["registry version none"]
        lines.append(f"release {self.release_id or 'none'}")
        lines += [f"weights sha256 {h}" for h in self.weights_sha256]
        return lines


def identity_of(
    name: str, version: str, metas: Sequence[ModelBundleMeta], release: Release | None = None
) -> AlgorithmIdentity:
    """The identity of a server's members; a release gives every member's registry version and hash
    (the DICOM transformer loads one member's bundle but knows the release's)."""
    if release is not None:
        return AlgorithmIdentity(
            name=name, version=version, release_id=release.release_id,
            registry_versions=tuple(m.model_uri for m in release.members),
            weights_sha256=tuple(m.weights_sha256 for m in release.members),
        )
    return AlgorithmIdentity(name=name, version=version, weights_sha256=tuple(m.weights_sha256 for m in metas))
