"""Classification metrics from a confusion matrix (numpy only: shared with monitoring).

Macro averages and balanced accuracy use the classes that occur (in the truth, or in truth
or prediction for F1), as scikit-learn does; classes absent from both are not scored.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_indices(labels: Sequence, classes: Sequence[str], what: str) -> np.ndarray:
    values = np.asarray(labels)
    if values.dtype.kind in "iu":
        if values.size and (values.min() < 0 or values.max() >= len(classes)):
            raise ValueError(f"{what} holds class ids outside 0..{len(classes) - 1}")
        return values.astype(np.int64)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise ValueError(f"{what} holds labels that are not classes: {unknown[:5]}")
    return np.array([index[str(v)] for v in values], dtype=np.int64)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = truth, columns = prediction."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def cohen_kappa(cm: np.ndarray) -> float:
    n = cm.sum()
    observed = np.trace(cm) / n
    expected = (cm.sum(0) @ cm.sum(1)) / n**2
    return float((observed - expected) / (1 - expected)) if expected < 1 else 0.0


def matthews_corrcoef(cm: np.ndarray) -> float:
    """Multiclass MCC (Gorodkin 2004), as scikit-learn computes it."""
    t, p = cm.sum(1).astype(float), cm.sum(0).astype(float)
    c, s = float(np.trace(cm)), float(cm.sum())
    denominator = np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def expected_calibration_error(y_true: Sequence, y_prob: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-label confidence over equal-width bins (Guo et al. 2017)."""
    y_prob = np.asarray(y_prob, dtype=float)
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return 0.0
    confidence = y_prob.max(1)
    correct = y_prob.argmax(1) == y_true
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        members = bins == b
        ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def classification_metrics(
    y_true: Sequence,
    y_pred: Sequence,
    classes: Sequence[str],
    y_prob: np.ndarray | None = None,
) -> dict:
    """Accuracy, balanced accuracy, macro-F1, Cohen's kappa, MCC, per-class accuracy (recall),
    confusion matrix, support, and the chance levels to beat.

    Labels are class names or class ids into `classes`; `y_prob` (n, n_classes) adds ECE and NLL.
    """
    classes = list(classes)
    t = _as_indices(y_true, classes, "y_true")
    p = _as_indices(y_pred, classes, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} labels, y_pred {len(p)}")
    if len(t) == 0:
        raise ValueError("no labelled examples to score")
    k = len(classes)
    cm = confusion_matrix(t, p, k)
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm).astype(float)
    present = support > 0
    scored = present | (predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=present)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    metrics = {
        "n": int(len(t)),
        "accuracy": float(tp.sum() / len(t)),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[scored].mean()),
        "cohen_kappa": cohen_kappa(cm),
        "mcc": matthews_corrcoef(cm),
        "per_class_accuracy": {classes[i]: float(recall[i]) for i in range(k) if present[i]},
        "support": {classes[i]: int(support[i]) for i in range(k)},
        "confusion_matrix": cm.tolist(),
        "classes": classes,
        # Chance levels: guessing uniformly, and always answering the most frequent class.
        "chance_uniform": 1.0 / k,
        "chance_majority": float(support.max() / len(t)),
    }
    if y_prob is not None:
        y_prob = np.asarray(y_prob, dtype=float)
        if y_prob.shape != (len(t), k):
            raise ValueError(f"y_prob must be ({len(t)}, {k}), got {y_prob.shape}")
        metrics["ece"] = expected_calibration_error(t, y_prob)
        metrics["nll"] = float(-np.log(np.clip(y_prob[np.arange(len(t)), t], 1e-12, None)).mean())
    return metrics
