"""A softmax-average ensemble of model bundles (Langer et al. 2024, "Ensemble": sum the softmax outputs of
the SimCLR, BYOL and SupCon models, then take the argmax; the mean has the same argmax and stays
a probability distribution).

Each member is predicted by `xrayops.inference.predict_arrays`, so calibration (temperature),
the OOD score and the region logic are each member's own; this module only combines them:
  - probabilities: the mean of the members' calibrated softmax;
  - ood_score: each member scores with its own detector (relative Mahalanobis, Mahalanobis, kNN or energy) against
    its own threshold; the ensemble's score is the mean of the members' margins
    (score - threshold), each divided by that member's in-domain spread (`ood_scale`) when every
    member has one (a Mahalanobis distance and a kNN distance live on different scales), and
    the image is flagged when that mean is > 0. Without thresholds: the mean raw score, no flag;
  - orientation_deg: the circular mean of the members that predict an angle (Baltruschat et al. 2018), None
    when none does;
  - label_disagreement: the ensemble's region against the file's tag, at the members' mean
    confidence threshold;
  - findings: per binary head, the mean P(positive) of the members that have it.

A single member is served unchanged (its own responses), so one code path serves both.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from xrayops.errors import XrayopsError
from xrayops.bundle import LoadedBundle
from xrayops.contracts import InferenceResponse, ModelBundleMeta
from xrayops.inference import label_disagreement, model_version, predict_arrays
from xrayops.regions import UNKNOWN


class EnsembleError(XrayopsError, ValueError):
    """Members that cannot be averaged: different classes or preprocessing."""


def check_members(metas: Sequence[ModelBundleMeta]) -> None:
    """Members must share their class list (averaging is per class) and their preprocessing spec
    (one decoded image feeds every member; docs/architecture.md, contract 2)."""
    if not metas:
        raise EnsembleError("an ensemble needs at least one member")
    first = metas[0]
    for i, meta in enumerate(metas[1:], start=1):
        if list(meta.classes) != list(first.classes):
            raise EnsembleError(f"member {i} ({meta.name}) has classes {meta.classes}, member 0 has {first.classes}")
        if meta.preprocessing != first.preprocessing:
            raise EnsembleError(
                f"member {i} ({meta.name}) was trained on another preprocessing spec than member 0; "
                "serve them as separate models"
            )


def average_probabilities(
    member_probabilities: Sequence[np.ndarray], weights: Sequence[float] | None = None
) -> np.ndarray:
    """(Weighted) mean over members of (n_images, n_classes) softmax arrays. The argmax is that
    of Langer et al. 2024's sum; the mean stays a probability distribution."""
    if not member_probabilities:
        raise EnsembleError("no member probabilities to average")
    shapes = {np.shape(p) for p in member_probabilities}
    if len(shapes) != 1:
        raise EnsembleError(f"member probabilities differ in shape: {sorted(shapes)}")
    if len(next(iter(shapes))) != 2:
        raise EnsembleError(f"expected member arrays of shape (n, k), got {next(iter(shapes))}")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in member_probabilities])
    w = np.ones(len(stack)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stack),) or (w < 0).any() or w.sum() <= 0:
        raise EnsembleError(f"need one non-negative weight per member, got {list(w)}")
    return np.tensordot(w / w.sum(), stack, axes=1)


def circular_mean_deg(angles: Sequence[float]) -> float:
    """Mean direction of angles in degrees, in [0, 360): 350 and 10 average to 0, not 180."""
    radians = np.deg2rad(np.asarray(angles, dtype=np.float64))
    mean = np.rad2deg(np.arctan2(np.sin(radians).mean(), np.cos(radians).mean()))
    mean = float(mean % 360.0)
    return 0.0 if mean >= 360.0 - 1e-9 else mean  # -1e-15 % 360 is 360


def ensemble_version(versions: Sequence[str]) -> str:
    """One member: its own version. Several: 12 hex digits over the members' versions, in order."""
    if len(versions) == 1:
        return versions[0]
    return hashlib.sha256("+".join(versions).encode()).hexdigest()[:12]


def combine_responses(
    member_responses: Sequence[Sequence[InferenceResponse]],
    metas: Sequence[ModelBundleMeta],
    model_name: str,
    version: str,
) -> list[InferenceResponse]:
    """One response per image from every member's responses for the same images."""
    check_members(metas)
    if len(member_responses) != len(metas):
        raise EnsembleError(f"{len(member_responses)} member answers for {len(metas)} members")
    if len(metas) == 1:
        return [r.model_copy(update={"model_name": model_name, "model_version": version}) for r in member_responses[0]]
    classes = list(metas[0].classes)
    n_images = {len(r) for r in member_responses}
    if len(n_images) != 1:
        raise EnsembleError(f"members answered for different numbers of images: {sorted(n_images)}")
    probs = average_probabilities(
        [np.array([[r.probabilities[c] for c in classes] for r in responses]) for responses in member_responses]
    )
    thresholds = [m.ood_threshold for m in metas]
    with_thresholds = all(t is not None for t in thresholds)
    scales = [m.ood_scale for m in metas]
    scales = scales if with_thresholds and all(c is not None and c > 0 for c in scales) else [1.0] * len(metas)
    confidence_threshold = float(np.mean([m.confidence_threshold for m in metas]))
    combined = []
    for i, p in enumerate(probs):
        per_member = [responses[i] for responses in member_responses]
        best = int(p.argmax())
        region, confidence = classes[best], float(p[best])
        scores = [r.ood_score for r in per_member]
        ood_score, ood = None, None
        if all(s is not None for s in scores):
            margins = [(s - t) / c for s, t, c in zip(scores, thresholds, scales)] if with_thresholds else scores
            ood_score = float(np.mean(margins))
            ood = ood_score > 0 if with_thresholds else None
        angles = [r.orientation_deg for r in per_member if r.orientation_deg is not None]
        dicom_region = per_member[0].dicom_region or UNKNOWN
        # Each finding: the mean over the members that have that head.
        names = sorted({name for r in per_member for name in r.findings})
        findings = {n: float(np.mean([r.findings[n] for r in per_member if n in r.findings])) for n in names}
        combined.append(
            InferenceResponse(
                region=region,
                confidence=confidence,
                probabilities={c: float(v) for c, v in zip(classes, p)},
                orientation_deg=circular_mean_deg(angles) if angles else None,
                ood_score=ood_score,
                ood=ood,
                dicom_region=dicom_region,
                label_disagreement=label_disagreement(dicom_region, region, confidence, confidence_threshold),
                findings=findings,
                model_name=model_name,
                model_version=version,
            )
        )
    return combined


def predict_ensemble(
    members: Sequence[LoadedBundle],
    arrays: list[np.ndarray],
    dicom_regions: list[str] | None = None,
    model_name: str | None = None,
    version: str | None = None,
) -> tuple[list[InferenceResponse], np.ndarray]:
    """Predict preprocessed images with every member and average them.

    Returns the combined responses and the first member's embeddings (the log keeps one
    embedding per image for drift monitoring; members' embedding spaces are not comparable).
    """
    metas = [m.meta for m in members]
    check_members(metas)
    version = version or ensemble_version([model_version(m) for m in members])
    answers, embeddings = [], None
    for member in members:
        responses, member_embeddings = predict_arrays(member, arrays, dicom_regions)
        answers.append(responses)
        embeddings = member_embeddings if embeddings is None else embeddings
    return combine_responses(answers, metas, model_name or metas[0].name, version), embeddings
