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
  root share, to the forest's probability. Rows reaching the same leaf share
  a path, so each tree's contributions are tabulated per leaf once and looked
  up with `tree.apply`.

Contributions are computed on the preprocessed columns and then added up per
contract feature (a one-hot categorical's columns become one reason), so the
reasons name the SQL columns analysts know.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from ml.modeling.fast_preprocess import CheckedPreprocessor
from ml.modeling.model import single_job_scorer


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


@dataclass(frozen=True)
class _LeafTable:
    """One tree's Saabas contributions, precomputed per leaf (leaf x contract feature).

    Every row reaching a leaf shares the same path, hence the same
    contributions; looking them up by `tree.apply` costs one gather per row
    instead of a sparse decision-path product.
    """

    tree: Any
    leaf_position: np.ndarray  # node id -> row of `values` (-1 for internal nodes)
    values: np.ndarray
    root_share: float


def _leaf_table(tree_estimator: Any, positive: int, mapping: np.ndarray) -> _LeafTable:
    tree = tree_estimator.tree_
    value = tree.value[:, 0, :]
    share = value[:, positive] / value.sum(axis=1)  # churn share at each node
    parent = np.full(tree.node_count, -1)
    internal = np.flatnonzero(tree.children_left >= 0)
    parent[tree.children_left[internal]] = internal
    parent[tree.children_right[internal]] = internal
    depth = np.zeros(tree.node_count, dtype=int)
    path = np.zeros((tree.node_count, mapping.shape[0]))
    # Node ids are assigned depth-first, so a parent's id is below its children's:
    # filling level by level, each node adds its own step to its parent's path.
    for node in range(1, tree.node_count):
        depth[node] = depth[parent[node]] + 1
    for level in range(1, int(depth.max()) + 1):
        nodes = np.flatnonzero(depth == level)
        parents = parent[nodes]
        path[nodes] = path[parents]
        # Moving from parent to child changes the churn share; credit the parent's split feature.
        path[nodes, tree.feature[parents]] += share[nodes] - share[parents]
    leaves = np.flatnonzero(tree.children_left < 0)
    position = np.full(tree.node_count, -1)
    position[leaves] = np.arange(len(leaves))
    return _LeafTable(tree_estimator, position, path[leaves] @ mapping, float(share[0]))


class Explainer:
    """Decomposes a ChurnModel's raw output into contract-feature contributions.

    Built once per model (a random forest's per-leaf tables are precomputed
    here) and applied chunk by chunk; `matrix()` exposes the preprocessed rows
    so a caller that also needs the model's scores transforms each chunk once.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.preprocess = model.pipeline.named_steps["preprocess"]
        self._transform = CheckedPreprocessor(self.preprocess)
        self.estimator = model.pipeline.named_steps["model"]
        self.kind = type(self.estimator).__name__
        if self.kind not in ("XGBClassifier", "LogisticRegression", "RandomForestClassifier"):
            raise ExplainError(f"cannot decompose a {self.kind}: supported are XGBClassifier, "
                               "LogisticRegression and RandomForestClassifier")
        names = [str(n) for n in self.preprocess.get_feature_names_out()]
        self.mapping, self.features = source_matrix(model, names)
        self.output = "probability" if self.kind == "RandomForestClassifier" else "log_odds"
        self._leaf_tables: list[_LeafTable] = []
        # Same fitted trees, scored with one job so a score's last bit does not depend on thread timing.
        self._scorer = single_job_scorer(self.estimator)
        if self.kind == "RandomForestClassifier":
            classes = list(self.estimator.classes_)
            positive = classes.index(1) if 1 in classes else len(classes) - 1
            self._leaf_tables = [_leaf_table(t, positive, self.mapping) for t in self.estimator.estimators_]

    def matrix(self, frame: pd.DataFrame, source: str = "input frame") -> Any:
        """The preprocessed feature matrix exactly as the final estimator sees it.

        `source` names the table in the error raised for a bad feature value.
        """
        return self._transform.transform(self.model.feature_frame(frame, source))

    def raw_scores(self, matrix: Any) -> np.ndarray:
        """The estimator's uncalibrated churn score of preprocessed rows (= model.raw_scores)."""
        return self._scorer.predict_proba(matrix)[:, 1]

    def contributions(self, matrix: Any, index: pd.Index) -> Contributions:
        """Contributions of preprocessed rows, by contract feature, plus the bias term."""
        if matrix.shape[0] == 0:  # e.g. a chunk with nobody flagged; boosters reject empty input
            return Contributions(pd.DataFrame(np.zeros((0, len(self.features))), columns=self.features,
                                              index=index), np.zeros(0), self.output)
        if self.kind == "XGBClassifier":
            values, bias = self._xgboost(matrix)
        elif self.kind == "LogisticRegression":
            values = _dense(matrix) * np.asarray(self.estimator.coef_, dtype=np.float64).ravel()
            bias = np.full(values.shape[0], float(np.ravel(self.estimator.intercept_)[0]))
        else:
            return self._forest(matrix, index)
        return Contributions(pd.DataFrame(values @ self.mapping, columns=self.features, index=index),
                             bias, self.output)

    def _xgboost(self, matrix: Any) -> tuple[np.ndarray, np.ndarray]:
        import xgboost as xgb

        booster = self.estimator.get_booster()
        best = getattr(self.estimator, "best_iteration", None)
        iteration_range = (0, best + 1) if best is not None else (0, 0)
        data = matrix if sparse.issparse(matrix) else _dense(matrix)
        dmatrix = xgb.DMatrix(data, feature_names=booster.feature_names)
        contribs = booster.predict(dmatrix, pred_contribs=True, iteration_range=iteration_range)
        return np.asarray(contribs[:, :-1], dtype=np.float64), np.asarray(contribs[:, -1], dtype=np.float64)

    def _forest(self, matrix: Any, index: pd.Index) -> Contributions:
        data = sparse.csr_matrix(matrix, dtype=np.float32) if sparse.issparse(matrix) else \
            _dense(matrix).astype(np.float32)
        total = np.zeros((data.shape[0], len(self.features)))
        bias = 0.0
        for table in self._leaf_tables:
            total += table.values[table.leaf_position[table.tree.apply(data)]]
            bias += table.root_share
        n_trees = len(self._leaf_tables)
        return Contributions(pd.DataFrame(total / n_trees, columns=self.features, index=index),
                             np.full(data.shape[0], bias / n_trees), self.output)


def contributions(model: Any, frame: pd.DataFrame) -> Contributions:
    """Exact per-feature contributions of each row of `frame` to the model's raw output."""
    explainer = Explainer(model)
    return explainer.contributions(explainer.matrix(frame), frame.index)


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
    rows = np.arange(matrix.shape[0])
    out: dict[str, Any] = {}
    for i in range(k):
        if i < used:
            out[f"reason_{i + 1}"] = pd.array(names[order[:, i]], dtype="string")
            out[f"reason_{i + 1}_contribution"] = matrix[rows, order[:, i]]
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
