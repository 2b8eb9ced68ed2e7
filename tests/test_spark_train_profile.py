"""`churn train` and `churn profile` reading the feature mart on Spark: the same model, the same profile.

On Spark the mart is the data plane (on the engine) and the stages' results the
control plane (the build DuckDB database), so each stage takes `data`, a
Reader of the mart. The session warehouse's DuckDB mart is written to Spark as
a table (its Parquet export, so both engines hold the very same values), the
stages run with `data=` that table on copies whose build database no longer
has a mart at all (every mart read must then go to Spark), and:
- (a) training on Spark gives the DuckDB-trained model (`trained_warehouse`,
  the same QUICK_TRAINING search from the same built warehouse): the same
  training-data hash, chosen algorithm, parameters, threshold and feature
  fingerprints (whose held-out rows are re-read on Spark), and model_metrics
  and feature_importance rows equal to 1e-9;
- (b) the profile's stored tables from Spark equal DuckDB's: counts, names
  and types exactly, floats to a relative 1e-9 (sums, means and correlations
  add in another order, quantiles interpolate in another formula). Both
  profiles run with the order-statistics bound below the mart's size, so the
  quantiles, medians and correlations come from the seeded sample: an md5 of
  key, snapshot date and seed below a cut picks it, and md5, casts to text
  and || compute the same on both engines (checked here against Python's md5
  too), so it is the same rows; the plots' sample (ordered by that digest) is
  the same rows in the same order;
- (c) a Spark mart missing a contract column is refused by both stages, the
  error naming the table and the column;
- and the hold-out re-read (a frame of keys joined to the mart, `registered`
  on Spark) returns the rows DuckDB returns.
The test without the `spark` mark needs no pyspark and runs in `make test`.

The module shares the test process's one Spark session (`spark_warehouse`);
its mart table is the one test_spark_ml writes too (the same values), and the
refusal test restores it after planting the broken one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ml.reports.profile as profile_module
from ml.config import ChurnConfig
from ml.features.contract import ContractError
from ml.features.mart import current_contract, load_evaluation_rows, mart_reader
from ml.reports.profile import PROFILE_SNAPSHOTS, TABLES, order_statistics_source, plot_sample, profile, row_digest
from ml.warehouse import Reader, connect
from ml.warehouse.spark import SCHEMA
from tests.conftest import QUICK_TRAINING, copy_warehouse, query

# The order statistics read a sample of about a third of the mart (the default bound exceeds the demo's).
SAMPLE_SHARE = 3
# Per profile table: the columns that identify a row, and the stamp columns that name the run.
PROFILE_KEYS = {
    "profile_columns": ["column_name"],
    "profile_categories": ["column_name", "category"],
    "profile_class_balance": ["scope", "snapshot_date"],
    "profile_correlations": ["column_a", "column_b", "method"],
    PROFILE_SNAPSHOTS.name: ["snapshot_date", "column_name"],
}
RUN_STAMP = ["run_id", "profiled_at", "computed_at"]
RUN_METRIC_COLUMNS = ["run_id", "model_version"]


def drop_duckdb_mart(config: ChurnConfig) -> None:
    """Remove the mart from a copy's build database: a stage given `data` must not need it there."""
    with connect(config.warehouse.build_db) as session:
        session.execute(f'drop table "{config.dataset.feature_mart}"')


def save_mart(spark_warehouse, export: Path, table: str, drop: str | None = None) -> None:
    """The exported mart (optionally without column `drop`) as Spark table churn.<table>, in 4 files.

    The warehouse's SQL session keeps its own cache of the table's files (an
    earlier module or test read it), which a write through the shared session
    does not invalidate: it is refreshed, or it would read files just replaced.
    """
    frame = spark_warehouse.spark.read.parquet(str(export))
    frame = frame.drop(drop) if drop else frame
    frame.repartition(4).write.mode("overwrite").saveAsTable(f"{SCHEMA}.{table}")
    spark_warehouse.rows(f'refresh table {SCHEMA}."{table}"')


def sampled_profile(config: ChurnConfig, run_id: str, data: Reader | None = None) -> None:
    """`profile` with the order-statistics bound at a third of the mart, so its seeded sample is used."""
    with mart_reader(config, data) as mart:
        total = int(mart.scalar(f'select count(*) from "{config.dataset.feature_mart}"'))
    bounded = functools.partial(order_statistics_source, rows=total // SAMPLE_SHARE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(profile_module, "order_statistics_source", bounded)
        profile(config, run_id=run_id, sample_rows=500, data=data)


def stored(config: ChurnConfig, table: str) -> pd.DataFrame:
    """A profile table of the build database without its run stamp, in key order."""
    frame = query(config, f"select * from {table}")
    frame = frame.drop(columns=[c for c in RUN_STAMP if c in frame.columns])
    return frame.sort_values(PROFILE_KEYS[table], ignore_index=True)


def assert_same_values(left: pd.DataFrame, right: pd.DataFrame, what: str) -> None:
    """Equal columns and dtypes; floats to a relative 1e-9, everything else exactly."""
    assert list(left.columns) == list(right.columns), what
    assert len(left) == len(right) > 0, what
    for column in left.columns:
        a, b = left[column], right[column]
        assert a.dtype == b.dtype, f"{what}.{column}: {a.dtype} vs {b.dtype}"
        if pd.api.types.is_float_dtype(a):
            assert np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-9, atol=1e-12, equal_nan=True), f"{what}.{column}"
        else:
            pd.testing.assert_series_equal(a, b, check_exact=True, obj=f"{what}.{column}")


# ---------------------------------------------------------------- without pyspark


def test_row_digest_is_the_md5_of_key_date_and_seed(built_warehouse: ChurnConfig) -> None:
    """The profile's engine-independent digest, checked against a third implementation: Python's md5."""
    contract = current_contract(built_warehouse)
    rows = query(built_warehouse, f'select "{contract.key}" as k, cast("{contract.as_of}" as date) as d, '
                                  f'{row_digest(contract, 7)} as digest from "{contract.model}" limit 200')
    expected = [hashlib.md5(f"{k}:{pd.Timestamp(d).date()}:7".encode()).hexdigest()
                for k, d in zip(rows["k"], rows["d"], strict=True)]
    assert rows["digest"].tolist() == expected


# ---------------------------------------------------------------- on Spark local mode


@pytest.fixture(scope="module")
def export(built_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session warehouse's mart as Parquet, written by DuckDB."""
    path = tmp_path_factory.mktemp("export") / "mart.parquet"
    with connect(built_warehouse.warehouse.build_db, read_only=True) as session:
        session.execute(f"copy \"{built_warehouse.dataset.feature_mart}\" to '{path}' (format parquet)")
    return path


@pytest.fixture(scope="module")
def spark(spark_warehouse, built_warehouse: ChurnConfig, export: Path):
    """The process's Spark session, holding the DuckDB mart as table churn.<mart>."""
    save_mart(spark_warehouse, export, built_warehouse.dataset.feature_mart)
    return spark_warehouse


@pytest.fixture(scope="module")
def spark_trained(spark, built_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the built warehouse, without its DuckDB mart, trained on the Spark mart (quick search)."""
    from ml.modeling.train import train

    config = copy_warehouse(built_warehouse, tmp_path_factory.mktemp("spark_trained"), QUICK_TRAINING)
    drop_duckdb_mart(config)
    return config, train(config, data=spark)


def training_record(config: ChurnConfig) -> dict:
    """What one training run chose and trained on, beside its champion model's parameters and fingerprints."""
    from ml.modeling.registry import load_champion

    run = query(config, "select training_data_hash, validation_strategy, chosen_algorithm, train_rows, oot_rows, "
                        "snapshot_min, snapshot_max, status from model_runs").iloc[0].to_dict()
    model = load_champion(config)
    return {**run, "algorithm": model.algorithm, "params": json.dumps(model.params, sort_keys=True),
            "threshold": model.threshold, "feature_definitions": model.metadata.feature_definitions,
            "validation": model.metadata.validation}


def run_rows(config: ChurnConfig, table: str, keys: list[str]) -> pd.DataFrame:
    return (query(config, f"select * from {table}").drop(columns=RUN_METRIC_COLUMNS)
            .sort_values(keys, ignore_index=True))


@pytest.mark.spark
def test_training_on_the_spark_mart_gives_the_duckdb_model(spark_trained, trained_warehouse: ChurnConfig) -> None:
    config, result = spark_trained
    assert result.promoted and not result.skipped
    on_spark, on_duckdb = training_record(config), training_record(trained_warehouse)
    threshold = on_spark.pop("threshold")
    assert threshold == pytest.approx(on_duckdb.pop("threshold"), rel=0, abs=1e-9)
    assert on_spark == on_duckdb  # hash, algorithm, params, fingerprints (re-read on Spark), held-out dates
    assert on_spark["status"] == "success" and on_spark["feature_definitions"]["values"]
    for table, keys in (("model_metrics", ["candidate", "split", "chosen"]),
                        ("feature_importance", ["feature", "importance_type"])):
        left, right = run_rows(config, table, keys), run_rows(trained_warehouse, table, keys)
        assert list(left.columns) == list(right.columns) and len(left) == len(right) > 0, table
        for column in left.columns:
            if pd.api.types.is_float_dtype(left[column]):
                assert np.allclose(left[column], right[column], rtol=0, atol=1e-9, equal_nan=True), (table, column)
            else:
                pd.testing.assert_series_equal(left[column], right[column], obj=f"{table}.{column}")


@pytest.fixture(scope="module")
def profiles(spark, built_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory):
    """Two copies of the built warehouse profiled with a sampled bound: on DuckDB, and on the Spark mart
    (that copy without its DuckDB mart)."""
    duck = copy_warehouse(built_warehouse, tmp_path_factory.mktemp("duck_profiled"))
    sampled_profile(duck, "profile-duckdb")
    on_spark = copy_warehouse(built_warehouse, tmp_path_factory.mktemp("spark_profiled"))
    drop_duckdb_mart(on_spark)
    sampled_profile(on_spark, "profile-spark", data=spark)
    return duck, on_spark


@pytest.mark.spark
@pytest.mark.parametrize("table", [*TABLES, PROFILE_SNAPSHOTS.name])
def test_profile_tables_from_spark_equal_duckdbs(profiles, table: str) -> None:
    duck, on_spark = profiles
    assert_same_values(stored(on_spark, table), stored(duck, table), table)


@pytest.mark.spark
def test_profile_samples_are_the_same_rows_on_both_engines(spark, built_warehouse: ChurnConfig) -> None:
    """The order-statistics sample's rows and the plot sample (rows and order) are equal across engines."""
    config = built_warehouse
    contract = current_contract(config)
    mart, seed = config.dataset.feature_mart, config.training.random_state
    features = contract.numeric[:3]
    with connect(config.warehouse.build_db, read_only=True) as session:
        total = int(session.scalar(f'select count(*) from "{mart}"'))
        readers = {"duckdb": session, "spark": spark}
        samples, plots = {}, {}
        for name, reader in readers.items():
            with order_statistics_source(reader, mart, contract, seed, rows=total // SAMPLE_SHARE) as (relation, n):
                samples[name] = (n, reader.frame(f"select * from {relation}"))
            plots[name] = plot_sample(reader, mart, contract, features, 500, seed)
    (n_duck, duck), (n_spark, on_spark) = samples["duckdb"], samples["spark"]
    assert n_duck == n_spark and 0.25 * total < n_duck < 0.42 * total
    order = list(duck.columns)
    pd.testing.assert_frame_equal(on_spark.sort_values(order, ignore_index=True),
                                  duck.sort_values(order, ignore_index=True))
    pd.testing.assert_frame_equal(plots["spark"], plots["duckdb"])
    assert len(plots["duckdb"]) == 500


@pytest.mark.spark
def test_hold_out_re_read_joins_the_same_rows_on_spark(spark, built_warehouse: ChurnConfig) -> None:
    """A hold-out's keys (a registered frame on Spark) select the rows DuckDB's join selects."""
    config = built_warehouse
    contract = current_contract(config)
    picked = query(config, f'select "{contract.key}" as k, cast("{contract.as_of}" as date) as d '
                           f'from "{contract.model}" where "{contract.label}" is not null order by 2, 1 limit 40')
    keys = [[k, str(pd.Timestamp(d).date())] for k, d in zip(picked["k"], picked["d"], strict=True)]
    validation = {"strategy": "stratified_holdout", "eval_keys": keys}
    with connect(config.warehouse.build_db, read_only=True) as session:
        duck = load_evaluation_rows(session, config, contract, validation)
    on_spark = load_evaluation_rows(spark, config, contract, validation)
    order = [contract.key, contract.as_of]
    assert len(duck) == 40
    pd.testing.assert_frame_equal(on_spark.sort_values(order, ignore_index=True),
                                  duck.sort_values(order, ignore_index=True))


@pytest.mark.spark
def test_both_stages_refuse_a_spark_mart_without_a_contract_column(
        spark, export: Path, built_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> None:
    from ml.modeling.train import train

    config = copy_warehouse(built_warehouse, tmp_path_factory.mktemp("broken"), QUICK_TRAINING)
    drop_duckdb_mart(config)
    mart = config.dataset.feature_mart
    dropped = current_contract(config).feature_names[0]
    refused = rf"table '{mart}' does not match the feature contract.*missing column\(s\) {dropped}"
    save_mart(spark, export, mart, drop=dropped)
    try:
        with pytest.raises(ContractError, match=refused):
            train(config, data=spark)
        with pytest.raises(ContractError, match=refused):
            profile(config, data=spark)
    finally:
        save_mart(spark, export, mart)  # the intact mart, for whatever runs next in this process
    failed = query(config, "select status, message from model_runs")
    assert failed["status"].tolist() == ["failed"] and dropped in failed["message"][0]
