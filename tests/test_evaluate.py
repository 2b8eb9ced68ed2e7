"""Pure evaluation rules, on hand-checked numbers."""

from __future__ import annotations

import numpy as np
import pytest

from ml.modeling.evaluate import (
    CandidateScore,
    aggregate_importance,
    baseline_metrics,
    choose_threshold_for_cost,
    choose_threshold_for_recall,
    classification_metrics,
    expected_calibration_error,
    select_by_simplicity,
    threshold_curve,
)

Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.6, 0.2, 0.7, 0.5, 0.3, 0.1, 0.1, 0.05])
ORDER = ("logistic_regression", "random_forest", "xgboost")


def test_recall_threshold_is_the_highest_meeting_the_target() -> None:
    choice = choose_threshold_for_recall(Y, P, 0.75)
    assert choice.threshold == 0.6  # flags 0.9, 0.8, 0.7, 0.6: 3 of 4 churners
    assert choice.recall == 0.75 and choice.precision == 0.75 and choice.share_flagged == 0.4
    full = choose_threshold_for_recall(Y, P, 0.80)
    assert full.threshold == 0.2  # the 4th churner sits at 0.2
    assert full.recall == 1.0 and full.precision == pytest.approx(4 / 7)


def test_recall_threshold_needs_churners() -> None:
    with pytest.raises(ValueError, match="no churners"):
        choose_threshold_for_recall(np.zeros(5), np.linspace(0, 1, 5), 0.8)


def test_cost_threshold_minimises_expected_cost() -> None:
    # a missed churner costs 10 offers: catch them all (FP = 3 at threshold 0.2)
    expensive_miss = choose_threshold_for_cost(Y, P, cost_missed_churner=10, cost_wasted_offer=1)
    assert expensive_miss.threshold == 0.2 and expensive_miss.expected_cost == 3.0
    assert expensive_miss.rule == "expected_cost"
    # offers cost more than a churner: only flag where no offer is wasted
    expensive_offer = choose_threshold_for_cost(Y, P, cost_missed_churner=1, cost_wasted_offer=10)
    assert expensive_offer.threshold == 0.8 and expensive_offer.precision == 1.0
    assert expensive_offer.expected_cost == 2.0
    # ... and flag nobody when the top score is a non-churner
    nobody = choose_threshold_for_cost(np.array([0, 1]), np.array([0.9, 0.1]), 1, 10)
    assert nobody.threshold > 0.9 and nobody.recall == 0.0 and nobody.expected_cost == 1.0
    # equal costs: 0.8 (FN 2, FP 0) and 0.6 (FN 1, FP 1) tie at 2; the highest wins
    equal = choose_threshold_for_cost(Y, P, 1, 1)
    assert equal.threshold == 0.8 and equal.expected_cost == 2.0


def test_classification_metrics_at_threshold() -> None:
    m = classification_metrics(Y, P, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 2, 4, 1)
    assert m["recall"] == 0.75 and m["precision"] == 0.6 and m["accuracy"] == 0.7
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["roc_auc"] == pytest.approx(20 / 24)
    assert m["brier"] == pytest.approx(np.mean((P - Y) ** 2))


def test_baseline_is_always_no_churn() -> None:
    m = baseline_metrics(Y, training_prevalence=0.25)
    assert m["recall"] == 0 and m["precision"] == 0 and m["tp"] == 0 and m["fp"] == 0
    assert m["roc_auc"] == 0.5
    assert m["pr_auc"] == pytest.approx(0.4)  # = prevalence
    assert m["accuracy"] == pytest.approx(0.6)  # = 1 - prevalence


def test_expected_calibration_error() -> None:
    assert expected_calibration_error(np.array([0, 1] * 50), np.full(100, 0.5)) == pytest.approx(0.0)
    assert expected_calibration_error(np.ones(10), np.full(10, 0.75)) == pytest.approx(0.25)


def test_threshold_curve_grid() -> None:
    curve = threshold_curve(Y, P)
    assert len(curve) == 99
    at_half = curve[np.isclose(curve["threshold"], 0.5)].iloc[0]
    assert at_half["recall"] == 0.75 and at_half["precision"] == 0.6 and at_half["share_flagged"] == 0.5


def test_selection_prefers_simpler_within_tolerance() -> None:
    scores = [
        CandidateScore("logistic_regression", 0.600, 0.010, 5),
        CandidateScore("random_forest", 0.642, 0.010, 5),
        CandidateScore("xgboost", 0.645, 0.010, 5),
    ]
    # xgboost is best; random forest is within one standard error (0.0045): simpler wins
    assert select_by_simplicity(scores, ORDER).algorithm == "random_forest"
    far = [CandidateScore("logistic_regression", 0.60, 0.0, 5), CandidateScore("xgboost", 0.70, 0.0, 5)]
    assert select_by_simplicity(far, ORDER).algorithm == "xgboost"
    # zero spread still tolerates 0.002
    close = [CandidateScore("logistic_regression", 0.6985, 0.0, 5), CandidateScore("xgboost", 0.70, 0.0, 5)]
    assert select_by_simplicity(close, ORDER).algorithm == "logistic_regression"


def test_importance_is_summed_back_to_source_features() -> None:
    summed = aggregate_importance(np.array([1.0, 2.0, 0.5, 0.25]), ["a", "b", "b", "a"])
    assert summed.to_dict() == {"a": 1.25, "b": 2.5}
    with pytest.raises(ValueError, match="1 importances for 2 transformed columns"):
        aggregate_importance(np.array([1.0]), ["a", "b"])
