"""Predictions from a loaded model bundle: region, calibrated confidence, out-of-domain score,
and whether the image's own PACS tag disagrees with a confident prediction (Langer et al. 2024: such
disagreements found the wrong labels)."""
from __future__ import annotations

import numpy as np
import torch
from pydicom.dataset import Dataset

from xrayops.errors import XrayopsError
from xrayops.bundle import LoadedBundle
from xrayops.contracts import InferenceLogRecord, InferenceResponse
from xrayops.refusals import not_applicable, with_refusals
from xrayops.inference_log import build_records
from xrayops.data.dataset import to_unit_float
from xrayops.models.heads import energy_score, vector_to_angle
from xrayops.models.ood import ood_scores
from xrayops.models.ood_features import StageCapture, view_features
from xrayops.regions import UNKNOWN


class InferenceInputError(XrayopsError, ValueError):
    """An input image that cannot be predicted, with its position in the request."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"input {index}: {reason}")
        self.index = index
        self.reason = reason


def model_version(bundle: LoadedBundle) -> str:
    """Content-addressed version: the first 12 hex digits of the weights' sha256."""
    return bundle.meta.weights_sha256[:12]


def validate_array(index: int, array: np.ndarray, size: int) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != (size, size):
        raise InferenceInputError(
            index, f"expected a preprocessed ({size}, {size}) image, got shape {array.shape}"
        )
    if array.dtype not in (np.uint8, np.uint16) and array.dtype.kind != "f":
        raise InferenceInputError(index, f"pixel dtype {array.dtype} is not uint8, uint16 or float")
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise InferenceInputError(index, "float pixels must be finite and within [0, 1]")
    return array


def label_disagreement(dicom_region: str, region: str, confidence: float, threshold: float) -> bool:
    """The file's own region tag is known, differs from the prediction, and the model is confident."""
    return dicom_region != UNKNOWN and dicom_region != region and confidence >= threshold


@torch.inference_mode()
def forward_batch(bundle: LoadedBundle, batch: torch.Tensor, capture: StageCapture | None, reuse_turns: bool):
    """(logits, region embedding, orientation or None, OOD features or None) of one batch: the
    region pass, with the stages `capture` records, then the test-time views when the bundle has them."""
    captured = None
    if capture is None:
        logits, embeddings, orientation = bundle.model.forward_all(batch)
    else:
        with capture:
            logits, embeddings, orientation = bundle.model.forward_all(batch)
        captured = capture.features(len(batch), bundle.model.rotation_average)
    if bundle.ood is not None and bundle.meta.ood_zooms:
        captured = view_features(bundle.model.backbone, batch, bundle.meta.ood_stages, bundle.meta.ood_zooms,
                                 plain_turns=captured if reuse_turns else None)
    return logits, embeddings, orientation, captured


@torch.inference_mode()
def predict_arrays(
    bundle: LoadedBundle,
    arrays: list[np.ndarray],
    dicom_regions: list[str] | None = None,
    batch_size: int = 64,
    version: str | None = None,
) -> tuple[list[InferenceResponse], np.ndarray]:
    """Predict preprocessed images (spec size, uint8/uint16 or float in [0, 1]).

    `dicom_regions` are the images' normalised PACS regions (or "unknown"), for the
    label_disagreement flag. Returns the responses and the embeddings (n, embedding_dim).
    """
    meta = bundle.meta
    if dicom_regions is not None and len(dicom_regions) != len(arrays):
        raise ValueError(f"{len(arrays)} images but {len(dicom_regions)} dicom_regions")
    size = meta.preprocessing.size
    images = [to_unit_float(validate_array(i, a, size)) for i, a in enumerate(arrays)]
    logits, embeddings, orientations, findings, ood_features = [], [], [], [], []
    # A multi-stage detector's features come from the region pass itself (hooks). Test-time views
    # need a pass of their own, but the four plain turns at zoom 1 are the rotation-averaged region
    # pass's inputs: captured there, not computed twice.
    views = bundle.ood is not None and bool(meta.ood_zooms)
    reuse_turns = views and bundle.model.rotation_average and 1.0 in meta.ood_zooms
    capture = (StageCapture(bundle.model.backbone, meta.ood_stages)
               if bundle.ood is not None and meta.ood_stages and (reuse_turns or not views) else None)
    for start in range(0, len(images), batch_size):
        batch = torch.stack(images[start : start + batch_size]).unsqueeze(1).to(bundle.device)
        batch_logits, batch_embeddings, batch_orientation, captured = forward_batch(bundle, batch, capture, reuse_turns)
        if captured is not None:
            ood_features.append(captured.float().cpu())
        logits.append(batch_logits.float().cpu())
        embeddings.append(batch_embeddings.float().cpu())
        if batch_orientation is not None:
            orientations.append(vector_to_angle(batch_orientation.float().cpu()))
        findings.append({k: v.float().cpu() for k, v in bundle.model.binary_probabilities(batch_embeddings).items()})
    if not images:
        return [], np.zeros((0, meta.embedding_dim), dtype=np.float32)
    logits_t = torch.cat(logits)
    angles = torch.cat(orientations).tolist() if orientations else [None] * len(images)
    positive = {name: torch.cat([f[name] for f in findings]).tolist() for name in meta.binary_heads}
    probabilities = torch.softmax(logits_t / meta.temperature, dim=1).numpy()
    embeddings_t = torch.cat(embeddings)
    # The bundle's feature-space detector (Lee et al. 2018 / Sun et al. 2022) on the region
    # embedding or pooled stages; bundles without one serve the energy of the logits as before.
    if bundle.ood is not None:
        scores = ood_scores(bundle.ood, (torch.cat(ood_features) if ood_features else embeddings_t).numpy())
    else:
        scores = energy_score(logits_t, meta.temperature).numpy()
    version = version if version is not None else model_version(bundle)

    responses = []
    for i, probs in enumerate(probabilities):
        best = int(probs.argmax())
        region, confidence = meta.classes[best], float(probs[best])
        dicom_region = (dicom_regions[i] if dicom_regions else UNKNOWN) or UNKNOWN
        if dicom_region not in meta.classes:
            dicom_region = UNKNOWN
        score = float(scores[i])
        responses.append(
            InferenceResponse(
                region=region,
                confidence=confidence,
                probabilities={c: float(p) for c, p in zip(meta.classes, probs)},
                orientation_deg=angles[i],
                ood_score=score,
                ood=None if meta.ood_threshold is None else score > meta.ood_threshold,
                dicom_region=dicom_region,
                label_disagreement=label_disagreement(dicom_region, region, confidence, meta.confidence_threshold),
                findings={name: float(p[i]) for name, p in positive.items()},
                model_name=meta.name,
                model_version=version,
            )
        )
    return responses, embeddings_t.numpy()


def predict_datasets(
    bundle: LoadedBundle,
    datasets: list[Dataset],
    request_id: str,
    key: str | None = None,
    version: str | None = None,
) -> tuple[list[InferenceResponse], list[InferenceLogRecord]]:
    """Preprocess DICOM datasets exactly as ingestion did (the bundle's spec), predict, and
    build one log record per predicted image for monitoring. `key` pseudonymises ids (default:
    settings). A dataset the bundle's admission policy refuses is answered not applicable (no
    region, no log record).

    Raises InferenceInputError naming the first image that cannot be decoded.
    """
    from xrayops.dicom.admission import admit
    from xrayops.dicom.decode import DicomError
    from xrayops.dicom.deid import safe_metadata
    from xrayops.dicom.labels import region_from_dataset
    from xrayops.dicom.pixels import preprocess

    if key is None:
        from xrayops.config import get_settings
        from xrayops.dicom.deid import require_key

        key = require_key(get_settings())
    spec = bundle.meta.preprocessing
    version = version if version is not None else model_version(bundle)
    arrays, regions, metadata, refusals = [], [], [], {}
    for i, ds in enumerate(datasets):
        admission = admit(ds, spec.admission, "inference")
        if not admission.admitted:
            refusals[i] = not_applicable(admission, bundle.meta.name, version)
            continue
        try:
            arrays.append(preprocess(ds, spec))
        except DicomError as exc:
            raise InferenceInputError(i, f"{exc.reason}: {exc.detail}") from exc
        regions.append(region_from_dataset(ds).region)
        metadata.append(safe_metadata(ds, key))
    responses, embeddings = predict_arrays(bundle, arrays, regions, version=version) if arrays else ([], None)
    records = build_records(responses, arrays, embeddings, request_id, metadata) if arrays else []
    return with_refusals(responses, refusals), records
