"""Drift statistics on synthetic samples with known answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ml.config import load_config
from ml.features.contract import Feature, FeatureContract
from ml.modeling.reference import (
    NULL_LEVEL,
    DriftReference,
    bin_shares,
    categorical_reference,
    compute_reference,
    numeric_reference,
    psi_edges,
)
from ml.monitoring import drift
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def monitoring():
    return load_config(REPO_ROOT / "churn.yml").monitoring


def _stat(rows, feature, statistic):
    matches = [r for r in rows if r.feature == feature and r.statistic == statistic]
    assert len(matches) == 1, (feature, statistic, rows)
    return matches[0]


def test_psi_edges_are_observed_values_and_no_reference_bin_is_empty():
    x = np.array([0.0] * 70 + [1.0] * 20 + [2.0] * 6 + [5.0] * 4 + [np.nan] * 10)
    edges = psi_edges(x, 10)
    assert edges == [0.0, 1.0]  # the 9th decile is 1.0; the top bin holds 2s and 5s
    shares = bin_shares(x, edges)
    assert shares == pytest.approx([70 / 110, 20 / 110, 10 / 110, 10 / 110])
    assert min(shares[:-1]) > 0


def test_psi_known_value_and_zero_for_identical():
    assert drift.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    expected = (0.7 - 0.5) * np.log(0.7 / 0.5) + (0.3 - 0.5) * np.log(0.3 / 0.5)
    assert drift.psi([0.5, 0.5], [0.7, 0.3]) == pytest.approx(expected)


def test_reference_is_json_and_bounded(monitoring):
    rng = np.random.default_rng(0)
    n = 200_000
    frame = pd.DataFrame({
        "a": rng.normal(size=n),
        "b": pd.array(rng.choice(["x", "y", None], size=n), dtype="string"),
    })
    contract = FeatureContract("m", "k", "d", "y", (Feature("a", "numeric"), Feature("b", "categorical")))
    ref = compute_reference(frame, rng.uniform(size=n), contract, monitoring, threshold=0.25)
    text = json.dumps(ref)
    assert len(text) < 200_000
    a = ref["features"]["a"]
    assert len(a["sketch"]) == monitoring.reference_quantiles
    assert len(a["bin_shares"]) == len(a["bin_edges"]) + 2
    assert sum(a["bin_shares"]) == pytest.approx(1.0)
    assert a["spread"] == pytest.approx(1.0, abs=0.02)  # std of a standard normal
    assert a["iqr"] == pytest.approx(1.349, abs=0.02)
    b = ref["features"]["b"]
    assert b["null_share"] == pytest.approx(1 / 3, abs=0.01)
    assert set(b["shares"]) == {"x", "y", NULL_LEVEL}
    assert ref["flagged"]["shares"]["flagged"] == pytest.approx(0.75, abs=0.01)


def test_reference_names_missing_feature_column(monitoring):
    contract = FeatureContract("m", "k", "d", "y", (Feature("a", "numeric"),))
    with pytest.raises(ValueError, match=r"lacks contract feature column\(s\) a$"):
        compute_reference(pd.DataFrame({"z": [1.0]}), np.array([0.1]), contract, monitoring)


def test_numeric_same_distribution_is_not_flagged(monitoring):
    rng = np.random.default_rng(1)
    ref = numeric_reference(rng.normal(size=100_000), monitoring)
    rows = drift.numeric_drift("a", ref, rng.normal(size=20_000), monitoring)
    assert not any(r.drifted for r in rows)
    assert _stat(rows, "a", drift.PSI).value < 0.01
    assert _stat(rows, "a", drift.WASSERSTEIN).value < 0.03
    assert _stat(rows, "a", drift.KS).p_value > 0.001


def test_numeric_shift_is_flagged_with_expected_size(monitoring):
    rng = np.random.default_rng(2)
    ref = numeric_reference(rng.normal(size=100_000), monitoring)
    rows = drift.numeric_drift("a", ref, rng.normal(loc=0.5, size=20_000), monitoring)
    w = _stat(rows, "a", drift.WASSERSTEIN)
    # A mean shift of 0.5 moves every quantile by 0.5: W = 0.5 / std(N(0,1)).
    assert w.value == pytest.approx(0.5, abs=0.03)
    assert w.drifted
    ks = _stat(rows, "a", drift.KS)
    assert ks.value == pytest.approx(0.197, abs=0.02)  # sup |Phi(x) - Phi(x - 0.5)|
    assert ks.p_value < 1e-10 and ks.drifted is None
    assert _stat(rows, "a", drift.PSI).drifted
    summary = json.loads(w.current_summary)
    assert summary["mean"] == pytest.approx(0.5, abs=0.03)


def test_small_shift_has_tiny_p_value_but_is_not_flagged(monitoring):
    rng = np.random.default_rng(3)
    ref = numeric_reference(rng.normal(size=200_000), monitoring)
    rows = drift.numeric_drift("a", ref, rng.normal(loc=0.05, size=50_000), monitoring)
    assert _stat(rows, "a", drift.KS).p_value < 0.01
    assert not any(r.drifted for r in rows)


def test_small_sample_noise_is_not_drift_but_a_large_effect_is(monitoring):
    """20 values: the distance is large by chance alone, and the KS p-value vetoes it."""
    rng = np.random.default_rng(8)
    ref = numeric_reference(rng.normal(size=100_000), monitoring)
    noise_rows = drift.numeric_drift("a", ref, rng.normal(size=20), monitoring)
    w = _stat(noise_rows, "a", drift.WASSERSTEIN)
    psi_row = _stat(noise_rows, "a", drift.PSI)
    assert w.value > monitoring.distance_threshold and psi_row.value > monitoring.psi_threshold
    assert w.p_value > monitoring.max_p_value and not w.drifted and not psi_row.drifted
    shifted = drift.numeric_drift("a", ref, rng.normal(loc=2.0, size=20), monitoring)
    assert _stat(shifted, "a", drift.WASSERSTEIN).drifted


def test_null_share_jump_is_its_own_row(monitoring):
    rng = np.random.default_rng(4)
    ref = numeric_reference(rng.normal(size=50_000), monitoring)
    current = rng.normal(size=10_000)
    current[:2_000] = np.nan
    row = _stat(drift.numeric_drift("a", ref, current, monitoring), "a", drift.NULL_SHARE)
    assert row.value == pytest.approx(0.2)
    assert row.drifted and row.p_value < 1e-10


def test_categorical_shift_new_levels_and_nulls(monitoring):
    rng = np.random.default_rng(5)
    ref = categorical_reference(rng.choice(["x", "y", "z"], p=[0.5, 0.3, 0.2], size=50_000))
    same = drift.categorical_drift("c", ref, rng.choice(["x", "y", "z"], p=[0.5, 0.3, 0.2], size=10_000), monitoring)
    assert not any(r.drifted for r in same)
    assert _stat(same, "c", drift.CHI2).p_value > 0.001

    shifted = rng.choice(["x", "y", "z", "new", None], p=[0.2, 0.3, 0.2, 0.2, 0.1], size=10_000)
    rows = drift.categorical_drift("c", ref, shifted, monitoring)
    assert _stat(rows, "c", drift.PSI).drifted
    assert _stat(rows, "c", drift.JENSEN_SHANNON).drifted
    new = _stat(rows, "c", drift.NEW_CATEGORIES)
    assert new.value == pytest.approx(0.2, abs=0.02) and new.drifted
    assert json.loads(new.current_summary)["new_levels"] == ["new"]
    nulls = _stat(rows, "c", drift.NULL_SHARE)
    assert nulls.value == pytest.approx(0.1, abs=0.02) and nulls.drifted
    assert _stat(rows, "c", drift.CHI2).p_value < 1e-10


def test_score_and_flagged_share(monitoring):
    rng = np.random.default_rng(6)
    scores = rng.beta(1, 9, size=50_000)
    contract = FeatureContract("m", "k", "d", "y", (Feature("a", "numeric"),))
    ref = DriftReference.from_dict(
        compute_reference(pd.DataFrame({"a": scores}), scores, contract, monitoring, threshold=0.2))
    stable = drift.score_drift(ref, rng.beta(1, 9, size=10_000), 0.2, monitoring)
    assert not any(r.drifted for r in stable)
    moved = drift.score_drift(ref, rng.beta(2, 6, size=10_000), 0.2, monitoring)
    flagged = _stat(moved, drift.FLAGGED_FEATURE, drift.PSI)
    assert flagged.drifted
    assert json.loads(flagged.current_summary)["top"]["flagged"] > 0.4
    # A threshold that differs from the stored one is read off the sketch instead.
    other = drift.score_drift(ref, scores[:10_000], 0.3, monitoring)
    assert not _stat(other, drift.FLAGGED_FEATURE, drift.PSI).drifted


def test_dataset_rows(monitoring):
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({name: rng.normal(size=20_000) for name in "abcd"})
    contract = FeatureContract("m", "k", "d", "y", tuple(Feature(n, "numeric") for n in "abcd"))
    ref = DriftReference.from_dict(compute_reference(frame, rng.uniform(size=20_000), contract, monitoring))
    current = frame.sample(5_000, random_state=1).reset_index(drop=True)
    current["b"] = current["b"] + 2.0
    rows = drift.feature_drift(ref, current, {n: "numeric" for n in "abcd"}, monitoring)
    assert drift.drifted_features(rows) == ["b"]
    share, top = drift.dataset_drift(rows, ["a", "b"], monitoring)
    assert share.value == pytest.approx(0.25) and share.drifted is (0.25 >= monitoring.dataset_drift_share)
    assert top.value == 1.0 and top.drifted
    _, top_other = drift.dataset_drift(rows, ["a", "c"], monitoring)
    assert top_other.value == 0.0 and not top_other.drifted
