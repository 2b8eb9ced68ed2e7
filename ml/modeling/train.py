"""`churn train`: compare candidate models, calibrate, evaluate out of time, register.

How a model is judged decides whether its numbers can be trusted:
- customers' monthly snapshots are correlated, so CV folds are grouped by
  customer (StratifiedGroupKFold) and no customer sits on both sides of a fold;
- the most recent fully labelled snapshot(s) are held out from CV and selection
  and used once, at the end, as the out-of-time test that mimics next month;
- calibration and the decision threshold are fitted on out-of-fold predictions,
  never on rows the estimator was fitted on;
- every result is reported beside the naive "nobody churns" baseline.
The feature list is read from the dbt contract, never written in Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterSampler, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits
from xgboost import XGBClassifier

from ml.config import ALGORITHMS, ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.mart import (
    TrainingError,
    current_contract,
    fully_labelled_dates,
    load_evaluation_rows,
    load_training_rows,
    mart_reader,
)
from ml.logs import get_logger, timed
from ml.modeling.definitions import definitions_of
from ml.modeling.evaluate import (
    CandidateScore,
    ThresholdChoice,
    aggregate_importance,
    baseline_metrics,
    choose_threshold_for_cost,
    choose_threshold_for_recall,
    classification_metrics,
    reliability_bins,
    select_by_simplicity,
    threshold_curve,
)
from ml.modeling.model import (
    ChurnModel,
    ModelMetadata,
    ScoreCalibrator,
    build_preprocessor,
    contract_feature_frame,
    single_job_scorer,
)
from ml.modeling.reference import compute_reference
from ml.modeling.registry import (
    SPLIT_OUT_OF_FOLD,
    SPLIT_OUT_OF_TIME,
    Registration,
    champion_version,
    register,
)
from ml.warehouse import (
    Reader,
    Session,
    TableSpec,
    column_list,
    connect,
    declare,
    json_value,
    quote,
)

log = get_logger("train")

ESTIMATOR_JOBS = 2
HOLDOUT_FOLDS = 5  # the single-snapshot fallback holds out one fold of five: 20%
HALVING_FACTOR = 3  # successive halving keeps the best third of the draws after each fold
SPLIT_TRAIN, SPLIT_TEST = "train", "test"  # the values a contract's `split` column may hold
PERMUTATION_REPEATS = 3
SCORERS = {"pr_auc": "average_precision", "roc_auc": "roc_auc"}
# XGBoost's own name of each selection metric: early stopping watches what selection judges.
XGB_METRICS = {"pr_auc": "aucpr", "roc_auc": "auc"}
STOPPING_SHARE = 0.2  # customers of a fold's training part set aside for boosting's early stopping


@dataclass(frozen=True)
class TrainResult:
    """What `churn train` did."""

    version: str | None
    algorithm: str | None
    oot_metrics: dict[str, float]
    promoted: bool
    run_id: str | None = None
    validation_strategy: str | None = None
    skipped: bool = False
    message: str = ""
    baseline_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationSplit:
    """Which rows train/select (positions into the frame) and which judge the final model."""

    strategy: str  # out_of_time | stratified_holdout | given_split
    train_index: np.ndarray
    eval_index: np.ndarray
    eval_as_of_dates: list[str]

    def describe(self, frame: pd.DataFrame, contract: FeatureContract) -> dict[str, Any]:
        """JSON description the registry uses to re-read the evaluation rows."""
        described: dict[str, Any] = {"strategy": self.strategy, "eval_as_of_dates": self.eval_as_of_dates}
        if self.strategy != "out_of_time":
            rows = frame.iloc[self.eval_index]
            described["eval_keys"] = [
                [json_value(k), str(pd.Timestamp(a).date())]
                for k, a in zip(rows[contract.key], rows[contract.as_of], strict=True)
            ]
        return described


@dataclass(frozen=True)
class SearchResult:
    """Best configuration of one algorithm and its out-of-fold raw scores."""

    algorithm: str
    params: dict[str, Any]
    fold_scores: list[float]
    oof_raw: np.ndarray
    configs_tried: int
    seconds: float
    all_configs: list[dict[str, Any]] = field(default_factory=list)
    # Boosting rounds early stopping kept on each of the winner's folds (empty without early stopping).
    fold_rounds: list[int] = field(default_factory=list)

    @property
    def refit_params(self) -> dict[str, Any]:
        """The winner's parameters for the refit: with early stopping, the rounds CV found replace the bound."""
        if not self.fold_rounds:
            return dict(self.params)
        return {**self.params, "n_estimators": int(round(float(np.mean(self.fold_rounds))))}

    @property
    def score(self) -> CandidateScore:
        return CandidateScore(self.algorithm, float(np.mean(self.fold_scores)),
                              float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else 0.0,
                              len(self.fold_scores))


# ---------------------------------------------------------------- data

def frame_hash(frame: pd.DataFrame) -> str:
    """sha256 of a frame's values and column names: identifies the exact training data."""
    digest = hashlib.sha256("|".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- splits

def validation_split(
    frame: pd.DataFrame, contract: FeatureContract, labelled_dates: list[pd.Timestamp],
    out_of_time_snapshots: int, random_state: int, table: str = "the feature mart",
) -> ValidationSplit:
    """The mart's given split, else out of time on the newest labelled dates, else a stratified hold-out.

    A given split (a contract column of train/test) wins: the analyst fixed which
    rows judge the model, e.g. to compare with a published result. With fewer
    than two labelled dates (e.g. a single-snapshot dataset) there is no "later"
    to test on, so one grouped, stratified fold of five (20%) is held out.
    """
    if contract.split:
        return given_split(frame, contract, table)
    present = set(frame[contract.as_of].unique())
    dates = sorted(d for d in labelled_dates if d in present)
    if len(dates) >= 2 and len(dates) > out_of_time_snapshots:
        held = set(dates[-out_of_time_snapshots:])
        is_eval = frame[contract.as_of].isin(held).to_numpy()
        return ValidationSplit(
            "out_of_time", np.flatnonzero(~is_eval), np.flatnonzero(is_eval),
            [str(d.date()) for d in sorted(held)],
        )
    splitter = StratifiedGroupKFold(n_splits=HOLDOUT_FOLDS, shuffle=True, random_state=random_state)
    train_index, eval_index = next(splitter.split(frame, frame[contract.label], frame[contract.key]))
    return ValidationSplit("stratified_holdout", np.sort(train_index), np.sort(eval_index), [])


def given_split(frame: pd.DataFrame, contract: FeatureContract, table: str) -> ValidationSplit:
    """Hold out exactly the rows whose split column is `test`; refuse any other value, naming it."""
    values = frame[contract.split]
    allowed = values.isin([SPLIT_TRAIN, SPLIT_TEST])
    if not allowed.all():
        counts = values[~allowed].astype(object).where(values[~allowed].notna(), "NULL").value_counts()
        shown = ", ".join(f"{value!r}: {n}" for value, n in counts.head(5).items())
        raise TrainingError(
            f"{table}: split column {contract.split!r} must be {SPLIT_TRAIN!r} or {SPLIT_TEST!r}; "
            f"{int((~allowed).sum())} of {len(frame)} labelled row(s) hold other values ({shown})"
        )
    is_eval = (values == SPLIT_TEST).to_numpy()
    for name, rows in ((SPLIT_TEST, int(is_eval.sum())), (SPLIT_TRAIN, int((~is_eval).sum()))):
        if rows == 0:
            raise TrainingError(f"{table}: split column {contract.split!r} has no labelled {name!r} rows "
                                f"({len(frame)} labelled rows)")
    return ValidationSplit("given_split", np.flatnonzero(~is_eval), np.flatnonzero(is_eval), [])


def cv_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, random_state: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds in which each customer's snapshots stay on one side."""
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise TrainingError(f"only {n_groups} customers for {n_folds} CV folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros(len(y)), y, groups))


def customer_sample(groups: np.ndarray, max_rows: int, random_state: int) -> np.ndarray:
    """Positions of the rows of a seeded share of customers, each with all its rows, at most `max_rows` in all.

    Customers are ranked by a seeded hash of their key, so a customer's place does
    not depend on who else is in the table (mostly the same customers night after
    night), and taken while their rows fit. Whole customers keep grouped CV honest.
    """
    if len(groups) <= max_rows:
        return np.arange(len(groups))
    codes, customers = pd.factorize(groups)
    seed = hashlib.sha256(f"search:{random_state}".encode()).hexdigest()[:16]
    rank = np.argsort(pd.util.hash_array(np.asarray(customers.astype(str), dtype=object), hash_key=seed),
                      kind="stable")
    fits = np.cumsum(np.bincount(codes)[rank]) <= max_rows
    return np.flatnonzero(np.isin(codes, rank[fits]))


def stopping_split(fit_idx: np.ndarray, y: np.ndarray, groups: np.ndarray,
                   random_state: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A fold's training rows split by customer into rows boosting fits on and rows early stopping watches.

    The watched customers come from the fold's training part, never its validation
    part: the fold's score then judges a model whose size was not tuned on it.
    None when the watched rows would hold a single class (nothing to stop on).
    """
    customers = np.unique(groups[fit_idx])
    rng = np.random.default_rng(random_state)
    watched = rng.choice(customers, size=max(1, int(round(STOPPING_SHARE * len(customers)))), replace=False)
    is_watched = np.isin(groups[fit_idx], watched)
    stop_idx = fit_idx[is_watched]
    if len(np.unique(y[stop_idx])) < 2 or is_watched.all():
        return None
    return fit_idx[~is_watched], stop_idx


# ---------------------------------------------------------------- candidates

def make_pipeline(contract: FeatureContract, algorithm: str, params: dict[str, Any],
                  random_state: int, scale_pos_weight: float) -> Pipeline:
    """Preprocessing + estimator for one candidate configuration."""
    if algorithm == "logistic_regression":
        estimator = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=random_state, **params)
    elif algorithm == "random_forest":
        estimator = RandomForestClassifier(class_weight="balanced_subsample", n_jobs=ESTIMATOR_JOBS,
                                           random_state=random_state, **params)
    elif algorithm == "xgboost":
        estimator = XGBClassifier(tree_method="hist", n_jobs=ESTIMATOR_JOBS, random_state=random_state,
                                  scale_pos_weight=scale_pos_weight, eval_metric="logloss",
                                  importance_type="gain", **params)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    preprocess = build_preprocessor(contract, scale_numeric=algorithm == "logistic_regression")
    return Pipeline([("preprocess", preprocess), ("model", estimator)])


def search_space(config: ChurnConfig, algorithm: str, rows: int) -> dict[str, list[Any]]:
    """The algorithm's configured space, widened by `small_table_spaces` on a small table.

    Fits on a few thousand rows are cheap and such tables (often high-signal)
    are where the big-table regularisation costs most: deep, unpruned forests
    and faster-learning boosting get their chance there.
    """
    t = config.training
    space = dict(t.search_spaces[algorithm])
    if is_small_table(config, rows):
        space.update(t.small_table_spaces.get(algorithm, {}))
    return {name: list(values) for name, values in space.items()}


def is_small_table(config: ChurnConfig, rows: int) -> bool:
    return rows <= config.training.small_table_rows


def search_iterations(config: ChurnConfig, rows: int) -> int:
    """Draws per candidate: more on a small table, where each fit costs little."""
    t = config.training
    return max(t.search_iterations, t.small_table_iterations) if is_small_table(config, rows) else t.search_iterations


def sample_configs(space: dict[str, list[Any]], iterations: int, random_state: int) -> list[dict[str, Any]]:
    """Up to `iterations` distinct seeded draws from a grid (one, the defaults, from an empty one)."""
    size = int(np.prod([len(v) for v in space.values()]))
    # Plain Python values: the params are stored as JSON (metadata.json, model_metrics.params).
    return [json_value(p) for p in ParameterSampler(space, n_iter=min(iterations, size), random_state=random_state)]


def _selection_value(metric: str, y: np.ndarray, scores: np.ndarray) -> float:
    return float(classification_metrics(y, scores, threshold=0.5)[metric])


def fit_early_stopped(pipeline: Pipeline, X: pd.DataFrame, y: np.ndarray, fit_idx: np.ndarray,
                      stop_idx: np.ndarray, rounds: int, metric: str) -> int:
    """Fit preprocessing on the fit rows, then boosting until `rounds` rounds bring no gain on the stop rows.

    The Pipeline does not pass an eval_set through its preprocessing, so the two
    steps are fitted here in turn; the fitted Pipeline predicts with the best
    round (XGBoost's default after early stopping). Returns the rounds kept.
    `fit_transform` transforms the fit rows once (`fit` then `transform` did it
    twice: ColumnTransformer.fit already transforms them and drops the result).
    """
    preprocess = pipeline.named_steps["preprocess"]
    fitted_rows = preprocess.fit_transform(X.iloc[fit_idx])
    model = pipeline.named_steps["model"]
    model.set_params(early_stopping_rounds=rounds, eval_metric=XGB_METRICS[metric])
    model.fit(fitted_rows, y[fit_idx],
              eval_set=[(preprocess.transform(X.iloc[stop_idx]), y[stop_idx])], verbose=False)
    return int(model.best_iteration) + 1


def search_algorithm(
    algorithm: str, contract: FeatureContract, X: pd.DataFrame, y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]], config: ChurnConfig, scale_pos_weight: float,
    stopping: list[tuple[np.ndarray, np.ndarray] | None] | None = None, table_rows: int | None = None,
) -> SearchResult:
    """Seeded random search for one algorithm; every config sees the same folds.

    With `halving`, folds are the resource of successive halving: every draw is
    fitted on the first fold, the best third (by mean over the folds so far) go
    on to the next, and the survivors finish all folds. Three draws on three
    folds cost five fits instead of nine; the winner still has out-of-fold
    scores on every row, which calibration and the threshold need.

    `stopping` (one split of each fold's training rows, see `stopping_split`)
    lets boosting stop early; `n_estimators` is then only the upper bound. The
    space follows the size of the whole table (`table_rows`), not of the
    search's sample: the winner is refitted on the whole table.
    """
    metric = config.problem.selection_metric
    rows = len(y) if table_rows is None else table_rows
    space = search_space(config, algorithm, rows)
    configs = sample_configs(space, search_iterations(config, rows), config.training.random_state)
    halving = config.training.search_strategy == "halving"
    early = config.training.early_stopping_rounds if algorithm == "xgboost" and stopping else None
    oof = [np.full(len(y), np.nan) for _ in configs]
    scores: list[list[float]] = [[] for _ in configs]
    rounds: list[list[int]] = [[] for _ in configs]
    alive = list(range(len(configs)))
    start, fits = time.perf_counter(), 0
    for k, (fit_idx, val_idx) in enumerate(folds, 1):
        for i in alive:
            fold_start = time.perf_counter()
            fitted = make_pipeline(contract, algorithm, configs[i], config.training.random_state, scale_pos_weight)
            split = stopping[k - 1] if early is not None else None
            if split is not None:
                rounds[i].append(fit_early_stopped(fitted, X, y, *split, early, metric))
            else:
                fitted.fit(X.iloc[fit_idx], y[fit_idx])
                if early is not None:  # this fold had nothing to stop on: every round was kept
                    rounds[i].append(int(fitted.named_steps["model"].get_booster().num_boosted_rounds()))
            # one job: these scores choose the calibrator and threshold, so they must repeat bit for bit
            oof[i][val_idx] = single_job_scorer(fitted).predict_proba(X.iloc[val_idx])[:, 1]
            scores[i].append(_selection_value(metric, y[val_idx], oof[i][val_idx]))
            fits += 1
            log.info("%s config %d/%d fold %d/%d: %s=%.4f%s (%.1fs)", algorithm, i + 1, len(configs), k,
                     len(folds), metric, scores[i][-1], f", {rounds[i][-1]} rounds" if rounds[i] else "",
                     time.perf_counter() - fold_start)
        if halving and k < len(folds):
            keep = max(1, -(-len(alive) // HALVING_FACTOR))
            alive = sorted(alive, key=lambda i: -float(np.mean(scores[i])))[:keep]
    tried = [{"params": configs[i], "folds": len(scores[i]), "mean": float(np.mean(scores[i])),
              "std": float(np.std(scores[i], ddof=1)) if len(scores[i]) > 1 else 0.0,
              **({"rounds": rounds[i]} if rounds[i] else {})} for i in range(len(configs))]
    best = max(alive, key=lambda i: float(np.mean(scores[i])))
    log.info("%s: %d configs, %d fits (%s); best %s mean %s=%.4f%s", algorithm, len(configs), fits,
             config.training.search_strategy, configs[best], metric, tried[best]["mean"],
             f", rounds per fold {rounds[best]}" if rounds[best] else "")
    return SearchResult(algorithm, configs[best], scores[best], oof[best], len(configs),
                        time.perf_counter() - start, tried, rounds[best])


def choose_threshold(config: ChurnConfig, y: np.ndarray, p: np.ndarray) -> ThresholdChoice:
    """Expected-cost threshold when both costs are configured, else the recall target's."""
    t = config.training
    if t.cost_missed_churner is not None and t.cost_wasted_offer is not None:
        return choose_threshold_for_cost(y, p, t.cost_missed_churner, t.cost_wasted_offer)
    return choose_threshold_for_recall(y, p, config.problem.success_target)


# ---------------------------------------------------------------- importance

def feature_importances(model: ChurnModel, eval_frame: pd.DataFrame, config: ChurnConfig) -> pd.DataFrame:
    """Model-native importance (gain / |coef|) summed back to contract features,
    plus permutation importance of the selection metric on (a seeded sample of) the evaluation rows."""
    sources = model.transformed_feature_sources()
    estimator = model.pipeline.named_steps["model"]
    if model.algorithm == "logistic_regression":
        native_type, native = "abs_coef", np.abs(estimator.coef_[0])
    else:
        native_type, native = "gain", np.asarray(estimator.feature_importances_, dtype=float)
    parts = [_ranked(aggregate_importance(native, sources).reindex(model.contract.feature_names, fill_value=0.0),
                     native_type)]
    rows = config.training.importance_rows
    if len(eval_frame) > rows:
        # A seeded sample: each of the (features x repeats) re-scorings reads only these rows.
        log.info("permutation importance on %d of %d held-out rows (training.importance_rows)", rows,
                 len(eval_frame))
        eval_frame = eval_frame.sample(n=rows, random_state=config.training.random_state)
    y = eval_frame[model.contract.label].to_numpy(dtype=int)
    if 0 < y.sum() < len(y):
        result = permutation_importance(
            single_job_scorer(model.pipeline), model.feature_frame(eval_frame), y,  # recorded: reproducible
            scoring=SCORERS[config.problem.selection_metric], n_repeats=PERMUTATION_REPEATS,
            random_state=config.training.random_state, n_jobs=1,
        )
        parts.append(_ranked(pd.Series(result.importances_mean, index=model.contract.feature_names), "permutation"))
    return pd.concat(parts, ignore_index=True)


def _ranked(values: pd.Series, importance_type: str) -> pd.DataFrame:
    frame = values.rename("value").rename_axis("feature").reset_index()
    frame["importance_type"] = importance_type
    frame["rank"] = frame["value"].rank(ascending=False, method="first").astype(int)
    return frame.sort_values("rank")


# ---------------------------------------------------------------- tables

METRIC_COLUMNS = ("roc_auc", "pr_auc", "log_loss", "brier", "recall", "precision", "f1", "accuracy",
                  "tp", "fp", "tn", "fn", "calibration_error", "threshold", "rows", "prevalence")

MODEL_RUNS = declare(
    name="model_runs",
    owner=__name__,
    grain="one row per training run (run_id), failed runs included",
    description="What each `churn train` run trained on, how it validated, what it chose and how it ended.",
    columns=[
        ("run_id", "VARCHAR"), ("started_at", "TIMESTAMP"), ("finished_at", "TIMESTAMP"),
        ("dataset", "VARCHAR"), ("feature_mart", "VARCHAR"), ("snapshot_min", "TIMESTAMP"),
        ("snapshot_max", "TIMESTAMP"), ("train_rows", "BIGINT"), ("oot_rows", "BIGINT"),
        ("config_hash", "VARCHAR"), ("training_data_hash", "VARCHAR"), ("validation_strategy", "VARCHAR"),
        ("chosen_algorithm", "VARCHAR"), ("model_version", "VARCHAR"), ("promoted", "BOOLEAN"),
        ("seconds", "DOUBLE"), ("status", "VARCHAR"), ("message", "VARCHAR"),
    ],
)
MODEL_METRICS = declare(
    name="model_metrics",
    owner=__name__,
    grain="one row per run, candidate and split (cv_fold_k, cv_mean, cv_std, out_of_time, baseline)",
    description="Every candidate's cross-validated metrics, the chosen model's held-out metrics "
                "and the 'nobody churns' baseline's, at the chosen threshold.",
    # Counts are DOUBLE: the cv_mean / cv_std rows hold their averages.
    columns=[("run_id", "VARCHAR"), ("model_version", "VARCHAR"), ("candidate", "VARCHAR"),
             ("params", "VARCHAR"), ("chosen", "BOOLEAN"), ("split", "VARCHAR"),
             *[(name, "DOUBLE") for name in METRIC_COLUMNS]],
)
FEATURE_IMPORTANCE = declare(
    name="feature_importance",
    owner=__name__,
    grain="one row per run, contract feature and importance type (gain / abs_coef / permutation)",
    description="The trained model's importance of each contract feature, ranked within its type.",
    columns=[("run_id", "VARCHAR"), ("model_version", "VARCHAR"), ("feature", "VARCHAR"),
             ("importance_type", "VARCHAR"), ("value", "DOUBLE"), ("rank", "BIGINT")],
)
THRESHOLD_CURVE = declare(
    name="threshold_curve",
    owner=__name__,
    grain="one row per run and threshold 0.01 .. 0.99",
    description="Recall, precision, F1 and share flagged of the trained model on its held-out rows.",
    columns=[("run_id", "VARCHAR"), ("model_version", "VARCHAR"), ("threshold", "DOUBLE"),
             ("recall", "DOUBLE"), ("precision", "DOUBLE"), ("f1", "DOUBLE"), ("share_flagged", "DOUBLE")],
)


CALIBRATION_CURVE = declare(
    name="calibration_curve",
    owner=__name__,
    grain="one row per run and probability bin (10 equal-width bins, empty ones kept)",
    # Bins, not the held-out rows: fixed size per run like threshold_curve, the same bins
    # as the recorded calibration_error, and no per-customer copy of the mart to publish.
    description="Reliability of the trained model's calibrated probabilities on its held-out rows: "
                "mean predicted probability against observed churn rate per bin.",
    columns=[("run_id", "VARCHAR"), ("model_version", "VARCHAR"), ("bin", "BIGINT"), ("bin_lower", "DOUBLE"),
             ("bin_upper", "DOUBLE"), ("n_rows", "BIGINT"), ("mean_predicted", "DOUBLE"),
             ("observed_rate", "DOUBLE")],
)


def _metric_rows(base: dict[str, Any], split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {**base, "split": split, **{k: metrics[k] for k in METRIC_COLUMNS}}


def candidate_metric_rows(
    result: SearchResult, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
    config: ChurnConfig, base: dict[str, Any],
) -> tuple[list[dict[str, Any]], ScoreCalibrator, ThresholdChoice]:
    """Per-fold, mean and std metrics of a candidate's out-of-fold predictions,
    calibrated and thresholded the way the final model would be."""
    calibrator = ScoreCalibrator(config.training.calibration).fit(result.oof_raw, y)
    calibrated = calibrator.predict(result.oof_raw)
    choice = choose_threshold(config, y, calibrated)
    folds_metrics = [classification_metrics(y[v], calibrated[v], choice.threshold) for _, v in folds]
    rows = [_metric_rows(base, f"cv_fold_{k}", m) for k, m in enumerate(folds_metrics, 1)]
    table = pd.DataFrame(folds_metrics)
    rows.append(_metric_rows(base, "cv_mean", table.mean().to_dict()))
    rows.append(_metric_rows(base, "cv_std", table.std(ddof=1).to_dict()))
    return rows, calibrator, choice


def write_run_tables(config: ChurnConfig, run_id: str, tables: dict[TableSpec, pd.DataFrame]) -> None:
    """Each table's rows for this run replace any earlier rows of the same run, all in one transaction."""
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session, session.transaction():
        for table, frame in tables.items():
            session.append(table, frame, where="run_id = ?", params=[run_id])


# ---------------------------------------------------------------- training steps

@dataclass(frozen=True)
class TrainingData:
    """The labelled mart rows, split into training/CV rows and the held-out evaluation rows."""

    contract: FeatureContract
    frame: pd.DataFrame
    split: ValidationSplit
    train_frame: pd.DataFrame
    eval_frame: pd.DataFrame
    training_data_hash: str

    @property
    def snapshot_min(self) -> pd.Timestamp:
        return self.frame[self.contract.as_of].min()

    @property
    def snapshot_max(self) -> pd.Timestamp:
        return self.frame[self.contract.as_of].max()


@dataclass(frozen=True)
class SearchRows:
    """The training rows the candidate search runs on (all, or a sample of whole customers), with its folds.

    CV, halving, calibration, the threshold and the stored out-of-fold
    predictions all use these rows; only the chosen candidate's refit sees every
    training row.
    """

    rows: np.ndarray  # positions into the training rows
    X: pd.DataFrame
    y: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]
    # Per fold, its training rows split for boosting's early stopping (None: not split).
    stopping: list[tuple[np.ndarray, np.ndarray] | None]


@dataclass(frozen=True)
class TrainingMatrix:
    """The training rows as the estimators see them, and the rows and grouped CV folds of the search."""

    X: pd.DataFrame
    y: np.ndarray
    search: SearchRows
    scale_pos_weight: float

    @property
    def folds(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.search.folds


@dataclass(frozen=True)
class Selection:
    """Every algorithm's best configuration, and the one chosen (simplest within noise of the best)."""

    searches: dict[str, SearchResult]
    chosen: CandidateScore

    @property
    def best(self) -> SearchResult:
        return self.searches[self.chosen.algorithm]


@dataclass(frozen=True)
class Calibration:
    """The chosen candidate's calibrator and threshold (fitted out of fold), and every candidate's CV rows."""

    calibrator: ScoreCalibrator
    choice: ThresholdChoice
    metric_rows: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class HeldOutEvaluation:
    """The final model on the held-out rows, beside the naive baseline."""

    y: np.ndarray
    p: np.ndarray
    metrics: dict[str, float]
    baseline: dict[str, float]


@dataclass(frozen=True)
class TrainingOutcome:
    """A finished training: what `churn train` reports, the registration and the run's table rows."""

    result: TrainResult
    registration: Registration
    algorithm: str
    tables: dict[TableSpec, pd.DataFrame]


def load_training_data(config: ChurnConfig, data: Reader | None = None) -> TrainingData:
    """Read the labelled rows and split off the evaluation rows (given split, newest snapshots, or a hold-out).

    `data` is where the mart is (Spark's warehouse); None reads the build database.
    """
    contract = current_contract(config)
    with timed(f"load labelled rows of {config.dataset.feature_mart}", log):
        with mart_reader(config, data) as mart:
            frame = load_training_rows(mart, config, contract)
            labelled_dates = fully_labelled_dates(mart, config, contract)
    return split_training_data(config, contract, frame, labelled_dates)


def split_training_data(config: ChurnConfig, contract: FeatureContract, frame: pd.DataFrame,
                        labelled_dates: list[pd.Timestamp]) -> TrainingData:
    """Labelled rows split into training/CV rows and held-out rows (also for frames not read from a mart)."""
    split = validation_split(frame, contract, labelled_dates, config.training.out_of_time_snapshots,
                             config.training.random_state, f"feature mart {config.dataset.feature_mart!r}")
    train_frame = frame.iloc[split.train_index].reset_index(drop=True)
    eval_frame = frame.iloc[split.eval_index].reset_index(drop=True)
    log.info("%d labelled rows: %d for training/CV, %d held out (%s %s)", len(frame), len(train_frame),
             len(eval_frame), split.strategy, ", ".join(split.eval_as_of_dates))
    return TrainingData(contract, frame, split, train_frame, eval_frame, frame_hash(train_frame))


def training_matrix(config: ChurnConfig, data: TrainingData) -> TrainingMatrix:
    """Contract features and labels of the training rows, and the search's rows and grouped folds.

    Refuses a single class, in the training rows and in the search's sample.
    """
    contract, t = data.contract, config.training
    X = contract_feature_frame(contract, data.train_frame, f"feature mart {config.dataset.feature_mart!r}")
    y = data.train_frame[contract.label].to_numpy(dtype=int)
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        raise TrainingError(f"training rows of {config.dataset.feature_mart!r} hold a single class ({len(y)} rows)")
    keys = data.train_frame[contract.key].to_numpy()
    rows = customer_sample(keys, t.search_rows, t.random_state)
    # Integer codes per customer: numpy's set operations on text keys (np.isin) took ~35 s at 100k rows.
    groups = pd.factorize(keys)[0]
    if len(rows) < len(y):
        log.info("search on %d of %d training rows (%d of %d customers, training.search_rows=%d); "
                 "the chosen candidate is refitted on all %d", len(rows), len(y), len(np.unique(groups[rows])),
                 len(np.unique(groups)), t.search_rows, len(y))
        if len(np.unique(y[rows])) < 2:
            raise TrainingError(f"the search's sample of {len(rows)} training rows of "
                                f"{config.dataset.feature_mart!r} holds a single class; raise training.search_rows")
    sampled = len(rows) < len(y)
    search_X = X.iloc[rows].reset_index(drop=True) if sampled else X
    search_y, search_groups = y[rows], groups[rows]
    folds = cv_folds(search_y, search_groups, t.cv_folds, t.random_state)
    stopping = [stopping_split(fit_idx, search_y, search_groups, t.random_state + k)
                if t.early_stopping_rounds is not None and "xgboost" in t.search_spaces else None
                for k, (fit_idx, _) in enumerate(folds)]
    return TrainingMatrix(X, y, SearchRows(rows, search_X, search_y, folds, stopping),
                          (len(y) - positives) / positives)


def select_candidate(config: ChurnConfig, contract: FeatureContract, matrix: TrainingMatrix) -> Selection:
    """Search every algorithm on the same folds and pick the simplest that is as good as the best."""
    searches: dict[str, SearchResult] = {}
    search = matrix.search
    for algorithm in config.training.search_spaces:
        with timed(f"candidate {algorithm} ({config.training.cv_folds}-fold grouped CV on {len(search.y)} rows)",
                   log):
            searches[algorithm] = search_algorithm(algorithm, contract, search.X, search.y, search.folds, config,
                                                   matrix.scale_pos_weight, stopping=search.stopping,
                                                   table_rows=len(matrix.y))
    chosen = select_by_simplicity([s.score for s in searches.values()], tuple(searches))
    selection = Selection(searches, chosen)
    log.info("chosen %s %s: CV %s %.4f +- %.4f", selection.best.algorithm, selection.best.params,
             config.problem.selection_metric, chosen.mean, chosen.std)
    return selection


def calibrate(config: ChurnConfig, run_id: str, selection: Selection, matrix: TrainingMatrix) -> Calibration:
    """Calibrate and threshold every candidate out of fold (for its CV rows); keep the chosen one's."""
    metric_rows: list[dict[str, Any]] = []
    calibrator, choice = None, None
    for algorithm, search in selection.searches.items():
        chosen = algorithm == selection.best.algorithm
        base = {"run_id": run_id, "candidate": algorithm, "params": json.dumps(search.params), "chosen": chosen}
        rows, candidate_calibrator, candidate_choice = candidate_metric_rows(search, matrix.search.y,
                                                                             matrix.search.folds, config, base)
        metric_rows += rows
        if chosen:
            calibrator, choice = candidate_calibrator, candidate_choice
    log.info("threshold %.4f (%s): out-of-fold recall %.3f at precision %.3f, flagging %.1f%% of rows",
             choice.threshold, choice.rule, choice.recall, choice.precision, 100 * choice.share_flagged)
    return Calibration(calibrator, choice, tuple(metric_rows))


def refit(config: ChurnConfig, contract: FeatureContract, selection: Selection, calibration: Calibration,
          matrix: TrainingMatrix) -> ChurnModel:
    """The chosen configuration fitted on all training rows, with the out-of-fold calibrator and threshold."""
    best = selection.best
    params = best.refit_params  # with early stopping: the rounds CV kept, not the search's upper bound
    with timed(f"refit {best.algorithm} {params} on {len(matrix.y)} rows", log):
        pipeline = make_pipeline(contract, best.algorithm, params, config.training.random_state,
                                 matrix.scale_pos_weight).fit(matrix.X, matrix.y)
    return ChurnModel(pipeline=pipeline, calibrator=calibration.calibrator, contract=contract,
                      algorithm=best.algorithm, params=params, threshold=calibration.choice.threshold)


def evaluate_held_out(config: ChurnConfig, model: ChurnModel, data: TrainingData,
                      matrix: TrainingMatrix) -> HeldOutEvaluation:
    """Score the held-out rows once, and the baseline at the training churn rate."""
    y = data.eval_frame[data.contract.label].to_numpy(dtype=int)
    p = model.predict_proba(data.eval_frame)
    metrics = classification_metrics(y, p, model.threshold)
    baseline = baseline_metrics(y, float(matrix.y.mean()))
    log.info("out-of-time (%s, %d rows): %s=%.4f roc_auc=%.4f recall=%.3f precision=%.3f at threshold %.4f; "
             "baseline pr_auc=%.4f", data.split.strategy, len(y), config.problem.selection_metric,
             metrics[config.problem.selection_metric], metrics["roc_auc"], metrics["recall"], metrics["precision"],
             model.threshold, baseline["pr_auc"])
    return HeldOutEvaluation(y, p, metrics, baseline)


def stored_predictions(data: TrainingData, matrix: TrainingMatrix, calibration: Calibration,
                       selection: Selection, evaluation: HeldOutEvaluation) -> pd.DataFrame:
    """The calibrated out-of-fold predictions of the training rows and the held-out predictions, with labels.

    Stored with the model: the threshold is re-chosen on the out-of-fold rows
    whenever the operating rule changes (no retrain), and the out-of-time rows
    let a later challenger be compared with this model's own predictions on
    the same (key, as_of) rows after the feature definitions changed.
    """
    c = data.contract
    oof = calibration.calibrator.predict(selection.best.oof_raw)
    searched = data.train_frame.iloc[matrix.search.rows]  # out-of-fold scores exist for the search's rows
    parts = []
    for split, frame, p in ((SPLIT_OUT_OF_FOLD, searched, oof),
                            (SPLIT_OUT_OF_TIME, data.eval_frame, evaluation.p)):
        parts.append(pd.DataFrame({
            "split": split, "key": frame[c.key].to_numpy(),
            "as_of": pd.to_datetime(frame[c.as_of]).dt.date.astype(str).to_numpy(),
            "label": frame[c.label].to_numpy(dtype=int), "probability": np.asarray(p, dtype=float),
        }))
    return pd.concat(parts, ignore_index=True)


def feature_definitions(config: ChurnConfig, data: TrainingData, mart: Reader | None = None) -> dict[str, Any]:
    """Fingerprints of the features, on the held-out rows re-read exactly as a later check re-reads them
    (from `mart`, where training read them; None: the build database)."""
    validation = data.split.describe(data.frame, data.contract)
    with mart_reader(config, mart) as reader:
        rows = load_evaluation_rows(reader, config, data.contract, validation)
    return definitions_of(config, data.contract, rows)


def model_metadata(config: ChurnConfig, run_id: str, data: TrainingData, selection: Selection,
                   calibration: Calibration, evaluation: HeldOutEvaluation,
                   reference: dict[str, Any], mart: Reader | None = None) -> ModelMetadata:
    """What the model's metadata.json records about how it was trained and judged (`mart`: where the
    feature fingerprints re-read the held-out rows)."""
    return ModelMetadata(
        run_id=run_id,
        dataset=config.dataset.name,
        feature_mart=config.dataset.feature_mart,
        config_hash=config.fingerprint(),
        training_data_hash=data.training_data_hash,
        training_rows=len(data.train_frame),
        snapshot_range=[str(data.snapshot_min.date()), str(data.snapshot_max.date())],
        validation=data.split.describe(data.frame, data.contract),
        selection_metric=config.problem.selection_metric,
        threshold_choice=dataclasses.asdict(calibration.choice),
        metrics={"cv_mean": {"mean": selection.chosen.mean, "std": selection.chosen.std},
                 "out_of_time": evaluation.metrics, "baseline": evaluation.baseline},
        candidates={a: {"params": s.params, "cv_mean": s.score.mean, "cv_std": s.score.std,
                        "search_rows": len(s.oof_raw), "configs": s.all_configs,
                        **({"fold_rounds": s.fold_rounds} if s.fold_rounds else {})}
                    for a, s in selection.searches.items()},
        reference=reference,
        feature_definitions=feature_definitions(config, data, mart),
    )


def run_tables(run_id: str, version: str, selection: Selection, calibration: Calibration,
               evaluation: HeldOutEvaluation, importance: pd.DataFrame) -> dict[TableSpec, pd.DataFrame]:
    """This run's rows of model_metrics, feature_importance, threshold_curve and calibration_curve."""
    best = selection.best
    chosen_base = {"run_id": run_id, "candidate": best.algorithm, "params": json.dumps(best.params), "chosen": True}
    baseline_base = {"run_id": run_id, "candidate": "always_no_churn", "params": "{}", "chosen": False}
    metrics = pd.DataFrame([*calibration.metric_rows, _metric_rows(chosen_base, "out_of_time", evaluation.metrics),
                            _metric_rows(baseline_base, "baseline", evaluation.baseline)])
    curve = threshold_curve(evaluation.y, evaluation.p)
    return {
        MODEL_METRICS: _with_run(metrics, run_id, version),
        FEATURE_IMPORTANCE: _with_run(importance, run_id, version),
        THRESHOLD_CURVE: _with_run(curve, run_id, version),
        CALIBRATION_CURVE: _with_run(reliability_bins(evaluation.y, evaluation.p), run_id, version),
    }


def _with_run(frame: pd.DataFrame, run_id: str, version: str) -> pd.DataFrame:
    return frame.assign(run_id=run_id, model_version=version)


@dataclass(frozen=True)
class RunStart:
    """The model_runs facts known before training starts."""

    run_id: str
    started_at: dt.datetime
    clock: float  # perf_counter at the start, for `seconds`


def run_row(config: ChurnConfig, start: RunStart, status: str, message: str | None = None,
            data: TrainingData | None = None, outcome: TrainingOutcome | None = None) -> pd.DataFrame:
    """The run's model_runs row, from what the steps that finished returned (a failed run has fewer)."""
    row: dict[str, Any] = {
        "run_id": start.run_id, "started_at": start.started_at, "dataset": config.dataset.name,
        "feature_mart": config.dataset.feature_mart, "config_hash": config.fingerprint(),
        "status": status, "message": message, "finished_at": dt.datetime.now(),
        "seconds": time.perf_counter() - start.clock,
    }
    if data is not None:
        row.update(snapshot_min=data.snapshot_min.to_pydatetime(), snapshot_max=data.snapshot_max.to_pydatetime(),
                   train_rows=len(data.train_frame), oot_rows=len(data.eval_frame),
                   validation_strategy=data.split.strategy, training_data_hash=data.training_data_hash)
    if outcome is not None:
        row.update(chosen_algorithm=outcome.algorithm, model_version=outcome.registration.version,
                   promoted=outcome.registration.promoted)
    # object columns: the declared table types each value, and an unknown one stays NULL.
    return pd.DataFrame({name: pd.Series([value], dtype=object) for name, value in row.items()})


# ---------------------------------------------------------------- training

def train(config: ChurnConfig, force: bool = False, run_id: str | None = None,
          data: Reader | None = None) -> TrainResult:
    """Train, select, calibrate, evaluate and register a model for the active dataset.

    Without `force`, an existing champion means nothing is done (and that is said).
    `data` is where the feature mart is (the data plane: Spark's warehouse when
    the nightly builds there); None reads it from the build database. The model,
    the registry and the run tables (the control plane) always go to the build
    database and the models folder.
    """
    current = champion_version(config)
    if current and not force:
        message = f"champion {current} exists for dataset {config.dataset.name!r}; use --force to retrain"
        log.info(message)
        return TrainResult(current, None, {}, False, run_id, skipped=True, message=message)

    run_id = run_id or dt.datetime.now().strftime("train-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    start = RunStart(run_id, dt.datetime.now(), time.perf_counter())
    training: TrainingData | None = None
    try:
        # One BLAS thread: the matrices are narrow (rows x features), so a second
        # OpenBLAS thread only adds synchronisation; on a busy 2-core machine it
        # made logistic regression fits ~7x slower. Tree estimators use their own n_jobs.
        with threadpool_limits(limits=1, user_api="blas"):
            training = load_training_data(config, data)
            outcome = _train(config, run_id, training, data)
    except Exception as exc:
        failed = run_row(config, start, "failed", f"{type(exc).__name__}: {exc}", training)
        write_run_tables(config, run_id, {MODEL_RUNS: failed})
        raise
    write_run_tables(config, run_id, {MODEL_RUNS: run_row(config, start, "success", data=training,
                                                          outcome=outcome),
                                      **outcome.tables})
    return outcome.result


@dataclass(frozen=True)
class FittedModel:
    """A model searched, calibrated and refitted on `data`'s training rows, judged once on its held-out rows."""

    matrix: TrainingMatrix
    selection: Selection
    calibration: Calibration
    model: ChurnModel
    evaluation: HeldOutEvaluation


def fit_model(config: ChurnConfig, run_id: str, data: TrainingData) -> FittedModel:
    """Search, select, calibrate, refit and evaluate: everything but recording (benchmarks use it alone)."""
    with timed(f"features, search sample and folds of {len(data.train_frame)} training rows", log):
        matrix = training_matrix(config, data)
    selection = select_candidate(config, data.contract, matrix)
    calibration = calibrate(config, run_id, selection, matrix)
    model = refit(config, data.contract, selection, calibration, matrix)
    return FittedModel(matrix, selection, calibration, model, evaluate_held_out(config, model, data, matrix))


def _train(config: ChurnConfig, run_id: str, data: TrainingData, mart: Reader | None = None) -> TrainingOutcome:
    """Search, select, calibrate, refit, evaluate, describe and register a model on `data` (read from `mart`,
    which the fingerprints and the champion comparison read again)."""
    fitted = fit_model(config, run_id, data)
    selection, calibration, model, evaluation = fitted.selection, fitted.calibration, fitted.model, fitted.evaluation
    with timed(f"reference statistics of {len(data.train_frame)} training rows", log):
        train_scores = model.predict_proba(data.train_frame)
        reference = compute_reference(data.train_frame, train_scores, data.contract, config.monitoring,
                                      threshold=model.threshold)
    with timed("feature importance", log):
        importance = feature_importances(model, data.eval_frame, config)
    metadata = model_metadata(config, run_id, data, selection, calibration, evaluation, reference, mart)
    registration = register(config, dataclasses.replace(model, metadata=metadata), run_id, evaluation.metrics,
                            evaluation_frame=data.eval_frame,
                            predictions=stored_predictions(data, fitted.matrix, calibration, selection,
                                                           evaluation),
                            data=mart)
    algorithm, version = selection.best.algorithm, registration.version
    result = TrainResult(
        version, algorithm, evaluation.metrics, registration.promoted, run_id, data.split.strategy,
        baseline_metrics=evaluation.baseline,
        message=f"{algorithm} registered as {version} ({'champion' if registration.promoted else 'challenger'})",
    )
    return TrainingOutcome(result, registration, algorithm,
                           run_tables(run_id, version, selection, calibration, evaluation, importance))


# ---------------------------------------------------------------- CLI

def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    result = train(config, force=args.force)
    if result.skipped:
        print(result.message)
        return 0
    print(f"{result.message}; validation: {result.validation_strategy}")
    metric = config.problem.selection_metric
    m = result.oot_metrics
    print(f"  held-out {metric} {m[metric]:.4f}  roc_auc {m['roc_auc']:.4f}  recall {m['recall']:.3f}  "
          f"precision {m['precision']:.3f}  threshold {m['threshold']:.4f}  ({m['rows']} rows)")
    b = result.baseline_metrics
    print(f"  baseline (always no churn) {metric} {b[metric]:.4f}  roc_auc {b['roc_auc']:.4f}  "
          f"recall {b['recall']:.3f}  accuracy {b['accuracy']:.3f}")
    return 0


# ---------------------------------------------------------------- reads for other stages

# Importance used to rank "top features": permutation (model-agnostic, on the
# evaluation rows) when the trainer recorded it, else the model's native one.
IMPORTANCE_PREFERENCE = ("permutation", "gain", "abs_coef")


def top_features(session: Session, version: str, limit: int) -> list[str]:
    """The model's most important contract features, by the preferred importance type."""
    if not session.exists(FEATURE_IMPORTANCE):
        return []
    frame = session.frame(
        f'select feature, importance_type, "rank" from {quote(FEATURE_IMPORTANCE.name)} where model_version = ?',
        [version],
    )
    for kind in IMPORTANCE_PREFERENCE:
        chosen = frame[frame["importance_type"] == kind]
        if not chosen.empty:
            return chosen.sort_values("rank")["feature"].head(limit).tolist()
    return frame.sort_values("rank")["feature"].drop_duplicates().head(limit).tolist()


def newest_trained_snapshot(session: Session, dataset: str) -> dt.date | None:
    """The newest snapshot any successful training run of `dataset` has seen.

    A rejected challenger has already learned from it too: retraining on the same
    snapshots would only reject the same challenger again, night after night.
    """
    if not session.exists(MODEL_RUNS):
        return None
    value = session.scalar(
        f"select max(snapshot_max) from {quote(MODEL_RUNS.name)} where dataset = ? and status = 'success'", [dataset]
    )
    return None if value is None else pd.Timestamp(value).date()


def validation_strategy(session: Session, run_id: str) -> str | None:
    """How training run `run_id` judged its model (`out_of_time` or `stratified_holdout`)."""
    if not session.exists(MODEL_RUNS):
        return None
    return session.scalar(
        f"select any_value(validation_strategy) from {quote(MODEL_RUNS.name)} where run_id = ?", [run_id]
    )


def held_out_metrics(session: Session, version: str, metrics: tuple[str, ...]) -> pd.DataFrame:
    """The model's held-out (`out_of_time`) and baseline rows of model_metrics: split, candidate, metrics, rows."""
    if not session.exists(MODEL_METRICS):
        return pd.DataFrame(columns=["split", "candidate", *metrics, "rows"])
    return session.frame(
        f"select split, candidate, {column_list(metrics)}, rows from {quote(MODEL_METRICS.name)} "
        "where model_version = ? and split in ('out_of_time', 'baseline')",
        [version],
    )


@dataclass(frozen=True)
class RunTables:
    """What one training run recorded about its model, for the model report."""

    run: dict[str, Any]
    metrics: pd.DataFrame
    importance: pd.DataFrame
    threshold_curve: pd.DataFrame
    calibration: pd.DataFrame = field(default_factory=pd.DataFrame)  # empty for runs before calibration_curve


def run_tables_of(session: Session, version: str) -> RunTables | None:
    """model_runs row, model_metrics, feature_importance, threshold_curve and calibration_curve of the run
    that trained `version`."""
    if not session.exists(MODEL_RUNS):
        return None
    run = session.frame(f"select * from {quote(MODEL_RUNS.name)} where model_version = ? limit 1", [version])
    if run.empty:
        return None
    frames = [
        session.frame(f"select * from {quote(spec.name)} where model_version = ?", [version])
        if session.exists(spec) else pd.DataFrame()
        for spec in (MODEL_METRICS, FEATURE_IMPORTANCE, THRESHOLD_CURVE, CALIBRATION_CURVE)
    ]
    return RunTables(run.iloc[0].to_dict(), *frames)
