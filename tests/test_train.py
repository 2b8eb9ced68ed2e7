"""Training: grouped CV, out-of-time hold-out, fallback, tables, skip rule.

Most tests use a small synthetic mart written straight into a private build DB
with a hand-made contract (fast, and every property is known); one test runs
the real demo mart through the quick-search `trained_warehouse` fixture.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ml.modeling.train as train_module
from ml.config import ChurnConfig
from ml.features.contract import ContractError, Feature, FeatureContract
from ml.modeling.evaluate import calibration_error_of_bins, expected_calibration_error
from ml.modeling.registry import champion_version, load_model
from ml.modeling.train import TrainResult, cv_folds, train, validation_split
from ml.warehouse import connect
from tests.conftest import make_config, query

QUICK = {"training": {"search_iterations": 1, "small_table_iterations": 1, "cv_folds": 3}}

# A synthetic mart: names are test fixtures, not the project's features.
SYNTHETIC_CONTRACT = FeatureContract(
    model="customer_features",
    key="customer_id",
    as_of="as_of_date",
    label="churned_within_30d",
    features=(
        Feature("signal", "numeric"),
        Feature("noisy_with_gaps", "numeric"),
        Feature("snapshot_index", "numeric"),
        Feature("plan", "categorical"),
    ),
)


def synthetic_mart(customers: int = 300, snapshots: int = 4, seed: int = 0,
                   unlabelled_last: bool = True) -> pd.DataFrame:
    """Monthly snapshots per customer; churn depends on `signal` and `plan`.

    With `unlabelled_last`, one extra newest snapshot has no label (horizon not yet
    observed), like the real mart's latest as_of_date.
    """
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2024-01-01", periods=snapshots + int(unlabelled_last), freq="MS")
    plan = rng.choice(["basic", "pro", "team"], customers)
    rows = []
    for i, date in enumerate(dates):
        signal = rng.normal(size=customers)
        logit = -2.0 + 1.6 * signal + np.where(plan == "basic", 0.8, 0.0)
        label = (rng.random(customers) < 1 / (1 + np.exp(-logit))).astype(float)
        if unlabelled_last and i == len(dates) - 1:
            label[:] = np.nan
        noisy = rng.normal(size=customers)
        noisy[rng.random(customers) < 0.1] = np.nan
        rows.append(pd.DataFrame({
            "customer_id": np.arange(customers),
            "as_of_date": date,
            "churned_within_30d": label,
            "signal": signal,
            "noisy_with_gaps": noisy,
            "snapshot_index": float(i),
            "plan": plan,
        }))
    frame = pd.concat(rows, ignore_index=True)
    frame["churned_within_30d"] = frame["churned_within_30d"].astype("Int64")
    return frame


def synthetic_warehouse(root: Path, monkeypatch: pytest.MonkeyPatch, mart: pd.DataFrame,
                        overrides: dict | None = None) -> ChurnConfig:
    """A private config whose build DB holds `mart` as the feature mart."""
    config = make_config(root, {**QUICK, **(overrides or {})})
    with connect(config.warehouse.build_db) as con:
        con.append(config.dataset.feature_mart, mart)
    monkeypatch.setattr(train_module, "current_contract", lambda _config: SYNTHETIC_CONTRACT)
    return config


@pytest.fixture(scope="session")
def synthetic_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChurnConfig, TrainResult, list[pd.DataFrame]]:
    """One quick training run on the synthetic mart, shared by read-only tests.

    Also records the feature frames each candidate search received, to prove the
    out-of-time rows never reach CV or selection.
    """
    seen: list[pd.DataFrame] = []
    original = train_module.search_algorithm

    def spy(algorithm, contract, X, *args, **kwargs):
        seen.append(X.copy())
        return original(algorithm, contract, X, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        config = synthetic_warehouse(tmp_path_factory.mktemp("synthetic"), monkeypatch, synthetic_mart())
        monkeypatch.setattr(train_module, "search_algorithm", spy)
        result = train(config, run_id="shared")
    return config, result, seen




def _run_counts(config: ChurnConfig, run_id: str) -> dict[str, int]:
    return {t: int(query(config, f"select count(*) n from {t} where run_id = '{run_id}'")["n"][0])
            for t in ("model_runs", "model_metrics", "feature_importance", "threshold_curve", "calibration_curve")}


def test_cv_folds_never_split_a_customer() -> None:
    frame = synthetic_mart(customers=200, snapshots=4)
    frame = frame[frame["churned_within_30d"].notna()]
    folds = cv_folds(frame["churned_within_30d"].to_numpy(int), frame["customer_id"].to_numpy(), 5, 1)
    assert len(folds) == 5
    customers = frame["customer_id"].to_numpy()
    for fit_idx, val_idx in folds:
        assert set(customers[fit_idx]).isdisjoint(customers[val_idx])
    # every row is validated exactly once
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(len(frame)))


def test_out_of_time_split_holds_out_newest_labelled_snapshot() -> None:
    frame = synthetic_mart(snapshots=4, unlabelled_last=True)
    labelled = frame[frame["churned_within_30d"].notna()].reset_index(drop=True)
    dates = sorted(pd.to_datetime(labelled["as_of_date"]).unique())
    split = validation_split(labelled, SYNTHETIC_CONTRACT, [pd.Timestamp(d) for d in dates], 1, 42)
    assert split.strategy == "out_of_time"
    assert split.eval_as_of_dates == ["2024-04-01"]
    assert set(labelled.iloc[split.eval_index]["as_of_date"]) == {pd.Timestamp("2024-04-01")}
    assert pd.Timestamp("2024-04-01") not in set(labelled.iloc[split.train_index]["as_of_date"])


def test_out_of_time_rows_never_reach_cv_or_selection(synthetic_trained) -> None:
    config, result, seen = synthetic_trained
    assert result.validation_strategy == "out_of_time"
    assert len(seen) == 3  # one search per candidate algorithm
    # snapshot 3 (2024-04-01) is the newest labelled one; snapshot 4 is unlabelled
    for X in seen:
        assert sorted(X["snapshot_index"].unique()) == [0.0, 1.0, 2.0]
    runs = query(config, "select * from model_runs where run_id = 'shared'")
    assert runs.loc[0, "train_rows"] == 900 and runs.loc[0, "oot_rows"] == 300
    assert str(runs.loc[0, "snapshot_max"].date()) == "2024-04-01"
    assert result.oot_metrics["rows"] == 300


def test_single_snapshot_falls_back_to_stratified_holdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mart = synthetic_mart(customers=600, snapshots=1, unlabelled_last=False)
    config = synthetic_warehouse(tmp_path / "wh", monkeypatch, mart)
    result = train(config, run_id="single")
    assert result.validation_strategy == "stratified_holdout"
    assert not result.skipped and result.promoted
    runs = query(config, "select * from model_runs where run_id = 'single'")
    assert runs.loc[0, "validation_strategy"] == "stratified_holdout"
    assert runs.loc[0, "status"] == "success"
    assert 0.15 * 600 <= runs.loc[0, "oot_rows"] <= 0.25 * 600
    assert runs.loc[0, "train_rows"] + runs.loc[0, "oot_rows"] == 600


def test_tables_have_expected_columns(synthetic_trained) -> None:
    config, result, _ = synthetic_trained
    counts = _run_counts(config, "shared")
    assert counts["model_runs"] == 1
    assert counts["threshold_curve"] == 99
    assert counts["calibration_curve"] == 10
    # 3 candidates x (3 folds + mean + std) + out_of_time + baseline
    assert counts["model_metrics"] == 3 * 5 + 2
    # native importance for 4 features + permutation for 4 features
    assert counts["feature_importance"] == 8
    with connect(config.warehouse.build_db) as con:
        assert {"run_id", "started_at", "finished_at", "dataset", "snapshot_min", "snapshot_max", "train_rows",
                "oot_rows", "config_hash", "training_data_hash", "validation_strategy", "chosen_algorithm",
                "model_version", "status"} <= set(con.columns("model_runs"))
        assert {"run_id", "model_version", "candidate", "split", "roc_auc", "pr_auc", "log_loss", "brier",
                "recall", "precision", "f1", "accuracy", "tp", "fp", "tn", "fn", "calibration_error",
                "threshold"} <= set(con.columns("model_metrics"))
        assert list(con.columns("feature_importance")) == [
            "run_id", "model_version", "feature", "importance_type", "value", "rank"]
        assert list(con.columns("threshold_curve")) == [
            "run_id", "model_version", "threshold", "recall", "precision", "f1", "share_flagged"]
    runs = query(config, "select * from model_runs where run_id = 'shared'")
    assert runs.loc[0, "model_version"] == result.version
    assert runs.loc[0, "config_hash"] == config.fingerprint()
    assert len(runs.loc[0, "training_data_hash"]) == 64
    metrics = query(config, "select * from model_metrics where run_id = 'shared'")
    assert set(metrics["split"]) == {"cv_fold_1", "cv_fold_2", "cv_fold_3", "cv_mean", "cv_std",
                                     "out_of_time", "baseline"}
    baseline = metrics[metrics["split"] == "baseline"].iloc[0]
    oot = metrics[metrics["split"] == "out_of_time"].iloc[0]
    assert oot["candidate"] == result.algorithm
    assert baseline["recall"] == 0 and baseline["precision"] == 0 and baseline["roc_auc"] == 0.5
    assert baseline["pr_auc"] == pytest.approx(oot["prevalence"])
    assert baseline["accuracy"] == pytest.approx(1 - oot["prevalence"])
    # the model beats "nobody churns" by a wide margin on this learnable data
    assert oot["roc_auc"] > 0.75 and oot["pr_auc"] > baseline["pr_auc"] + 0.2
    importance = query(config, "select * from feature_importance where run_id = 'shared'")
    top = importance[importance["rank"] == 1].set_index("importance_type")["feature"]
    assert top["permutation"] == "signal"
    assert set(importance["feature"]) == set(SYNTHETIC_CONTRACT.feature_names)
    curve = query(config, "select * from threshold_curve where run_id = 'shared' order by threshold")
    assert curve["threshold"].iloc[0] == pytest.approx(0.01) and curve["threshold"].iloc[-1] == pytest.approx(0.99)
    assert curve["share_flagged"].is_monotonic_decreasing
    # The reliability bins cover every held-out row, and their ECE is the one model_metrics records.
    bins = query(config, "select * from calibration_curve where run_id = 'shared' order by bin")
    assert bins["bin"].tolist() == list(range(10)) and bins["n_rows"].sum() == oot["rows"]
    assert calibration_error_of_bins(bins) == pytest.approx(oot["calibration_error"])


def test_rerun_with_same_run_id_replaces_its_rows(synthetic_trained, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    shared, first, _ = synthetic_trained
    config = make_config(tmp_path / "wh", QUICK)
    shutil.copytree(shared.warehouse.dir, config.warehouse.dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("churn.yml"))
    monkeypatch.setattr(train_module, "current_contract", lambda _config: SYNTHETIC_CONTRACT)
    before = _run_counts(config, "shared")
    second = train(config, force=True, run_id="shared")
    assert _run_counts(config, "shared") == before
    assert second.version != first.version
    runs = query(config, "select model_version from model_runs where run_id = 'shared'")
    assert runs["model_version"].tolist() == [second.version]


def test_threshold_meets_recall_target_on_out_of_fold_rows(synthetic_trained) -> None:
    synthetic, result, _ = synthetic_trained

    model = load_model(synthetic, result.version)
    choice = model.metadata.threshold_choice
    assert choice["rule"] == "recall_target"
    assert choice["recall"] >= synthetic.problem.success_target
    assert model.threshold == pytest.approx(choice["threshold"])
    metrics = query(synthetic, "select * from model_metrics where run_id = 'shared' and chosen and split = 'cv_mean'")
    assert metrics.loc[0, "threshold"] == pytest.approx(model.threshold)
    # out-of-fold calibration is close on held-out rows
    assert metrics.loc[0, "calibration_error"] < 0.05


def test_train_skips_when_champion_exists_unless_forced(synthetic_trained) -> None:
    synthetic, first, _ = synthetic_trained
    assert first.promoted and champion_version(synthetic) == first.version
    skipped = train(synthetic)
    assert skipped.skipped and skipped.version == first.version
    assert "--force" in skipped.message
    runs = query(synthetic, "select run_id from model_runs")
    assert runs["run_id"].tolist() == ["shared"]


def test_model_stores_reference_and_traces_transformed_columns(synthetic_trained) -> None:
    synthetic, result, _ = synthetic_trained

    model = load_model(synthetic, result.version)
    reference = model.metadata.reference
    assert reference["n_rows"] == 900
    assert set(reference["features"]) == set(SYNTHETIC_CONTRACT.feature_names)
    sources = model.transformed_feature_sources()
    width = model.pipeline.named_steps["preprocess"].transform(
        model.feature_frame(synthetic_mart().head(5))).shape[1]
    assert len(sources) == width
    assert sources.count("plan") == 3  # one-hot of three plans
    assert sources.count("noisy_with_gaps") == 2  # value + missing indicator


def test_missing_feature_column_is_named(synthetic_trained) -> None:
    synthetic, result, _ = synthetic_trained

    model = load_model(synthetic, result.version)
    with pytest.raises(ContractError, match="noisy_with_gaps"):
        model.predict_proba(synthetic_mart().drop(columns=["noisy_with_gaps"]))


def test_single_class_mart_fails_clearly_and_records_failed_run(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mart = synthetic_mart(customers=100, snapshots=2)
    mart["churned_within_30d"] = mart["churned_within_30d"] * 0
    config = synthetic_warehouse(tmp_path / "wh", monkeypatch, mart)
    with pytest.raises(train_module.TrainingError, match="both classes"):
        train(config, run_id="oneclass")
    runs = query(config, "select status, message from model_runs where run_id = 'oneclass'")
    assert runs.loc[0, "status"] == "failed" and "customer_features" in runs.loc[0, "message"]
    assert champion_version(config) is None


def test_demo_mart_trains_and_beats_baseline(trained_warehouse: ChurnConfig) -> None:
    metrics = query(trained_warehouse, "select * from model_metrics")
    runs = query(trained_warehouse, "select * from model_runs")
    assert runs.loc[0, "validation_strategy"] == "out_of_time"
    assert runs.loc[0, "status"] == "success"
    oot = metrics[metrics["split"] == "out_of_time"].iloc[0]
    baseline = metrics[metrics["split"] == "baseline"].iloc[0]
    assert oot["roc_auc"] > 0.7
    assert oot["pr_auc"] > 1.5 * baseline["pr_auc"]
    assert champion_version(trained_warehouse) == runs.loc[0, "model_version"]


def test_expected_calibration_error_is_small_after_oof_calibration() -> None:
    from ml.modeling.model import ScoreCalibrator

    rng = np.random.default_rng(3)
    truth = rng.uniform(0, 0.6, 20000)
    y = (rng.random(20000) < truth).astype(int)
    raw = truth ** 3  # a monotone but badly calibrated score
    calibrator = ScoreCalibrator("isotonic").fit(raw[:10000], y[:10000])
    calibrated = calibrator.predict(raw[10000:])
    assert expected_calibration_error(y[10000:], raw[10000:]) > 0.15
    assert expected_calibration_error(y[10000:], calibrated) < 0.02


def test_row_cap_samples_whole_customers_across_every_snapshot(built_warehouse: ChurnConfig, tmp_path: Path) -> None:
    """Above max_training_rows, training keeps a share of customers with all their
    snapshots: grouping holds and the out-of-time snapshots are still there."""
    from ml.features.mart import current_contract, load_training_rows
    from tests.conftest import copy_warehouse

    def load_training_rows_of(config: ChurnConfig) -> pd.DataFrame:
        with connect(config.warehouse.build_db, read_only=True) as session:
            return load_training_rows(session, config, contract)

    contract = current_contract(built_warehouse)
    full = load_training_rows_of(built_warehouse)
    cap = len(full) // 4
    capped_config = copy_warehouse(built_warehouse, tmp_path / "capped", {"training": {"max_training_rows": cap}})
    capped = load_training_rows_of(capped_config)

    assert 0.7 * cap < len(capped) < 1.3 * cap
    assert set(capped[contract.as_of]) == set(full[contract.as_of])
    rows_per_customer = full.groupby(contract.key).size()
    kept = capped.groupby(contract.key).size()
    assert (kept == rows_per_customer.loc[kept.index]).all(), "a sampled customer keeps all its snapshots"
    again = load_training_rows_of(capped_config)
    assert again[contract.key].tolist() == capped[contract.key].tolist(), "the sample is seeded"
