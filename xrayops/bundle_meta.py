"""The torch-free half of a model bundle: its file names, its metadata and its integrity check.

The registry and the server read bundles without building a model, so this lives apart from
`xrayops.bundle` (which loads weights with torch).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import ValidationError

from xrayops.errors import XrayopsError
from xrayops.contracts import ModelBundleMeta

WEIGHTS = "weights.pt"
META = "bundle.json"


class BundleError(XrayopsError, RuntimeError):
    """The bundle directory is missing, incomplete or unreadable."""


class BundleIntegrityError(BundleError):
    """weights.pt does not match the sha256 recorded in bundle.json."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bundle_meta(bundle_dir: Path) -> ModelBundleMeta:
    path = Path(bundle_dir) / META
    if not path.is_file():
        raise BundleError(f"not a model bundle: {path} is missing")
    try:
        return ModelBundleMeta.model_validate_json(path.read_text())
    except (ValidationError, UnicodeDecodeError) as exc:
        raise BundleError(f"corrupt {path}: {exc}") from exc


def verify_bundle(bundle_dir: Path) -> ModelBundleMeta:
    """The bundle's metadata, after checking that weights.pt hashes to the recorded sha256."""
    bundle_dir = Path(bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    weights = bundle_dir / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"not a model bundle: {weights} is missing")
    if not meta.weights_sha256:  # no recorded hash: nothing to verify against, so never loaded
        raise BundleIntegrityError(f"{bundle_dir / META} records no weights_sha256; an unverifiable bundle is refused")
    actual = file_sha256(weights)
    if actual != meta.weights_sha256:
        raise BundleIntegrityError(
            f"{weights} has sha256 {actual}, which does not match {bundle_dir / META} "
            f"weights_sha256 {meta.weights_sha256!r}"
        )
    return meta
