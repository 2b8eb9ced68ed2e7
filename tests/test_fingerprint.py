"""Value fingerprints tell a redefined feature from a rebuilt one (ml.features.fingerprint)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from ml.features.fingerprint import value_fingerprints


def _frame(trend: list[float], spend: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"customer_id": ["a", "b", "c", "d"], "as_of_date": pd.Timestamp("2024-01-01"),
                         "usage_trend_30_vs_prior_60": trend, "monthly_spend": spend})


# the attributes value_fingerprints reads from a FeatureContract
CONTRACT = SimpleNamespace(key="customer_id", as_of="as_of_date",
                           feature_names=("usage_trend_30_vs_prior_60", "monthly_spend"),
                           numeric=("usage_trend_30_vs_prior_60", "monthly_spend"))


def test_parallel_sum_noise_around_zero_is_the_same_definition():
    # Planted: the same trend rebuilt, where DuckDB's parallel sums left 1e-15 in one build
    # and -2e-15 in the next for customers whose windows are equal; and -0.0 against 0.0.
    contract = CONTRACT
    first = value_fingerprints(_frame([1e-15, 0.0, 12.5, np.nan], [10.0, 20.0, 30.0, 40.0]), contract)
    again = value_fingerprints(_frame([-2e-15, -0.0, 12.5 + 1e-13, np.nan], [10.0, 20.0, 30.0, 40.0]), contract)
    assert first["usage_trend_30_vs_prior_60"] == again["usage_trend_30_vs_prior_60"]
    # a real redefinition still shows, also on a single small value
    moved = value_fingerprints(_frame([1e-15, 0.0, 12.5, np.nan], [10.0, 20.0, 30.5, 40.0]), contract)
    assert moved["monthly_spend"] != first["monthly_spend"]
    small = value_fingerprints(_frame([1e-15, 0.01, 12.5, np.nan], [10.0, 20.0, 30.0, 40.0]), contract)
    assert small["usage_trend_30_vs_prior_60"] != first["usage_trend_30_vs_prior_60"]
