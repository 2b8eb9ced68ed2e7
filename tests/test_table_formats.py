"""spark.table_format (ml.warehouse.table_formats): what each format makes dbt, the session, the scores
history and publish do.

Delta cannot run here (no Delta jars can be fetched on these machines), so
its branches are checked as what they produce: the settings, the writer
options and the SQL statements a cluster would run. On Spark local mode (marked
`spark`): a session asked for delta without Delta's classes is refused with a
message naming the setting, the class and the fix, before it changes the
process's running session; and the scores history keeps its Parquet rewrite.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

import pytest
import yaml

from ml.config import TABLE_FORMAT_NAMES, ChurnConfig
from ml.warehouse.spark import dbt_env, target_conf
from ml.warehouse.table_formats import (
    DELTA,
    DELTA_CATALOG,
    DELTA_EXTENSION,
    PARQUET,
    TABLE_FORMATS,
    TableFormatError,
    table_format,
)
from tests.conftest import REPO_ROOT

PROFILES = REPO_ROOT / "dbt_project" / "profiles.yml"
DBT_PROJECT = REPO_ROOT / "dbt_project" / "dbt_project.yml"
ENV_VAR = re.compile(r"\{\{\s*env_var\('([A-Z_]+)',\s*'[^']*'\)\s*\}\}")


def with_format(config: ChurnConfig, name: str):
    return dataclasses.replace(config.spark, table_format=name)


def test_churn_yml_admits_exactly_the_registry_and_parquet_needs_no_jars() -> None:
    assert tuple(TABLE_FORMATS) == TABLE_FORMAT_NAMES
    assert all(fmt.name == name for name, fmt in TABLE_FORMATS.items())
    assert PARQUET.required_classes == () and DELTA.required_classes == (DELTA_EXTENSION, DELTA_CATALOG)
    with pytest.raises(TableFormatError, match="'iceberg' is not one of: parquet, delta"):
        table_format("iceberg")


@pytest.mark.parametrize("name", TABLE_FORMAT_NAMES)
def test_dbt_target_and_ml_session_get_the_formats_settings(tmp_path: Path, small_config: ChurnConfig,
                                                            name: str) -> None:
    """profiles.yml rendered with dbt_env's variables sets target_conf, the format's settings included,
    and dbt_project.yml writes the spark target's models in the format dbt_env names."""
    settings = with_format(small_config, name)
    env = dbt_env(tmp_path, settings)
    rendered = ENV_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), PROFILES.read_text())
    parameters = yaml.safe_load(rendered)["churn"]["outputs"]["spark"]["server_side_parameters"]
    assert parameters == target_conf(tmp_path, settings)
    assert {k: parameters[k] for k in TABLE_FORMATS[name].session_conf} == dict(TABLE_FORMATS[name].session_conf)
    assert env["CHURN_SPARK_TABLE_FORMAT"] == name
    assert "env_var('CHURN_SPARK_TABLE_FORMAT', 'parquet') if target.type == 'spark' else none" in (
        DBT_PROJECT.read_text())


def test_delta_sessions_load_deltas_extension_and_catalog_and_parquet_keeps_sparks_defaults() -> None:
    assert dict(DELTA.session_conf) == {"spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
                                        "spark.sql.catalog.spark_catalog":
                                            "org.apache.spark.sql.delta.catalog.DeltaCatalog"}
    assert dict(PARQUET.session_conf) == {"spark.sql.extensions": "", "spark.sql.catalog.spark_catalog": "builtin"}


def test_history_is_rewritten_on_parquet_and_replaced_where_on_delta() -> None:
    night = dt.date(2025, 6, 30)
    assert PARQUET.history_write("as_of_date", night, "v3").replace_where is None
    plan = DELTA.history_write("as_of_date", night, "v3")
    predicate = "`as_of_date` = date '2025-06-30' and `model_version` = 'v3'"
    assert (plan.file_format, plan.replace_where) == ("delta", predicate)
    assert plan.writer_options == {"replaceWhere": predicate, "mergeSchema": "true"}
    assert PARQUET.history_write("as_of_date", night, "v3").writer_options == {}
    assert dict(DELTA.overwrite_options) == {"overwriteSchema": "true"} and not PARQUET.overwrite_options


def test_publish_adds_partitions_on_parquet_and_appends_and_deletes_rows_on_delta() -> None:
    table, ddl, root = "churn_published.`t__versions_ab12cd34`", "`a` int", Path("/w/published/t")
    folder = root / "publish_version=v1"
    assert PARQUET.create_versions_table(table, ddl, root) == (
        f"create table {table} (`a` int, publish_version string) using parquet "
        "partitioned by (publish_version) location '/w/published/t'")
    assert PARQUET.add_version(table, "v1", folder) == (
        f"alter table {table} add if not exists partition (publish_version = 'v1') "
        "location '/w/published/t/publish_version=v1'")
    assert PARQUET.drop_versions(table, ["v0", "v1"]) == [
        f"alter table {table} drop if exists partition (publish_version = 'v0')",
        f"alter table {table} drop if exists partition (publish_version = 'v1')"]

    assert DELTA.create_versions_table(table, ddl, root) == (
        f"create table {table} (`a` int, publish_version string) using delta partitioned by (publish_version)")
    assert DELTA.add_version(table, "v1", folder) == (
        f"insert into {table} select *, 'v1' as publish_version from parquet.`/w/published/t/publish_version=v1`")
    assert DELTA.drop_versions(table, ["v0", "v1"]) == [
        f"delete from {table} where publish_version in ('v0', 'v1')"]
    assert DELTA.drop_versions(table, []) == []


# ---------------------------------------------------------------- on Spark local mode


@pytest.mark.spark
def test_a_delta_session_without_deltas_jars_is_refused_naming_setting_class_and_fix(spark_warehouse,
                                                                                     small_config) -> None:
    from ml.warehouse.spark import start_spark
    from ml.warehouse.table_formats import check_classes

    jvm = spark_warehouse.spark.sparkContext._jvm
    check_classes(jvm, PARQUET)  # nothing to load
    with pytest.raises(TableFormatError) as refused:
        start_spark(spark_warehouse.folder, with_format(small_config, "delta"))
    message = str(refused.value)
    for part in ("spark.table_format: delta in churn.yml", DELTA_EXTENSION, DELTA_CATALOG, "spark.jars",
                 "Databricks", "set spark.table_format: parquet"):
        assert part in message
    # refused before getOrCreate: the process's running session keeps its catalog
    assert spark_warehouse.spark.conf.get("spark.sql.catalog.spark_catalog") == "builtin"


@pytest.mark.spark
def test_parquet_history_keeps_other_nights_and_replaces_tonights_rows(spark_warehouse) -> None:
    """write_spark_scores on the process's session: the first night creates the history, a rerun of a
    night replaces only that night's rows (the whole-table rewrite Parquet needs)."""
    import pandas as pd

    from ml.modeling.score import HISTORY_TABLE, SCORES_TABLE
    from ml.modeling.spark_score import qualified_table, write_spark_scores

    spark = spark_warehouse.spark
    for table in (SCORES_TABLE, HISTORY_TABLE):  # other modules' scores; they write their own in fixtures
        spark.sql(f"drop table if exists {qualified_table(table)}")

    def night(day: int, probabilities: list[float]):
        return spark.createDataFrame(pd.DataFrame({
            "customer_id": ["a", "b"], "as_of_date": [dt.date(2025, 6, day)] * 2,
            "churn_probability": probabilities, "will_churn": [p >= 0.5 for p in probabilities],
            "model_version": ["v1", "v1"]}))

    try:
        assert write_spark_scores(spark_warehouse, night(1, [0.9, 0.1]), "as_of_date", dt.date(2025, 6, 1), "v1") == 1
        # the SQL session reads both now, caching their file listings, which the next writes make stale
        assert len(spark_warehouse.frame(f"select * from {SCORES_TABLE}")) == 2
        assert len(spark_warehouse.frame(f"select * from {HISTORY_TABLE}")) == 2
        write_spark_scores(spark_warehouse, night(2, [0.2, 0.1]), "as_of_date", dt.date(2025, 6, 2), "v1")
        flagged = write_spark_scores(spark_warehouse, night(2, [0.8, 0.7]), "as_of_date", dt.date(2025, 6, 2), "v1")
        history = spark_warehouse.frame(f"select * from {HISTORY_TABLE} order by as_of_date, customer_id")
        assert flagged == 2
        assert history["churn_probability"].tolist() == [0.9, 0.1, 0.8, 0.7]
        assert len(spark_warehouse.frame(f"select * from {SCORES_TABLE}")) == 2
    finally:
        for table in (SCORES_TABLE, HISTORY_TABLE):
            spark.sql(f"drop table if exists {qualified_table(table)}")
