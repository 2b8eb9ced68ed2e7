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


def frame(n: int, seed: int, unseen: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plans = np.array(["basic", "pro", "team"] + (["enterprise"] if unseen else []), dtype=object)
    out = pd.DataFrame({
        "spend": np.where(rng.random(n) < 0.1, np.nan, rng.gamma(2.0, 30.0, n)),
        "visits": rng.poisson(4, n).astype(float),
        "always_empty": np.full(n, np.nan),
        "plan": rng.choice(plans, n),
        "region": pd.array(np.where(rng.random(n) < 0.05, None, rng.choice(["north", "south"], n)), dtype="string"),
    })
    return contract_feature_frame(CONTRACT, out)


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
