"""Classification metrics from a confusion matrix (numpy only: shared with monitoring), and
metrics.json as a typed document (EvaluationMetrics).

Macro averages and balanced accuracy use the classes that occur (in the truth, or in truth
or prediction for F1), as scikit-learn does; classes absent from both are not scored.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from xrayops.evaluate.intervals import ClassificationIntervals, MetricCI
from xrayops.evaluate.subgroups import SubgroupAccuracy


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


# --- binary heads (abnormality, implant: Acitores 2022; Ghalyan et al.), with bootstrap confidence intervals ---


def roc_auc(y_true: Sequence, score: Sequence) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half
    (the Mann-Whitney U statistic, equal to scikit-learn's roc_auc_score). NaN if one class is absent."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y_true: Sequence, score: Sequence, threshold: float = 0.5) -> dict[str, float]:
    """AUC, sensitivity (recall of positives) and specificity (recall of negatives) at `threshold`."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true {y.shape} and score {s.shape} must be equal 1-d shapes")
    predicted = s >= threshold
    return {
        "auc": roc_auc(y, s),
        "sensitivity": float(predicted[y].mean()) if y.any() else float("nan"),
        "specificity": float((~predicted[~y]).mean()) if (~y).any() else float("nan"),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
    }


def bootstrap_ci(
    statistic, arrays: Sequence[np.ndarray], n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*arrays)` over resampled rows (Efron 1979).

    Resamples where the statistic is undefined (NaN, e.g. no positives drawn) are skipped.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        index = rng.integers(0, n, n)
        value = statistic(*(a[index] for a in arrays))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def auroc_ci(
    y_true: Sequence, score: Sequence, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC, positives and negatives resampled apart
    (stratified): each resample keeps both groups' sizes, so none is undefined, which matters
    when positives are few (a handful of out-of-domain images in a test split)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=float)
    positives, negatives = s[y], s[~y]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    values = [
        roc_auc(labels, np.r_[rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))])
        for _ in range(n_boot)
    ]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def binary_metrics_with_ci(
    y_true: Sequence, score: Sequence, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0
) -> dict:
    """binary_metrics plus 95 % bootstrap intervals (`auc_ci`, ...), as Acitores 2022 reports them."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=float)
    out: dict = binary_metrics(y, s, threshold)
    for key in ("auc", "sensitivity", "specificity"):
        out[f"{key}_ci"] = list(
            bootstrap_ci(lambda yy, ss, k=key: binary_metrics(yy, ss, threshold)[k], [y, s], n_boot, seed=seed)
        )
    out["threshold"] = threshold
    return out


# --- orientation (Baltruschat et al. 2018) ---


def orientation_metrics(predicted_deg: Sequence, true_deg: Sequence, tolerance: float = 4.0) -> dict[str, float]:
    """Mean absolute angular error (on the circle) and the share within +-tolerance degrees
    (Baltruschat et al. 2018: MAE 2.79 deg, 84.4 % within +-4 deg after fine-tuning)."""
    p = np.asarray(predicted_deg, dtype=float)
    t = np.asarray(true_deg, dtype=float)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"need equal, non-empty shapes, got {p.shape} and {t.shape}")
    diff = (p - t) % 360.0
    error = 180.0 - np.abs(180.0 - diff)
    return {
        "orientation_mae_deg": float(error.mean()),
        "orientation_median_error_deg": float(np.median(error)),
        f"orientation_within_{tolerance:g}deg": float((error <= tolerance).mean()),
        # Baltruschat et al. 2018 also bins into the four right-angle orientations.
        "orientation_quadrant_accuracy": float((np.round(p / 90.0) % 4 == np.round(t / 90.0) % 4).mean()),
        "orientation_n": int(p.size),
    }


# --- metrics.json as a typed document ---

class ScoreTable(BaseModel):
    """One `classification_metrics` result (predictions vs one reference: the PACS tags or the
    truth) with its study-bootstrap intervals and its subgroups. Unnamed keys are kept."""

    model_config = ConfigDict(extra="allow")

    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    cohen_kappa: float
    mcc: float
    per_class_accuracy: dict[str, float]
    support: dict[str, int]
    confusion_matrix: list[list[int]]
    classes: list[str]
    chance_uniform: float
    chance_majority: float
    ece: float | None = None
    ece_uncalibrated: float | None = None
    nll: float | None = None
    intervals: ClassificationIntervals | None = None
    subgroups: list[SubgroupAccuracy] = []

    def ci(self, name: str) -> MetricCI:
        """The metric with its interval (the point estimate alone where none was computed)."""
        if self.intervals is not None:
            return getattr(self.intervals, name)
        return MetricCI(value=getattr(self, name))


class EvaluationMetrics(BaseModel):
    """metrics.json of `xrayops evaluate`: flat headline numbers on top (vs the PACS tags
    unprefixed, vs the truth as `truth_*`, with `<metric>_ci_low/_ci_high`) for lineage and
    MLflow, the full tables under `vs_pacs` / `vs_truth`. Keys not named here (OOD, orientation,
    binary heads, ensemble members) are kept as written."""

    model_config = ConfigDict(extra="allow")

    split: str = ""
    model: str = ""
    weights_sha256: str = ""
    n_images: int = 0
    n_pacs_labelled: int = 0
    ood_rate: float | None = None
    label_disagreement_rate: float | None = None
    vs_pacs: ScoreTable | None = None
    vs_truth: ScoreTable | None = None

    def table(self, reference: str = "") -> ScoreTable | None:
        """The scoring against `reference` ("truth" or "pacs"); by default the truth where known."""
        if reference == "pacs":
            return self.vs_pacs
        if reference == "truth":
            return self.vs_truth
        return self.vs_truth or self.vs_pacs


def read_evaluation(path) -> EvaluationMetrics:
    """A metrics.json written by the evaluation (older files without intervals read back too)."""
    import json
    from pathlib import Path

    return EvaluationMetrics.model_validate(json.loads(Path(path).read_text()))
