"""What each `spark.table_format` does, in one place: a frozen record per format and their registry.

Plain Parquet needs no jars and is what every Spark run here uses; Delta is
for a cluster that has delta-spark (native on Databricks). The two differ in
what a table can do to its rows, and that decides four things:

- dbt: the spark target's models are written with `file_format` = the format
  (`dbt_file_format`, passed to dbt as $CHURN_SPARK_TABLE_FORMAT);
- the session: Delta's SQL extension and catalog (`session_conf`), whose
  classes must be on the JVM's classpath (`required_classes`, checked at session
  start by `check_classes`, so a missing jar is named before any table is read);
- the scores history: Parquet cannot delete rows, so the history is rewritten
  whole each night; Delta replaces tonight's (as_of_date, model_version) rows
  only (`history_write`);
- publish: the same pointer scheme on both; Parquet adds each version's folder
  as a partition of an external table and drops partitions, Delta appends the
  version's rows to a Delta table and deletes old versions' rows
  (`create_versions_table`, `add_version`, `drop_versions`).

Everything here is a plain value or a function returning SQL or writer
options, so the Delta branches are checked without Delta's jars; nothing here
imports pyspark (the JVM check takes the running JVM's py4j view).

Only parquet is exercised on these machines: no Delta jars can be fetched here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ml.warehouse.connection import WarehouseError
from ml.warehouse.sql import quote_literal, spark_quote

# The column that names a published version (spark_publish's versions tables are partitioned by it).
VERSION_COLUMN = "publish_version"
# Spark's own defaults of the two session settings Delta changes: what a Parquet session runs with,
# stated so dbt's target and the ML layer's session set the very same values on both formats.
NO_EXTENSIONS = ""
BUILTIN_CATALOG = "builtin"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


class TableFormatError(WarehouseError):
    """The configured table format cannot run in this session (its classes are not on the classpath)."""


@dataclass(frozen=True)
class HistoryWrite:
    """How tonight's scores go into churn_scores_history once the table exists.

    `replace_where` None: the format cannot delete rows, so the kept rows and
    tonight's are written whole. Otherwise only the rows the predicate selects
    are replaced; `options` are the writer's others (Delta's mergeSchema).
    """

    file_format: str
    replace_where: str | None
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def writer_options(self) -> dict[str, str]:
        """What the writer is given: `options`, and the predicate as replaceWhere when there is one."""
        predicate = {} if self.replace_where is None else {"replaceWhere": self.replace_where}
        return {**self.options, **predicate}


@dataclass(frozen=True)
class TableFormat:
    """One value of `spark.table_format` and everything that differs by it."""

    name: str
    dbt_file_format: str                      # dbt-spark's file_format of the spark target's models
    session_conf: Mapping[str, str]           # Spark settings (dbt's target sets the same)
    required_classes: tuple[str, ...]         # JVM classes those settings load
    history_write: Callable[[str, dt.date, str], HistoryWrite]  # (as_of column, date, model version)
    create_versions_table: Callable[[str, str, Path], str]      # (table, column DDL, Parquet root) -> sql
    add_version: Callable[[str, str, Path], str]                # (table, version, version folder) -> sql
    drop_versions: Callable[[str, Sequence[str]], list[str]]    # (table, versions) -> statements
    overwrite_options: Mapping[str, str] = field(default_factory=dict)  # writer options of a whole-table overwrite
    remedy: str = ""                          # what to do when required_classes are missing


# ---------------------------------------------------------------- parquet: rewrite and partitions


def _parquet_history(as_of_column: str, as_of_date: dt.date, version: str) -> HistoryWrite:
    return HistoryWrite("parquet", replace_where=None)


def _versions_table_sql(table: str, ddl: str, using: str) -> str:
    """The versions table both formats declare: the published columns and the version, partitioned by it."""
    return (f"create table {table} ({ddl}, {VERSION_COLUMN} string) using {using} "
            f"partitioned by ({VERSION_COLUMN})")


def _parquet_versions_table(table: str, ddl: str, root: Path) -> str:
    """An external table over the Parquet root: each version's folder becomes a partition."""
    return f"{_versions_table_sql(table, ddl, 'parquet')} location {quote_literal(root)}"


def _parquet_add_version(table: str, version: str, folder: Path) -> str:
    return (f"alter table {table} add if not exists partition "
            f"({VERSION_COLUMN} = {quote_literal(version)}) location {quote_literal(folder)}")


def _parquet_drop_versions(table: str, versions: Sequence[str]) -> list[str]:
    """Partitions only: the folders are removed by the caller (an external table's files stay)."""
    return [f"alter table {table} drop if exists partition ({VERSION_COLUMN} = {quote_literal(v)})"
            for v in versions]


# ---------------------------------------------------------------- delta: replaceWhere, append, delete


def _delta_history(as_of_column: str, as_of_date: dt.date, version: str) -> HistoryWrite:
    """Tonight's (snapshot, model version) rows replaced in place: the night's cost, not the history's.
    mergeSchema adds columns tonight has and the history lacks (scoring.top_reasons raised)."""
    predicate = (f"{spark_quote(as_of_column)} = date {quote_literal(as_of_date.isoformat())} "
                 f"and {spark_quote('model_version')} = {quote_literal(version)}")
    return HistoryWrite("delta", replace_where=predicate, options=MappingProxyType({"mergeSchema": "true"}))


def _delta_versions_table(table: str, ddl: str, root: Path) -> str:
    """A managed Delta table (the catalog's storage, e.g. Unity Catalog's); the Parquet root stays
    the DuckDB file's copy of each version, so the Delta table keeps its own files apart from it."""
    return _versions_table_sql(table, ddl, "delta")


def _delta_add_version(table: str, version: str, folder: Path) -> str:
    """The version's rows appended from its Parquet files (columns in the files' order, the version last)."""
    return (f"insert into {table} select *, {quote_literal(version)} as {VERSION_COLUMN} "
            f"from parquet.{spark_quote(str(folder))}")


def _delta_drop_versions(table: str, versions: Sequence[str]) -> list[str]:
    """One delete for all old versions; their files go at the cluster's VACUUM, not here."""
    if not versions:
        return []
    listed = ", ".join(quote_literal(v) for v in versions)
    return [f"delete from {table} where {VERSION_COLUMN} in ({listed})"]


PARQUET = TableFormat(
    name="parquet",
    dbt_file_format="parquet",
    session_conf=MappingProxyType({"spark.sql.extensions": NO_EXTENSIONS,
                                   "spark.sql.catalog.spark_catalog": BUILTIN_CATALOG}),
    required_classes=(),
    history_write=_parquet_history,
    create_versions_table=_parquet_versions_table,
    add_version=_parquet_add_version,
    drop_versions=_parquet_drop_versions,
)

DELTA = TableFormat(
    name="delta",
    dbt_file_format="delta",
    session_conf=MappingProxyType({"spark.sql.extensions": DELTA_EXTENSION,
                                   "spark.sql.catalog.spark_catalog": DELTA_CATALOG}),
    required_classes=(DELTA_EXTENSION, DELTA_CATALOG),
    history_write=_delta_history,
    create_versions_table=_delta_versions_table,
    add_version=_delta_add_version,
    drop_versions=_delta_drop_versions,
    # churn_scores is replaced whole each night; its columns follow scoring.top_reasons
    overwrite_options=MappingProxyType({"overwriteSchema": "true"}),
    remedy=("put delta-spark's jars (delta-spark and delta-storage of the Delta release for this Spark "
            "version) on the classpath with spark.jars (or spark.jars.packages where a Maven repository is "
            "reachable), or run on Databricks, where Delta is built in"),
)

# churn.yml's allowed values (ml.config.TABLE_FORMAT_NAMES) are these keys (tests/test_table_formats.py).
TABLE_FORMATS: Mapping[str, TableFormat] = MappingProxyType({f.name: f for f in (PARQUET, DELTA)})


def table_format(name: str) -> TableFormat:
    """The record of a `spark.table_format` value (churn.yml's validation admits only these)."""
    try:
        return TABLE_FORMATS[name]
    except KeyError:
        raise TableFormatError(f"spark.table_format {name!r} is not one of: {', '.join(TABLE_FORMATS)}") from None


# ---------------------------------------------------------------- the classpath check


def missing_classes(jvm: Any, fmt: TableFormat) -> list[str]:
    """The format's classes the JVM cannot load, looked up as Spark loads extensions and catalogs
    (the thread's context class loader, which holds spark.jars)."""
    loader = jvm.java.lang.Thread.currentThread().getContextClassLoader() if fmt.required_classes else None
    missing = []
    for name in fmt.required_classes:
        try:
            jvm.java.lang.Class.forName(name, False, loader)
        except Exception:  # py4j's Py4JJavaError wraps ClassNotFoundException; pyspark is not imported here
            missing.append(name)
    return missing


def check_classes(jvm: Any, fmt: TableFormat) -> None:
    """Refuse a session whose table format's classes are missing, naming the setting, class and remedy.

    Spark itself would only warn about a missing extension and fail later, at
    the first catalog access, with a message that names neither the setting
    nor the fix.
    """
    missing = missing_classes(jvm, fmt)
    if missing:
        raise TableFormatError(
            f"spark.table_format: {fmt.name} in churn.yml needs classes this Spark JVM cannot load: "
            f"{', '.join(missing)}. To use {fmt.name}: {fmt.remedy}; otherwise set spark.table_format: "
            f"{PARQUET.name}"
        )
