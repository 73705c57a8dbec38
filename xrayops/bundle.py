"""Model bundles: a directory with weights.pt (RegionClassifier state_dict) and bundle.json
(ModelBundleMeta, including the sha256 of weights.pt). Loading refuses weights whose hash
does not match."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from xrayops.bundle_meta import (  # re-exported: callers that load models import them from here
    META,
    WEIGHTS,
    BundleError,
    BundleIntegrityError,
    file_sha256,
    read_bundle_meta,
    verify_bundle,
)
from xrayops.contracts import ModelBundleMeta
from xrayops.models.backbone import build_backbone, save_backbone
from xrayops.models.heads import RegionClassifier

__all__ = [
    "META", "WEIGHTS", "BundleError", "BundleIntegrityError", "LoadedBundle", "export_backbone", "file_sha256",
    "load_bundle", "read_bundle_meta", "save_bundle", "verify_bundle",
]


@dataclass
class LoadedBundle:
    model: RegionClassifier  # in eval mode, on `device`
    meta: ModelBundleMeta
    device: torch.device


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
            "orientation": model.orientation_head is not None,
            "binary_heads": list(model.binary_heads),
        }
    )
    (bundle_dir / META).write_text(meta.model_dump_json(indent=2))
    return meta


def load_bundle(bundle_dir: Path, device: str | torch.device = "cpu") -> LoadedBundle:
    """Verify and load a bundle; the model comes back in eval mode on `device`."""
    bundle_dir = Path(bundle_dir)
    meta = verify_bundle(bundle_dir)
    weights = bundle_dir / WEIGHTS
    try:
        backbone, embedding_dim = build_backbone(meta.arch)
        if embedding_dim != meta.embedding_dim:
            raise ValueError(f"{meta.arch} embeds to {embedding_dim} dims, bundle.json says {meta.embedding_dim}")
        model = RegionClassifier(
            backbone, embedding_dim, len(meta.classes), meta.rotation_average, meta.orientation, meta.binary_heads
        )
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:  # unknown arch, wrong shapes, damaged file
        raise BundleError(
            f"cannot load {weights} as a {meta.arch} RegionClassifier with {len(meta.classes)} classes: {exc}"
        ) from exc
    device = torch.device(device)
    return LoadedBundle(model=model.to(device).eval(), meta=meta, device=device)


def export_backbone(bundle_dir: Path, path: Path) -> Path:
    """Write the bundle's backbone as a backbone.pt (`save_backbone`), after the weights check.

    Retraining starts from the model that serves: its head is retrained (or its backbone warm-
    started) on the new data, so the challenger differs from the champion only by what was learnt.
    """
    loaded = load_bundle(bundle_dir)
    return save_backbone(path, loaded.model.backbone, loaded.meta.arch, loaded.meta.ssl_method)
