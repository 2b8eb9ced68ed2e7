"""Per-row reasons must be exact decompositions of each algorithm's raw output.

Built on a small synthetic problem with a known driver, so the tests can check
both the arithmetic (contributions + bias == the model's own output) and the
meaning (the driver is the top reason for the riskiest rows).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from ml.features.contract import Feature, FeatureContract
from ml.modeling.explain import Explainer, ExplainError, contributions, reason_columns, top_k, top_reasons
from ml.modeling.model import ChurnModel, ScoreCalibrator, build_preprocessor, single_job_scorer

CONTRACT = FeatureContract(
    model="synthetic_mart",
    key="entity_id",
    as_of="snapshot",
    label="outcome",
    features=(
        Feature("driver", "numeric"),
        Feature("noise", "numeric"),
        Feature("segment", "categorical"),
    ),
)


def synthetic(n: int = 1500, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    driver = rng.normal(size=n)
    segment = rng.choice(["a", "b", "c"], size=n)
    logit = -1.0 + 2.5 * driver + np.where(segment == "c", 1.0, 0.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    driver_with_gaps = np.where(rng.random(n) < 0.05, np.nan, driver)
    frame = pd.DataFrame({
        "entity_id": [f"E{i:05d}" for i in range(n)],
        "snapshot": pd.Timestamp("2025-01-01"),
        "driver": driver_with_gaps,
        "noise": rng.normal(size=n),
        "segment": segment,
    })
    return frame, y


ESTIMATORS = {
    "logistic_regression": lambda: LogisticRegression(max_iter=1000),
    "random_forest": lambda: RandomForestClassifier(n_estimators=25, max_depth=6, random_state=0, n_jobs=1),
    "xgboost": lambda: xgb.XGBClassifier(n_estimators=40, max_depth=3, learning_rate=0.2, n_jobs=1),
}


def fitted_model(algorithm: str) -> tuple[ChurnModel, pd.DataFrame]:
    frame, y = synthetic()
    pipeline = Pipeline([
        ("preprocess", build_preprocessor(CONTRACT, scale_numeric=algorithm == "logistic_regression")),
        ("model", ESTIMATORS[algorithm]()),
    ])
    model = ChurnModel(
        pipeline=pipeline,
        calibrator=ScoreCalibrator("sigmoid"),
        contract=CONTRACT,
        algorithm=algorithm,
        params={},
        threshold=0.5,
    )
    pipeline.fit(model.feature_frame(frame), y)
    model.calibrator.fit(model.raw_scores(frame), y)
    return model, frame


def model_raw_output(model: ChurnModel, frame: pd.DataFrame) -> np.ndarray:
    """The quantity each algorithm's contributions must add up to."""
    features = model.feature_frame(frame)
    if model.algorithm == "random_forest":
        return model.pipeline.predict_proba(features)[:, 1]
    if model.algorithm == "logistic_regression":
        return model.pipeline.decision_function(features)
    matrix = model.pipeline.named_steps["preprocess"].transform(features)
    return model.pipeline.named_steps["model"].predict(matrix, output_margin=True)


@pytest.mark.parametrize("algorithm", sorted(ESTIMATORS))
def test_contributions_add_up_to_the_raw_output(algorithm: str) -> None:
    model, frame = fitted_model(algorithm)
    result = contributions(model, frame)
    assert list(result.values.columns) == CONTRACT.feature_names
    total = result.values.sum(axis=1).to_numpy() + result.bias
    np.testing.assert_allclose(total, model_raw_output(model, frame), rtol=0, atol=1e-4)
    assert result.output == ("probability" if algorithm == "random_forest" else "log_odds")


@pytest.mark.parametrize("algorithm", sorted(ESTIMATORS))
def test_explainer_scores_its_matrix_like_the_model(algorithm: str) -> None:
    """Scoring shares one preprocessed matrix between probability and reasons."""
    model, frame = fitted_model(algorithm)
    explainer = Explainer(model)
    matrix = explainer.matrix(frame)
    np.testing.assert_allclose(explainer.raw_scores(matrix), model.raw_scores(frame), rtol=0, atol=1e-12)
    shared = explainer.contributions(matrix, frame.index)
    pd.testing.assert_frame_equal(shared.values, contributions(model, frame).values)


def tree_order_proba(forest: RandomForestClassifier, matrix: np.ndarray) -> np.ndarray:
    """A forest's probabilities summed tree by tree in `estimators_` order, as one job adds them."""
    total = np.zeros((matrix.shape[0], len(forest.classes_)))
    for tree in forest.estimators_:
        total += tree.predict_proba(matrix)
    return total / len(forest.estimators_)


def threaded_forest(seed: int = 0) -> tuple[RandomForestClassifier, np.ndarray]:
    """A forest fitted with two jobs on random rows, as training fits one (class_weight makes odd shares)."""
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(3000, 6))
    y = (rng.random(3000) < 1 / (1 + np.exp(-matrix[:, 0]))).astype(int)
    forest = RandomForestClassifier(n_estimators=40, max_depth=6, class_weight="balanced_subsample",
                                    random_state=0, n_jobs=2).fit(matrix, y)
    return forest, matrix


def test_a_threaded_forest_scores_the_same_bits_on_every_call_through_single_job_scorer() -> None:
    forest, matrix = threaded_forest()
    # Planted: on these rows the trees' sum depends on its order, so a scorer adding them in
    # thread-finishing order could not pass the bitwise checks below by luck of the data.
    reversed_forest = copy.copy(forest).set_params(n_jobs=1)
    reversed_forest.estimators_ = forest.estimators_[::-1]
    assert not np.array_equal(reversed_forest.predict_proba(matrix), tree_order_proba(forest, matrix))
    scorer = single_job_scorer(forest)
    first = scorer.predict_proba(matrix)
    for _ in range(20):
        assert np.array_equal(single_job_scorer(forest).predict_proba(matrix), first)
    assert np.array_equal(first, tree_order_proba(forest, matrix))  # tree order, every call
    np.testing.assert_allclose(first, forest.predict_proba(matrix), rtol=0, atol=1e-12)
    # The fitted forest is neither refitted nor changed: same trees, still two jobs for the next fit.
    assert scorer is not forest and scorer.n_jobs == 1
    assert forest.n_jobs == 2 and scorer.estimators_ is forest.estimators_


def test_every_forest_scoring_path_uses_one_job_without_touching_the_fitted_pipeline() -> None:
    """ChurnModel and Explainer score a two-job forest pipeline in tree order; the pipeline keeps its jobs."""
    model, frame = fitted_model("random_forest")
    forest = model.pipeline.named_steps["model"]
    forest.set_params(n_jobs=2)  # as train.make_pipeline fits it
    steps = model.pipeline.steps
    explainer = Explainer(model)
    matrix = explainer.matrix(frame)
    expected = tree_order_proba(forest, matrix)[:, 1]
    for _ in range(5):
        assert np.array_equal(model.raw_scores(frame), expected)
        assert np.array_equal(explainer.raw_scores(matrix), expected)
    assert model.pipeline.steps is steps and model.pipeline.named_steps["model"] is forest
    assert forest.n_jobs == 2
    # Nothing to do for estimators that already score deterministically: no copies.
    assert single_job_scorer(forest.set_params(n_jobs=1)) is forest
    linear = fitted_model("logistic_regression")[0].pipeline
    assert single_job_scorer(linear) is linear


@pytest.mark.parametrize("algorithm", sorted(ESTIMATORS))
def test_the_known_driver_is_the_top_reason_of_the_riskiest_rows(algorithm: str) -> None:
    model, frame = fitted_model(algorithm)
    riskiest = frame.loc[np.argsort(-model.predict_proba(frame))[:100]]
    reasons = top_reasons(model, riskiest, k=2)
    assert list(reasons.columns) == reason_columns(2)
    assert reasons.index.equals(riskiest.index)
    assert (reasons["reason_1"] == "driver").mean() >= 0.9
    # Reasons are ordered by signed contribution, most churn-raising first.
    assert (reasons["reason_1_contribution"] >= reasons["reason_2_contribution"]).all()
    assert (reasons["reason_1_contribution"] > 0).all()
    # The useless feature contributes far less than the driver on average.
    values = contributions(model, frame).values.abs().mean()
    assert values["noise"] < 0.5 * values["driver"]


def test_random_forest_matches_a_walk_down_each_tree() -> None:
    """The vectorised decomposition equals the textbook per-row, per-tree walk."""
    model, frame = fitted_model("random_forest")
    rows = frame.iloc[:5]
    fast = contributions(model, rows).values.to_numpy()
    matrix = model.pipeline.named_steps["preprocess"].transform(model.feature_frame(rows)).astype(np.float32)
    sources = model.transformed_feature_sources()
    forest = model.pipeline.named_steps["model"]
    expected = np.zeros((len(rows), len(CONTRACT.features)))
    for tree_estimator in forest.estimators_:
        tree = tree_estimator.tree_
        share = tree.value[:, 0, 1] / tree.value[:, 0, :].sum(axis=1)
        for r in range(len(rows)):
            node = 0
            while tree.children_left[node] >= 0:
                feature = tree.feature[node]
                go_left = matrix[r, feature] <= tree.threshold[node]
                child = tree.children_left[node] if go_left else tree.children_right[node]
                expected[r, CONTRACT.feature_names.index(sources[feature])] += share[child] - share[node]
                node = child
    np.testing.assert_allclose(fast, expected / len(forest.estimators_), atol=1e-9)


def test_one_hot_columns_are_summed_into_their_categorical_feature() -> None:
    model, frame = fitted_model("logistic_regression")
    estimator = model.pipeline.named_steps["model"]
    matrix = model.pipeline.named_steps["preprocess"].transform(model.feature_frame(frame.iloc[:3]))
    columns = [i for i, s in enumerate(model.transformed_feature_sources()) if s == "segment"]
    assert len(columns) == 3  # a, b, c
    expected = (matrix[:, columns] * estimator.coef_[0, columns]).sum(axis=1)
    np.testing.assert_allclose(contributions(model, frame.iloc[:3]).values["segment"], expected)


def test_top_k_orders_signed_values_and_pads_missing_reasons() -> None:
    values = pd.DataFrame({"f1": [0.1, -0.3], "f2": [0.5, -0.1], "f3": [-0.2, -0.2]}, index=[10, 11])
    reasons = top_k(values, 4)
    assert reasons.loc[10, "reason_1"] == "f2"
    assert reasons.loc[10, "reason_2"] == "f1"
    assert reasons.loc[10, "reason_3"] == "f3"
    assert reasons.loc[11, "reason_1"] == "f2"
    assert reasons.loc[11, "reason_1_contribution"] == pytest.approx(-0.1)
    assert reasons["reason_4"].isna().all()
    assert reasons["reason_4_contribution"].isna().all()


def test_unsupported_estimator_is_refused() -> None:
    model, frame = fitted_model("logistic_regression")
    from sklearn.dummy import DummyClassifier

    model.pipeline.steps[-1] = ("model", DummyClassifier().fit([[0], [1]], [0, 1]))
    with pytest.raises(ExplainError, match="DummyClassifier"):
        contributions(model, frame)
    with pytest.raises(ExplainError, match="k >= 1"):
        top_reasons(model, frame, 0)
