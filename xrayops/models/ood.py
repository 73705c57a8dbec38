"""Feature-space out-of-domain scores on frozen backbone features (the region embedding, or
pooled ResNet stages: `xrayops.models.ood_features`).

Fitted on the training split's features, higher = further from the training images:
  - "mahalanobis" (Lee et al. 2018): the smallest Mahalanobis distance to a class mean under
    one covariance shared by the classes. 512 dimensions from a thousand images make the plain
    pooled covariance near-singular, so it is shrunk towards a scaled identity by the
    Ledoit-Wolf estimate (Ledoit and Wolf 2004).
  - "relative_mahalanobis" (Ren et al. 2021): that distance minus the distance to one Gaussian
    fitted to all training images regardless of class (the "background"). Directions in which
    every radiograph varies count less, so images that differ from radiographs only along them
    (brightness, field size) no longer outscore near-domain ones; better on validation for both
    backbones measured (benchmarks/README.md, "Out-of-domain detection").
  - "knn" (Sun et al. 2022): the distance from the L2-normalised embedding to its k-th nearest
    L2-normalised training embedding; no class labels and no density assumed.

The softmax's energy (Liu et al. 2020) only sees the head's 14 logits: images unlike any
radiograph can still land far along one class direction and look confident. Distances in
the embedding itself see them.

Pure math on numpy arrays; the bundle stores a detector as tensors in its weights file
(`detector_state` / `detector_from_state`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from xrayops.errors import XrayopsError

OodMethod = Literal["mahalanobis", "relative_mahalanobis", "knn"]
OOD_METHODS: tuple[str, ...] = ("mahalanobis", "relative_mahalanobis", "knn")
MAHALANOBIS_METHODS = ("mahalanobis", "relative_mahalanobis")
STATE_PREFIX = "ood_detector."  # keys of a detector's tensors inside weights.pt


class OodError(XrayopsError, ValueError):
    """A detector that cannot be fitted or used: too few or mismatched embeddings."""


@dataclass(frozen=True)
class OodDetector:
    """A fitted detector. Mahalanobis: `means` (C, D) and `precision` (D, D), the relative form
    also `background_mean` (1, D) and `background_precision` (D, D); kNN: `reference` (N, D)
    unit rows and `k`."""

    method: OodMethod
    means: np.ndarray | None = None
    precision: np.ndarray | None = None
    background_mean: np.ndarray | None = None
    background_precision: np.ndarray | None = None
    reference: np.ndarray | None = None
    k: int = 0

    @property
    def dim(self) -> int:
        return int((self.means if self.method in MAHALANOBIS_METHODS else self.reference).shape[1])


def _as_matrix(embeddings, what: str = "embeddings") -> np.ndarray:
    x = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise OodError(f"{what} must be a finite (n, D) array, got shape {x.shape}")
    return x


def shared_covariance(embeddings, labels, shrinkage: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(class means (C, D) in sorted label order, shared covariance (D, D), shrinkage used).

    The covariance is that of the class-centred embeddings (Lee et al. 2018:
    1/N sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T), shrunk as
    (1 - s) * S + s * trace(S) / D * I with the Ledoit-Wolf s unless `shrinkage` is given.
    """
    from sklearn.covariance import ledoit_wolf_shrinkage

    x = _as_matrix(embeddings)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if len(y) != len(x):
        raise OodError(f"{len(x)} embeddings but {len(y)} labels")
    if len(x) < 2:
        raise OodError(f"need at least 2 labelled embeddings to fit a covariance, got {len(x)}")
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    sample = centred.T @ centred / len(x)
    if shrinkage is None:
        shrinkage = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
    if not 0.0 <= shrinkage <= 1.0:
        raise OodError(f"shrinkage must be in [0, 1], got {shrinkage}")
    mu = np.trace(sample) / x.shape[1]
    covariance = (1.0 - shrinkage) * sample + shrinkage * mu * np.eye(x.shape[1])
    return means, covariance, shrinkage


def fit_mahalanobis(embeddings, labels, shrinkage: float | None = None) -> OodDetector:
    """Class means and the inverse of the shared, shrunk covariance (Lee et al. 2018)."""
    means, covariance, _ = shared_covariance(embeddings, labels, shrinkage)
    # pinv: a zero shrinkage on fewer images than dimensions leaves the covariance singular.
    precision = np.linalg.pinv(covariance, hermitian=True)
    return OodDetector(method="mahalanobis", means=means, precision=(precision + precision.T) / 2)


def fit_relative_mahalanobis(embeddings, labels) -> OodDetector:
    """The class-conditional detector plus one background Gaussian over all training images,
    each covariance shrunk by its own Ledoit-Wolf estimate (Ren et al. 2021)."""
    classwise = fit_mahalanobis(embeddings, labels)
    background = fit_mahalanobis(embeddings, np.zeros(len(_as_matrix(embeddings)), dtype=int))
    return OodDetector(method="relative_mahalanobis", means=classwise.means, precision=classwise.precision,
                       background_mean=background.means, background_precision=background.precision)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_knn(embeddings, k: int = 10) -> OodDetector:
    """The L2-normalised training embeddings as the reference set (Sun et al. 2022)."""
    x = _as_matrix(embeddings)
    if not 1 <= k <= len(x):
        raise OodError(f"k must be in 1..{len(x)} (the reference images), got {k}")
    return OodDetector(method="knn", reference=unit_rows(x), k=int(k))


def fit_ood_detector(embeddings, labels, method: OodMethod = "mahalanobis", k: int = 10) -> OodDetector:
    """Fit the named detector on training embeddings (n, D) and their class labels (n,)."""
    if method == "mahalanobis":
        return fit_mahalanobis(embeddings, labels)
    if method == "relative_mahalanobis":
        return fit_relative_mahalanobis(embeddings, labels)
    if method == "knn":
        return fit_knn(embeddings, min(k, len(np.asarray(labels))))
    raise OodError(f"unknown OOD method {method!r}; choose one of {', '.join(OOD_METHODS)}")


def min_mahalanobis(means: np.ndarray, precision: np.ndarray, x: np.ndarray) -> np.ndarray:
    """min_c (x - mu_c)^T P (x - mu_c), one class at a time (differences first: expanding the
    quadratic form cancels badly when embeddings lie far from the origin)."""
    distances = [(((x - mu) @ precision) * (x - mu)).sum(1) for mu in means]
    return np.maximum(np.min(distances, axis=0), 0.0)


def mahalanobis_scores(detector: OodDetector, x: np.ndarray) -> np.ndarray:
    """The class-conditional distance; in the relative form, minus the background distance."""
    score = min_mahalanobis(detector.means, detector.precision, x)
    if detector.method == "relative_mahalanobis":
        score = score - min_mahalanobis(detector.background_mean, detector.background_precision, x)
    return score


def knn_scores(detector: OodDetector, x: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors to the k-th nearest reference row."""
    cosine = unit_rows(x) @ detector.reference.T
    kth = -np.partition(-cosine, detector.k - 1, axis=1)[:, detector.k - 1]  # k-th largest cosine
    return np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))


def ood_scores(detector: OodDetector, embeddings) -> np.ndarray:
    """(n,) float64 scores of embeddings (n, D); higher = more out of domain."""
    x = _as_matrix(embeddings)
    if x.shape[1] != detector.dim:
        raise OodError(f"embeddings have {x.shape[1]} dimensions, the detector was fitted on {detector.dim}")
    if len(x) == 0:
        return np.zeros(0)
    return mahalanobis_scores(detector, x) if detector.method in MAHALANOBIS_METHODS else knn_scores(detector, x)


def detector_state(detector: OodDetector) -> dict[str, torch.Tensor]:
    """The detector's arrays as float64 tensors under STATE_PREFIX, for the weights file (so
    its sha256 covers them); the method and k travel in the bundle's metadata."""
    arrays = {"means": detector.means, "precision": detector.precision, "background_mean": detector.background_mean,
              "background_precision": detector.background_precision, "reference": detector.reference}
    return {STATE_PREFIX + k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in arrays.items() if v is not None}


def detector_from_state(state: dict[str, torch.Tensor], method: str, k: int = 0) -> OodDetector:
    """The inverse of detector_state; raises OodError when a tensor the method needs is missing."""
    arrays = {key.removeprefix(STATE_PREFIX): v.double().numpy() for key, v in state.items() if key.startswith(STATE_PREFIX)}
    needed = {"mahalanobis": ("means", "precision"),
              "relative_mahalanobis": ("means", "precision", "background_mean", "background_precision"),
              "knn": ("reference",)}.get(method)
    if needed is None:
        raise OodError(f"unknown OOD method {method!r}; choose one of {', '.join(OOD_METHODS)}")
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise OodError(f"the weights have no {', '.join(STATE_PREFIX + m for m in missing)} for the {method} detector")
    if method == "knn" and not 1 <= k <= len(arrays["reference"]):
        raise OodError(f"k must be in 1..{len(arrays['reference'])}, got {k}")
    return OodDetector(method=method, k=int(k), **{name: arrays[name] for name in needed})
