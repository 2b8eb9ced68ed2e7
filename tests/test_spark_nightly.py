"""The whole nightly on Spark local mode equals the nightly on DuckDB: `churn nightly` with engine spark.

The session's trained warehouse is copied and its nightly run with
`CHURN_ENGINE=spark` in a child process (the nightly starts its own Spark
session on the copy's Spark folder, and one process keeps one). Beside it is
the session's DuckDB nightly of the same trained warehouse
(`published_warehouse`). Then:
- the marts are equal (keys and labels exactly, floats to 1e-9) and the dbt
  build on Spark passed its tests, the point-in-time leakage test among them;
- the published churn_scores are equal: probabilities to 1e-9, decisions,
  ranks, bands and reasons identical (what BI and the API read);
- every published table of the DuckDB nightly is published on Spark too, with
  the same columns, readable from the published DuckDB file and from Spark;
- the run's steps are all recorded as successful in pipeline_runs.

Marked `spark` (a JVM and a dbt build on Spark: a few minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.features.dbt import dbt_target_path
from ml.warehouse import connect
from tests.conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse

pytestmark = pytest.mark.spark
pytest.importorskip("pyspark", reason="needs the .[spark] extra (make test-spark)")

LEAKAGE_TEST = "test.churn.assert_features_use_only_past_events"
RUN_COLUMNS = ["scored_at", "run_id"]


def published(config: ChurnConfig, sql: str) -> pd.DataFrame:
    with connect(config.warehouse.published_db, read_only=True) as session:
        return session.frame(sql)


def published_columns(config: ChurnConfig) -> dict[str, list[str]]:
    with connect(config.warehouse.published_db, read_only=True) as session:
        return {t: list(session.columns(t)) for t in session.tables(base_tables_only=False)}


@pytest.fixture(scope="module")
def spark_nightly(trained_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    config = copy_warehouse(trained_warehouse, tmp_path_factory.mktemp("spark_nightly"), QUICK_TRAINING)
    env = {**os.environ, "CHURN_ENGINE": "spark", "PYSPARK_PYTHON": sys.executable,
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ml.cli", "--config", str(config.source_file), "nightly"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return config


def sorted_scores(config: ChurnConfig) -> pd.DataFrame:
    scores = published(config, "select * from churn_scores").drop(columns=RUN_COLUMNS)
    return scores.sort_values("risk_rank", ignore_index=True)


def test_published_scores_equal_the_duckdb_nightly(published_warehouse: ChurnConfig, spark_nightly) -> None:
    duck, spark = sorted_scores(published_warehouse), sorted_scores(spark_nightly)
    assert list(spark.columns) == list(duck.columns)
    assert len(spark) == len(duck) > 0 and spark["will_churn"].sum() == duck["will_churn"].sum() > 0
    for column in duck.columns:
        left, right = duck[column], spark[column]
        if pd.api.types.is_float_dtype(left):
            np.testing.assert_allclose(right.to_numpy(), left.to_numpy(), rtol=0, atol=1e-9, err_msg=column)
        else:
            pd.testing.assert_series_equal(right, left, check_dtype=False, obj=column)


def test_marts_equal_and_the_spark_build_passed_the_leakage_test(published_warehouse: ChurnConfig,
                                                                 spark_nightly) -> None:
    mart = spark_nightly.dataset.feature_mart
    with connect(published_warehouse.warehouse.build_db, read_only=True) as session:
        duck = session.frame(f"select * from {mart}")
    spark = pd.read_parquet(spark_nightly.warehouse.dir / "spark" / "tables" / "churn.db" / mart)
    keys = ["customer_id", "as_of_date"]
    duck, spark = (f.assign(as_of_date=pd.to_datetime(f["as_of_date"]).astype("datetime64[us]"))
                   .sort_values(keys, ignore_index=True) for f in (duck, spark))
    assert list(spark.columns) == list(duck.columns) and len(spark) == len(duck) > 0
    for column in duck.columns:
        if pd.api.types.is_numeric_dtype(duck[column]) and pd.api.types.is_numeric_dtype(spark[column]):
            np.testing.assert_allclose(spark[column].astype(float), duck[column].astype(float), rtol=1e-9,
                                       atol=1e-9, equal_nan=True, err_msg=column)
        else:
            assert (spark[column].astype(str) == duck[column].astype(str)).all(), column
    results = json.loads((dbt_target_path(spark_nightly) / "run_results.json").read_text())["results"]
    leakage = [r for r in results if r["unique_id"] == LEAKAGE_TEST]
    assert leakage and leakage[0]["status"] == "pass"
    assert all(r["status"] in ("success", "pass") for r in results), [r["unique_id"] for r in results
                                                                       if r["status"] not in ("success", "pass")]


def test_every_published_table_is_published_on_spark_with_its_columns(published_warehouse: ChurnConfig,
                                                                      spark_nightly) -> None:
    duck, spark = published_columns(published_warehouse), published_columns(spark_nightly)
    ignored = {"published_parts"}  # which files a state reads: per engine by design
    for table, columns in duck.items():
        if table not in ignored:
            assert spark.get(table) == columns, table
    with connect(spark_nightly.warehouse.build_db, read_only=True) as session:
        steps = session.frame("select step, status from pipeline_runs")
    assert set(steps["status"]) == {"success"}
    assert {"build", "audit_mart", "profile", "score", "audit_scores", "monitor", "publish"} <= set(steps["step"])
