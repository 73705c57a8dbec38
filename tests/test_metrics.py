"""classification_metrics against scikit-learn on hand-made arrays; ECE by hand."""
import numpy as np
import pytest
from sklearn import metrics as skm

from xrayops.evaluate.metrics import classification_metrics, expected_calibration_error

CLASSES = ["a", "b", "c", "d", "e"]  # "e" never occurs
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 0, 1, 2, 3, 3])
Y_PRED = np.array([0, 1, 0, 1, 1, 2, 1, 2, 0, 3, 0, 1, 2, 1, 3])


def test_matches_sklearn():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y_TRUE, Y_PRED))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="macro"))
    assert m["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(Y_TRUE, Y_PRED))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(Y_TRUE, Y_PRED))
    assert m["confusion_matrix"] == skm.confusion_matrix(Y_TRUE, Y_PRED, labels=range(5)).tolist()
    recalls = skm.recall_score(Y_TRUE, Y_PRED, average=None, labels=range(4))
    assert m["per_class_accuracy"] == pytest.approx(dict(zip(CLASSES[:4], recalls)))
    assert m["support"] == {"a": 4, "b": 5, "c": 3, "d": 3, "e": 0}
    assert m["n"] == 15
    assert m["chance_uniform"] == pytest.approx(1 / 5)
    assert m["chance_majority"] == pytest.approx(5 / 15)


def test_names_and_ids_agree_and_probabilities_add_ece_and_nll():
    names = [CLASSES[i] for i in Y_TRUE], [CLASSES[i] for i in Y_PRED]
    probs = np.full((15, 5), 0.05)
    probs[np.arange(15), Y_PRED] = 0.8
    by_name = classification_metrics(*names, CLASSES, y_prob=probs)
    by_id = classification_metrics(Y_TRUE, Y_PRED, CLASSES, y_prob=probs)
    assert by_name == by_id
    assert by_id["nll"] == pytest.approx(skm.log_loss(Y_TRUE, probs, labels=range(5)))
    # One bin at confidence 0.8 holding 11/15 correct.
    assert by_id["ece"] == pytest.approx(abs(11 / 15 - 0.8))


def test_perfect_and_degenerate_cases():
    perfect = classification_metrics(["b", "a", "b"], ["b", "a", "b"], CLASSES)
    assert perfect["accuracy"] == perfect["balanced_accuracy"] == perfect["macro_f1"] == 1.0
    assert perfect["cohen_kappa"] == pytest.approx(1.0) and perfect["mcc"] == pytest.approx(1.0)
    constant = classification_metrics(["a", "a"], ["a", "a"], CLASSES)
    # No agreement beyond chance is measurable: 0 (sklearn gives MCC 0 and kappa NaN), never NaN in JSON.
    assert constant["cohen_kappa"] == 0.0 and constant["mcc"] == 0.0


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="not classes: \\['unknown'\\]"):
        classification_metrics(["a", "unknown"], ["a", "b"], CLASSES)
    with pytest.raises(ValueError, match="outside 0..4"):
        classification_metrics([0, 7], [0, 1], CLASSES)
    with pytest.raises(ValueError, match="y_true has 2 labels, y_pred 1"):
        classification_metrics(["a", "b"], ["a"], CLASSES)
    with pytest.raises(ValueError, match="no labelled examples"):
        classification_metrics([], [], CLASSES)
    with pytest.raises(ValueError, match="y_prob must be"):
        classification_metrics([0, 1], [0, 1], CLASSES, y_prob=np.ones((2, 3)))


def test_ece_by_hand():
    y_true = np.array([0, 1, 1, 0])
    y_prob = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    # Bin 0.9: 2 samples, accuracy 0.5 -> gap 0.4; bin 0.7: 1 correct -> 0.3; bin 0.6: wrong -> 0.6.
    assert expected_calibration_error(y_true, y_prob, n_bins=10) == pytest.approx((2 * 0.4 + 0.3 + 0.6) / 4)


def test_auc_sensitivity_specificity_match_sklearn_and_have_bootstrap_intervals():
    from xrayops.evaluate.metrics import binary_metrics, binary_metrics_with_ci, bootstrap_ci, roc_auc

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    score = np.clip(0.35 * y + rng.random(200) * 0.7, 0, 1).round(2)  # rounded: ties happen
    assert roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score))
    m = binary_metrics(y, score, threshold=0.5)
    predicted = score >= 0.5
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, predicted))
    assert m["specificity"] == pytest.approx(skm.recall_score(~y, ~predicted))
    assert (m["n_positive"], m["n_negative"]) == (int(y.sum()), int((~y).sum()))
    with_ci = binary_metrics_with_ci(y, score, n_boot=300)
    for key in ("auc", "sensitivity", "specificity"):
        low, high = with_ci[f"{key}_ci"]
        assert low < with_ci[key] < high and high - low < 0.3, (key, low, high)
    # The interval narrows with more data (about 1/sqrt(n)).
    big_y, big_s = np.tile(y, 16), np.tile(score, 16)
    wide = np.diff(bootstrap_ci(roc_auc, [y, score], n_boot=200))[0]
    narrow = np.diff(bootstrap_ci(roc_auc, [big_y, big_s], n_boot=200))[0]
    assert narrow < wide / 2.5
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))  # one class only: undefined, not a crash
    with pytest.raises(ValueError):
        binary_metrics([1, 0], [0.5])


def test_orientation_error_wraps_around_the_circle():
    from xrayops.evaluate.metrics import orientation_metrics

    m = orientation_metrics([359.0, 10.0, 95.0, 180.0], [2.0, 10.0, 88.0, 0.0])
    # errors: 3, 0, 7, 180
    assert m["orientation_mae_deg"] == pytest.approx(190 / 4)
    assert m["orientation_within_4deg"] == pytest.approx(0.5)
    assert m["orientation_median_error_deg"] == pytest.approx(5.0)
    assert m["orientation_quadrant_accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        orientation_metrics([], [])
