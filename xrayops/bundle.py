"""Model bundles: a directory with weights.pt (RegionClassifier state_dict, plus the arrays of a
feature-space out-of-domain detector under `ood_detector.*`) and bundle.json (ModelBundleMeta,
including the sha256 of weights.pt). Loading refuses weights whose hash does not match.

The detector's arrays live in weights.pt rather than in a file of their own so that the one
hash covers them and every copy of a bundle (registry, releases) carries them unchanged."""
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
from xrayops.models.ood import STATE_PREFIX, OodDetector, OodError, detector_from_state, detector_state
from xrayops.models.ood_features import stages_width

__all__ = [
    "META", "WEIGHTS", "BundleError", "BundleIntegrityError", "LoadedBundle", "export_backbone", "file_sha256",
    "load_bundle", "read_bundle_meta", "save_bundle", "verify_bundle",
]


@dataclass
class LoadedBundle:
    model: RegionClassifier  # in eval mode, on `device`
    meta: ModelBundleMeta
    device: torch.device
    # The feature-space OOD detector (meta.ood_method other than "energy"); None: energy score.
    ood: OodDetector | None = None


def save_bundle(
    bundle_dir: Path, model: RegionClassifier, meta: ModelBundleMeta, ood: OodDetector | None = None
) -> ModelBundleMeta:
    """Write weights.pt and bundle.json; returns the meta as written (with weights_sha256).

    With `ood`, its arrays go into weights.pt and meta.ood_method/ood_k are taken from it
    (meta.ood_threshold must then be a threshold of its scores, meta.ood_stages name its
    features); without, the bundle serves the energy score."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    if ood is None and meta.ood_method != "energy":
        raise BundleError(f"bundle.json names the {meta.ood_method} OOD detector but none was given to save")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if ood is not None:
        expected = ood_width(model, meta)
        if ood.dim != expected:
            raise BundleError(f"the OOD detector has {ood.dim} dimensions, its features {expected}")
        state.update(detector_state(ood))
    torch.save(state, bundle_dir / WEIGHTS)
    meta = meta.model_copy(
        update={
            "weights_sha256": file_sha256(bundle_dir / WEIGHTS),
            "created_at": meta.created_at or datetime.now(timezone.utc),
            "rotation_average": model.rotation_average,  # how the weights must be used
            "orientation": model.orientation_head is not None,
            "binary_heads": list(model.binary_heads),
            "ood_method": ood.method if ood is not None else "energy",
            "ood_k": ood.k if ood is not None else 0,
            "ood_stages": list(meta.ood_stages) if ood is not None else [],
            "ood_zooms": list(meta.ood_zooms) if ood is not None else [],
        }
    )
    (bundle_dir / META).write_text(meta.model_dump_json(indent=2))
    return meta


def ood_width(model: RegionClassifier, meta: ModelBundleMeta) -> int:
    """Dimensions of the features the OOD detector scores: the named stages, else the embedding."""
    return stages_width(model.backbone, meta.ood_stages) if meta.ood_stages else meta.embedding_dim


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
        state = torch.load(weights, map_location="cpu", weights_only=True)
        detector = {k: state.pop(k) for k in [k for k in state if k.startswith(STATE_PREFIX)]}
        model.load_state_dict(state)
    except Exception as exc:  # unknown arch, wrong shapes, damaged file
        raise BundleError(
            f"cannot load {weights} as a {meta.arch} RegionClassifier with {len(meta.classes)} classes: {exc}"
        ) from exc
    ood = None
    if meta.ood_method != "energy":
        try:
            ood = detector_from_state(detector, meta.ood_method, meta.ood_k)
        except OodError as exc:
            raise BundleError(f"{weights}: {exc}") from exc
        try:
            expected = ood_width(model, meta)
        except ValueError as exc:
            raise BundleError(f"{META}: OOD stages {meta.ood_stages} are not stages of {meta.arch}: {exc}") from exc
        if ood.dim != expected:
            raise BundleError(f"{weights}: the OOD detector has {ood.dim} dimensions, its features {expected}")
    device = torch.device(device)
    return LoadedBundle(model=model.to(device).eval(), meta=meta, device=device, ood=ood)


def export_backbone(bundle_dir: Path, path: Path) -> Path:
    """Write the bundle's backbone as a backbone.pt (`save_backbone`), after the weights check.

    Retraining starts from the model that serves: its head is retrained (or its backbone warm-
    started) on the new data, so the challenger differs from the champion only by what was learnt.
    """
    loaded = load_bundle(bundle_dir)
    return save_backbone(path, loaded.model.backbone, loaded.meta.arch, loaded.meta.ssl_method)
