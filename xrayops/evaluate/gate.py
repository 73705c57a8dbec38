"""Champion/challenger gate: promote a retrained model only if it is not worse.

Both models are scored on the SAME fixed, versioned test set (the test split of one DVC
dataset version: its md5 is recorded with the decision, and a challenger scored on another
set is refused). Per image, each model is right or wrong; the paired bootstrap resamples
images, keeping each image's pair of outcomes together, and gives a confidence interval for
accuracy(challenger) - accuracy(champion). The challenger is promoted when the interval's
lower bound is above -margin ("not worse beyond the margin", a non-inferiority test).
Promotion moves the registry alias (`champion`) to the challenger's version.

Serving reload hook: a server started with `xrayops serve --model models:/NAME@champion`
resolves the alias when it loads. After `promote` moves the alias, the serving side reloads
by re-resolving the same reference (on a cluster: roll the InferenceService, e.g. bump an
annotation, so new pods resolve the new version; locally: restart `xrayops serve`). The
`on_promote` callback of `gate_and_promote` is where the composition root plugs that in.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import BaseModel

from xrayops.contracts import ModelBundleMeta
from xrayops.evaluate.metrics import classification_metrics
from xrayops.logs import get_logger

log = get_logger(__name__)


class ScoredModel(BaseModel):
    """One model's predictions on the gate's test set."""

    name: str  # e.g. models:/xrayops-region/3
    test_set: str  # the dataset version (DVC md5) whose test split was scored
    image_ids: list[str]
    y_true: list[str]
    y_pred: list[str]


class GateDecision(BaseModel):
    promote: bool
    reason: str
    test_set: str
    n: int
    champion_accuracy: float
    challenger_accuracy: float
    difference: float  # challenger - champion
    ci_low: float
    ci_high: float
    confidence: float
    margin: float
    bootstrap_samples: int
    champion: str
    challenger: str
    lost: list[str] = []  # champion outputs the challenger lacks (`lost_outputs`); any blocks promotion


def paired_bootstrap_difference(
    champion_correct: np.ndarray, challenger_correct: np.ndarray, samples: int = 2000, confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(observed difference, CI low, CI high) of mean(challenger) - mean(champion), percentile
    bootstrap over images resampled WITH their pair of outcomes."""
    a = np.asarray(champion_correct, dtype=np.float64)
    b = np.asarray(challenger_correct, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equally long, non-empty outcome vectors, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    # Chunks bound memory (samples x n indices) on large test sets.
    chunk = max(1, 2_000_000 // len(diff))
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        means[start:stop] = diff[rng.integers(0, len(diff), (stop - start, len(diff)))].mean(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(diff.mean()), float(low), float(high)


def _aligned(champion: ScoredModel, challenger: ScoredModel) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if champion.test_set != challenger.test_set:
        raise ValueError(
            f"champion was scored on test set {champion.test_set!r} and challenger on {challenger.test_set!r}: "
            "the gate compares models on one fixed test set only"
        )
    for m in (champion, challenger):
        if not (len(m.image_ids) == len(m.y_true) == len(m.y_pred)):
            raise ValueError(f"{m.name}: image_ids, y_true and y_pred differ in length")
    if sorted(champion.image_ids) != sorted(challenger.image_ids):
        raise ValueError("champion and challenger were scored on different images of the test set")
    truth = dict(zip(champion.image_ids, champion.y_true))
    if any(truth[i] != t for i, t in zip(challenger.image_ids, challenger.y_true)):
        raise ValueError("champion and challenger disagree on the true labels of the test set")
    order = sorted(champion.image_ids)
    pred_a, pred_b = dict(zip(champion.image_ids, champion.y_pred)), dict(zip(challenger.image_ids, challenger.y_pred))
    a = np.array([pred_a[i] == truth[i] for i in order])
    b = np.array([pred_b[i] == truth[i] for i in order])
    return a, b, order


def gate(
    champion: ScoredModel, challenger: ScoredModel, margin: float = 0.01, samples: int = 2000,
    confidence: float = 0.95, seed: int = 0,
) -> GateDecision:
    """Promote when the lower CI bound of the accuracy difference is above -margin."""
    a, b, order = _aligned(champion, challenger)
    truth = dict(zip(champion.image_ids, champion.y_true))
    y_true = [truth[i] for i in order]
    pred_a, pred_b = dict(zip(champion.image_ids, champion.y_pred)), dict(zip(challenger.image_ids, challenger.y_pred))
    classes = sorted(set(y_true) | set(pred_a.values()) | set(pred_b.values()))
    # The shared metrics module: the same accuracy as every evaluation report.
    acc_a = classification_metrics(y_true, [pred_a[i] for i in order], classes)["accuracy"]
    acc_b = classification_metrics(y_true, [pred_b[i] for i in order], classes)["accuracy"]
    difference, low, high = paired_bootstrap_difference(a, b, samples, confidence, seed)
    promote = low > -margin
    reason = (
        f"challenger accuracy {acc_b:.3f} vs champion {acc_a:.3f} (difference {difference:+.3f}, "
        f"{confidence:.0%} CI [{low:+.3f}, {high:+.3f}]); "
        + (f"not worse beyond the margin {margin:.3f}: promote" if promote
           else f"may be worse by more than the margin {margin:.3f}: keep the champion")
    )
    decision = GateDecision(
        promote=promote, reason=reason, test_set=champion.test_set, n=len(order), champion_accuracy=acc_a,
        challenger_accuracy=acc_b, difference=difference, ci_low=low, ci_high=high, confidence=confidence,
        margin=margin, bootstrap_samples=samples, champion=champion.name, challenger=challenger.name,
    )
    log.info("gate", promote=promote, difference=round(difference, 4), ci_low=round(low, 4), ci_high=round(high, 4))
    return decision


def lost_outputs(champion: ModelBundleMeta, challenger: ModelBundleMeta) -> list[str]:
    """What the champion answers and the challenger could not: serving would silently stop
    returning it (an orientation head trained from truth angles, a binary head, a class)."""
    lost = []
    if champion.orientation and not challenger.orientation:
        lost.append("orientation")
    lost += [f"binary head {h}" for h in champion.binary_heads if h not in challenger.binary_heads]
    lost += [f"class {c}" for c in champion.classes if c not in challenger.classes]
    return lost


def refuse(decision: GateDecision, lost: list[str]) -> GateDecision:
    """The decision with promotion withheld because the challenger lacks `lost`."""
    if not lost:
        return decision
    reason = f"{decision.reason}; but the challenger lacks the champion's {', '.join(lost)}: keep the champion"
    return decision.model_copy(update={"promote": False, "reason": reason, "lost": list(lost)})


def promote(tracking_uri: str, name: str, version: int | str, alias: str = "champion") -> None:
    """Point the registry alias at `version` (MLflow)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(name, alias, str(version))
    log.info("promoted", name=name, version=str(version), alias=alias)


def record_decision(tracking_uri: str, name: str, version: int | str, decision: GateDecision) -> None:
    """The gate's decision as tags of the challenger's registry version, promoted or not: why a
    version serves (or does not) stays readable in MLflow beside its lineage."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    tags = {
        "promote": str(decision.promote).lower(), "champion": decision.champion, "test_set": decision.test_set,
        "n": str(decision.n), "difference": f"{decision.difference:.4f}",
        "ci": f"[{decision.ci_low:.4f}, {decision.ci_high:.4f}] at {decision.confidence:.0%}",
        "margin": f"{decision.margin:.4f}", "reason": decision.reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), f"xrayops.gate.{key}", value)


def gate_and_promote(
    champion: ScoredModel, challenger: ScoredModel, tracking_uri: str, name: str, challenger_version: int | str,
    margin: float = 0.01, samples: int = 2000, confidence: float = 0.95, alias: str = "champion",
    on_promote: Callable[[GateDecision], None] | None = None, lost: list[str] | None = None,
) -> GateDecision:
    """The gate, its decision recorded on the challenger's version, and on success the alias move
    plus the serving reload hook. `lost`: what the challenger cannot answer that the champion can
    (`lost_outputs`); any of it blocks promotion."""
    decision = refuse(gate(champion, challenger, margin, samples, confidence), lost or [])
    record_decision(tracking_uri, name, challenger_version, decision)
    if decision.promote:
        promote(tracking_uri, name, challenger_version, alias)
        if on_promote is not None:
            on_promote(decision)
    return decision


class GatePolicy(BaseModel):
    """How the gate decides and what it may do: the settings' gate_* fields, plus whether a passing
    challenger gets the alias."""

    margin: float = 0.01
    samples: int = 2000
    confidence: float = 0.95
    promote: bool = True
    alias: str = "champion"

    @classmethod
    def from_settings(cls, settings, promote: bool = True, alias: str = "champion") -> "GatePolicy":
        return cls(margin=settings.gate_margin, samples=settings.gate_bootstrap_samples,
                   confidence=settings.gate_confidence, promote=promote, alias=alias)


class GateModel(BaseModel):
    """One side of the gate: a bundle folder and the reference it was resolved from."""

    bundle_dir: str
    ref: str  # models:/NAME/VERSION (a challenger to promote must be one) or a folder


def run_gate(
    champion: GateModel, challenger: GateModel, data_dir, test_set: str, policy: GatePolicy,
    tracking_uri: str = "", truth: dict[str, str] | None = None,
    on_promote: Callable[[GateDecision], None] | None = None,
) -> GateDecision:
    """The one gate of the platform (CLI, KFP component, demo scenario): both bundles scored on the
    test split of the dataset version `test_set`, the paired-bootstrap decision, withheld when the
    challenger lacks a champion output, recorded on the challenger's registry version, and with
    `policy.promote` the alias moved and `on_promote` called."""
    from pathlib import Path

    from xrayops.bundle_meta import read_bundle_meta
    from xrayops.registry import parse_model_ref

    target = parse_model_ref(challenger.ref) if policy.promote else None
    if target is not None and target.version is None:
        raise ValueError(f"the challenger {challenger.ref} must name a registry version (models:/NAME/VERSION) to be promoted")
    scored = [score_bundle(Path(m.bundle_dir), Path(data_dir), test_set, m.ref, truth) for m in (champion, challenger)]
    lost = lost_outputs(read_bundle_meta(Path(champion.bundle_dir)), read_bundle_meta(Path(challenger.bundle_dir)))
    kwargs = dict(margin=policy.margin, samples=policy.samples, confidence=policy.confidence)
    if target is None:
        return refuse(gate(*scored, **kwargs), lost)
    return gate_and_promote(*scored, tracking_uri, target.name, target.version, alias=policy.alias, lost=lost,
                            on_promote=on_promote, **kwargs)


def score_bundle(
    bundle_dir, data_dir, test_set: str, name: str = "", truth: dict[str, str] | None = None, split: str = "test",
) -> ScoredModel:
    """The bundle's predictions on the `split` of the dataset at `data_dir` (the DVC version
    `test_set`), scored against `truth` (source_name -> true region) where given, else the PACS
    tags; images whose label is not a model class (unknown, out of domain) are left out."""
    from pathlib import Path

    from xrayops.bundle import load_bundle
    from xrayops.data.dataset import load_images, read_ok_rows
    from xrayops.inference import predict_arrays

    bundle = load_bundle(Path(bundle_dir))
    rows = read_ok_rows(Path(data_dir), split)
    labels = [truth.get(s, "unknown") if truth is not None else r
              for s, r in zip(rows["source_name"].astype(str), rows["region"].astype(str))]
    keep = [i for i, label in enumerate(labels) if label in bundle.meta.classes]
    if not keep:
        raise ValueError(f"no labelled images of a model class in split {split!r} of {data_dir}")
    rows = rows.iloc[keep].reset_index(drop=True)
    responses, _ = predict_arrays(bundle, list(load_images(Path(data_dir), rows)), rows["region"].astype(str).tolist())
    return ScoredModel(name=name or str(bundle_dir), test_set=test_set, image_ids=rows["image_id"].astype(str).tolist(),
                       y_true=[labels[i] for i in keep], y_pred=[r.region for r in responses])
