"""Publishing on Spark without extra jars: versioned Parquet, one pointer switched in one metastore step.

Write-audit-publish on Spark needs what DuckDB's `os.replace` gives the
published file: readers see the old complete state or the new one, never a
mix. Delta and Iceberg would give it, but their jars come from a Maven
repository at session start, and none is reachable here; so this path needs
plain Parquet and the metastore only:

1. Every published table is written as Parquet into a folder of its own for
   this version: `<spark folder>/published/<table>/publish_version=<v>/`. The
   engine tables (the data plane: churn_scores, churn_scores_history) are
   written by Spark from the `churn` schema; the small tables the ML layer keeps
   in the build database (registry, metrics, drift, runs: the control plane)
   are written by DuckDB. Column names are the published ones (the keyword
   renames of `ml.serving.publish`), so both publishes offer the same columns.
2. Each table is an external table `churn_published.<table>__versions_<schema>`
   partitioned by `publish_version` (the version folder is added as a
   partition), and BI reads the view `churn_published.<table>`: the rows of
   the partition that the one-row view `churn_published.publish_pointer` names.
   Spark folds that scalar subquery into a partition filter, so a query reads
   one version's files.
3. The switch is one statement, `create or replace view publish_pointer`:
   every published view moves to the new version at once. A crash before it
   leaves the previous state whole; its half-written version folder is removed
   by the next publish. A table whose columns changed gets a new versions
   table and its view is re-declared just before the switch: a query in that
   instant sees that table empty, never rows of two versions.
4. The published DuckDB file (`warehouse.published_db`) is rewritten with
   views over the same version's files and swapped with `os.replace`, so a BI
   tool opening one file read-only, the README's queries and `churn serve` read
   the Spark output unchanged. Its `published_parts` rows name the version.
5. Versions that neither the new state, the previous pointer nor the previous
   published file reads are dropped (partitions and folders): the previous
   state stays one more publish for readers still on it.

That is `spark.table_format: parquet`, what runs here. On `delta` (a cluster
with delta-spark, or Databricks; not exercised here, where no Delta jars can
be fetched) the pointer and the views are the same, and only the versions
tables differ (`ml.warehouse.table_formats`): each is a managed Delta table
partitioned by `publish_version`, a version's rows are appended from its
Parquet folder (`insert into`), and old versions are removed with one
`delete from ... where publish_version in (...)` per table (their files go at
the cluster's VACUUM). The Parquet folders are still written: they are what
the published DuckDB file's views read (DuckDB reads no Delta without its
delta extension), so that file stays the same version as the Spark views;
on a cluster, BI reads the Spark or Databricks SQL endpoint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ml.config import ChurnConfig
from ml.features.mart import current_contract
from ml.logs import get_logger, timed
from ml.serving.publish import (
    FEATURE_DICTIONARY,
    PUBLISH_INFO,
    PUBLISHED_PARTS,
    PUBLISHED_TABLES,
    REQUIRED_TABLES,
    Documentation,
    PublishError,
    build_columns,
    comment_on,
    documentation,
    feature_dictionary,
    keyword_renames,
    legacy_views,
    pause_point,
    publish_lock,
    remove_stale_temps,
    rename_clause,
    replace_published_file,
)
from ml.warehouse import MEMORY, EngineError, Session, connect, quote, quote_literal
from ml.warehouse.spark import SparkWarehouse, spark_folder, spark_quote
from ml.warehouse.table_formats import VERSION_COLUMN

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = get_logger("spark_publish")

PUBLISHED_SCHEMA = "churn_published"
POINTER_VIEW = "publish_pointer"
# Tables the published state holds beyond PUBLISHED_TABLES (written by this publish itself).
OWN_TABLES = (PUBLISH_INFO.name, FEATURE_DICTIONARY.name)


@dataclass(frozen=True)
class SparkPublishResult:
    """One publish on Spark: its version, where the DuckDB readers' file is, rows per table."""

    version: str
    path: Path
    tables: dict[str, int]
    removed_versions: tuple[str, ...]
    seconds: float


def published_root(config: ChurnConfig) -> Path:
    """The versioned Parquet of every published state, inside the dataset's Spark folder."""
    return spark_folder(config) / "published"


def version_folder(root: Path, table: str, version: str) -> Path:
    return root / table / f"{VERSION_COLUMN}={version}"


def new_version() -> str:
    """Sortable and unique per publish (UTC to the microsecond); the run id goes to publish_info."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


def qualified(name: str) -> str:
    return f"{PUBLISHED_SCHEMA}.{spark_quote(name)}"


# ---------------------------------------------------------------- writing one version


def _spark_table_out(frame: DataFrame, renames: dict[str, str]) -> DataFrame:
    """The engine table under its published names; timestamps without zone, as DuckDB's TIMESTAMP."""
    from pyspark.sql import functions as F

    frame = frame.withColumnsRenamed(renames) if renames else frame
    zoned = [f.name for f in frame.schema.fields if f.dataType.typeName() == "timestamp"]
    return frame.withColumns({name: F.col(name).cast("timestamp_ntz") for name in zoned}) if zoned else frame


def _write_spark_table(warehouse: SparkWarehouse, table: str, renames: dict[str, str], folder: Path) -> None:
    out = _spark_table_out(warehouse.table(table), renames)
    out.write.mode("errorifexists").option("compression", "zstd").parquet(str(folder))


def _write_build_table(session: Session, table: str, renames: dict[str, str], folder: Path) -> None:
    """A control-plane table of the attached build database as one Parquet file of the version."""
    folder.mkdir(parents=True, exist_ok=True)
    session.execute(f"copy (select *{rename_clause(renames)} from build.main.{quote(table)}) "
                    f"to {quote_literal(folder / 'part-00000.parquet')} (format parquet, compression zstd)")


def _write_frame(session: Session, frame: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with session.registered(frame) as name:
        session.execute(f"copy (select * from {quote(name)}) "
                        f"to {quote_literal(folder / 'part-00000.parquet')} (format parquet)")


def _files(folder: Path) -> str:
    return quote_literal(f"{folder}/*.parquet")


@dataclass(frozen=True)
class _Version:
    tables: dict[str, int]  # published table -> rows
    renamed: dict[str, dict[str, str]]
    docs: Documentation  # the manifest's descriptions, parsed once for the dictionary and the comments


def _write_version(config: ChurnConfig, warehouse: SparkWarehouse, root: Path, version: str,
                   run_id: str | None) -> _Version:
    """Every published table of this state as Parquet under `version`; nothing points at it yet."""
    engine_tables = [t for t in PUBLISHED_TABLES if warehouse.exists(t)]
    missing = [t for t in REQUIRED_TABLES if t not in engine_tables]
    if missing:
        raise PublishError(f"Spark schema churn lacks {', '.join(missing)}: nothing published "
                           "(score on Spark first)")
    docs = documentation(config)
    contract = current_contract(config)
    rows: dict[str, int] = {}
    with connect(MEMORY, settings=config.warehouse.engine) as session:
        session.execute(f"attach {quote_literal(config.warehouse.build_db)} as build (read_only)")
        build_tables = {name for name, in session.rows("select table_name from information_schema.tables "
                                                       "where table_catalog = 'build' and table_schema = 'main'")}
        control = [t for t in PUBLISHED_TABLES if t not in engine_tables and t in build_tables]
        # every table's names are judged before a single file is written
        renamed = {t: keyword_renames(session, t, list(warehouse.columns(t))) for t in engine_tables}
        renamed |= {t: keyword_renames(session, t, [c for c, _ in build_columns(session, t)]) for t in control}
        for table in engine_tables:
            _write_spark_table(warehouse, table, renamed[table], version_folder(root, table, version))
            pause_point(f"spark_publish:{table}")
        for table in control:
            _write_build_table(session, table, renamed[table], version_folder(root, table, version))
        mart_types = dict(build_columns(session, contract.model))
        if not mart_types:  # the mart lives on Spark
            mart_types = warehouse.columns(contract.model)
        session.execute("detach build")
        published = [*engine_tables, *control]
        info = pd.DataFrame([{"run_id": run_id, "dataset": config.dataset.name,
                              "published_at": dt.datetime.now(), "published_tables": ",".join(published)}])
        _write_frame(session, info.astype({"run_id": "string"}), version_folder(root, PUBLISH_INFO.name, version))
        _write_frame(session, feature_dictionary(contract, docs, mart_types),
                     version_folder(root, FEATURE_DICTIONARY.name, version))
        for table in [*published, *OWN_TABLES]:
            rows[table] = int(session.scalar(
                f"select count(*) from read_parquet({_files(version_folder(root, table, version))}, "
                "hive_partitioning = false)"))
    return _Version(rows, renamed, docs)


# ---------------------------------------------------------------- the metastore


def _schema_ddl(warehouse: SparkWarehouse, folder: Path) -> str:
    """The columns of a version's files as Spark DDL (their own types; the version column added)."""
    schema = warehouse.spark.read.parquet(str(folder)).schema
    return ", ".join(f"{spark_quote(f.name)} {f.dataType.simpleString()}" for f in schema.fields)


def _versions_table(table: str, ddl: str) -> str:
    """Named by the columns, so a version with other columns gets its own versions table."""
    return f"{table}__versions_{hashlib.sha256(ddl.encode()).hexdigest()[:8]}"


def current_pointer(warehouse: SparkWarehouse) -> str | None:
    """The version Spark readers see now, or None before the first publish."""
    if not warehouse.spark.catalog.tableExists(f"{PUBLISHED_SCHEMA}.{POINTER_VIEW}"):
        return None
    row = warehouse.spark.sql(f"select {VERSION_COLUMN} from {qualified(POINTER_VIEW)}").collect()
    return str(row[0][0]) if row else None


def _point(warehouse: SparkWarehouse, version: str) -> None:
    """The switch: one metastore statement moves every published view to `version`."""
    warehouse.spark.sql(f"create or replace view {qualified(POINTER_VIEW)} as "
                        f"select {quote_literal(version)} as {VERSION_COLUMN}")


def _register(warehouse: SparkWarehouse, root: Path, version: str, tables: list[str]) -> dict[str, str]:
    """Add the version to each table's versions table (Parquet: its folder as a partition; Delta: its rows
    appended); return table -> versions table of the views that must be (re)declared."""
    spark, fmt = warehouse.spark, warehouse.table_format
    spark.sql(f"create database if not exists {PUBLISHED_SCHEMA}")
    redeclare: dict[str, str] = {}
    for table in tables:
        folder = version_folder(root, table, version)
        ddl = _schema_ddl(warehouse, folder)
        versions = _versions_table(table, ddl)
        if not spark.catalog.tableExists(f"{PUBLISHED_SCHEMA}.{versions}"):
            spark.sql(fmt.create_versions_table(qualified(versions), ddl, root / table))
        spark.sql(fmt.add_version(qualified(versions), version, folder))
        if _view_source(warehouse, table) != versions:
            redeclare[table] = versions
    return redeclare


def _view_source(warehouse: SparkWarehouse, table: str) -> str | None:
    """The versions table the published view of `table` reads, or None when it has no view yet."""
    if not warehouse.spark.catalog.tableExists(f"{PUBLISHED_SCHEMA}.{table}"):
        return None
    text = warehouse.spark.sql(f"show create table {qualified(table)}").collect()[0][0]
    found = re.search(rf"{re.escape(table)}__versions_[0-9a-f]{{8}}", text)
    return found.group(0) if found else None


def _declare_view(warehouse: SparkWarehouse, table: str, versions: str) -> None:
    warehouse.spark.sql(
        f"create or replace view {qualified(table)} as select * except ({VERSION_COLUMN}) "
        f"from {qualified(versions)} where {VERSION_COLUMN} = "
        f"(select {VERSION_COLUMN} from {qualified(POINTER_VIEW)})")


# ---------------------------------------------------------------- the DuckDB readers' file


def _write_duckdb_file(config: ChurnConfig, target: Path, root: Path, version: str, written: _Version) -> None:
    """A small DuckDB file of views over the version's files: what BI and `churn serve` open."""
    docs = written.docs
    tables = list(written.tables)
    with connect(target, settings=config.warehouse.engine) as session:
        for table in tables:
            # the folder's publish_version=<v> is no column of the table
            session.execute(f"create view main.{quote(table)} as select * from read_parquet("
                            f"{_files(version_folder(root, table, version))}, hive_partitioning = false)")
        session.append(PUBLISHED_PARTS, pd.DataFrame(
            [{"table_name": t, "partition_key": version,
              "part_file": version_folder(root, t, version).relative_to(root).as_posix(),
              "row_count": n, "row_hash": None} for t, n in written.tables.items()],
            columns=PUBLISHED_PARTS.column_names))
        for table in [*tables, PUBLISHED_PARTS.name]:
            comment_on(session, table, docs, written.renamed.get(table, {}))
        legacy_views(session, written.renamed)
        session.execute("checkpoint")


def _file_version(published: Path) -> str | None:
    """The version the current published DuckDB file reads (None: none, or a DuckDB-engine publish)."""
    if not published.exists():
        return None
    try:
        with connect(published, read_only=True) as session:
            if not session.exists(PUBLISHED_PARTS):
                return None
            row = session.one(f"select min(partition_key) from {quote(PUBLISHED_PARTS.name)} "
                              "where part_file like ?", [f"%/{VERSION_COLUMN}=%"])
    except EngineError as exc:
        log.warning("previous published file %s unreadable (%s)", published, exc)
        return None
    return None if row is None or row[0] is None else str(row[0])


# ---------------------------------------------------------------- cleaning up


def _remove_versions(warehouse: SparkWarehouse, root: Path, keep: set[str]) -> tuple[str, ...]:
    """Drop every version no kept state reads, crashed publishes' too: first from the versions tables
    (Parquet: partitions; Delta: one delete per table), then their folders."""
    spark = warehouse.spark
    stale: dict[str, list[str]] = {}  # published table -> its versions to drop
    folders = []
    for folder in sorted(root.glob(f"*/{VERSION_COLUMN}=*")):
        version = folder.name.split("=", 1)[1]
        if version not in keep:
            stale.setdefault(folder.parent.name, []).append(version)
            folders.append(folder)
    versions_tables = [t.name for t in spark.catalog.listTables(PUBLISHED_SCHEMA)
                       if "__versions_" in t.name] if stale and spark.catalog.databaseExists(PUBLISHED_SCHEMA) else []
    for table, versions in stale.items():
        for versions_table in versions_tables:
            if versions_table.startswith(f"{table}__versions_"):
                for statement in warehouse.table_format.drop_versions(qualified(versions_table), versions):
                    spark.sql(statement)
    for folder in folders:
        shutil.rmtree(folder)
    removed = sorted({folder.name.split("=", 1)[1] for folder in folders})
    if removed:
        log.info("removed %d published version(s) no reader is left on: %s", len(removed), ", ".join(removed))
    return tuple(removed)


# ---------------------------------------------------------------- the publish


def publish_on_spark(config: ChurnConfig, warehouse: SparkWarehouse, run_id: str | None = None) -> SparkPublishResult:
    """Publish the Spark data plane and the build database's control tables as one new version."""
    published = config.warehouse.published_db
    root = published_root(config)
    start = time.perf_counter()
    with timed(f"publish on Spark to {PUBLISHED_SCHEMA} and {published}", log), publish_lock(published):
        remove_stale_temps(published)
        previous = {v for v in (current_pointer(warehouse), _file_version(published)) if v is not None}
        version = new_version()
        written = _write_version(config, warehouse, root, version, run_id)
        tables = list(written.tables)
        redeclare = _register(warehouse, root, version, tables)
        if current_pointer(warehouse) is None:
            _point(warehouse, version)  # the first publish: the views need a pointer to be declared over
        for table, versions in redeclare.items():
            _declare_view(warehouse, table, versions)
        pause_point("spark_publish:before_switch")
        _point(warehouse, version)
        replace_published_file(published, lambda target: _write_duckdb_file(config, target, root, version, written))
        removed = _remove_versions(warehouse, root, previous | {version})
    result = SparkPublishResult(version, published, written.tables, removed, time.perf_counter() - start)
    log.info("published version %s on Spark: %s", version, ", ".join(f"{t}={n:,d}" for t, n in result.tables.items()))
    return result
