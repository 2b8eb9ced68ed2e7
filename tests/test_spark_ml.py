"""The ML layer's Spark building blocks, on Spark local mode: the session, the training read, scoring.

The session warehouse's DuckDB mart is written to Spark as a table (its
Parquet export, so both engines hold the very same values), and then:
- the ML session is the one dbt-spark's `session` method gets in this process,
  and it refuses a second folder instead of reading the first one's tables;
- the training read (capped: the md5 sample) through Arrow returns exactly
  the frame the DuckDB read returns, dtypes and training-data hash included;
- scoring with mapInPandas around `score_frame` and the same champion equals
  `churn score`'s churn_scores bit for bit (probabilities, decisions, bands,
  ranks, reasons, contributions, texts).
The tests without the `spark` mark need no pyspark and run in `make test`: the
session settings are dbt's `spark` target's, `ml` imports without pyspark,
and the sample predicate picks the customers a plain md5 in Python picks.

One Spark session (a JVM, ~16 s to start) serves the whole module, on its own
Derby and table folder under tmp_path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ml.config import ChurnConfig
from ml.features.contract import ContractError
from ml.features.mart import current_contract, load_training_rows, sample_cut
from ml.warehouse import connect
from ml.warehouse.spark import (
    SCHEMA,
    SparkFolderError,
    SparkUnavailableError,
    dbt_env,
    start_spark,
    target_conf,
)
from tests.conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse, query

PROFILES = REPO_ROOT / "dbt_project" / "profiles.yml"
ENV_VAR = re.compile(r"\{\{\s*env_var\('([A-Z_]+)',\s*'[^']*'\)\s*\}\}")
# Columns that name the run rather than the scores.
RUN_COLUMNS = ["scored_at", "run_id"]


def capped(config: ChurnConfig, rows: int) -> ChurnConfig:
    return dataclasses.replace(config, training=dataclasses.replace(config.training, max_training_rows=rows))


def duckdb_training_rows(config: ChurnConfig) -> pd.DataFrame:
    with connect(config.warehouse.build_db, read_only=True) as session:
        return load_training_rows(session, config, current_contract(config))


# ---------------------------------------------------------------- without pyspark


def test_ml_session_settings_are_the_dbt_spark_targets(tmp_path: Path, small_config: ChurnConfig) -> None:
    """profiles.yml's spark target, rendered with dbt_env's variables, sets exactly target_conf."""
    env = dbt_env(tmp_path, small_config.spark)
    rendered = ENV_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), PROFILES.read_text())
    spark_target = yaml.safe_load(rendered)["churn"]["outputs"]["spark"]
    assert spark_target["method"] == "session" and spark_target["schema"] == SCHEMA
    assert spark_target["server_side_parameters"] == target_conf(tmp_path, small_config.spark)


def test_ml_imports_without_pyspark_and_a_session_names_the_extra(tmp_path: Path, small_config: ChurnConfig,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = "import sys; sys.modules['pyspark'] = None; import ml.modeling.spark_score, ml.modeling.train"
    subprocess.run([sys.executable, "-c", blocked], check=True, cwd=REPO_ROOT)
    monkeypatch.setitem(sys.modules, "pyspark", None)
    with pytest.raises(SparkUnavailableError, match=re.escape(".[spark]")):
        start_spark(tmp_path, small_config.spark)


def test_capped_sample_is_the_md5_of_key_and_seed(built_warehouse: ChurnConfig) -> None:
    """The engine-independent predicate, checked against a third implementation: Python's md5."""
    contract = current_contract(built_warehouse)
    full = duckdb_training_rows(built_warehouse)
    config = capped(built_warehouse, len(full) // 3)
    sample = duckdb_training_rows(config)
    cut = sample_cut(config.training.max_training_rows / len(full))
    seed = config.training.random_state
    expected = {k for k in full[contract.key].unique()
                if hashlib.md5(f"{k}:{seed}".encode()).hexdigest()[:len(cut)] < cut}
    assert 0 < len(sample) < len(full)
    assert set(sample[contract.key]) == expected


# ---------------------------------------------------------------- on Spark local mode


@pytest.fixture(scope="module")
def scored(trained_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the trained warehouse scored by `churn score` on DuckDB, with the model it scored with."""
    from ml.modeling.registry import load_champion
    from ml.modeling.score import score

    config = copy_warehouse(trained_warehouse, tmp_path_factory.mktemp("scored"), QUICK_TRAINING)
    model = load_champion(config)  # as score() loads it: its threshold picks who is explained
    result = score(config)
    return config, model, load_champion(config).threshold, result


@pytest.fixture(scope="module")
def spark(scored, spark_warehouse, tmp_path_factory: pytest.TempPathFactory):
    """The process's Spark session, holding the DuckDB mart as table churn.<mart> in 4 files."""
    config = scored[0]
    export = tmp_path_factory.mktemp("export") / "mart.parquet"
    with connect(config.warehouse.build_db, read_only=True) as session:
        session.execute(f"copy {config.dataset.feature_mart} to '{export}' (format parquet)")
    table = f"{SCHEMA}.{config.dataset.feature_mart}"
    spark_warehouse.spark.read.parquet(str(export)).repartition(4).write.mode("overwrite").saveAsTable(table)
    spark_warehouse.rows(f"refresh table {table}")  # an earlier module's reads may have cached its old files
    return spark_warehouse


@pytest.mark.spark
def test_dbt_spark_in_this_process_gets_the_ml_session(spark, scored) -> None:
    from dbt.adapters.spark.session import Connection

    config = scored[0]
    cursor = Connection(server_side_parameters=target_conf(spark.folder, config.spark)).cursor()
    cursor.execute(f"select count(*) from {SCHEMA}.{config.dataset.feature_mart}")
    duck = query(config, f"select count(*) as n from {config.dataset.feature_mart}")
    assert cursor.fetchall()[0][0] == duck["n"][0] > 0
    with pytest.raises(SparkFolderError, match="derby.system.home"):
        start_spark(spark.folder.parent / "another", config.spark)


@pytest.mark.spark
@pytest.mark.parametrize("share", [1.0, 0.3], ids=["all_rows", "capped_sample"])
def test_training_read_through_arrow_equals_duckdb(spark, scored, share: float) -> None:
    from ml.modeling.train import frame_hash

    config = scored[0]
    total = len(duckdb_training_rows(config))
    config = capped(config, max(1, int(share * total)))
    duck = duckdb_training_rows(config)
    on_spark = load_training_rows(spark, config, current_contract(config))
    assert len(duck) < total if share < 1 else len(duck) == total
    pd.testing.assert_frame_equal(on_spark, duck)
    assert frame_hash(on_spark) == frame_hash(duck)


@pytest.mark.spark
def test_distributed_scores_equal_duckdb_scores_bit_for_bit(spark, scored) -> None:
    from ml.features.mart import snapshot_select
    from ml.modeling.spark_score import score_snapshot
    from ml.warehouse.spark import arrow_frame

    config, model, threshold, result = scored
    contract = model.contract
    parts = spark.dataframe(snapshot_select(config, contract), [result.as_of_date]).rdd.getNumPartitions()
    assert parts >= 2, "the snapshot must be spread over workers for the test to prove anything"
    on_spark = arrow_frame(score_snapshot(spark, config, model, result.as_of_date, threshold, "spark-run").toArrow())
    duck = query(config, "select * from churn_scores")

    assert list(on_spark.columns) == list(duck.columns)
    on_spark, duck = (f.sort_values("rank", ignore_index=True).drop(columns=RUN_COLUMNS) for f in (on_spark, duck))
    assert len(on_spark) == result.rows and on_spark["will_churn"].sum() == result.flagged > 0
    for column in duck.columns:
        left, right = duck[column], on_spark[column]
        if pd.api.types.is_float_dtype(left):
            assert np.array_equal(left.to_numpy(), right.to_numpy(), equal_nan=True), column  # bit for bit
        else:
            pd.testing.assert_series_equal(right, left, check_dtype=False, obj=column)


@pytest.mark.spark
def test_distributed_scoring_refuses_a_mart_without_a_contract_column(spark, scored) -> None:
    from ml.modeling.spark_score import score_snapshot

    config, model, threshold, result = scored
    dropped = model.contract.feature_names[0]
    broken = f"{config.dataset.feature_mart}_without_{dropped}"
    spark.table(config.dataset.feature_mart).drop(dropped).write.saveAsTable(f"{SCHEMA}.{broken}")
    config = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, feature_mart=broken))
    with pytest.raises(ContractError, match=rf"{broken}.*missing column\(s\) {dropped}"):
        score_snapshot(spark, config, model, result.as_of_date, threshold, "spark-run")
