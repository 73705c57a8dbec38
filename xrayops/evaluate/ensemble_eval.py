"""The softmax-average ensemble of paper 000 ("sum the softmax outputs of the SimCLR, BYOL and
SupCon models, then take the argmax"), evaluation side.

`average_probabilities` is the one combining rule; serving's member averaging can share it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xrayops.contracts import InferenceResponse, ModelBundleMeta
from xrayops.inference import label_disagreement


def average_probabilities(member_probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """(n, k) mean of the members' (n, k) class probabilities (weighted if given). The argmax
    is that of paper 000's sum; the mean stays a probability distribution."""
    stack = np.stack([np.asarray(p, dtype=float) for p in member_probs])
    if stack.ndim != 3:
        raise ValueError(f"expected member arrays of shape (n, k), got {stack.shape[1:]}")
    w = np.ones(len(stack)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(stack),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per member, got {list(w)}")
    return np.tensordot(w / w.sum(), stack, axes=1)


def ensemble_responses(
    member_responses: Sequence[Sequence[InferenceResponse]], metas: Sequence[ModelBundleMeta]
) -> list[InferenceResponse]:
    """One response per image from the members' responses to the same images.

    Region and confidence: the averaged probabilities. Out of domain: when most members say so
    (each against its own threshold); ood_score is the members' mean energy. Orientation: the
    circular mean of the members that estimate it.
    """
    classes = list(metas[0].classes)
    probs = average_probabilities(
        [np.array([[r.probabilities[c] for c in classes] for r in responses]) for responses in member_responses]
    )
    threshold = min(m.confidence_threshold for m in metas)
    out = []
    for i, p in enumerate(probs):
        members = [responses[i] for responses in member_responses]
        best = int(p.argmax())
        flags = [m.ood for m in members if m.ood is not None]
        scores = [m.ood_score for m in members if m.ood_score is not None]
        angles = np.deg2rad([m.orientation_deg for m in members if m.orientation_deg is not None])
        orientation = float(np.rad2deg(np.arctan2(np.sin(angles).sum(), np.cos(angles).sum())) % 360) if len(angles) else None
        dicom_region = members[0].dicom_region
        out.append(
            InferenceResponse(
                region=classes[best],
                confidence=float(p[best]),
                probabilities={c: float(v) for c, v in zip(classes, p)},
                orientation_deg=orientation,
                ood_score=float(np.mean(scores)) if scores else None,
                ood=(2 * sum(flags) > len(flags)) if flags else None,
                dicom_region=dicom_region,
                label_disagreement=label_disagreement(dicom_region, classes[best], float(p[best]), threshold),
                model_name="ensemble",
                model_version="+".join(m.model_version for m in members),
            )
        )
    return out
