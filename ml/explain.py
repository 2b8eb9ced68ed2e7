"""Per-customer reasons: which contract features push each churn score up.

A retention team acts on a score only when it can say *why* a customer is at
risk, so every scored row carries its top features by contribution. The
contributions are exact decompositions of the model's own raw output, computed
the cheapest exact way for each algorithm:

* XGBoost: the booster's TreeSHAP (`pred_contribs=True`); they sum, with the
  bias column, to the margin (log-odds).
* Logistic regression: coefficient times the preprocessed value. The
  preprocessor standardises numeric columns, so a transformed value already is
  the distance from the training mean; they sum, with the intercept, to the
  decision function (log-odds).
* Random forest: the Saabas / treeinterpreter path decomposition: along each
  tree's decision path every split moves the node's churn share, and that move
  is credited to the split's feature; averaged over trees they sum, with the
  root share, to the forest's probability.

Contributions are computed on the preprocessed columns and then added up per
contract feature (a one-hot categorical's columns become one reason), so the
reasons name the SQL columns analysts know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse


class ExplainError(ValueError):
    """The model's final estimator is not one this module can decompose."""


@dataclass(frozen=True)
class Contributions:
    """Per-row contributions by contract feature, plus the per-row bias term.

    `values.sum(axis=1) + bias` equals the model's raw output for each row
    (margin for XGBoost and logistic regression, probability for random forest).
    """

    values: pd.DataFrame
    bias: np.ndarray
    output: str  # "log_odds" or "probability"


def _transformed_matrix(model: Any, frame: pd.DataFrame) -> tuple[Any, list[str]]:
    """The preprocessed feature matrix exactly as the final estimator sees it."""
    preprocess = model.pipeline.named_steps["preprocess"]
    matrix = preprocess.transform(model.feature_frame(frame))
    names = [str(n) for n in preprocess.get_feature_names_out()]
    return matrix, names


def _dense(matrix: Any) -> np.ndarray:
    if sparse.issparse(matrix):
        return np.asarray(matrix.toarray(), dtype=np.float64)
    if isinstance(matrix, pd.DataFrame):
        return matrix.to_numpy(dtype=np.float64)
    return np.asarray(matrix, dtype=np.float64)


def source_matrix(model: Any, transformed_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """0/1 matrix (transformed column x contract feature) that sums columns per feature."""
    sources = model.transformed_feature_sources()
    if isinstance(sources, Mapping):
        missing = [n for n in transformed_names if n not in sources]
        if missing:
            raise ExplainError(f"no contract feature known for transformed column(s) {missing}")
        sources = [sources[n] for n in transformed_names]
    sources = list(sources)
    if len(sources) != len(transformed_names):
        raise ExplainError(
            f"transformed_feature_sources() gave {len(sources)} sources for "
            f"{len(transformed_names)} transformed columns"
        )
    features = list(model.contract.feature_names)
    unknown = sorted({s for s in sources if s not in features})
    if unknown:
        raise ExplainError(f"transformed columns map to non-contract feature(s) {unknown}")
    position = {name: i for i, name in enumerate(features)}
    mapping = np.zeros((len(sources), len(features)))
    mapping[np.arange(len(sources)), [position[s] for s in sources]] = 1.0
    return mapping, features


def _xgboost_contributions(estimator: Any, matrix: Any) -> tuple[np.ndarray, np.ndarray]:
    import xgboost as xgb

    booster = estimator.get_booster()
    best = getattr(estimator, "best_iteration", None)
    iteration_range = (0, best + 1) if best is not None else (0, 0)
    data = matrix if sparse.issparse(matrix) else _dense(matrix)
    dmatrix = xgb.DMatrix(data, feature_names=booster.feature_names)
    contribs = booster.predict(dmatrix, pred_contribs=True, iteration_range=iteration_range)
    return np.asarray(contribs[:, :-1], dtype=np.float64), np.asarray(contribs[:, -1], dtype=np.float64)


def _logistic_contributions(estimator: Any, matrix: Any) -> tuple[np.ndarray, np.ndarray]:
    coef = np.asarray(estimator.coef_, dtype=np.float64).ravel()
    values = _dense(matrix) * coef
    bias = np.full(values.shape[0], float(np.ravel(estimator.intercept_)[0]))
    return values, bias


def _tree_contributions(tree_estimator: Any, matrix: Any, positive: int) -> tuple[np.ndarray, float]:
    """Saabas decomposition of one tree, vectorised: path indicator @ (node delta by feature)."""
    tree = tree_estimator.tree_
    value = tree.value[:, 0, :]
    share = value[:, positive] / value.sum(axis=1)  # churn share at each node
    parent = np.full(tree.node_count, -1)
    internal = np.flatnonzero(tree.children_left >= 0)
    parent[tree.children_left[internal]] = internal
    parent[tree.children_right[internal]] = internal
    children = np.flatnonzero(parent >= 0)
    # Moving from parent to child changes the churn share; credit the parent's split feature.
    deltas = sparse.csr_matrix(
        (share[children] - share[parent[children]], (children, tree.feature[parent[children]])),
        shape=(tree.node_count, tree_estimator.n_features_in_),
    )
    paths = tree_estimator.decision_path(matrix)
    return np.asarray((paths @ deltas).toarray()), float(share[0])


def _forest_contributions(estimator: Any, matrix: Any) -> tuple[np.ndarray, np.ndarray]:
    positive = int(np.flatnonzero(estimator.classes_ == 1)[0]) if 1 in estimator.classes_ else 1
    data = matrix if sparse.issparse(matrix) else _dense(matrix).astype(np.float32)
    if sparse.issparse(data):
        data = sparse.csr_matrix(data, dtype=np.float32)
    total = np.zeros((data.shape[0], estimator.n_features_in_))
    bias = 0.0
    for tree_estimator in estimator.estimators_:
        values, root = _tree_contributions(tree_estimator, data, positive)
        total += values
        bias += root
    n_trees = len(estimator.estimators_)
    return total / n_trees, np.full(data.shape[0], bias / n_trees)


def contributions(model: Any, frame: pd.DataFrame) -> Contributions:
    """Exact per-feature contributions of each row of `frame` to the model's raw output."""
    estimator = model.pipeline.named_steps["model"]
    matrix, names = _transformed_matrix(model, frame)
    kind = type(estimator).__name__
    if kind == "XGBClassifier":
        values, bias = _xgboost_contributions(estimator, matrix)
        output = "log_odds"
    elif kind == "LogisticRegression":
        values, bias = _logistic_contributions(estimator, matrix)
        output = "log_odds"
    elif kind == "RandomForestClassifier":
        values, bias = _forest_contributions(estimator, matrix)
        output = "probability"
    else:
        raise ExplainError(f"cannot decompose a {kind}: supported are XGBClassifier, "
                           "LogisticRegression and RandomForestClassifier")
    mapping, features = source_matrix(model, names)
    by_feature = pd.DataFrame(values @ mapping, columns=features, index=frame.index)
    return Contributions(values=by_feature, bias=bias, output=output)


def reason_columns(k: int) -> list[str]:
    """Column names of the reasons, in table order: reason_1, reason_1_contribution, ..."""
    return [c for i in range(1, k + 1) for c in (f"reason_{i}", f"reason_{i}_contribution")]


def top_k(values: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per row, the k features with the largest signed contribution (most churn-raising first).

    Signed, not absolute: a reason answers "why is this customer at risk", so
    the features that push the score up come first. Rows of a model with fewer
    than k features get nulls in the extra reason columns.
    """
    matrix = values.to_numpy(dtype=np.float64)
    names = np.asarray(values.columns, dtype=object)
    n = matrix.shape[1]
    used = min(k, n)
    # argsort of the negated values, stable, so ties keep contract order.
    order = np.argsort(-matrix, axis=1, kind="stable")[:, :used]
    rows = np.arange(matrix.shape[0])[:, None]
    out: dict[str, Any] = {}
    for i in range(k):
        if i < used:
            out[f"reason_{i + 1}"] = pd.array(names[order[:, i]], dtype="string")
            out[f"reason_{i + 1}_contribution"] = matrix[rows[:, 0], order[:, i]]
        else:
            out[f"reason_{i + 1}"] = pd.array([None] * matrix.shape[0], dtype="string")
            out[f"reason_{i + 1}_contribution"] = np.full(matrix.shape[0], np.nan)
    return pd.DataFrame(out, index=values.index)


def top_reasons(model: Any, frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per row of `frame`, the top k contract features by signed contribution to the score.

    Columns: reason_1, reason_1_contribution, ..., reason_k, reason_k_contribution;
    the index is `frame`'s.
    """
    if k < 1:
        raise ExplainError(f"top_reasons needs k >= 1, got {k}")
    return top_k(contributions(model, frame).values, k)
