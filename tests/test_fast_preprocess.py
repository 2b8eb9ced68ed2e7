"""The numpy replay of the fitted preprocessing must equal scikit-learn's transform bit for bit.

Planted: missing numeric values (imputed, with indicator columns), a numeric
column that was empty at fit time, missing and never-seen categories, and the
scaled variant the linear model uses. A preprocessing shape the replay does
not know must fall back to scikit-learn instead of guessing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.preprocessing import OneHotEncoder

from ml.features.contract import Feature, FeatureContract
from ml.modeling.fast_preprocess import CheckedPreprocessor, compile_preprocessor
from ml.modeling.model import build_preprocessor, contract_feature_frame

CONTRACT = FeatureContract(
    model="synthetic_mart", key="entity_id", as_of="snapshot", label="outcome",
    features=(Feature("spend", "numeric"), Feature("visits", "numeric"), Feature("always_empty", "numeric"),
              Feature("plan", "categorical"), Feature("region", "categorical")),
)


def raw_frame(n: int, seed: int, unseen: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plans = np.array(["basic", "pro", "team"] + (["enterprise"] if unseen else []), dtype=object)
    out = pd.DataFrame({
        "spend": np.where(rng.random(n) < 0.1, np.nan, rng.gamma(2.0, 30.0, n)),
        "visits": rng.poisson(4, n).astype(float),
        "always_empty": np.full(n, np.nan),
        "plan": rng.choice(plans, n),
        "region": pd.array(np.where(rng.random(n) < 0.05, None, rng.choice(["north", "south"], n)), dtype="string"),
    })
    return out


def frame(n: int, seed: int, unseen: bool = False) -> pd.DataFrame:
    return contract_feature_frame(CONTRACT, raw_frame(n, seed, unseen))


def test_a_str_column_is_kept_as_the_conversion_would_make_it() -> None:
    """pandas' default `str` columns (what DuckDB returns) skip the str() round trip and end up the same."""
    raw = raw_frame(300, 4)
    raw.loc[:9, "plan"] = None
    as_objects = raw.assign(plan=raw["plan"].astype(object), region=raw["region"].astype(object))
    as_str = raw.assign(plan=raw["plan"].astype("str"), region=raw["region"].astype("str"))
    assert isinstance(as_str["plan"].dtype, pd.StringDtype)
    kept, converted = contract_feature_frame(CONTRACT, as_str), contract_feature_frame(CONTRACT, as_objects)
    pd.testing.assert_frame_equal(kept, converted)
    assert kept["plan"].isna().sum() == 10


@pytest.mark.parametrize("scale", [False, True])
def test_replay_equals_scikit_learn_bit_for_bit(scale: bool) -> None:
    fitted = build_preprocessor(CONTRACT, scale_numeric=scale).fit(frame(500, 0))
    fast = compile_preprocessor(fitted)
    assert fast is not None
    scoring = frame(3000, 1, unseen=True)
    scoring.loc[:40, "visits"] = np.nan  # missing where training had none: no indicator column, median fill
    expected = fitted.transform(scoring)
    got = fast(scoring)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    assert (scoring["plan"] == "enterprise").any()  # the unseen category was really planted


def test_unknown_preprocessing_falls_back_to_scikit_learn() -> None:
    dropping = ColumnTransformer([("categorical", OneHotEncoder(drop="first", sparse_output=False), ["plan"])],
                                 sparse_threshold=0.0).fit(frame(200, 0))
    assert compile_preprocessor(dropping) is None
    checked = CheckedPreprocessor(dropping)
    scoring = frame(50, 2)
    np.testing.assert_array_equal(checked.transform(scoring), dropping.transform(scoring))


def test_a_replay_that_disagrees_is_abandoned_for_good() -> None:
    fitted = build_preprocessor(CONTRACT, scale_numeric=False).fit(frame(500, 0))
    checked = CheckedPreprocessor(fitted)
    checked.fast = lambda features: np.zeros(fitted.transform(features).shape)  # plant a wrong replay
    scoring = frame(100, 3)
    np.testing.assert_array_equal(checked.transform(scoring), fitted.transform(scoring))
    assert checked.fast is None
