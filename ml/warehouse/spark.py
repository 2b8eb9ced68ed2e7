"""Spark local mode for the ML layer: one session factory, on the conventions of dbt's `spark` target.

dbt-spark's `session` method runs Spark inside the dbt process: every
statement calls `SparkSession.builder ... getOrCreate()`, so one Python process
has one Spark session (one JVM), and whoever starts it first fixes what is
read only when the JVM starts: the Derby metastore folder (`derby.system.home`),
the table folder (`spark.sql.warehouse.dir`), the driver's memory and the
master. `spark_session` starts it exactly as `dbt_project/profiles.yml`'s
`spark` target does for `CHURN_SPARK_DIR=<folder>` (`dbt_env` gives a dbt
subprocess those variables), so dbt and the ML layer see the same `churn`
schema, and a dbt run in the same process gets this very session back.

Embedded Derby admits one JVM per metastore folder, and the JVM keeps it
until the process exits: a dbt subprocess on the same folder must finish
before a session opens, and one process serves one folder (a second folder is
refused, naming both, rather than silently reading the first one's tables).

`spark.table_format` (ml.warehouse.table_formats) adds its session settings
to both (Delta's extension and catalog on delta, Spark's defaults on parquet),
and the session refuses to start when the format's classes are not on the
JVM's classpath, naming the setting and the missing class.

pyspark is optional (`pip install -e '.[spark]'`): nothing here imports it
until a session is asked for, so the default DuckDB-only install imports `ml`
unchanged.

`SparkWarehouse` offers the read half of `ml.warehouse.Session` on Spark, so
the ML layer's reads run on both engines unchanged: its SQL session reads
double-quoted names as identifiers (ANSI mode, which also makes a bad cast an
error as on DuckDB, where dbt-spark turns ANSI off for its own session),
column types are reported in DuckDB's spelling, and frames come through Arrow
and are converted to pandas by DuckDB's own rules (nullable integers, dates as
datetime64[us], decimals as float64), so a stage sees the same dtypes on both.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import duckdb
import pandas as pd

import ml
from ml.config import ChurnConfig, SparkConfig
from ml.warehouse.catalog import TableSpec
from ml.warehouse.connection import Params, WarehouseError
from ml.warehouse.sql import spark_quote
from ml.warehouse.table_formats import PARQUET, TableFormat, TableFormatError, check_classes, table_format

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark import SparkContext
    from pyspark.sql import DataFrame, SparkSession

# The schema (Spark database) profiles.yml's spark target builds into.
SCHEMA = "churn"
INSTALL_HINT = "pip install -e '.[spark]' (pyspark and dbt-spark) and Java 17"

# SQL settings of the ML layer's own session (its SQL conf is separate from dbt's).
ML_SQL_CONF = {
    "spark.sql.ansi.enabled": "true",
    "spark.sql.ansi.doubleQuotedIdentifiers": "true",
}

# Spark's type names (DataType.simpleString) as DuckDB's information_schema spells them,
# which is what the contract checks (ml.warehouse.sql.is_numeric_type) read.
DUCKDB_TYPE_NAMES = {
    "tinyint": "TINYINT", "smallint": "SMALLINT", "int": "INTEGER", "bigint": "BIGINT",
    "float": "FLOAT", "double": "DOUBLE", "boolean": "BOOLEAN", "string": "VARCHAR", "date": "DATE",
    "timestamp": "TIMESTAMP WITH TIME ZONE", "timestamp_ntz": "TIMESTAMP", "binary": "BLOB",
}


class SparkUnavailableError(WarehouseError):
    """pyspark (the `.[spark]` extra) or Java is missing, so no Spark session can start."""


class SparkFolderError(WarehouseError):
    """This process already runs Spark on another folder (one JVM per process, one per Derby folder)."""


def spark_folder(config: ChurnConfig) -> Path:
    """The active dataset's Spark folder (tables and metastore), beside its build database."""
    return config.warehouse.dir / "spark"


def target_conf(folder: Path, settings: SparkConfig) -> dict[str, str]:
    """What profiles.yml's spark target sets (server_side_parameters) with `dbt_env(folder, settings)`."""
    folder = Path(folder).resolve()
    return {
        "spark.master": settings.master,
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={folder}/derby",
        "spark.sql.warehouse.dir": f"{folder}/tables",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.driver.memory": settings.driver_memory,
        "spark.ui.enabled": "false",
        # the table format's extension and catalog (Spark's own defaults on parquet)
        **table_format(settings.table_format).session_conf,
    }


def session_conf(folder: Path, settings: SparkConfig) -> dict[str, str]:
    """The dbt target's settings plus what the ML layer's Python workers need."""
    return {
        **target_conf(folder, settings),
        # Workers run this interpreter (spark-submit reads this; start_spark sets PYSPARK_PYTHON too)
        # and import this checkout's `ml`. On a cluster: ship the environment.
        "spark.pyspark.python": sys.executable,
        "spark.executorEnv.PYTHONPATH": str(Path(ml.__file__).resolve().parent.parent),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # a silent fallback to row-by-row conversion would also change dtypes
        "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
        # the console progress bar would interleave with the nightly's log lines
        "spark.ui.showConsoleProgress": "false",
    }


def dbt_env(folder: Path, settings: SparkConfig) -> dict[str, str]:
    """Environment variables that point dbt's spark target at `folder` with these settings."""
    fmt = table_format(settings.table_format)
    return {
        "CHURN_SPARK_DIR": str(Path(folder).resolve()),
        "CHURN_SPARK_MASTER": settings.master,
        "CHURN_SPARK_SHUFFLE_PARTITIONS": str(settings.shuffle_partitions),
        "CHURN_SPARK_DRIVER_MEMORY": settings.driver_memory,
        "CHURN_SPARK_TABLE_FORMAT": fmt.dbt_file_format,
        "CHURN_SPARK_SQL_EXTENSIONS": fmt.session_conf["spark.sql.extensions"],
        "CHURN_SPARK_SESSION_CATALOG": fmt.session_conf["spark.sql.catalog.spark_catalog"],
        "PYSPARK_PYTHON": sys.executable,
    }


def start_spark(folder: Path, settings: SparkConfig) -> SparkSession:
    """The process's Spark session on `folder`: started with `session_conf`, or the running one if it
    was started on the same folder (e.g. by dbt-spark in this process)."""
    try:
        from pyspark import SparkContext
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise SparkUnavailableError(f"Spark is not installed ({exc}); {INSTALL_HINT}") from None
    folder = Path(folder).resolve()
    fmt = table_format(settings.table_format)
    # Before getOrCreate, which would return a running session and overwrite its settings with ours.
    running = SparkContext._active_spark_context
    if running is not None:
        check_folder(running, folder)
        check_classes(running._jvm, fmt)  # before getOrCreate pushes the format's settings into it
    (folder / "derby").mkdir(parents=True, exist_ok=True)
    # pyspark's driver reads the workers' interpreter from the environment only (spark.pyspark.python
    # serves spark-submit); without it workers run the system python3, which has no pandas.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("churn-ml").enableHiveSupport()
    for key, value in session_conf(folder, settings).items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # no java, or the JVM died at start: pyspark raises its own runtime errors
        raise SparkUnavailableError(f"Spark could not start: {exc}; {INSTALL_HINT}") from exc
    check_folder(spark.sparkContext, folder)
    if running is None:
        # before the first catalog access, where a missing catalog class would fail without naming the setting
        try:
            check_classes(spark.sparkContext._jvm, fmt)
        except TableFormatError:
            spark.stop()
            raise
    spark.sql(f"create database if not exists {SCHEMA}")
    return spark


def check_folder(context: SparkContext, folder: Path) -> None:
    """Refuse a Spark context started on another folder: getOrCreate would silently hand it out."""
    # The JVM's own property: a context restarted in a running JVM reports its new options but
    # keeps the Derby home the JVM was launched with.
    derby = context._jvm.java.lang.System.getProperty("derby.system.home")
    tables = context.getConf().get("spark.sql.warehouse.dir")
    actual = {"derby.system.home": derby,
              "spark.sql.warehouse.dir": urlparse(tables).path if tables and tables.startswith("file:") else tables}
    expected = {"derby.system.home": folder / "derby", "spark.sql.warehouse.dir": folder / "tables"}
    wrong = [f"{key} is {actual[key]} (expected {path})" for key, path in expected.items()
             if actual[key] is None or Path(actual[key]).resolve() != path]
    if wrong:
        raise SparkFolderError(
            f"this process already runs Spark on another folder: {'; '.join(wrong)}. One process serves one "
            "Spark folder (the embedded Derby metastore admits one JVM per folder, for the life of the "
            "process); run this in its own process"
        )


@contextmanager
def spark_session(folder: Path, settings: SparkConfig) -> Iterator[SparkWarehouse]:
    """A Spark session on `folder` for one job, stopped at the end (the JVM itself lives on with the process)."""
    spark = start_spark(folder, settings)
    try:
        yield SparkWarehouse(spark, Path(folder).resolve(), table_format(settings.table_format))
    finally:
        spark.stop()


def duckdb_type(spark_type: str) -> str:
    """A Spark column type (simpleString) in DuckDB's spelling: decimal(10,2) -> DECIMAL(10,2), int -> INTEGER."""
    if spark_type.startswith("decimal"):
        return spark_type.upper()
    if spark_type.startswith(("varchar", "char")):
        return "VARCHAR"
    return DUCKDB_TYPE_NAMES.get(spark_type, spark_type.upper())


def arrow_frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as pandas, converted by DuckDB's rules (what `Session.frame` returns)."""
    with duckdb.connect() as con:
        return con.from_arrow(table).df()


def _name(table: str | TableSpec) -> str:
    return table.name if isinstance(table, TableSpec) else str(table)


class SparkWarehouse:
    """The read vocabulary of `ml.warehouse.Session` (the `ml.warehouse.Reader` protocol: frame, rows,
    one, scalar, chunks, exists, columns, temp_table, registered) on Spark.

    `spark` is the process's shared session (dbt's too) for DataFrame work;
    SQL runs on a session of its own (same tables, own SQL settings, current
    schema `churn`). Read-only: writing with the write-audit-publish promise
    on Spark is not built yet.
    """

    read_only = True

    def __init__(self, spark: SparkSession, folder: Path, table_format: TableFormat = PARQUET) -> None:
        self.spark = spark
        self.folder = folder
        self.table_format = table_format  # what the writers (scores history, publish) do to tables
        self.path = f"Spark schema {SCHEMA} in {folder / 'tables'}"
        self._sql = spark.newSession()
        for key, value in ML_SQL_CONF.items():
            self._sql.conf.set(key, value)
        self._sql.catalog.setCurrentDatabase(SCHEMA)
        self._frame_names = itertools.count()

    def dataframe(self, sql: str, params: Params = None) -> DataFrame:
        """The statement's result as a (lazy) Spark DataFrame; `?` parameters bind positionally."""
        return self._sql.sql(sql, args=list(params) if params is not None else None)

    def frame(self, sql: str, params: Params = None) -> pd.DataFrame:
        return arrow_frame(self.dataframe(sql, params).toArrow())

    def rows(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.dataframe(sql, params).collect()]

    def chunks(self, sql: str, params: Params = None, chunk_rows: int = 200_000,
               always_one: bool = False) -> Iterator[pd.DataFrame]:
        """The result as pandas frames of at most `chunk_rows` rows (as `Session.chunks` on DuckDB).

        The driver collects the result once in Arrow (compact, columnar) and
        converts one chunk at a time to pandas, where the rows cost the most:
        bounded by the result's Arrow size, not by one chunk as on DuckDB.
        """
        table = self.dataframe(sql, params).toArrow()
        if table.num_rows == 0:
            if always_one:
                yield arrow_frame(table)
            return
        for start in range(0, table.num_rows, chunk_rows):
            yield arrow_frame(table.slice(start, chunk_rows))

    def one(self, sql: str, params: Params = None) -> tuple[Any, ...] | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Params = None) -> Any:
        row = self.one(sql, params)
        return row[0] if row else None

    def exists(self, table: str | TableSpec) -> bool:
        return bool(self._sql.catalog.tableExists(f"{SCHEMA}.{spark_quote(_name(table))}"))

    def columns(self, table: str | TableSpec) -> dict[str, str]:
        """Column name -> type in DuckDB's spelling, in table order; empty when the table is absent."""
        if not self.exists(table):
            return {}
        schema = self._sql.table(f"{SCHEMA}.{spark_quote(_name(table))}").schema
        return {field.name: duckdb_type(field.dataType.simpleString()) for field in schema.fields}

    def table(self, table: str | TableSpec) -> DataFrame:
        """The table as a DataFrame, its file listing refreshed first: another session of this JVM
        (dbt-spark's, or the shared `spark`) may have rewritten it, and a stale listing names
        files that are gone."""
        self.refresh(table)
        return self._sql.table(f"{SCHEMA}.{spark_quote(_name(table))}")

    def refresh(self, table: str | TableSpec) -> None:
        """Forget this SQL session's cached file listing of `table`: a writer that rewrote it
        through the shared `spark` calls this, so later SQL reads see the new files, not gone ones."""
        self._sql.catalog.refreshTable(f"{SCHEMA}.{spark_quote(_name(table))}")

    @contextmanager
    def temp_table(self, name: str, select_sql: str, params: Params = None) -> Iterator[str]:
        """`select_sql`'s result cached and shown to SQL as temp view `name` for the block (as
        `Session.temp_table` on DuckDB): computed by the first statement that reads it, then read from
        memory by the others instead of re-scanning its source; uncached and dropped after the block."""
        frame = self.dataframe(select_sql, params).cache()
        frame.createOrReplaceTempView(name)
        try:
            yield name
        finally:
            self._sql.catalog.dropTempView(name)
            frame.unpersist()

    @contextmanager
    def registered(self, frame: pd.DataFrame) -> Iterator[str]:
        """`frame` visible to this SQL session under a fresh name for the block, as `Session.registered`.

        A temporary view (through Arrow, dates as DATE), so nothing is written:
        how a read joins a small frame of the caller's (e.g. a model's held-out
        keys) to a big table where the table lives.
        """
        name = f"_frame_{next(self._frame_names)}"
        self._sql.createDataFrame(frame).createOrReplaceTempView(name)
        try:
            yield name
        finally:
            self._sql.catalog.dropTempView(name)
