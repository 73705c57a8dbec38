"""Champion/challenger gate: paired bootstrap CI, non-inferiority margin, alias move (real MLflow)."""
from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from xrayops.evaluate.gate import ScoredModel, gate, gate_and_promote, paired_bootstrap_difference
from xrayops.registry import register_bundle
from tests.test_registry import write_dummy_bundle

REGIONS4 = ["hand", "knee", "skull", "wrist"]


def scored(name: str, truth: list[str], correct: np.ndarray, test_set: str = "md5-a") -> ScoredModel:
    """Predictions that are right exactly where `correct` says (wrong ones name the next class)."""
    preds = [t if ok else REGIONS4[(REGIONS4.index(t) + 1) % 4] for t, ok in zip(truth, correct)]
    return ScoredModel(name=name, test_set=test_set, image_ids=[f"i{k}" for k in range(len(truth))],
                       y_true=truth, y_pred=preds)


def _pair(n: int, acc_a: float, acc_b: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = list(rng.choice(REGIONS4, n))
    shared = rng.random(n)
    # Correlated outcomes, as two models of one family are: both fail on the hard images.
    return truth, shared < acc_a, shared < acc_b


def test_paired_bootstrap_interval_covers_the_difference_and_is_narrow_when_paired():
    _, a, b = _pair(2000, 0.90, 0.92)
    diff, low, high = paired_bootstrap_difference(a, b, samples=1000)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert low < diff < high and low > 0  # pairing: the 2-point gain is clearly positive
    # Unpaired, the same outcomes give an interval about three times as wide (normal approximation).
    unpaired_width = 2 * 1.96 * np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert high - low < 0.5 * unpaired_width
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap_difference(a[:5], b[:6])


def test_gate_promotes_equal_or_better_and_refuses_worse():
    truth, a, b = _pair(1500, 0.90, 0.90)
    same = gate(scored("champ", truth, a), scored("chall", truth, b), margin=0.01, samples=500)
    assert same.promote and same.difference == 0 and "promote" in same.reason
    truth, a, b = _pair(1500, 0.90, 0.85)
    worse = gate(scored("champ", truth, a), scored("chall", truth, b), margin=0.01, samples=500)
    assert not worse.promote and worse.ci_high < 0 and "keep the champion" in worse.reason
    assert worse.champion_accuracy == pytest.approx(a.mean()) and worse.challenger_accuracy == pytest.approx(b.mean())
    # A tiny test set cannot show non-inferiority: the interval is too wide.
    truth, a, b = _pair(40, 0.90, 0.90, seed=3)
    b[:2] = ~b[:2]
    assert not gate(scored("c", truth, a), scored("d", truth, b), margin=0.01, samples=500).promote


def test_gate_refuses_different_test_sets():
    truth, a, b = _pair(100, 0.9, 0.9)
    with pytest.raises(ValueError, match="one fixed test set"):
        gate(scored("c", truth, a), scored("d", truth, b, test_set="md5-b"))
    other = scored("d", truth, b)
    other.image_ids[0] = "elsewhere"
    with pytest.raises(ValueError, match="different images"):
        gate(scored("c", truth, a), other)


def test_promotion_moves_the_champion_alias_and_calls_the_reload_hook(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_dummy_bundle(tmp_path / "b1", b"one")
    write_dummy_bundle(tmp_path / "b2", b"two")
    write_dummy_bundle(tmp_path / "b3", b"three")
    register_bundle(tmp_path / "b1", uri, "gated", alias="champion")
    v2 = register_bundle(tmp_path / "b2", uri, "gated", alias="challenger")
    v3 = register_bundle(tmp_path / "b3", uri, "gated", alias="challenger")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    reloads = []

    truth, a, b = _pair(1500, 0.90, 0.80)
    kept = gate_and_promote(scored("v1", truth, a), scored("v2", truth, b), uri, "gated", v2.version,
                            samples=300, on_promote=reloads.append)
    assert not kept.promote and str(client.get_model_version_by_alias("gated", "champion").version) == "1"
    truth, a, b = _pair(1500, 0.90, 0.93)
    moved = gate_and_promote(scored("v1", truth, a), scored("v3", truth, b), uri, "gated", v3.version,
                             samples=300, on_promote=reloads.append)
    assert moved.promote and str(client.get_model_version_by_alias("gated", "champion").version) == "3"
    assert reloads == [moved]
    # Why each challenger serves or not stays on its registry version.
    tags2, tags3 = (client.get_model_version("gated", v).tags for v in ("2", "3"))
    assert tags2["xrayops.gate.promote"] == "false" and tags3["xrayops.gate.promote"] == "true"
    assert tags3["xrayops.gate.champion"] == "v1" and tags3["xrayops.gate.n"] == "1500"
    assert float(tags3["xrayops.gate.difference"]) == pytest.approx(moved.difference, abs=1e-4)
    assert tags2["xrayops.gate.reason"] == kept.reason and "keep the champion" in kept.reason
