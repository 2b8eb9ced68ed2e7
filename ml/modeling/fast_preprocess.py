"""The fitted preprocessing step replayed in plain numpy, for scoring a million rows a second.

Scoring spends most of its non-explanation time in scikit-learn's
`ColumnTransformer.transform`: input validation, per-transformer copies and an
`hstack`, none of which a fitted, known pipeline needs. This module reads the
fitted parameters of the one preprocessing shape `ml.modeling.model.build_preprocessor`
makes (numeric: median impute + missing indicator, optional standard scaling;
categorical: constant impute + one-hot that ignores unseen categories) and
applies the same arithmetic in the same order, so the output is bit-identical.

Two guards keep it from ever scoring differently from the model:
* `compile_preprocessor` returns None for any step it does not recognise
  (another transformer, a dropped category, infrequent-category grouping), and
  the caller keeps scikit-learn's transform;
* `CheckedPreprocessor` compares both on the first rows it sees and falls back
  to scikit-learn for good, with a warning, if they differ in a single bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from ml.logs import get_logger

log = get_logger("preprocess")

Transform = Callable[[pd.DataFrame], np.ndarray]
# Rows compared against scikit-learn before the fast path is trusted.
CHECK_ROWS = 2_000


@dataclass(frozen=True)
class _Numeric:
    columns: list[str]
    fill: np.ndarray
    indicator: np.ndarray | None  # input column positions that get a missing-indicator column
    mean: np.ndarray | None
    scale: np.ndarray | None

    @property
    def width(self) -> int:
        return len(self.columns) + (0 if self.indicator is None else len(self.indicator))

    def write(self, frame: pd.DataFrame, out: np.ndarray) -> None:
        """Imputed values, then the missing indicators, then (x - mean) / scale over both, as
        SimpleImputer(add_indicator) and StandardScaler do, one output column at a time."""
        missing: list[np.ndarray] = []
        for j, column in enumerate(self.columns):
            values = frame[column].to_numpy(dtype=np.float64)
            gaps = np.isnan(values)
            out[:, j] = values
            out[gaps, j] = self.fill[j]
            missing.append(gaps)
        for j, source in enumerate([] if self.indicator is None else self.indicator):
            out[:, len(self.columns) + j] = missing[source]
        if self.mean is not None:
            out -= self.mean
        if self.scale is not None:
            out /= self.scale


@dataclass(frozen=True)
class _Categorical:
    columns: list[str]
    fill: str
    categories: list[np.ndarray]

    @property
    def width(self) -> int:
        return sum(len(c) for c in self.categories)

    def write(self, frame: pd.DataFrame, out: np.ndarray) -> None:
        """One-hot columns of every categorical column, zero for missing-and-unseen like the encoder."""
        out[:] = 0.0
        rows = np.arange(len(frame))
        offset = 0
        for column, categories in zip(self.columns, self.categories, strict=True):
            # Factorise once (a C hash of the few distinct values), then map the distinct values to
            # the encoder's positions: far cheaper than matching every row against the categories.
            inverse, uniques = pd.factorize(frame[column], use_na_sentinel=True)
            position = {value: i for i, value in enumerate(categories)}
            lookup = np.array([position.get(value, -1) for value in uniques] + [position.get(self.fill, -1)],
                              dtype=np.int64)
            codes = lookup[inverse]  # inverse -1 (missing) picks the last entry: the fill value's position
            known = codes >= 0  # -1: unseen, ignored like handle_unknown="ignore"
            out[rows[known], offset + codes[known]] = 1.0
            offset += len(categories)


def _numeric(pipeline: Pipeline, columns: list[str]) -> _Numeric | None:
    steps = dict(pipeline.steps)
    impute, scale = steps.get("impute"), steps.get("scale")
    if set(steps) - {"impute", "scale"} or not isinstance(impute, SimpleImputer) or impute.strategy != "median":
        return None
    if not (isinstance(impute.missing_values, float) and np.isnan(impute.missing_values)):
        return None
    indicator = None
    if impute.indicator_ is not None:
        if impute.indicator_.features != "missing-only":
            return None
        indicator = np.asarray(impute.indicator_.features_, dtype=int)
    if scale is not None and not isinstance(scale, StandardScaler):
        return None
    mean = None if scale is None or scale.mean_ is None else np.asarray(scale.mean_, dtype=np.float64)
    std = None if scale is None or scale.scale_ is None else np.asarray(scale.scale_, dtype=np.float64)
    return _Numeric(list(columns), np.asarray(impute.statistics_, dtype=np.float64), indicator, mean, std)


def _categorical(pipeline: Pipeline, columns: list[str]) -> _Categorical | None:
    steps = dict(pipeline.steps)
    impute, onehot = steps.get("impute"), steps.get("onehot")
    if set(steps) != {"impute", "onehot"} or not isinstance(impute, SimpleImputer) \
            or not isinstance(onehot, OneHotEncoder):
        return None
    if impute.strategy != "constant" or not isinstance(impute.fill_value, str):
        return None
    if onehot.drop is not None or getattr(onehot, "_infrequent_enabled", False) \
            or onehot.handle_unknown != "ignore" or onehot.dtype not in (np.float64, float):
        return None
    return _Categorical(list(columns), impute.fill_value, [np.asarray(c, dtype=object) for c in onehot.categories_])


def compile_preprocessor(preprocess: ColumnTransformer) -> Transform | None:
    """A numpy replay of a fitted preprocessing step, or None when its shape is not the known one."""
    if getattr(preprocess, "sparse_threshold", None) != 0.0:
        return None
    parts: list[_Numeric | _Categorical] = []
    for name, transformer, columns in preprocess.transformers_:
        if name == "remainder" or transformer == "drop":
            continue
        if not isinstance(transformer, Pipeline):
            return None
        part = _numeric(transformer, columns) if name == "numeric" else \
            _categorical(transformer, columns) if name == "categorical" else None
        if part is None:
            return None
        parts.append(part)
    if not parts:
        return None

    widths = [part.width for part in parts]
    edges = np.cumsum([0, *widths])

    def transform(frame: pd.DataFrame) -> np.ndarray:
        # One column-major matrix written in place: each output column is contiguous for its writer,
        # with no per-part blocks and no hstack copy (both were most of the replay's time); the
        # estimators read it as fast as a row-major one, and the values are the same bits.
        out = np.empty((len(frame), int(edges[-1])), dtype=np.float64, order="F")
        for part, start, stop in zip(parts, edges[:-1], edges[1:], strict=True):
            part.write(frame, out[:, start:stop])
        return out

    return transform


class CheckedPreprocessor:
    """The fast replay when it agrees bit for bit with scikit-learn on the first rows, else scikit-learn.

    Stateful on purpose but only about itself: once checked, later chunks of
    the same scoring run skip the comparison.
    """

    def __init__(self, preprocess: ColumnTransformer) -> None:
        self.preprocess = preprocess
        self.fast = compile_preprocessor(preprocess)
        self.checked = False

    def transform(self, features: pd.DataFrame) -> np.ndarray:
        if self.fast is None:
            return self.preprocess.transform(features)
        if not self.checked:
            sample = features.iloc[:CHECK_ROWS]
            expected = np.asarray(self.preprocess.transform(sample), dtype=np.float64)
            got = self.fast(sample)
            if got.shape != expected.shape or not np.array_equal(got, expected, equal_nan=True):
                log.warning("fast preprocessing differs from scikit-learn's on the first %d rows; "
                            "using scikit-learn's transform", len(sample))
                self.fast = None
                return self.preprocess.transform(features)
            self.checked = True
        return self.fast(features)
