"""Champion/challenger gate: promote a retrained model only if it is not worse, overall and in
every acquisition subgroup large enough to judge.

Both models are scored on the SAME fixed, versioned test set (the test split of one DVC
dataset version: its md5 is recorded with the decision, and a challenger scored on another
set is refused). Per image, each model is right or wrong; the paired bootstrap resamples
studies (a study's images are correlated), keeping each image's pair of outcomes together, and
gives a confidence interval for accuracy(challenger) - accuracy(champion). The challenger is
promoted when the interval's lower bound is above -margin ("not worse beyond the margin", a
non-inferiority test) AND, in every subgroup (site, manufacturer, modality, view position,
photometric interpretation, transfer-syntax family: xrayops.evaluate.subgroups) of at least
`subgroup_min_n` test images, the same paired interval's lower bound is above -subgroup_margin:
better on average must not hide worse for one vendor's images (Oakden-Rayner et al. 2020).
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
from xrayops.evaluate.intervals import cluster_sums, bootstrap_replicates, commonest_per_cluster, percentile_interval
from xrayops.evaluate.metrics import classification_metrics
from xrayops.evaluate.subgroups import SubgroupComparison, compare_subgroups
from xrayops.logs import get_logger

log = get_logger(__name__)


class ScoredModel(BaseModel):
    """One model's predictions on the gate's test set."""

    name: str  # e.g. models:/xrayops-region/3
    test_set: str  # the dataset version (DVC md5) whose test split was scored
    image_ids: list[str]
    y_true: list[str]
    y_pred: list[str]
    # Per image: its study (the bootstrap's unit; empty: each image its own) and its subgroup
    # attributes (attribute -> values, xrayops.evaluate.subgroups.subgroup_attributes).
    study_ids: list[str] = []
    subgroups: dict[str, list[str]] = {}


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
    n_studies: int = 0  # studies behind n (the bootstrap's unit); 0 in decisions made per image
    subgroup_min_n: int = 0
    subgroup_margin: float = 0.0
    # Every subgroup of the test set, checked (n >= subgroup_min_n) or only shown.
    subgroups: list[SubgroupComparison] = []

    @property
    def refused_subgroups(self) -> list[SubgroupComparison]:
        return [g for g in self.subgroups if g.refused]


def paired_bootstrap_difference(
    champion_correct: np.ndarray, challenger_correct: np.ndarray, samples: int = 2000, confidence: float = 0.95,
    seed: int = 0, studies=None, strata=None,
) -> tuple[float, float, float]:
    """(observed difference, CI low, CI high) of mean(challenger) - mean(champion), percentile
    bootstrap over studies (`studies`, one id per image; None: each image its own) resampled WITH
    their images' pairs of outcomes, within `strata` (one label per image, constant in a study)."""
    a = np.asarray(champion_correct, dtype=np.float64)
    b = np.asarray(challenger_correct, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two equally long, non-empty outcome vectors, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = b - a
    studies = np.arange(len(diff)).astype(str) if studies is None else np.asarray(studies, dtype=str)
    ids, sums = cluster_sums(studies, np.c_[diff, np.ones_like(diff)])
    cluster_strata = None
    if strata is not None:
        _, first = np.unique(studies, return_index=True)
        cluster_strata = np.asarray(strata, dtype=str)[first]
    means = bootstrap_replicates(sums, lambda t: t[:, 0] / t[:, 1], cluster_strata, samples, seed)
    low, high = percentile_interval(means, confidence)
    return float(diff.mean()), float(low[0]), float(high[0])


def _aligned(champion: ScoredModel, challenger: ScoredModel) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Both models' outcomes (right/wrong) in one image order, after checking they were scored on
    the same images, labels and test set."""
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


def _per_image(model: ScoredModel, order: list[str]) -> tuple[np.ndarray, dict[str, list[str]]]:
    """The model's study ids and subgroup attributes in `order` (studies: each image its own where
    none were recorded)."""
    position = {image: k for k, image in enumerate(model.image_ids)}
    index = [position[i] for i in order]
    studies = (np.asarray(model.study_ids, dtype=str)[index] if model.study_ids
               else np.asarray(order, dtype=str))
    for name, values in model.subgroups.items():
        if len(values) != len(model.image_ids):
            raise ValueError(f"{model.name}: subgroup {name!r} has {len(values)} values for {len(model.image_ids)} images")
    return studies, {name: [values[k] for k in index] for name, values in model.subgroups.items()}


def gate(
    champion: ScoredModel, challenger: ScoredModel, margin: float = 0.01, samples: int = 2000,
    confidence: float = 0.95, seed: int = 0, subgroup_min_n: int = 30, subgroup_margin: float = 0.05,
) -> GateDecision:
    """Promote when the lower CI bound of the accuracy difference is above -margin, overall and in
    every subgroup of at least `subgroup_min_n` images (there above -max(subgroup_margin, margin):
    a subgroup is never held to a tighter margin than the whole test set)."""
    a, b, order = _aligned(champion, challenger)
    if len(champion.study_ids or challenger.study_ids) not in (0, len(order)):
        raise ValueError("study ids must be given for every image of the test set")
    truth = dict(zip(champion.image_ids, champion.y_true))
    y_true = [truth[i] for i in order]
    pred_a, pred_b = dict(zip(champion.image_ids, champion.y_pred)), dict(zip(challenger.image_ids, challenger.y_pred))
    classes = sorted(set(y_true) | set(pred_a.values()) | set(pred_b.values()))
    # The shared metrics module: the same accuracy as every evaluation report.
    acc_a = classification_metrics(y_true, [pred_a[i] for i in order], classes)["accuracy"]
    acc_b = classification_metrics(y_true, [pred_b[i] for i in order], classes)["accuracy"]
    studies, attributes = _per_image(champion if champion.study_ids or champion.subgroups else challenger, order)
    strata = commonest_per_cluster(studies, y_true)[np.unique(studies, return_inverse=True)[1]]
    difference, low, high = paired_bootstrap_difference(a, b, samples, confidence, seed, studies, strata)
    overall = low > -margin
    sub_margin = max(subgroup_margin, margin)
    subgroups = compare_subgroups(a, b, studies, y_true, attributes, subgroup_min_n, sub_margin, samples,
                                  confidence, seed)
    refused = [g for g in subgroups if g.refused]
    promote = overall and not refused
    reason = (
        f"challenger accuracy {acc_b:.3f} vs champion {acc_a:.3f} (difference {difference:+.3f}, "
        f"{confidence:.0%} CI [{low:+.3f}, {high:+.3f}]); "
        + (f"not worse beyond the margin {margin:.3f}" if overall
           else f"may be worse by more than the margin {margin:.3f}: keep the champion")
    )
    if refused:
        reason += (f"; {'and ' if not overall else 'but '}in subgroup{'s' if len(refused) > 1 else ''} "
                   + "; ".join(g.describe() for g in refused)
                   + f" it may be worse by more than the subgroup margin {sub_margin:.3f}: keep the champion")
    elif overall:
        checked = sum(g.checked for g in subgroups)
        reason += (f", nor in any of {checked} subgroups of >= {subgroup_min_n} images (margin {sub_margin:.3f}): promote"
                   if checked else f"; no subgroup has >= {subgroup_min_n} images to check: promote")
    decision = GateDecision(
        promote=promote, reason=reason, test_set=champion.test_set, n=len(order), champion_accuracy=acc_a,
        challenger_accuracy=acc_b, difference=difference, ci_low=low, ci_high=high, confidence=confidence,
        margin=margin, bootstrap_samples=samples, champion=champion.name, challenger=challenger.name,
        n_studies=len(set(studies.tolist())), subgroup_min_n=subgroup_min_n, subgroup_margin=sub_margin,
        subgroups=subgroups,
    )
    log.info("gate", promote=promote, difference=round(difference, 4), ci_low=round(low, 4), ci_high=round(high, 4),
             refused_subgroups=[f"{g.attribute}={g.value}" for g in refused])
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
        "subgroups_refused": "; ".join(f"{g.attribute}={g.value}" for g in decision.refused_subgroups) or "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), f"xrayops.gate.{key}", value)


def gate_and_promote(
    champion: ScoredModel, challenger: ScoredModel, tracking_uri: str, name: str, challenger_version: int | str,
    margin: float = 0.01, samples: int = 2000, confidence: float = 0.95, alias: str = "champion",
    on_promote: Callable[[GateDecision], None] | None = None, lost: list[str] | None = None,
    subgroup_min_n: int = 30, subgroup_margin: float = 0.05,
) -> GateDecision:
    """The gate, its decision recorded on the challenger's version, and on success the alias move
    plus the serving reload hook. `lost`: what the challenger cannot answer that the champion can
    (`lost_outputs`); any of it blocks promotion."""
    decision = refuse(gate(champion, challenger, margin, samples, confidence, subgroup_min_n=subgroup_min_n,
                           subgroup_margin=subgroup_margin), lost or [])
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
    # Subgroups with at least this many test images must not be worse beyond the subgroup margin.
    subgroup_min_n: int = 30
    subgroup_margin: float = 0.05

    @classmethod
    def from_settings(cls, settings, promote: bool = True, alias: str = "champion") -> "GatePolicy":
        return cls(margin=settings.gate_margin, samples=settings.gate_bootstrap_samples,
                   confidence=settings.gate_confidence, promote=promote, alias=alias,
                   subgroup_min_n=settings.gate_subgroup_min_n, subgroup_margin=settings.gate_subgroup_margin)


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
    kwargs = dict(margin=policy.margin, samples=policy.samples, confidence=policy.confidence,
                  subgroup_min_n=policy.subgroup_min_n, subgroup_margin=policy.subgroup_margin)
    if target is None:
        return refuse(gate(*scored, **kwargs), lost)
    return gate_and_promote(*scored, tracking_uri, target.name, target.version, alias=policy.alias, lost=lost,
                            on_promote=on_promote, **kwargs)


def score_bundle(
    bundle_dir, data_dir, test_set: str, name: str = "", truth: dict[str, str] | None = None, split: str = "test",
) -> ScoredModel:
    """The bundle's predictions on the `split` of the dataset at `data_dir` (the DVC version
    `test_set`), scored against `truth` (source_name -> true region) where given, else the PACS
    tags; images whose label is not a model class (unknown, out of domain) are left out. Each
    image carries its study and subgroup attributes for the gate's bootstrap and subgroup checks."""
    from pathlib import Path

    from xrayops.bundle import load_bundle
    from xrayops.data.dataset import load_images, read_ok_rows
    from xrayops.evaluate.subgroups import subgroup_attributes
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
    studies = rows["study_id"].astype(str).tolist() if "study_id" in rows.columns else []
    return ScoredModel(name=name or str(bundle_dir), test_set=test_set, image_ids=rows["image_id"].astype(str).tolist(),
                       y_true=[labels[i] for i in keep], y_pred=[r.region for r in responses], study_ids=studies,
                       subgroups=subgroup_attributes(rows))
