"""Realized metrics and CBPE estimates."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ml.monitoring.performance import estimated_metrics, realized_metrics


def test_realized_metrics_by_hand():
    y = np.array([1, 1, 0, 0, 0, 1])
    p = np.array([0.9, 0.4, 0.6, 0.1, 0.2, 0.7])
    flagged = p >= 0.5
    m = realized_metrics(y, p, flagged)
    # flagged: rows 0, 2, 5 -> TP 2 (rows 0, 5), FP 1 (row 2), FN 1 (row 1)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["flagged_share"] == pytest.approx(0.5)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert m["n_rows"] == 6 and m["positives"] == 3


def test_realized_uses_the_decisions_taken_not_a_new_threshold():
    y = np.array([1, 0])
    p = np.array([0.2, 0.9])
    m = realized_metrics(y, p, np.array([True, False]))
    assert m["recall"] == 1.0 and m["precision"] == 1.0


def test_one_class_gives_nan_auc_and_zero_precision():
    m = realized_metrics(np.zeros(4), np.full(4, 0.1), np.zeros(4, dtype=bool))
    assert np.isnan(m["roc_auc"]) and np.isnan(m["pr_auc"]) and m["precision"] == 0.0


def test_cbpe_expected_confusion_by_hand():
    p = np.array([0.8, 0.6, 0.3, 0.1])
    flagged = p >= 0.5
    m = estimated_metrics(p, flagged)
    tp, fp, fn = 0.8 + 0.6, 0.2 + 0.4, 0.3 + 0.1
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["positives"] == pytest.approx(1.8)
    assert m["brier"] == pytest.approx(np.mean(p * (1 - p)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cbpe_tracks_realized_on_calibrated_probabilities(seed):
    """With labels drawn from the probabilities themselves, the estimate is unbiased."""
    rng = np.random.default_rng(seed)
    p = rng.beta(0.6, 8, size=40_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    threshold = np.quantile(p, 0.8)
    flagged = p >= threshold
    est, real = estimated_metrics(p, flagged), realized_metrics(y, p, flagged)
    assert est["recall"] == pytest.approx(real["recall"], abs=0.03)
    assert est["precision"] == pytest.approx(real["precision"], abs=0.03)
    assert est["roc_auc"] == pytest.approx(real["roc_auc"], abs=0.02)
    assert est["pr_auc"] == pytest.approx(real["pr_auc"], abs=0.03)
    assert est["brier"] == pytest.approx(real["brier"], abs=0.005)


def test_cbpe_misses_miscalibration_as_documented():
    """Probabilities that overstate risk 2x: realized recall is unaffected but the
    estimate is not, which is why realized metrics replace it once labels exist."""
    rng = np.random.default_rng(9)
    true_p = rng.beta(0.6, 8, size=40_000)
    y = (rng.uniform(size=true_p.size) < true_p).astype(int)
    stated = np.clip(true_p * 2, 0, 1)
    flagged = stated >= np.quantile(stated, 0.8)
    est = estimated_metrics(stated, flagged)
    real = realized_metrics(y, stated, flagged)
    assert abs(est["precision"] - real["precision"]) > 0.1


def test_weighted_auc_matches_duplicated_rows():
    p = np.array([0.9, 0.5, 0.2])
    est = estimated_metrics(p, p >= 0.5)
    # Expected AUC over label draws by explicit enumeration of the positive/negative halves.
    y = np.r_[np.ones(3), np.zeros(3)]
    s = np.r_[p, p]
    w = np.r_[p, 1 - p]
    assert est["roc_auc"] == pytest.approx(roc_auc_score(y, s, sample_weight=w))
    assert est["pr_auc"] == pytest.approx(average_precision_score(y, s, sample_weight=w))
