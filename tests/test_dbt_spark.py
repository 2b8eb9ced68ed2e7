"""One dbt project, two engines: the demo built on Spark equals the DuckDB build.

The session's small demo warehouse (built on DuckDB) is built again from the
same landing files and as_of on Spark local mode (dbt-spark, `session`
method, profiles.yml target `spark`). The marts must match row for row: keys
identical, floats to 1e-9 (summation order may differ), everything else
exactly; the point-in-time leakage test must pass on both engines.

Heavy (a JVM, ~1-2 s per statement), so marked `spark`: `make test-spark`
installs `.[spark]` and runs it; the default `make test` leaves it out. Generic
tests are left to the DuckDB suite (they pass unchanged on Spark, at ~1.5 s each).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.features.dbt import dbt_target_path, run_dbt
from tests.conftest import query

pytestmark = pytest.mark.spark
pytest.importorskip("pyspark", reason="needs the .[spark] extra (make test-spark)")
pytest.importorskip("dbt.adapters.spark", reason="needs the .[spark] extra (make test-spark)")

LEAKAGE_TEST = "test.churn.assert_features_use_only_past_events"
KEYS = ["customer_id", "as_of_date"]


def spark_table(spark_dir: Path, table: str) -> pd.DataFrame:
    """A model Spark wrote, read from its Parquet files (no second JVM needed)."""
    return pd.read_parquet(spark_dir / "tables" / "churn.db" / table)


@pytest.fixture(scope="module")
def spark_build(built_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spark_dir = tmp_path_factory.mktemp("spark")
    with pytest.MonkeyPatch.context() as env:
        # each run its own Derby metastore and warehouse folder; workers run this venv's python
        env.setenv("CHURN_SPARK_DIR", str(spark_dir))
        env.setenv("PYSPARK_PYTHON", sys.executable)
        run_dbt(built_warehouse, "build", "--target", "spark", "--exclude", "test_type:generic",
                as_of=built_warehouse.decided_as_of().isoformat(), target_path=spark_dir / "dbt_target")
    return spark_dir


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["as_of_date"] = pd.to_datetime(frame["as_of_date"]).astype("datetime64[us]")
    return frame.sort_values(KEYS, ignore_index=True)


def test_marts_are_equal_on_both_engines(built_warehouse: ChurnConfig, spark_build: Path) -> None:
    mart = built_warehouse.dataset.feature_mart
    duck = comparable(query(built_warehouse, f"select * from {mart}"))
    spark = comparable(spark_table(spark_build, mart))

    assert list(spark.columns) == list(duck.columns)
    assert len(duck) > 0
    pd.testing.assert_frame_equal(spark[KEYS], duck[KEYS])
    for column in duck.columns.difference(KEYS):
        left, right = duck[column], spark[column]
        if pd.api.types.is_numeric_dtype(left) and pd.api.types.is_numeric_dtype(right):
            np.testing.assert_allclose(right.astype(float), left.astype(float), rtol=1e-9, atol=1e-9,
                                       equal_nan=True, err_msg=column)
        else:
            assert right.isna().equals(left.isna()), column
            assert (right[left.notna()].astype(str) == left[left.notna()].astype(str)).all(), column


def test_leakage_test_passes_on_both_engines(built_warehouse: ChurnConfig, spark_build: Path) -> None:
    for target in (dbt_target_path(built_warehouse), spark_build / "dbt_target"):
        results = json.loads((target / "run_results.json").read_text())["results"]
        leakage = [r for r in results if r["unique_id"] == LEAKAGE_TEST]
        assert len(leakage) == 1, target
        assert leakage[0]["status"] == "pass" and leakage[0]["failures"] == 0, target
