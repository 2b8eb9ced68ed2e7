"""The mart and scores audits on Spark: `audit(..., data=SparkWarehouse)` stores what the DuckDB audit stores.

Issue 15 moves the data plane (the feature mart, churn_scores) to Spark, while
the control plane (data_quality_results, the row-count history, mart_builds)
stays in the build DuckDB database. Each test copies the session's published
warehouse (one complete DuckDB nightly) twice: one copy is audited on DuckDB as
today; from the other, the mart and churn_scores are exported to Parquet,
saved as Spark tables in `churn` (3 files each, so Spark reads them in its own
order) and dropped from its build database, so its audit can only read them on
Spark. Then:
- the shipped suites, and a strict mart suite of row-wise ranges and nulls and
  compound-key uniqueness, store the same data_quality_results rows on both
  engines (expectations, success flags, observed values, counts, details,
  scopes; run ids and timestamps aside), judged in one batch per check and in
  many (a small quality.chunk_rows: streamed batches, several hash partitions);
- Spark's hash partitions cover every row exactly once, though its hash is
  signed (a plain `hash % n = part` would drop the negative ones);
- a fault planted in the data (negative values, nulls, a duplicated key) fails
  the same expectation with the same unexpected count on both, and the
  AuditError, the same text on both, names the table, the column and the rows;
- a table missing on Spark is reported by name and location, even though the
  build database still holds it.
The tests without the `spark` mark need no pyspark and run in `make test`: the
landing audit refuses a data-plane reader (it reads files through DuckDB on
every engine), and DuckDB's hash partitions are exactly the ones it always used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.quality.audit import RESULTS, AuditError, _missing_tables, audit, hash_partition
from ml.warehouse import MEMORY, connect, quote
from tests.conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse, query

SCORES = "churn_scores"
RUN = "parity"
# Columns that name the run rather than the verdict.
RUN_COLUMNS = ["run_id", "checked_at"]
STRICT_MART_SUITE = {
    "name": "spark_audit_mart",
    "meta": {"stage": "mart", "table": "$feature_mart"},
    "expectations": [
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "login_days_30d", "min_value": 0},
         "meta": {"severity": "critical"}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "plan"},
         "meta": {"severity": "critical"}},
        {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["$entity_key", "$as_of_column"]},
         "meta": {"severity": "critical"}},
    ],
}


@dataclass(frozen=True)
class Fault:
    """Rows changed in both copies' data before the audits, and the critical check it must fail."""

    sql: str  # on the build database; {mart} is the feature mart
    expectation: str
    column: str
    unexpected: int


LATEST = "as_of_date = (select max(as_of_date) from {mart})"
# Per stage, faults planted together (each fails its own check) and the batch size they are judged in:
# the mart's 30k rows in 8 streamed batches and 8 hash partitions, the scores' keys in 2 partitions.
FAULTS = {
    "mart": (4096, (
        Fault(f"update {{mart}} set login_days_30d = -5 where {LATEST} and customer_id in "
              f"(select customer_id from {{mart}} where {LATEST} order by customer_id limit 3)",
              "expect_column_values_to_be_between", "login_days_30d", 3),
        Fault(f"update {{mart}} set plan = null where {LATEST} and customer_id in "
              f"(select customer_id from {{mart}} where {LATEST} order by customer_id desc limit 2)",
              "expect_column_values_to_not_be_null", "plan", 2),
    )),
    "scores": (1000, (
        Fault(f"update {SCORES} set churn_probability = -0.25 where customer_id in "
              f"(select customer_id from {SCORES} order by customer_id desc limit 3)",
              "expect_column_values_to_be_between", "churn_probability", 3),
        Fault(f"update {SCORES} set customer_id = (select min(customer_id) from {SCORES}) where customer_id in "
              f"(select customer_id from {SCORES} order by customer_id limit 2 offset 1)",  # the first key 3 times
              "expect_column_values_to_be_unique", "customer_id", 3),
    )),
}


# ---------------------------------------------------------------- without pyspark


def test_the_landing_audit_refuses_a_data_plane_reader(small_config: ChurnConfig) -> None:
    """Landing files are read through an in-memory DuckDB on every engine: a reader would go unused: refused."""
    with connect(MEMORY) as session, pytest.raises(ValueError, match="landing audit reads the landing files"):
        audit(small_config, "landing", "refused", data=session)


def test_duckdb_hash_partitions_are_the_ones_it_always_used() -> None:
    """The folded remainder changes nothing on DuckDB (its hash is unsigned): the same rows per partition."""
    with connect(MEMORY) as session:
        session.execute("create table t as select i, 'key-' || i as k, i % 3 as g from range(5000) r(i)")
        for projection in ('"k"', '"k", "g"'):
            for parts in (2, 7):
                for part in range(parts):
                    ours = session.rows(f"select i from t where {hash_partition(projection, parts, part)} order by i")
                    before = session.rows(f"select i from t where hash({projection}) % {parts} = {part} order by i")
                    assert ours == before and ours


# ---------------------------------------------------------------- on Spark local mode


def audited_copy(published: ChurnConfig, root: Path, chunk_rows: int | None) -> ChurnConfig:
    """A copy of the published warehouse auditing with the shipped suites plus the strict mart suite."""
    suites = root / "expectations"
    overrides = {**QUICK_TRAINING, "warehouse": {"expectations_dir": str(suites)}}
    if chunk_rows is not None:
        overrides["quality"] = {"chunk_rows": chunk_rows}
    config = copy_warehouse(published, root / "wh", overrides)
    folder = suites / config.dataset.name
    folder.mkdir(parents=True)
    for shipped in (REPO_ROOT / "expectations" / config.dataset.name).glob("*.json"):
        (folder / shipped.name).write_text(shipped.read_text())
    (folder / "spark_audit_mart.json").write_text(json.dumps(STRICT_MART_SUITE))
    return config


def plant(config: ChurnConfig, faults: tuple[Fault, ...]) -> None:
    with connect(config.warehouse.build_db) as session:
        for fault in faults:
            session.execute(fault.sql.format(mart=quote(config.dataset.feature_mart)))


def to_spark(config: ChurnConfig, warehouse, export: Path, drop_from_duckdb: bool) -> None:
    """The mart and churn_scores as Spark tables (their Parquet export: the very values), in 3 files each.

    `drop_from_duckdb`: the build database keeps only the control plane, so an audit that read the
    data plane from DuckDB would fail instead of passing unnoticed.
    """
    tables = (config.dataset.feature_mart, SCORES)
    export.mkdir(parents=True, exist_ok=True)
    with connect(config.warehouse.build_db) as session:
        for table in tables:
            session.execute(f"copy {quote(table)} to '{export / table}.parquet' (format parquet)")
            if drop_from_duckdb:
                session.execute(f"drop table {quote(table)}")
    for table in tables:
        (warehouse.spark.read.parquet(str(export / f"{table}.parquet")).repartition(3)
         .write.mode("overwrite").saveAsTable(f"churn.{table}"))
        # The reader's SQL session caches each table's file list: an earlier test's files are gone.
        warehouse.rows(f"refresh table churn.{table}")


@dataclass(frozen=True)
class Twins:
    """Two copies of one warehouse state: the data plane in the build database, and on Spark."""

    duck: ChurnConfig
    spark: ChurnConfig
    warehouse: object  # the session's SparkWarehouse


def twins(published: ChurnConfig, warehouse, root: Path, chunk_rows: int | None = None,
          faults: tuple[Fault, ...] = ()) -> Twins:
    duck, spark = (audited_copy(published, root / name, chunk_rows) for name in ("duck", "spark"))
    for config in (duck, spark):
        plant(config, faults)
    to_spark(spark, warehouse, root / "export", drop_from_duckdb=True)
    return Twins(duck, spark, warehouse)


def audit_both(pair: Twins, stage: str) -> tuple[BaseException | None, BaseException | None]:
    """The stage's audit of each copy (DuckDB, Spark); a critical failure is returned, not raised."""
    outcomes = []
    for config, data in ((pair.duck, None), (pair.spark, pair.warehouse)):
        try:
            audit(config, stage, RUN, data=data)
            outcomes.append(None)
        except AuditError as exc:
            outcomes.append(exc)
    return outcomes[0], outcomes[1]


def stored(config: ChurnConfig) -> pd.DataFrame:
    """This run's data_quality_results rows without the run's own columns, in a stable order."""
    frame = query(config, f"select * from {quote(RESULTS.name)} where run_id = ?", [RUN]).drop(columns=RUN_COLUMNS)
    return frame.sort_values(["stage", "suite", "expectation_type", "column_name"], ignore_index=True)


def observed(value: str | None) -> float | str | None:
    """A stored observed value, as a float when it is one (a column's mean or stdev)."""
    try:
        parsed = json.loads(value) if value is not None else None
    except json.JSONDecodeError:
        return value
    return parsed if isinstance(parsed, float) else value


def assert_same_verdicts(spark: pd.DataFrame, duck: pd.DataFrame) -> None:
    """Equal stored verdicts, an observed float to 1e-12 relative.

    A mean is the engine's SQL average, and a sum of doubles depends on the order
    it is added in (Spark adds per partition, then the partial sums): the last
    bits may differ (0.03569312939076212 vs ...221 on the scores), the verdict
    only for a mean within 1e-16 of a band's edge. Everything else is exact.
    """
    pd.testing.assert_frame_equal(spark.drop(columns="observed_value"), duck.drop(columns="observed_value"))
    for on_spark, on_duckdb in zip(map(observed, spark["observed_value"]), map(observed, duck["observed_value"]),
                                   strict=True):
        if isinstance(on_duckdb, float):
            assert on_spark == pytest.approx(on_duckdb, rel=1e-12)
        else:
            assert on_spark == on_duckdb


@pytest.mark.spark
@pytest.mark.parametrize("chunk_rows", [None, 1000], ids=["one_batch", "many_batches"])
def test_mart_and_scores_audits_on_spark_store_what_duckdb_stores(
        published_warehouse: ChurnConfig, spark_warehouse, tmp_path: Path, chunk_rows: int | None) -> None:
    pair = twins(published_warehouse, spark_warehouse, tmp_path, chunk_rows)
    assert not {pair.spark.dataset.feature_mart, SCORES} & set(
        query(pair.spark, "select table_name from information_schema.tables")["table_name"])
    for stage in ("mart", "scores"):
        assert audit_both(pair, stage) == (None, None), stage
    duck, spark = stored(pair.duck), stored(pair.spark)
    assert set(duck["stage"]) == {"mart", "scores"} and duck["success"].all()
    if chunk_rows is not None:  # some row-wise checks read more rows than one streamed batch holds
        assert (duck["rows_checked"] > 2048).any()
    assert_same_verdicts(spark, duck)


@pytest.mark.spark
def test_spark_hash_partitions_cover_every_row_once(published_warehouse: ChurnConfig, spark_warehouse,
                                                    tmp_path: Path) -> None:
    """Spark's hash is a signed int: the folded remainder still puts each row in exactly one partition."""
    config = copy_warehouse(published_warehouse, tmp_path / "wh", QUICK_TRAINING)
    to_spark(config, spark_warehouse, tmp_path / "export", drop_from_duckdb=False)
    table = quote(SCORES)
    total = spark_warehouse.scalar(f"select count(*) from {table}")
    assert spark_warehouse.scalar(f'select count(*) from {table} where hash("customer_id") < 0') > 0
    for projection in ('"customer_id"', '"customer_id", "as_of_date"'):
        for parts in (2, 5):
            counts = [spark_warehouse.scalar(f"select count(*) from {table} where "
                                             f"{hash_partition(projection, parts, part)}") for part in range(parts)]
            assert sum(counts) == total and min(counts) > 0, (projection, parts, counts)


@pytest.mark.spark
@pytest.mark.parametrize("stage", list(FAULTS))
def test_planted_faults_fail_the_same_checks_with_the_same_counts_on_both(
        published_warehouse: ChurnConfig, spark_warehouse, tmp_path: Path, stage: str) -> None:
    chunk_rows, faults = FAULTS[stage]
    pair = twins(published_warehouse, spark_warehouse, tmp_path, chunk_rows, faults)
    on_duckdb, on_spark = audit_both(pair, stage)
    assert on_duckdb is not None and on_spark is not None
    table = pair.duck.dataset.feature_mart if stage == "mart" else SCORES
    for error in (on_duckdb, on_spark):
        failed = {(r.table_name, r.expectation_type, r.column_name): r.unexpected_count
                  for r in error.report.critical_failures}
        assert failed == {(table, f.expectation, f.column): f.unexpected for f in faults}
        for fault in faults:
            assert (f"(table {table}, column {fault.column}): {fault.expectation} failed [critical]: "
                    f"{fault.unexpected} of ") in str(error)
    assert str(on_spark) == str(on_duckdb)
    assert_same_verdicts(stored(pair.spark), stored(pair.duck))


@pytest.mark.spark
@pytest.mark.parametrize("stage", ["mart", "scores"])
def test_a_table_missing_on_spark_is_named(published_warehouse: ChurnConfig, spark_warehouse, tmp_path: Path,
                                           stage: str) -> None:
    config = audited_copy(published_warehouse, tmp_path, chunk_rows=None)
    to_spark(config, spark_warehouse, tmp_path / "export", drop_from_duckdb=False)
    table = config.dataset.feature_mart if stage == "mart" else SCORES
    spark_warehouse.spark.sql(f"drop table churn.{table}")
    assert _missing_tables(config, stage) == []  # the build database still has it
    assert _missing_tables(config, stage, spark_warehouse) == [table]
    where = f"Spark schema churn in {spark_warehouse.folder / 'tables'}"
    with pytest.raises(AuditError, match=re.escape(f": table {table} does not exist in {where}")):
        audit(config, stage, "missing", data=spark_warehouse)
