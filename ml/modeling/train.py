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
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterSampler, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits
from xgboost import XGBClassifier

from ml.config import ChurnConfig
from ml.features.contract import ContractError, FeatureContract, load_contract
from ml.features.dbt import dbt_target_path
from ml.modeling.evaluate import (
    CandidateScore,
    ThresholdChoice,
    aggregate_importance,
    baseline_metrics,
    choose_threshold_for_cost,
    choose_threshold_for_recall,
    classification_metrics,
    select_by_simplicity,
    threshold_curve,
)
from ml.logs import get_logger, timed
from ml.modeling.model import ALGORITHMS, ChurnModel, ScoreCalibrator, build_preprocessor, contract_feature_frame
from ml.warehouse import Session, WarehouseError, column_list, connect, table_columns, table_exists, write_table

log = get_logger("train")

# Fixed, small search spaces: `training.search_iterations` random draws from each.
# Bounded on purpose so a nightly retrain on millions of rows stays predictable.
SEARCH_SPACES: dict[str, dict[str, list[Any]]] = {
    "logistic_regression": {"C": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]},
    "random_forest": {
        "n_estimators": [100, 200],
        "max_depth": [6, 10, 14],
        "min_samples_leaf": [10, 50],
        "max_features": ["sqrt", 0.3],
        "max_samples": [0.5],
    },
    # Churn is rare (a few % per month): shallow, slowly learned trees with a
    # minimum leaf weight overfit less than deep ones.
    "xgboost": {
        "n_estimators": [150, 300],
        "max_depth": [2, 3, 4],
        "learning_rate": [0.03, 0.08],
        "subsample": [0.8],
        "colsample_bytree": [0.8],
        "min_child_weight": [5, 20],
    },
}
ESTIMATOR_JOBS = 2
HOLDOUT_FOLDS = 5  # the single-snapshot fallback holds out one fold of five: 20%
PERMUTATION_REPEATS = 3
SCORERS = {"pr_auc": "average_precision", "roc_auc": "roc_auc"}


class TrainingError(RuntimeError):
    """The labelled mart cannot support training (missing, empty, one class, bad labels)."""


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

    strategy: str  # out_of_time | stratified_holdout
    train_index: np.ndarray
    eval_index: np.ndarray
    eval_as_of_dates: list[str]

    def describe(self, frame: pd.DataFrame, contract: FeatureContract) -> dict[str, Any]:
        """JSON description the registry uses to re-read the evaluation rows."""
        described: dict[str, Any] = {"strategy": self.strategy, "eval_as_of_dates": self.eval_as_of_dates}
        if self.strategy == "stratified_holdout":
            rows = frame.iloc[self.eval_index]
            described["eval_keys"] = [
                [_jsonable(k), str(pd.Timestamp(a).date())] for k, a in zip(rows[contract.key], rows[contract.as_of])
            ]
        return described


@dataclass
class SearchResult:
    """Best configuration of one algorithm and its out-of-fold raw scores."""

    algorithm: str
    params: dict[str, Any]
    fold_scores: list[float]
    oof_raw: np.ndarray
    configs_tried: int
    seconds: float
    all_configs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> CandidateScore:
        return CandidateScore(self.algorithm, float(np.mean(self.fold_scores)),
                              float(np.std(self.fold_scores, ddof=1)) if len(self.fold_scores) > 1 else 0.0,
                              len(self.fold_scores))


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------- data

def mart_contract(config: ChurnConfig) -> FeatureContract:
    return load_contract(dbt_target_path(config) / "manifest.json", config.dataset.feature_mart)


def _checked_mart(con, config: ChurnConfig, contract: FeatureContract) -> str:
    mart = config.dataset.feature_mart
    if not table_exists(con, mart):
        raise WarehouseError(
            f"feature mart {mart!r} not found in {config.warehouse.build_db} (run `churn build` first)"
        )
    contract.check_columns(mart, table_columns(con, mart))
    if contract.label not in table_columns(con, mart):
        raise ContractError(f"feature mart {mart!r} has no label column {contract.label!r}")
    return mart


def _select_list(contract: FeatureContract) -> str:
    return ", ".join(f'"{c}"' for c in contract.columns)


def load_training_rows(config: ChurnConfig, contract: FeatureContract) -> pd.DataFrame:
    """Labelled mart rows, capped at about training.max_training_rows.

    Above the cap a seeded hash of the customer key picks a share of customers
    with all their snapshots: every as_of_date stays represented (the
    out-of-time split needs the newest ones, the model the older ones) and a
    customer is never split, which grouped cross-validation relies on. Keeping
    the newest rows instead would shrink to a single snapshot at scale.
    """
    cap = config.training.max_training_rows
    with connect(config.warehouse.build_db) as con:
        mart = _checked_mart(con, config, contract)
        labelled = f'"{contract.label}" is not null'
        total = con.execute(f'select count(*) from "{mart}" where {labelled}').fetchone()[0]
        sample = ""
        if total > cap:
            per_million = int(1_000_000 * cap / total)
            sample = (f'and hash("{contract.key}"::varchar || \':{config.training.random_state}\') '
                      f'% 1000000 < {per_million}')
            log.info("%s has %d labelled rows, above training.max_training_rows=%d: "
                     "training on %.1f%% of customers, all snapshots", mart, total, cap, per_million / 1e4)
        frame = con.execute(
            f'select {_select_list(contract)} from "{mart}" where {labelled} {sample} '
            f'order by "{contract.as_of}" desc, "{contract.key}"'
        ).df()
    if frame.empty:
        raise TrainingError(f"feature mart {mart!r} has no labelled rows ({contract.label} is null everywhere)")
    label = pd.to_numeric(frame[contract.label], errors="coerce")
    bad = int((~label.isin([0, 1])).sum())
    if bad:
        raise TrainingError(f"feature mart {mart!r}: label {contract.label!r} is not 0/1 in {bad} row(s)")
    frame[contract.label] = label.astype(int)
    frame[contract.as_of] = pd.to_datetime(frame[contract.as_of])
    positives = int(frame[contract.label].sum())
    if positives == 0 or positives == len(frame):
        raise TrainingError(
            f"feature mart {mart!r}: all {len(frame)} labelled rows have {contract.label} = "
            f"{int(frame[contract.label].iloc[0])}; a classifier needs both classes"
        )
    return frame


def fully_labelled_dates(config: ChurnConfig, contract: FeatureContract) -> list[pd.Timestamp]:
    """as_of_dates whose horizon is fully observed: every row has a label."""
    with connect(config.warehouse.build_db) as con:
        mart = _checked_mart(con, config, contract)
        rows = con.execute(
            f'select "{contract.as_of}" from "{mart}" group by 1 '
            f'having count("{contract.label}") = count(*) order by 1'
        ).fetchall()
    return [pd.Timestamp(r[0]) for r in rows]


def load_evaluation_rows(config: ChurnConfig, contract: FeatureContract, validation: dict[str, Any]) -> pd.DataFrame:
    """Re-read a model's evaluation rows from the mart (the registry's champion comparison)."""
    with connect(config.warehouse.build_db) as con:
        mart = _checked_mart(con, config, contract)
        base = f'select {_select_list(contract)} from "{mart}" where "{contract.label}" is not null'
        if validation["strategy"] == "out_of_time":
            frame = con.execute(
                f'{base} and cast("{contract.as_of}" as date) in (select unnest(?::date[]))',
                [validation["eval_as_of_dates"]],
            ).df()
        else:
            keys = pd.DataFrame(validation["eval_keys"], columns=["_key", "_as_of"])
            keys["_as_of"] = pd.to_datetime(keys["_as_of"]).dt.date
            con.register("_eval_keys", keys)
            try:
                frame = con.execute(
                    f'select m.* from ({base}) m join _eval_keys k '
                    f'on m."{contract.key}" = k._key and cast(m."{contract.as_of}" as date) = k._as_of'
                ).df()
            finally:
                con.unregister("_eval_keys")
    if frame.empty:
        raise TrainingError(f"feature mart {mart!r}: none of the model's evaluation rows are present")
    frame[contract.label] = frame[contract.label].astype(int)
    return frame


def frame_hash(frame: pd.DataFrame) -> str:
    """sha256 of a frame's values and column names: identifies the exact training data."""
    digest = hashlib.sha256("|".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- splits

def validation_split(
    frame: pd.DataFrame, contract: FeatureContract, labelled_dates: list[pd.Timestamp],
    out_of_time_snapshots: int, random_state: int,
) -> ValidationSplit:
    """Out-of-time split on the newest fully labelled dates, or a stratified hold-out.

    With fewer than two labelled dates (e.g. a single-snapshot dataset) there is no
    "later" to test on, so one grouped, stratified fold of five (20%) is held out.
    """
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


def cv_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, random_state: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds in which each customer's snapshots stay on one side."""
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise TrainingError(f"only {n_groups} customers for {n_folds} CV folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros(len(y)), y, groups))


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


def sample_configs(algorithm: str, iterations: int, random_state: int) -> list[dict[str, Any]]:
    """Up to `iterations` distinct seeded draws from the algorithm's fixed grid."""
    space = SEARCH_SPACES[algorithm]
    size = int(np.prod([len(v) for v in space.values()]))
    return [_native(p) for p in ParameterSampler(space, n_iter=min(iterations, size), random_state=random_state)]


def _native(params: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in params.items()}


def _selection_value(metric: str, y: np.ndarray, scores: np.ndarray) -> float:
    return float(classification_metrics(y, scores, threshold=0.5)[metric])


def search_algorithm(
    algorithm: str, contract: FeatureContract, X: pd.DataFrame, y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]], config: ChurnConfig, scale_pos_weight: float,
) -> SearchResult:
    """Bounded random search for one algorithm; every config sees the same folds."""
    metric = config.problem.selection_metric
    configs = sample_configs(algorithm, config.training.search_iterations, config.training.random_state)
    best: SearchResult | None = None
    tried: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, params in enumerate(configs, 1):
        template = make_pipeline(contract, algorithm, params, config.training.random_state, scale_pos_weight)
        oof = np.full(len(y), np.nan)
        fold_scores = []
        for k, (fit_idx, val_idx) in enumerate(folds, 1):
            fold_start = time.perf_counter()
            fitted = clone(template).fit(X.iloc[fit_idx], y[fit_idx])
            oof[val_idx] = fitted.predict_proba(X.iloc[val_idx])[:, 1]
            fold_scores.append(_selection_value(metric, y[val_idx], oof[val_idx]))
            log.info("%s config %d/%d fold %d/%d: %s=%.4f (%.1fs)", algorithm, i, len(configs), k,
                     len(folds), metric, fold_scores[-1], time.perf_counter() - fold_start)
        result = SearchResult(algorithm, params, fold_scores, oof, len(configs), 0.0)
        tried.append({"params": params, "mean": result.score.mean, "std": result.score.std})
        log.info("%s config %d/%d %s: mean %s=%.4f (std %.4f)", algorithm, i, len(configs), params,
                 metric, result.score.mean, result.score.std)
        if best is None or result.score.mean > best.score.mean:
            best = result
    assert best is not None
    best.seconds = time.perf_counter() - start
    best.all_configs = tried
    return best


def choose_threshold(config: ChurnConfig, y: np.ndarray, p: np.ndarray) -> ThresholdChoice:
    """Expected-cost threshold when both costs are configured, else the recall target's."""
    t = config.training
    if t.cost_missed_churner is not None and t.cost_wasted_offer is not None:
        return choose_threshold_for_cost(y, p, t.cost_missed_churner, t.cost_wasted_offer)
    return choose_threshold_for_recall(y, p, config.problem.success_target)


# ---------------------------------------------------------------- importance

def feature_importances(model: ChurnModel, eval_frame: pd.DataFrame, config: ChurnConfig) -> pd.DataFrame:
    """Model-native importance (gain / |coef|) summed back to contract features,
    plus permutation importance of the selection metric on the evaluation rows."""
    sources = model.transformed_feature_sources()
    estimator = model.pipeline.named_steps["model"]
    if model.algorithm == "logistic_regression":
        native_type, native = "abs_coef", np.abs(estimator.coef_[0])
    else:
        native_type, native = "gain", np.asarray(estimator.feature_importances_, dtype=float)
    parts = [_ranked(aggregate_importance(native, sources).reindex(model.contract.feature_names, fill_value=0.0),
                     native_type)]
    y = eval_frame[model.contract.label].to_numpy(dtype=int)
    if 0 < y.sum() < len(y):
        result = permutation_importance(
            model.pipeline, model.feature_frame(eval_frame), y,
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

def _metric_rows(base: dict[str, Any], split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("roc_auc", "pr_auc", "log_loss", "brier", "recall", "precision", "f1", "accuracy",
            "tp", "fp", "tn", "fn", "calibration_error", "threshold", "rows", "prevalence")
    return {**base, "split": split, **{k: metrics[k] for k in keep}}


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


def _run_row(run: dict[str, Any]) -> pd.DataFrame:
    """One model_runs row with explicit dtypes, so a failed first run still types the table."""
    spec = {
        "run_id": "string", "started_at": "datetime64[us]", "finished_at": "datetime64[us]",
        "dataset": "string", "feature_mart": "string", "snapshot_min": "datetime64[us]",
        "snapshot_max": "datetime64[us]", "train_rows": "Int64", "oot_rows": "Int64",
        "config_hash": "string", "training_data_hash": "string", "validation_strategy": "string",
        "chosen_algorithm": "string", "model_version": "string", "promoted": "boolean",
        "seconds": "Float64", "status": "string", "message": "string",
    }
    return pd.DataFrame({k: pd.Series([run.get(k)], dtype=v) for k, v in spec.items()})


def write_run_tables(config: ChurnConfig, run_id: str, tables: dict[str, pd.DataFrame]) -> None:
    """Each table's rows for this run replace any earlier rows of the same run."""
    with connect(config.warehouse.build_db) as con:
        for table, frame in tables.items():
            write_table(con, table, frame, replace_where=("run_id = ?", [run_id]))


# ---------------------------------------------------------------- training

def train(config: ChurnConfig, force: bool = False, run_id: str | None = None) -> TrainResult:
    """Train, select, calibrate, evaluate and register a model for the active dataset.

    Without `force`, an existing champion means nothing is done (and that is said).
    """
    from ml.modeling.registry import champion_version, register

    current = champion_version(config)
    if current and not force:
        message = f"champion {current} exists for dataset {config.dataset.name!r}; use --force to retrain"
        log.info(message)
        return TrainResult(current, None, {}, False, run_id, skipped=True, message=message)

    run_id = run_id or dt.datetime.now().strftime("train-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    run: dict[str, Any] = {
        "run_id": run_id, "started_at": dt.datetime.now(), "dataset": config.dataset.name,
        "feature_mart": config.dataset.feature_mart, "config_hash": config.fingerprint(), "status": "running",
    }
    start = time.perf_counter()
    try:
        # One BLAS thread: the matrices are narrow (rows x features), so a second
        # OpenBLAS thread only adds synchronisation; on a busy 2-core machine it
        # made logistic regression fits ~7x slower. Tree estimators use their own n_jobs.
        with threadpool_limits(limits=1, user_api="blas"):
            result, tables = _train(config, run_id, run, register)
    except Exception as exc:
        run.update(status="failed", message=f"{type(exc).__name__}: {exc}", finished_at=dt.datetime.now(),
                   seconds=time.perf_counter() - start)
        write_run_tables(config, run_id, {"model_runs": _run_row(run)})
        raise
    run.update(status="success", finished_at=dt.datetime.now(), seconds=time.perf_counter() - start)
    write_run_tables(config, run_id, {"model_runs": _run_row(run), **tables})
    return result


def _train(config: ChurnConfig, run_id: str, run: dict[str, Any], register) -> tuple[TrainResult, dict[str, pd.DataFrame]]:
    contract = mart_contract(config)
    with timed(f"load labelled rows of {config.dataset.feature_mart}", log):
        frame = load_training_rows(config, contract)
        split = validation_split(frame, contract, fully_labelled_dates(config, contract),
                                 config.training.out_of_time_snapshots, config.training.random_state)
    train_frame = frame.iloc[split.train_index].reset_index(drop=True)
    eval_frame = frame.iloc[split.eval_index].reset_index(drop=True)
    run.update(
        snapshot_min=frame[contract.as_of].min(), snapshot_max=frame[contract.as_of].max(),
        train_rows=len(train_frame), oot_rows=len(eval_frame), validation_strategy=split.strategy,
        training_data_hash=frame_hash(train_frame),
    )
    log.info("%d labelled rows: %d for training/CV, %d held out (%s %s)", len(frame), len(train_frame),
             len(eval_frame), split.strategy, ", ".join(split.eval_as_of_dates))

    X = contract_feature_frame(contract, train_frame, f"feature mart {config.dataset.feature_mart!r}")
    y = train_frame[contract.label].to_numpy(dtype=int)
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        raise TrainingError(f"training rows of {config.dataset.feature_mart!r} hold a single class ({len(y)} rows)")
    scale_pos_weight = (len(y) - positives) / positives
    folds = cv_folds(y, train_frame[contract.key].to_numpy(), config.training.cv_folds, config.training.random_state)

    searches: dict[str, SearchResult] = {}
    for algorithm in ALGORITHMS:
        with timed(f"candidate {algorithm} ({config.training.cv_folds}-fold grouped CV)", log):
            searches[algorithm] = search_algorithm(algorithm, contract, X, y, folds, config, scale_pos_weight)
    chosen = select_by_simplicity([s.score for s in searches.values()], ALGORITHMS)
    best = searches[chosen.algorithm]
    log.info("chosen %s %s: CV %s %.4f +- %.4f", best.algorithm, best.params,
             config.problem.selection_metric, chosen.mean, chosen.std)

    metric_rows: list[dict[str, Any]] = []
    calibrator, choice = None, None
    for algorithm, search in searches.items():
        base = {"run_id": run_id, "candidate": algorithm, "params": json.dumps(search.params),
                "chosen": algorithm == best.algorithm}
        rows, cal, ch = candidate_metric_rows(search, y, folds, config, base)
        metric_rows += rows
        if algorithm == best.algorithm:
            calibrator, choice = cal, ch

    log.info("threshold %.4f (%s): out-of-fold recall %.3f at precision %.3f, flagging %.1f%% of rows",
             choice.threshold, choice.rule, choice.recall, choice.precision, 100 * choice.share_flagged)
    with timed(f"refit {best.algorithm} on {len(train_frame)} rows", log):
        pipeline = make_pipeline(contract, best.algorithm, best.params, config.training.random_state,
                                 scale_pos_weight).fit(X, y)
    model = ChurnModel(pipeline=pipeline, calibrator=calibrator, contract=contract, algorithm=best.algorithm,
                       params=best.params, threshold=choice.threshold)

    y_eval = eval_frame[contract.label].to_numpy(dtype=int)
    p_eval = model.predict_proba(eval_frame)
    oot = classification_metrics(y_eval, p_eval, model.threshold)
    baseline = baseline_metrics(y_eval, float(y.mean()))
    log.info("out-of-time (%s, %d rows): %s=%.4f roc_auc=%.4f recall=%.3f precision=%.3f at threshold %.4f; "
             "baseline pr_auc=%.4f", split.strategy, len(eval_frame), config.problem.selection_metric,
             oot[config.problem.selection_metric], oot["roc_auc"], oot["recall"], oot["precision"],
             model.threshold, baseline["pr_auc"])

    from ml.modeling.reference import compute_reference

    with timed("reference statistics and feature importance", log):
        train_scores = model.predict_proba(train_frame)
        reference = compute_reference(train_frame, train_scores, contract, config.monitoring,
                                      threshold=model.threshold)
        importance = feature_importances(model, eval_frame, config)
    model.metadata = {
        "run_id": run_id,
        "dataset": config.dataset.name,
        "feature_mart": config.dataset.feature_mart,
        "config_hash": config.fingerprint(),
        "training_data_hash": run["training_data_hash"],
        "training_rows": len(train_frame),
        "snapshot_range": [str(run["snapshot_min"].date()), str(run["snapshot_max"].date())],
        "validation": split.describe(frame, contract),
        "selection_metric": config.problem.selection_metric,
        "threshold_choice": dataclasses.asdict(choice),
        "metrics": {"cv_mean": {"mean": chosen.mean, "std": chosen.std}, "out_of_time": oot, "baseline": baseline},
        "candidates": {a: {"params": s.params, "cv_mean": s.score.mean, "cv_std": s.score.std,
                           "configs": s.all_configs} for a, s in searches.items()},
        "reference": reference,
    }

    version = register(config, model, run_id, oot, evaluation_frame=eval_frame)
    from ml.modeling.registry import champion_version

    promoted = champion_version(config) == version
    run.update(chosen_algorithm=best.algorithm, model_version=version, promoted=promoted)

    chosen_base = {"run_id": run_id, "candidate": best.algorithm, "params": json.dumps(best.params), "chosen": True}
    metric_rows.append(_metric_rows(chosen_base, "out_of_time", oot))
    metric_rows.append(_metric_rows({"run_id": run_id, "candidate": "always_no_churn", "params": "{}",
                                     "chosen": False}, "baseline", baseline))
    metrics = pd.DataFrame(metric_rows)
    metrics.insert(1, "model_version", version)
    importance.insert(0, "run_id", run_id)
    importance.insert(1, "model_version", version)
    curve = threshold_curve(y_eval, p_eval)
    curve.insert(0, "run_id", run_id)
    curve.insert(1, "model_version", version)
    tables = {"model_metrics": metrics, "feature_importance": importance[
        ["run_id", "model_version", "feature", "importance_type", "value", "rank"]], "threshold_curve": curve}
    result = TrainResult(version, best.algorithm, oot, promoted, run_id, split.strategy, baseline_metrics=baseline,
                         message=f"{best.algorithm} registered as {version} ({'champion' if promoted else 'challenger'})")
    return result, tables


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="train even if a champion model exists")


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
    if not session.exists("feature_importance"):
        return []
    frame = session.frame(
        'select feature, importance_type, "rank" from feature_importance where model_version = ?', [version]
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
    if not session.exists("model_runs"):
        return None
    value = session.scalar(
        "select max(snapshot_max) from model_runs where dataset = ? and status = 'success'", [dataset]
    )
    return None if value is None else pd.Timestamp(value).date()


def validation_strategy(session: Session, run_id: str) -> str | None:
    """How training run `run_id` judged its model (`out_of_time` or `stratified_holdout`)."""
    if not session.exists("model_runs"):
        return None
    return session.scalar("select any_value(validation_strategy) from model_runs where run_id = ?", [run_id])


def held_out_metrics(session: Session, version: str, metrics: tuple[str, ...]) -> pd.DataFrame:
    """The model's held-out (`out_of_time`) and baseline rows of model_metrics: split, candidate, metrics, rows."""
    if not session.exists("model_metrics"):
        return pd.DataFrame(columns=["split", "candidate", *metrics, "rows"])
    return session.frame(
        f"select split, candidate, {column_list(metrics)}, rows from model_metrics "
        "where model_version = ? and split in ('out_of_time', 'baseline')",
        [version],
    )
