"""The one metrics implementation: known answers on constructed cases, and agreement with
scikit-learn where both define the same figure."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from device.core.metrics import (
    binary_metrics,
    choose_threshold,
    confusion,
    expected_calibration_error,
    roc_auc,
)

Y = [1, 1, 1, 0, 0, 0]
S = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1]


def test_binary_metrics_known_answers():
    metrics = binary_metrics(Y, S, 0.5)
    assert metrics["confusion"] == {"tp": 2, "fn": 1, "fp": 1, "tn": 2}
    assert metrics["n"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["auc"] == pytest.approx(8 / 9)  # 0.3 loses only to 0.6
    assert metrics["threshold"] == 0.5
    assert list(metrics) == ["n", "accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "confusion", "threshold"]


def test_threshold_is_inclusive():
    assert confusion([1, 0], [0.5, 0.49], 0.5) == {"tp": 1, "fn": 0, "fp": 0, "tn": 1}


def test_auc_counts_ties_as_half_and_matches_scikit_learn():
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.uniform(0, 1, 300) + 0.3 * y, 1)  # coarse: many ties
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auc_is_undefined_with_one_class():
    assert math.isnan(roc_auc([1, 1], [0.2, 0.9]))


def test_youden_threshold_reproduces_best_operating_point_with_a_margin():
    threshold = choose_threshold(Y, S, "youden")
    # best J is at threshold 0.8 (sens 2/3, spec 1) or 0.3 (sens 1, spec 2/3): both J = 2/3;
    # the rule takes the more sensitive one and sits halfway to the next lower score (0.2)
    assert threshold == pytest.approx(0.25)
    counts = confusion(Y, S, threshold)
    assert counts == {"tp": 3, "fn": 0, "fp": 1, "tn": 2}


def test_youden_threshold_follows_the_best_j_not_the_first_point():
    y = [1, 1, 0, 1, 0, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.3, 0.2]
    # J: 0.9 -> 1/3, 0.8 -> 2/3, 0.7 -> 1/3, 0.6 -> 2/3, ... ties again, most sensitive wins
    assert choose_threshold(y, s) == pytest.approx(0.45)
    assert choose_threshold([1, 1, 0, 0, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.3, 0.2]) == pytest.approx(0.75)


def test_sensitivity_rule_keeps_every_positive_here():
    threshold = choose_threshold(Y, S, "sensitivity95")
    assert threshold == pytest.approx(0.25)  # between 0.3 (last positive) and 0.2
    assert binary_metrics(Y, S, threshold)["sensitivity"] == 1.0


def test_threshold_selection_refuses_unknown_rules_and_single_class_data():
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(Y, S, "magic")
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.1, 0.2])


def test_expected_calibration_error_known_answers():
    assert expected_calibration_error([1, 1, 1, 1, 0], [0.8] * 5) == pytest.approx(0.0)
    assert expected_calibration_error([1, 0, 1, 0], [1.0] * 4) == pytest.approx(0.5)
    # two bins: 0.1 predicted, 0 observed (error 0.1); 0.9 predicted, 1 observed (error 0.1)
    assert expected_calibration_error([0, 0, 1, 1], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.1)
