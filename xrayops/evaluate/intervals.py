"""Bootstrap confidence intervals that respect studies (numpy only).

Images of one study share a patient, a detector and a technologist, so their outcomes are
correlated: resampling images treats them as independent and gives intervals that are too
narrow. Here the unit of resampling is the study (the cluster bootstrap; Field and Welsh 2007),
optionally stratified (each stratum, e.g. a study's reference class, keeps its own number of
studies in every replicate, so rare classes never vanish from a resample; Davison and Hinkley
1997). Intervals are percentile intervals (Efron 1979).

Every statistic here is a function of per-study SUMS (a confusion matrix is the sum of its
studies' confusion matrices; an accuracy is correct images over images), so a replicate is a
weighted sum: W (replicates x studies, how often each study was drawn) @ per-study sums. That
makes 2,000 replicates of a 14-class confusion matrix a single matrix product.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel

# Bound the replicate weight matrix (replicates x studies) to about this many entries per chunk.
_CHUNK_ENTRIES = 2_000_000


class MetricCI(BaseModel):
    """A point estimate with its bootstrap interval; low/high are None where no interval exists
    (fewer than two studies, or the statistic undefined in every replicate)."""

    value: float | None
    low: float | None = None
    high: float | None = None

    def format(self, digits: int = 3) -> str:
        if self.value is None:
            return "n/a"
        text = f"{self.value:.{digits}f}"
        if self.low is not None and self.high is not None:
            text += f" [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return text


def cluster_sums(clusters: Sequence, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids sorted, per-cluster column sums of `values` (n, d))."""
    ids, inverse = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if len(values) != len(inverse):
        raise ValueError(f"{len(inverse)} cluster ids for {len(values)} rows")
    sums = np.zeros((len(ids), values.shape[1]))
    np.add.at(sums, inverse, values)
    return ids, sums


def _weights(strata_index: list[np.ndarray], n_clusters: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, n_clusters) draw counts: each stratum's clusters drawn with replacement, as
    many as the stratum holds."""
    w = np.zeros((replicates, n_clusters))
    for members in strata_index:
        size = len(members)
        drawn = rng.integers(0, size, (replicates, size)) + (np.arange(replicates) * size)[:, None]
        w[:, members] = np.bincount(drawn.ravel(), minlength=replicates * size).reshape(replicates, size)
    return w


def bootstrap_replicates(
    sums: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], strata: Sequence | None = None,
    samples: int = 2000, seed: int = 0,
) -> np.ndarray:
    """`statistic` of the resampled totals, one row per replicate. `sums` are per-cluster sums
    (clusters, d); `statistic` maps totals (r, d) to (r,) or (r, m) values, NaN where undefined."""
    sums = np.asarray(sums, dtype=np.float64)
    if sums.ndim != 2 or len(sums) == 0:
        raise ValueError(f"need per-cluster sums of shape (clusters, d), got {sums.shape}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    labels = np.zeros(len(sums), dtype=int) if strata is None else np.unique(np.asarray(strata, dtype=str),
                                                                            return_inverse=True)[1]
    if len(labels) != len(sums):
        raise ValueError(f"{len(labels)} strata for {len(sums)} clusters")
    strata_index = [np.flatnonzero(labels == s) for s in np.unique(labels)]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ENTRIES // len(sums))
    parts = []
    for start in range(0, samples, chunk):
        w = _weights(strata_index, len(sums), min(chunk, samples - start), rng)
        parts.append(np.asarray(statistic(w @ sums), dtype=np.float64))
    return np.concatenate(parts)


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the (1-confidence)/2 and (1+confidence)/2 quantiles of the finite replicates
    (NaN where a column has none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(replicates, dtype=np.float64)
    values = values[:, None] if values.ndim == 1 else values
    alpha = (1 - confidence) / 2
    low, high = np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        finite = values[np.isfinite(values[:, j]), j]
        if len(finite):
            low[j], high[j] = np.quantile(finite, [alpha, 1 - alpha])
    return low, high


def _ci(value: float, low: float, high: float, n_clusters: int) -> MetricCI:
    value = None if value is None or not np.isfinite(value) else float(value)
    if value is None or n_clusters < 2 or not (np.isfinite(low) and np.isfinite(high)):
        return MetricCI(value=value)
    return MetricCI(value=value, low=float(low), high=float(high))


# --- ratios: accuracy of a subgroup, the paired accuracy difference ---


def ratio_interval(
    numerator: np.ndarray, denominator: np.ndarray, clusters: Sequence, strata: Sequence | None = None,
    samples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> MetricCI:
    """sum(numerator) / sum(denominator) with a cluster-bootstrap interval: an accuracy
    (numerator: 1 per correct image, denominator: 1 per image), or a mean paired difference.
    `strata` is per row and must be constant within a cluster (the cluster's first row counts)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    if numerator.shape != denominator.shape or numerator.ndim != 1 or len(numerator) == 0:
        raise ValueError(f"need equally long, non-empty vectors, got {numerator.shape} and {denominator.shape}")
    ids, sums = cluster_sums(clusters, np.c_[numerator, denominator])
    value = sums[:, 0].sum() / sums[:, 1].sum()
    cluster_strata = None if strata is None else per_cluster(clusters, strata)
    reps = bootstrap_replicates(sums, lambda t: t[:, 0] / np.where(t[:, 1] > 0, t[:, 1], np.nan), cluster_strata,
                                samples, seed)
    low, high = percentile_interval(reps, confidence)
    return _ci(value, low[0], high[0], len(ids))


def per_cluster(clusters: Sequence, values: Sequence) -> np.ndarray:
    """One value per cluster (sorted by id as `cluster_sums` orders them): the first row's."""
    ids, first = np.unique(np.asarray(clusters, dtype=str), return_index=True)
    return np.asarray(values, dtype=str)[first]


def commonest_per_cluster(clusters: Sequence, labels: Sequence) -> np.ndarray:
    """Each cluster's commonest label (ties: the smallest), sorted by cluster id: a study's
    stratum is its reference class."""
    clusters = np.asarray(clusters, dtype=str)
    labels = np.asarray(labels, dtype=str)
    ids, c_index = np.unique(clusters, return_inverse=True)
    names, l_index = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(ids), len(names)), dtype=np.int64)
    np.add.at(counts, (c_index, l_index), 1)
    return names[counts.argmax(1)]


# --- the classification metrics of xrayops.evaluate.metrics, on a batch of confusion matrices ---


def batch_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro-F1, Cohen's kappa, MCC and per-class recall of a batch
    of confusion matrices (r, k, k), rows = truth, with the conventions of
    `classification_metrics` (macro averages over the classes that occur; recall NaN for a
    class absent from the truth; kappa and MCC 0 where undefined)."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum((1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(2), cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        r0 = np.nan_to_num(recall)
        f1 = np.where(precision + r0 > 0, 2 * precision * r0 / (precision + r0), 0.0)
        scored = (support > 0) | (predicted > 0)
        accuracy = tp.sum(1) / n
        present = support > 0
        balanced = np.where(present, np.nan_to_num(recall), 0).sum(1) / present.sum(1)
        macro_f1 = np.where(scored, f1, 0).sum(1) / scored.sum(1)
        expected = (support * predicted).sum(1) / n**2
        kappa = np.where(expected < 1, (accuracy - expected) / (1 - expected), 0.0)
        c, s = tp.sum(1), n
        denominator = np.sqrt((s**2 - (predicted**2).sum(1)) * (s**2 - (support**2).sum(1)))
        mcc = np.where(denominator > 0, (c * s - (support * predicted).sum(1)) / denominator, 0.0)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": macro_f1, "cohen_kappa": kappa,
            "mcc": mcc, "recall": recall}


HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "cohen_kappa", "mcc")


class ClassificationIntervals(BaseModel):
    """Stratified study-bootstrap intervals of one scoring (predictions vs one reference)."""

    method: str = "percentile bootstrap over studies, stratified by the study's reference class"
    confidence: float
    samples: int
    n_images: int
    n_studies: int
    accuracy: MetricCI
    balanced_accuracy: MetricCI
    macro_f1: MetricCI
    cohen_kappa: MetricCI
    mcc: MetricCI
    per_class_recall: dict[str, MetricCI]


def classification_intervals(
    y_true: Sequence[int], y_pred: Sequence[int], n_classes: int, classes: Sequence[str], studies: Sequence,
    samples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> ClassificationIntervals:
    """Intervals for the headline metrics and each present class's recall; `y_true`/`y_pred` are
    class ids, `studies` the study of each image."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or len(t) != len(studies) or len(t) == 0:
        raise ValueError(f"need equally long, non-empty y_true, y_pred and studies, got {len(t)}, {len(p)}, {len(studies)}")
    k = n_classes
    cells = np.zeros((len(t), k * k))
    cells[np.arange(len(t)), t * k + p] = 1.0
    ids, sums = cluster_sums(studies, cells)
    strata = commonest_per_cluster(studies, t.astype(str))
    point = batch_metrics(sums.sum(0).reshape(1, k, k))
    reps = bootstrap_replicates(
        sums, lambda totals: _stacked(batch_metrics(totals.reshape(-1, k, k))), strata, samples, seed)
    low, high = percentile_interval(reps, confidence)
    values = _stacked(point)[0]
    cis = [_ci(v, lo, hi, len(ids)) for v, lo, hi in zip(values, low, high)]
    present = np.flatnonzero(np.isfinite(point["recall"][0]))
    return ClassificationIntervals(
        confidence=confidence, samples=samples, n_images=len(t), n_studies=len(ids),
        **dict(zip(HEADLINE, cis[: len(HEADLINE)])),
        per_class_recall={classes[i]: cis[len(HEADLINE) + i] for i in present},
    )


def _stacked(metrics: dict[str, np.ndarray]) -> np.ndarray:
    """(r, 5 + k): the headline metrics, then the per-class recalls."""
    return np.column_stack([*(metrics[name] for name in HEADLINE), metrics["recall"]])
