"""The trained churn model: preprocessing + estimator + calibrator + contract.

One object carries everything scoring needs, so a model can never be applied
with a different feature list, threshold or calibration than it was judged
with. Preprocessing lives inside the sklearn Pipeline (fitted per CV fold, never
on validation rows); calibration is a separate step because it is fitted on
out-of-fold scores, not on the rows the estimator saw.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from ml.features.contract import ContractError, FeatureContract

CALIBRATION_METHODS = ("isotonic", "sigmoid")
MISSING_CATEGORY = "__missing__"
# Estimators whose predict_proba averages trees over joblib threads (summed in finishing order).
THREADED_FORESTS = (RandomForestClassifier, ExtraTreesClassifier)


def single_job_scorer(estimator: Any) -> Any:
    """`estimator`, or a shallow copy of it whose forest predicts with one job, for reproducible scores.

    With several jobs a forest's predict_proba adds the trees' probabilities in
    whichever order its threads finish, so the last bit of a score varied from
    run to run (and between DuckDB and Spark scoring); one job adds them in tree
    order. Only prediction needs this: a fit with a random_state is
    deterministic, so training keeps its jobs. The copy shares the fitted trees
    (nothing is refitted) and the fitted object keeps its own n_jobs. A Pipeline
    (what training builds: preprocessing, then the estimator) is copied with its
    last step replaced; anything else is returned as it is.
    """
    if isinstance(estimator, Pipeline):
        name, last = estimator.steps[-1]
        scorer = single_job_scorer(last)
        if scorer is last:
            return estimator
        pipeline = copy.copy(estimator)
        pipeline.steps = [*estimator.steps[:-1], (name, scorer)]  # a new list: the original's steps stay
        return pipeline
    # n_jobs=None is one job only outside a joblib parallel_config, so only an explicit 1 is left alone.
    if isinstance(estimator, THREADED_FORESTS) and estimator.n_jobs != 1:
        forest = copy.copy(estimator)
        forest.n_jobs = 1
        return forest
    return estimator


def build_preprocessor(contract: FeatureContract, scale_numeric: bool) -> ColumnTransformer:
    """Numeric: median impute + missing indicator (+ scaling for linear models);
    categorical: constant impute + one-hot that ignores unseen categories.

    Column lists come from the contract, so a feature added in SQL/YAML is picked up
    without touching Python. Output is dense so tree models and per-feature
    contributions see plain arrays.
    """
    numeric_steps: list[tuple[str, Any]] = [
        # keep_empty_features keeps the output layout fixed even when a column is all-null
        ("impute", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)),
    ]
    if scale_numeric:
        numeric_steps.append(("scale", StandardScaler()))
    transformers: list[tuple[str, Any, list[str]]] = []
    if contract.numeric:
        transformers.append(("numeric", Pipeline(numeric_steps), contract.numeric))
    if contract.categorical:
        categorical = Pipeline([
            ("impute", SimpleImputer(strategy="constant", fill_value=MISSING_CATEGORY,
                                     keep_empty_features=True)),
            ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
        ])
        transformers.append(("categorical", categorical, contract.categorical))
    return ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)


class ScoreCalibrator:
    """Maps a raw positive-class score to a calibrated churn probability.

    Fitted on out-of-fold scores so the mapping reflects how the model behaves on
    rows it has not seen. Isotonic is flexible (needs a few hundred churners);
    sigmoid (Platt) is the safer choice on small data.
    """

    def __init__(self, method: str) -> None:
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {CALIBRATION_METHODS}, got {method!r}")
        self.method = method
        self.estimator_: IsotonicRegression | LogisticRegression | None = None

    def fit(self, raw: np.ndarray, y: np.ndarray) -> ScoreCalibrator:
        raw = np.asarray(raw, dtype=float)
        y = np.asarray(y, dtype=int)
        if self.method == "isotonic":
            self.estimator_ = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, y)
        else:
            self.estimator_ = LogisticRegression(C=1e6).fit(raw.reshape(-1, 1), y)
        return self

    def predict(self, raw: np.ndarray) -> np.ndarray:
        if self.estimator_ is None:
            raise RuntimeError("calibrator is not fitted")
        raw = np.asarray(raw, dtype=float)
        if isinstance(self.estimator_, IsotonicRegression):
            return np.clip(self.estimator_.predict(raw), 0.0, 1.0)
        return self.estimator_.predict_proba(raw.reshape(-1, 1))[:, 1]


def _is_text_with_nan(column: pd.Series) -> bool:
    """A pandas string column whose missing value is NaN: pandas' default `str` dtype."""
    dtype = column.dtype
    return isinstance(dtype, pd.StringDtype) and isinstance(dtype.na_value, float) and np.isnan(dtype.na_value)


def contract_feature_frame(
    contract: FeatureContract, frame: pd.DataFrame, source: str = "input frame"
) -> pd.DataFrame:
    """The contract's features, in contract order, with the dtypes the pipeline expects.

    Numeric -> float64, categorical -> object with NaN for missing (pandas' string
    dtypes and DuckDB decimals otherwise leak into sklearn in odd ways).
    """
    missing = [name for name in contract.feature_names if name not in frame.columns]
    if missing:
        raise ContractError(
            f"{source} does not match the feature contract of {contract.model!r}: "
            f"missing column(s) {', '.join(missing)} ({len(frame)} rows)"
        )
    # built as a dict and framed once: inserting columns one by one dominates a one-row (API) frame
    out: dict[str, pd.Series] = {}
    for name in contract.feature_names:
        column = frame[name]
        if name in contract.categorical and _is_text_with_nan(column):
            # what the conversion below makes of any column, already (pandas' default str dtype):
            # rebuilding it cost a third of scoring's preprocessing at a million rows
            out[name] = column
        elif name in contract.categorical:
            # Vectorised str() with NaN for missing: a per-value lambda was most of scoring's preprocessing.
            text = column.astype(str).to_numpy(dtype=object)
            text[column.isna().to_numpy()] = np.nan
            out[name] = text
        elif isinstance(column.dtype, np.dtype) and column.dtype.kind in "biuf":
            # already numbers: to_numeric's checks cost ~0.3 ms a column, most of a one-row (API) frame's scoring
            out[name] = column.to_numpy(dtype=np.float64)
        else:
            converted = pd.to_numeric(column, errors="coerce").astype("float64")
            bad = int((converted.isna() & column.notna()).sum())
            if bad:
                raise ContractError(
                    f"{source}: numeric feature {name!r} has {bad} non-numeric value(s)"
                )
            out[name] = converted
    return pd.DataFrame(out, index=frame.index)


@dataclass(frozen=True)
class ModelMetadata:
    """What training recorded about a model, as stored in its metadata.json.

    Every field is optional because models saved before a field existed must
    still load and score: `from_dict` fills what a file lacks with None, and
    `to_dict` writes only the fields that are set, so a model's metadata.json
    keeps exactly the keys (and order) it was written with. `reference`,
    `validation`, `metrics` and the like stay plain JSON dicts: their shape is
    owned by the code that computes them (e.g. `ml.modeling.reference`).
    `library_versions` and `artifact_sha256` are filled by the registry when it
    saves (and are present on every loaded model).
    """

    library_versions: dict[str, str] | None = None
    artifact_sha256: dict[str, str] | None = None
    run_id: str | None = None
    dataset: str | None = None
    feature_mart: str | None = None
    config_hash: str | None = None
    training_data_hash: str | None = None
    training_rows: int | None = None
    snapshot_range: list[str] | None = None  # [first, last] training as_of_date, YYYY-MM-DD
    validation: dict[str, Any] | None = None  # strategy, eval_as_of_dates (and eval_keys for a hold-out)
    selection_metric: str | None = None
    threshold_choice: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    candidates: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None  # drift reference, as compute_reference returns it
    # sql / contract / values fingerprints of the features it was trained on (ml.features.fingerprint)
    feature_definitions: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMetadata:
        """From a metadata.json dict: missing keys become None, keys of other owners are ignored."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, in metadata.json order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class ChurnModel:
    """A fitted, calibrated churn model bound to the feature contract it was trained on."""

    pipeline: Pipeline
    calibrator: ScoreCalibrator
    contract: FeatureContract
    algorithm: str
    params: dict[str, Any]
    threshold: float
    metadata: ModelMetadata = field(default_factory=ModelMetadata)
    version: str | None = None  # set by the registry on the copy it registers or loads

    def feature_frame(self, frame: pd.DataFrame, source: str = "input frame") -> pd.DataFrame:
        """Contract features in order; ContractError names any missing column."""
        return contract_feature_frame(self.contract, frame, source)

    def raw_scores(self, frame: pd.DataFrame) -> np.ndarray:
        """Uncalibrated positive-class score of the estimator (for ranking and calibration).

        Through `single_job_scorer`, so the same rows get the same bits on every call.
        """
        return single_job_scorer(self.pipeline).predict_proba(self.feature_frame(frame))[:, 1]

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated P(churn within the horizon) for each row."""
        return self.calibrator.predict(self.raw_scores(frame))

    def transformed_feature_sources(self) -> list[str]:
        """For each column the ColumnTransformer outputs, the contract feature it came from.

        Built from the fitted transformers' structure (imputer indicator indices,
        one-hot categories), not from parsing output names, so features whose names
        share a prefix cannot be confused.
        """
        preprocess: ColumnTransformer = self.pipeline.named_steps["preprocess"]
        sources: list[str] = []
        for name, transformer, columns in preprocess.transformers_:
            if name == "remainder" or transformer == "drop":
                continue
            columns = list(columns)
            impute: SimpleImputer = transformer.named_steps["impute"]
            if name == "numeric":
                sources += columns
                if impute.indicator_ is not None:
                    sources += [columns[i] for i in impute.indicator_.features_]
            elif name == "categorical":
                onehot: OneHotEncoder = transformer.named_steps["onehot"]
                for column, categories in zip(columns, onehot.categories_, strict=True):
                    sources += [column] * len(categories)
            else:
                raise ValueError(f"unexpected transformer {name!r} in the preprocessing step")
        expected = len(preprocess.get_feature_names_out())
        if len(sources) != expected:
            raise RuntimeError(
                f"preprocessing outputs {expected} columns but {len(sources)} were traced to features"
            )
        return sources
