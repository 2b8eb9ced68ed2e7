"""Publishing on Spark (ml.serving.spark_publish): versioned Parquet, one pointer, readers on both engines.

The session's published warehouse (one complete DuckDB nightly) provides the
control-plane tables in its build database and, exported to Spark tables, the
data plane (churn_scores, churn_scores_history). Then:
- Spark SQL reads every published table under `churn_published` with the
  names and columns the DuckDB publish gives them, and the very rows;
- the published DuckDB file the Spark publish writes has the same tables and
  rows, so BI tools and `churn serve` read the Spark output unchanged (a
  customer's answer equals its churn_scores row);
- a publish killed before its switch leaves every reader on the previous
  state (pointer and file), and the next publish removes the dead one's files;
- a version stays one more publish for readers still on it, then goes.

Marked `spark`: it uses the process's one Spark session (conftest's `spark_warehouse`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.warehouse import connect
from tests.conftest import QUICK_TRAINING, copy_warehouse

pytestmark = pytest.mark.spark

ENGINE_TABLES = ("churn_scores", "churn_scores_history")


def duckdb_published(path: Path) -> dict[str, pd.DataFrame]:
    with connect(path, read_only=True) as session:
        return {t: session.frame(f'select * from "{t}"') for t in session.tables(base_tables_only=False)}


@pytest.fixture(scope="module")
def on_spark(published_warehouse: ChurnConfig, spark_warehouse, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the published warehouse whose scores live on Spark; the DuckDB publish's tables beside."""
    config = copy_warehouse(published_warehouse, tmp_path_factory.mktemp("spark_publish"), QUICK_TRAINING)
    export = tmp_path_factory.mktemp("export")
    with connect(config.warehouse.build_db, read_only=True) as session:
        for table in ENGINE_TABLES:
            session.execute(f"copy {table} to '{export / table}.parquet' (format parquet)")
    for table in ENGINE_TABLES:
        (spark_warehouse.spark.read.parquet(str(export / f"{table}.parquet")).repartition(2)
         .write.mode("overwrite").saveAsTable(f"churn.{table}"))
        spark_warehouse.rows(f"refresh table churn.{table}")  # an earlier module's reads may have cached it
    before = duckdb_published(config.warehouse.published_db)
    return config, spark_warehouse, before


def spark_view(warehouse, table: str) -> pd.DataFrame:
    from ml.serving.spark_publish import qualified
    from ml.warehouse.spark import arrow_frame

    return arrow_frame(warehouse.spark.sql(f"select * from {qualified(table)}").toArrow())


def same_rows(left: pd.DataFrame, right: pd.DataFrame, table: str) -> None:
    assert list(left.columns) == list(right.columns), table
    assert len(left) == len(right), table
    if left.empty:
        return
    order = list(left.columns)
    left = left.astype(str).sort_values(order, ignore_index=True)
    right = right.astype(str).sort_values(order, ignore_index=True)
    pd.testing.assert_frame_equal(left, right, obj=table)


def test_both_readers_see_the_duckdb_publish_tables_columns_and_rows(on_spark) -> None:
    from ml.serving.spark_publish import publish_on_spark

    config, warehouse, before = on_spark
    result = publish_on_spark(config, warehouse, run_id="spark-run-1")

    after = duckdb_published(config.warehouse.published_db)
    compared = [t for t in before if t not in ("published_parts", "publish_info")]
    assert {"churn_scores", "churn_scores_history", "model_registry", "feature_dictionary"} <= set(compared)
    with connect(config.warehouse.build_db, read_only=True) as session:
        # the nightly's publish ran before its own publish and reports steps were recorded
        before = {**before, "pipeline_runs": session.frame("select * from pipeline_runs")}
    for table in compared:
        same_rows(after[table], before[table], table)
        same_rows(spark_view(warehouse, table), before[table], table)
    assert after["publish_info"]["run_id"].tolist() == ["spark-run-1"]
    assert spark_view(warehouse, "publish_info")["run_id"].tolist() == ["spark-run-1"]
    assert result.tables["churn_scores"] == len(before["churn_scores"]) > 0
    # BI's queries quote nothing: the keyword renames hold on Spark too
    assert "risk_rank" in spark_view(warehouse, "churn_scores").columns


def test_serve_answers_from_the_spark_output(on_spark, tmp_path: Path) -> None:
    from ml.serving.api import ScoringService
    from ml.serving.spark_publish import publish_on_spark

    config, warehouse, _ = on_spark
    publish_on_spark(config, warehouse, run_id="spark-run-serve")
    scores = duckdb_published(config.warehouse.published_db)["churn_scores"]
    row = scores.sort_values("risk_rank").iloc[0]
    service = ScoringService(config, workdir=tmp_path)
    try:
        answer = service.score_customer(str(row["customer_id"]))
    finally:
        service.close()
    assert answer["churn_probability"] == pytest.approx(float(row["churn_probability"]), abs=1e-9)
    assert answer["will_churn"] == bool(row["will_churn"]) and answer["risk_band"] == row["risk_band"]


def test_a_publish_killed_before_its_switch_leaves_the_previous_state(on_spark, monkeypatch) -> None:
    from ml.serving import spark_publish
    from ml.serving.spark_publish import current_pointer, publish_on_spark, published_root
    from ml.serving.state import file_stamp

    config, warehouse, _ = on_spark
    first = publish_on_spark(config, warehouse, run_id="spark-run-a")
    stamp = file_stamp(config.warehouse.published_db)
    full = len(spark_view(warehouse, "churn_scores"))
    # tonight's scores differ (fewer rows), so a mix of versions would show
    warehouse.spark.table("churn.churn_scores").limit(full // 2).localCheckpoint().write.mode(
        "overwrite").saveAsTable("churn.churn_scores_half")
    warehouse.spark.table("churn.churn_scores_half").write.mode("overwrite").saveAsTable("churn.churn_scores")

    def dies(name: str) -> None:
        if name == "spark_publish:before_switch":
            raise KeyboardInterrupt("killed before the switch")

    root = published_root(config)
    kept = {p.name for p in root.glob("churn_scores/publish_version=*")}  # an earlier test's version too
    monkeypatch.setattr(spark_publish, "pause_point", dies)
    with pytest.raises(KeyboardInterrupt):
        publish_on_spark(config, warehouse, run_id="spark-run-dies")
    monkeypatch.undo()

    assert current_pointer(warehouse) == first.version
    assert len(spark_view(warehouse, "churn_scores")) == full
    assert file_stamp(config.warehouse.published_db) == stamp
    dead = {p.name for p in root.glob("churn_scores/publish_version=*")} - kept
    assert len(dead) == 1, "the killed publish wrote its version's files"

    second = publish_on_spark(config, warehouse, run_id="spark-run-b")
    assert current_pointer(warehouse) == second.version
    assert len(spark_view(warehouse, "churn_scores")) == full // 2
    assert len(duckdb_published(config.warehouse.published_db)["churn_scores"]) == full // 2
    left = {p.name.split("=", 1)[1] for p in root.glob("churn_scores/publish_version=*")}
    assert left == {first.version, second.version}, "the dead version is removed, the previous one kept"

    third = publish_on_spark(config, warehouse, run_id="spark-run-c")
    left = {p.name.split("=", 1)[1] for p in root.glob("*/publish_version=*")}
    assert left == {second.version, third.version}
    assert first.version in third.removed_versions
    # the dropped version's rows are gone from the metastore too, not only its files
    versions = [t.name for t in warehouse.spark.catalog.listTables("churn_published") if "__versions_" in t.name
                and t.name.startswith("churn_scores__")]
    partitions = {r[0] for v in versions for r in warehouse.spark.sql(f"show partitions churn_published.{v}").collect()}
    assert f"publish_version={first.version}" not in partitions


def test_publish_refuses_a_spark_schema_without_scores(on_spark, monkeypatch) -> None:
    from ml.serving.publish import PublishError
    from ml.serving.spark_publish import publish_on_spark

    config, warehouse, _ = on_spark
    stamp_before = config.warehouse.published_db.stat().st_ino
    monkeypatch.setattr(type(warehouse), "exists", lambda self, table: table != "churn_scores")
    with pytest.raises(PublishError, match="lacks churn_scores: nothing published"):
        publish_on_spark(config, warehouse, run_id="spark-run-none")
    assert config.warehouse.published_db.stat().st_ino == stamp_before
