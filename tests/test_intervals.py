"""Study-bootstrap intervals (xrayops.evaluate.intervals): the metrics of a batch of confusion
matrices equal classification_metrics, the 95 % interval covers a known accuracy about 95 % of
the time when images of a study are correlated (resampling images does not), and strata keep
their sizes in every replicate."""
from __future__ import annotations

import numpy as np
import pytest

from xrayops.evaluate.intervals import (
    HEADLINE,
    MetricCI,
    batch_metrics,
    bootstrap_replicates,
    classification_intervals,
    cluster_sums,
    ratio_interval,
)
from xrayops.evaluate.metrics import classification_metrics

CLASSES = [f"c{i}" for i in range(6)]


def test_batch_metrics_equal_classification_metrics():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 80))
        t = rng.integers(0, 5, n)  # class c5 never occurs in the truth
        p = np.where(rng.random(n) < 0.6, t, rng.integers(0, 6, n))
        if trial == 0:
            p[:] = 0  # a constant prediction: kappa and MCC defined as 0
        expected = classification_metrics(t, p, CLASSES)
        cm = np.asarray(expected["confusion_matrix"])[None]
        got = batch_metrics(cm)
        for name in HEADLINE:
            assert got[name][0] == pytest.approx(expected[name]), (trial, name)
        recall = got["recall"][0]
        assert {CLASSES[i]: recall[i] for i in np.flatnonzero(np.isfinite(recall))} == pytest.approx(
            expected["per_class_accuracy"])


def _correlated_set(rng, n_studies=50, per_study=6, accuracy=0.8):
    """Half the studies easy (97 % right), half hard (63 %): accuracy 0.8, images of a study correlated."""
    easy = rng.random(n_studies) < 0.5
    p = np.where(easy, accuracy + 0.17, accuracy - 0.17)
    correct = (rng.random((n_studies, per_study)) < p[:, None]).ravel().astype(float)
    return correct, np.repeat(np.arange(n_studies), per_study).astype(str)


def test_the_study_interval_covers_a_known_accuracy_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    runs, by_study, by_image = 300, 0, 0
    for k in range(runs):
        correct, studies = _correlated_set(rng)
        ones = np.ones_like(correct)
        s = ratio_interval(correct, ones, studies, samples=300, seed=k)
        i = ratio_interval(correct, ones, np.arange(len(correct)).astype(str), samples=300, seed=k)
        by_study += s.low <= 0.8 <= s.high
        by_image += i.low <= 0.8 <= i.high
    # 300 runs: the coverage's standard error is about 0.013; the percentile bootstrap over 50
    # studies runs a little under its nominal level.
    assert 0.90 <= by_study / runs <= 0.98
    # Resampling images ignores the correlation: intervals too narrow, coverage well short of 95 %.
    assert by_image / runs < 0.89 < by_study / runs


def test_strata_keep_their_size_in_every_replicate():
    strata = np.array(["a"] * 3 + ["b"] * 7)
    sums = np.c_[np.eye(10)[:, :3].sum(1), np.ones(10)]  # column 0: 1 for the stratum-a clusters
    reps = bootstrap_replicates(sums, lambda t: t, strata, samples=500, seed=4)
    assert np.all(reps[:, 0] == 3) and np.all(reps[:, 1] == 10)
    free = bootstrap_replicates(sums, lambda t: t, None, samples=500, seed=4)
    assert free[:, 0].std() > 0  # without strata the share of a's varies


def test_classification_intervals_by_study():
    rng = np.random.default_rng(2)
    t = np.repeat(rng.integers(0, 4, 40), 3)  # 40 studies of 3 images, one class each
    p = np.where(rng.random(120) < 0.7, t, (t + 1) % 4)
    studies = np.repeat(np.arange(40), 3).astype(str)
    got = classification_intervals(t, p, 6, CLASSES, studies, samples=500)
    expected = classification_metrics(t, p, CLASSES)
    assert got.n_images == 120 and got.n_studies == 40 and got.confidence == 0.95
    for name in HEADLINE:
        ci = getattr(got, name)
        assert ci.value == pytest.approx(expected[name]) and ci.low < ci.value < ci.high, name
    assert set(got.per_class_recall) == set(expected["per_class_accuracy"])  # only classes in the truth
    for c, ci in got.per_class_recall.items():
        assert ci.value == pytest.approx(expected["per_class_accuracy"][c]) and ci.low <= ci.value <= ci.high
    # The same outcomes as 120 independent images: a narrower interval than by study.
    alone = classification_intervals(t, p, 6, CLASSES, np.arange(120).astype(str), samples=500)
    assert alone.accuracy.high - alone.accuracy.low < got.accuracy.high - got.accuracy.low
    # Same seed, same interval.
    assert classification_intervals(t, p, 6, CLASSES, studies, samples=500) == got


def test_one_study_has_no_interval_and_bad_input_is_refused():
    one = ratio_interval(np.array([1.0, 0.0, 1.0]), np.ones(3), ["s"] * 3)
    assert one.value == pytest.approx(2 / 3) and one.low is None and one.high is None and one.format() == "0.667"
    assert MetricCI(value=0.5, low=0.4, high=0.6).format(2) == "0.50 [0.40, 0.60]"
    with pytest.raises(ValueError, match="equally long"):
        ratio_interval(np.ones(3), np.ones(2), ["a"] * 3)
    with pytest.raises(ValueError, match="cluster ids"):
        cluster_sums(["a", "b"], np.ones(3))
    with pytest.raises(ValueError, match="equally long"):
        classification_intervals([0, 1], [0], 2, CLASSES[:2], ["a", "b"])
