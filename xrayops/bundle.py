"""Model bundles: a directory with weights.pt (RegionClassifier state_dict) and bundle.json
(ModelBundleMeta, including the sha256 of weights.pt). Loading refuses weights whose hash
does not match."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import ValidationError

from xrayops.contracts import ModelBundleMeta
from xrayops.models.backbone import build_backbone
from xrayops.models.heads import RegionClassifier

WEIGHTS = "weights.pt"
META = "bundle.json"


class BundleError(RuntimeError):
    """The bundle directory is missing, incomplete or unreadable."""


class BundleIntegrityError(BundleError):
    """weights.pt does not match the sha256 recorded in bundle.json."""


@dataclass
class LoadedBundle:
    model: RegionClassifier  # in eval mode, on `device`
    meta: ModelBundleMeta
    device: torch.device


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_bundle(bundle_dir: Path, model: RegionClassifier, meta: ModelBundleMeta) -> ModelBundleMeta:
    """Write weights.pt and bundle.json; returns the meta as written (with weights_sha256)."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, bundle_dir / WEIGHTS)
    meta = meta.model_copy(
        update={
            "weights_sha256": file_sha256(bundle_dir / WEIGHTS),
            "created_at": meta.created_at or datetime.now(timezone.utc),
            "rotation_average": model.rotation_average,  # how the weights must be used
        }
    )
    (bundle_dir / META).write_text(meta.model_dump_json(indent=2))
    return meta


def read_bundle_meta(bundle_dir: Path) -> ModelBundleMeta:
    path = Path(bundle_dir) / META
    if not path.is_file():
        raise BundleError(f"not a model bundle: {path} is missing")
    try:
        return ModelBundleMeta.model_validate_json(path.read_text())
    except (ValidationError, UnicodeDecodeError) as exc:
        raise BundleError(f"corrupt {path}: {exc}") from exc


def load_bundle(bundle_dir: Path, device: str | torch.device = "cpu") -> LoadedBundle:
    """Verify and load a bundle; the model comes back in eval mode on `device`."""
    bundle_dir = Path(bundle_dir)
    meta = read_bundle_meta(bundle_dir)
    weights = bundle_dir / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"not a model bundle: {weights} is missing")
    actual = file_sha256(weights)
    if actual != meta.weights_sha256:
        raise BundleIntegrityError(
            f"{weights} has sha256 {actual}, but {bundle_dir / META} records {meta.weights_sha256!r}"
        )
    try:
        backbone, embedding_dim = build_backbone(meta.arch)
        if embedding_dim != meta.embedding_dim:
            raise ValueError(f"{meta.arch} embeds to {embedding_dim} dims, bundle.json says {meta.embedding_dim}")
        model = RegionClassifier(backbone, embedding_dim, len(meta.classes), meta.rotation_average)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:  # unknown arch, wrong shapes, damaged file
        raise BundleError(
            f"cannot load {weights} as a {meta.arch} RegionClassifier with {len(meta.classes)} classes: {exc}"
        ) from exc
    device = torch.device(device)
    return LoadedBundle(model=model.to(device).eval(), meta=meta, device=device)
