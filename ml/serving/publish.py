"""`churn publish`: copy the BI-facing tables to the published database, atomically.

Write-audit-publish: the nightly writes into the build database, audits it
(dbt tests during the build, then the Great Expectations suites), and only a
run that passed every critical check reaches this step. BI tools read only
`warehouse.published_db`, so they never see a half-built warehouse.

Publishing writes a complete new DuckDB file next to the published one (same
folder, so the rename stays on one file system), checkpoints and closes it,
fsyncs it, and `os.replace`s it over the old file, then fsyncs the folder. A
reader opening the path gets either the old complete file or the new one; a
reader that already has the old file open keeps reading it (POSIX rename
leaves the old inode alive until closed). A crash at any point leaves the old
file untouched and at worst a temp file, which the next publish removes under
an exclusive lock (`flock`, released by the kernel when a process dies).

History tables (HISTORY_PARTITIONS: scores history, drift, performance, audit
results, run log, ...) grow every night, so copying them whole would make the
publish as slow as the history is long. They are published as immutable
Parquet parts instead, one per run (or log segment) in
`<published_db without suffix>/<table>/`, named by the part's key and a
signature of its rows (count and summed row hashes): an unchanged part keeps
its name and is never written again, tonight's parts and any part whose rows
changed (a re-run of a night, the run log's later steps) get a new file, and
the small published file exposes each table as a view over exactly the parts
of this state. Parts are written to a temp name and renamed, before the small
file is swapped, so a reader sees the old complete state or the new one. Files
neither the new nor the previous state references are removed after the swap
(the previous state's stay one more night for readers still connected to it).

Deciding what changed costs the night, not the history: the manifest
(`published_parts`) keeps each part's row count and row hash, and a publish
hashes just the parts that are new, whose count moved, or that belong to
tonight's run. Every history writer replaces a key's rows by deleting and
appending them (a re-run, the run log's later steps, a re-scored snapshot
leaving its old run), so an untouched count of a past run's key means
untouched rows. Counting per key reads only the keys from the newest
published one on (`_key_counts`): keys are run ids and log segments named by
their start time, and new rows are appended under tonight's keys, so the rows
of older keys sit in row groups DuckDB skips by their min/max. The older
keys' counts come from the manifest, trusted only while the table's total
(a metadata read) says no row was removed or added under them; otherwise,
and whenever tonight's run id sorts before the newest key, every key is
counted again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.dbt import dbt_target_path
from ml.features.mart import current_contract
from ml.logs import get_logger, timed
from ml.warehouse import (
    EngineError,
    Session,
    TableSpec,
    WarehouseError,
    catalog,
    connect,
    declare,
    fsync,
    quote,
    quote_literal,
)

log = get_logger("publish")

T = TypeVar("T")

# Tables BI reads, in the order they are copied. churn_scores is required: a
# published warehouse without scores would be a broken dashboard.
REQUIRED_TABLES = ("churn_scores",)
PUBLISHED_TABLES = (
    "churn_scores",
    "churn_scores_history",
    "model_runs",
    "model_metrics",
    "model_registry",
    "feature_importance",
    "threshold_curve",
    "calibration_curve",
    "data_quality_results",
    "pipeline_runs",
    "drift_stats",
    "model_performance",
    "retrain_decisions",
    "prediction_log",
)
PUBLISH_INFO = declare(
    name="publish_info",
    owner=__name__,
    grain="one row: the publish that wrote this published database",
    description="Which nightly run and dataset the published database comes from, when, and which tables it holds.",
    columns=[
        ("run_id", "VARCHAR", "the nightly run whose build database was published"),
        ("dataset", "VARCHAR", "the churn.yml dataset profile the published state comes from"),
        ("published_at", "TIMESTAMP", "when this file was written"),
        ("published_tables", "VARCHAR", "comma-separated names of the tables copied"),
    ],
)
INFO_TABLE = PUBLISH_INFO.name
# History tables published as Parquet parts, with the column that names a part (one run, one log segment).
HISTORY_PARTITIONS: dict[str, str] = {
    "churn_scores_history": "run_id",
    "data_quality_results": "run_id",
    "pipeline_runs": "run_id",
    "drift_stats": "run_id",
    "model_performance": "run_id",
    "retrain_decisions": "run_id",
    "prediction_log": "segment",
}
PUBLISHED_PARTS = declare(
    name="published_parts",
    owner=__name__,
    grain="one row per Parquet part a history view of the published database reads (published database only)",
    description="Which immutable Parquet part files the history views of this published state read; "
                "the next publish keeps them one more night and removes files no state references.",
    columns=[
        ("table_name", "VARCHAR", "the history table the part belongs to (a view in the published database)"),
        ("partition_key", "VARCHAR", "the part's value of the table's partition column (run_id, or segment)"),
        ("part_file", "VARCHAR", "the file, relative to the parts folder (<table>/<key>__<signature>.parquet)"),
        ("row_count", "BIGINT", "rows in the part"),
        ("row_hash", "VARCHAR", "summed hashes of the part's rows: its signature, reused while its count stands"),
    ],
)
FEATURE_DICTIONARY = declare(
    name="feature_dictionary",
    owner=__name__,
    grain="one row per column of the feature mart's contract (published database only)",
    description="What each column the model reads means: the feature mart's contract and YAML descriptions, "
                "so reason_<i> names in churn_scores can be looked up.",
    columns=[
        ("feature_mart", "VARCHAR", "the dbt model the columns belong to"),
        ("column_name", "VARCHAR", "the mart column, as named in churn_scores.reason_<i>"),
        ("role", "VARCHAR", "key, as_of, label or feature (the contract's role)"),
        ("kind", "VARCHAR", "numeric or categorical for features; NULL for the other roles"),
        ("data_type", "VARCHAR", "the column's DuckDB type in the mart"),
        ("description", "VARCHAR", "the column's description in the mart's dbt YAML"),
    ],
)
# Published column names that are SQL keywords (a BI user would have to quote
# them) get these names; the old names stay readable for one release through
# views of the same names in schema LEGACY_SCHEMA (e.g. legacy.churn_scores.rank).
KEYWORD_RENAMES: dict[str, dict[str, str]] = {
    "churn_scores": {"rank": "risk_rank"},
    "churn_scores_history": {"rank": "risk_rank"},
    "model_metrics": {"precision": "precision_at_threshold", "rows": "n_rows"},
    "feature_importance": {"value": "importance_value", "rank": "importance_rank"},
    "threshold_curve": {"precision": "precision_at_threshold"},
    "model_performance": {"precision": "precision_at_threshold"},
    "drift_stats": {"value": "statistic_value"},
}
LEGACY_SCHEMA = "legacy"
# Reserved words of the SQL standard (and so of most BI tools' dialects) that
# DuckDB itself accepts unquoted; DuckDB's own non-'unreserved' keywords are asked of duckdb_keywords().
SQL_RESERVED = frozenset({
    "all", "and", "any", "as", "between", "by", "case", "cast", "count", "cube", "current", "date", "day", "default",
    "desc", "end", "from", "group", "having", "hour", "in", "interval", "key", "level", "like", "max", "min",
    "minute", "month", "not", "null", "or", "order", "over", "partition", "percent", "position", "precision",
    "range", "rank", "result", "row", "rows", "second", "select", "size", "sum", "table", "time", "timestamp",
    "to", "user", "value", "values", "where", "window", "year",
})
# dbt source (dbt_project/models/ml/_ml__sources.yml) documenting the ML-written tables column by column.
ML_SOURCE = "ml"
PAUSE_ENV = "CHURN_PAUSE_AT"
PAUSE_FILE_ENV = "CHURN_PAUSE_FILE"


class PublishError(RuntimeError):
    """Nothing was published; the previous published database is unchanged."""


def pause_point(name: str) -> None:
    """Test hook: stop here while $CHURN_PAUSE_AT names this point, so a test can kill the process.

    Crash-safety tests set CHURN_PAUSE_AT=<point> and CHURN_PAUSE_FILE=<path>; the
    process writes the file and sleeps, and the test SIGKILLs it at a known place.
    Unset (always, outside those tests) this returns at once.
    """
    if os.environ.get(PAUSE_ENV) != name:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{os.getpid()} {name}\n")
    log.warning("paused at %s (pid %d) for a crash test", name, os.getpid())
    time.sleep(600)


@dataclass(frozen=True)
class PublishResult:
    path: Path
    tables: dict[str, int]
    seconds: float
    parts_written: int = 0  # history parts written tonight (new or changed)
    parts_kept: int = 0  # history parts reused as they were
    rows_hashed: int = 0  # history rows whose signature was computed tonight (the rest came from the manifest)
    rows_counted: int = 0  # history rows whose key was read to count them (the rest came from the manifest)


def _temp_prefix(published: Path) -> str:
    return f".{published.name}.tmp-"


@contextmanager
def publish_lock(published: Path) -> Iterator[None]:
    """Exclusive lock for publishing into `published`'s folder; the kernel frees it if we die."""
    published.parent.mkdir(parents=True, exist_ok=True)
    lock_path = published.parent / f".{published.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_temps(published: Path) -> list[Path]:
    """Temp files of publishes that died before their rename (call under the lock)."""
    stale = sorted(published.parent.glob(_temp_prefix(published) + "*"))
    for path in stale:
        path.unlink(missing_ok=True)
        log.warning("removed stale publish temp file %s", path)
    return stale


def tables_to_publish(config: ChurnConfig) -> list[str]:
    """The BI tables present in the build database; fail when a required one is missing."""
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        existing = set(session.tables(base_tables_only=False))
    present = [t for t in PUBLISHED_TABLES if t in existing]
    missing = [t for t in REQUIRED_TABLES if t not in present]
    if missing:
        raise PublishError(
            f"build database {config.warehouse.build_db} lacks {', '.join(missing)}: nothing published "
            "(run `churn score` first)"
        )
    return present


@dataclass(frozen=True)
class PublishInfo:
    """What publish_info says about a published database."""

    run_id: str | None
    dataset: str
    published_at: dt.datetime
    tables: tuple[str, ...]


def published_info(session: Session) -> PublishInfo | None:
    """The publish that wrote the database `session` reads, or None when it has no publish_info."""
    if not session.exists(PUBLISH_INFO):
        return None
    row = session.one(f"select run_id, dataset, published_at, published_tables from {quote(PUBLISH_INFO.name)} limit 1")
    if row is None:
        return None
    run_id, dataset, published_at, tables = row
    return PublishInfo(run_id, dataset, published_at, tuple(t for t in (tables or "").split(",") if t))


@dataclass(frozen=True)
class Documentation:
    """What each published table and column means, for the published file's comments.

    The ML tables are documented column by column as the dbt source `ml`
    (dbt_project/models/ml/_ml__sources.yml), so the same words appear in dbt
    docs' lineage and in the data dictionary a BI tool reads from the comments;
    the mart's own YAML describes the contract columns the scores carry.
    """

    tables: dict[str, str]
    columns: dict[str, dict[str, str]]
    mart_columns: dict[str, str]

    def table(self, table: str) -> str:
        """The source YAML's description, else the catalogue's (with its grain)."""
        if self.tables.get(table):
            return self.tables[table]
        declared = catalog().get(table)
        return f"{declared.description} (grain: {declared.grain})" if declared is not None else ""

    def column(self, table: str, column: str) -> str:
        """A column's description: the source YAML, the catalogue, the mart (contract columns), the reason family."""
        described = self.columns.get(table, {}).get(column)
        if described:
            return described
        declared = catalog().get(table)
        if isinstance(declared, TableSpec):
            match = [c.description for c in declared.columns if c.name == column and c.description]
            if match:
                return match[0]
        if column in self.mart_columns:
            return self.mart_columns[column]
        return _reason_description(column)


def _reason_description(column: str) -> str:
    """Descriptions of the reason_<i> family, whose count follows scoring.top_reasons."""
    parts = column.split("_")
    if len(parts) < 2 or parts[0] != "reason" or not parts[1].isdigit():
        return ""
    i = parts[1]
    if len(parts) == 2:
        return (f"the contract feature with the {i}. largest churn-raising contribution (see feature_dictionary); "
                "NULL for customers not flagged when scoring.reasons_for = flagged")
    if parts[2:] == ["contribution"]:
        return f"reason_{i}'s contribution to the score, in the unit named by contribution_unit"
    if parts[2:] == ["text"]:
        return f"reason_{i} in words: description, the customer's value, the typical training value, direction"
    return ""


def documentation(config: ChurnConfig) -> Documentation:
    """Descriptions from the last dbt run's manifest (sources `ml` and the feature mart)."""
    manifest_path = dbt_target_path(config) / "manifest.json"
    if not manifest_path.is_file():
        raise PublishError(f"dbt manifest not found: {manifest_path} (run churn build): nothing published")
    manifest = json.loads(manifest_path.read_text())
    tables: dict[str, str] = {}
    columns: dict[str, dict[str, str]] = {}
    for source in manifest.get("sources", {}).values():
        if source.get("source_name") != ML_SOURCE:
            continue
        tables[source["name"]] = source.get("description", "")
        columns[source["name"]] = {n: c.get("description", "") for n, c in (source.get("columns") or {}).items()}
    mart_columns = {
        name: column.get("description", "")
        for node in manifest.get("nodes", {}).values()
        if node.get("resource_type") == "model" and node.get("name") == config.dataset.feature_mart
        for name, column in (node.get("columns") or {}).items()
    }
    return Documentation(tables, columns, mart_columns)


def feature_dictionary(contract: FeatureContract, docs: Documentation, mart_types: dict[str, str]) -> pd.DataFrame:
    """One row per contract column: role, kind, type and YAML description."""
    kinds = {f.name: f.kind for f in contract.features}
    roles = {contract.key: "key", contract.as_of: "as_of", contract.label: "label",
             **{name: "feature" for name in contract.feature_names}}
    return pd.DataFrame([
        {"feature_mart": contract.model, "column_name": name, "role": role, "kind": kinds.get(name),
         "data_type": mart_types.get(name), "description": docs.mart_columns.get(name, "")}
        for name, role in roles.items()
    ])


def is_sql_keyword(session: Session, name: str) -> bool:
    """True when a BI user would have to quote `name`: SQL-standard reserved or a DuckDB keyword that is."""
    if name.lower() in SQL_RESERVED:
        return True
    category = session.scalar("select keyword_category from duckdb_keywords() where keyword_name = ?", [name.lower()])
    return category is not None and category != "unreserved"


def build_columns(session: Session, table: str) -> list[tuple[str, str]]:
    """(column, type) of a table of the attached build database, in table order."""
    return session.rows(
        "select column_name, data_type from information_schema.columns where table_catalog = 'build' "
        "and table_schema = 'main' and table_name = ? order by ordinal_position", [table])


def _renames(session: Session, table: str) -> dict[str, str]:
    """The keyword renames that apply to the build table's columns; refuse a keyword left unrenamed."""
    return keyword_renames(session, table, [c for c, _ in build_columns(session, table)])


def keyword_renames(session: Session, table: str, columns: list[str]) -> dict[str, str]:
    """The keyword renames that apply to `table`'s `columns` (wherever they live); refuse a keyword
    left unrenamed. `session` is any DuckDB session: it only answers which words are keywords."""
    renames = {old: new for old, new in KEYWORD_RENAMES.get(table, {}).items() if old in columns}
    keywords = [renames.get(c, c) for c in columns if is_sql_keyword(session, renames.get(c, c))]
    if keywords:
        raise PublishError(
            f"published table {table!r} would have SQL-keyword column(s) {', '.join(keywords)}; "
            "add them to publish.KEYWORD_RENAMES: nothing published"
        )
    return renames


def rename_clause(renames: dict[str, str]) -> str:
    return f" rename ({', '.join(f'{quote(o)} as {quote(n)}' for o, n in renames.items())})" if renames else ""


def _copy_table(session: Session, table: str) -> dict[str, str]:
    """Copy one table from the attached build database, renaming keyword columns; returns the renames."""
    renames = _renames(session, table)
    session.execute(f"create table main.{quote(table)} as select *{rename_clause(renames)} "
                    f"from build.main.{quote(table)}")
    return renames


# --- history tables as immutable Parquet parts ---------------------------------


def parts_folder(published: Path) -> Path:
    """Where the history tables' Parquet parts live: beside the published file, named after it."""
    return published.parent / (published.stem if published.suffix else f"{published.name}.parts")


@dataclass(frozen=True)
class _Part:
    table: str
    key: str | None
    file: str  # relative to parts_folder
    rows: int
    row_hash: str


@dataclass(frozen=True)
class _PartsWritten:
    parts: list[_Part]
    written: int
    kept: int
    rows_hashed: int
    rows_counted: int


# (table, partition key) -> (row_count, row_hash) of the previous published state's parts
Signatures = dict[tuple[str, str | None], tuple[int, str]]


def _is_tonight(key: str | None, run_id: str | None) -> bool:
    """Keys tonight's run writes: its own id and the runs it starts (`<run_id>-retrain`, ...)."""
    return run_id is not None and key is not None and (key == run_id or key.startswith(f"{run_id}-"))


def _key_counts(session: Session, table: str, key: str, previous: Signatures,
                run_id: str | None) -> tuple[list[tuple[str | None, int]], int]:
    """(key, rows) per key of a history table, nulls first, and how many rows were read to count them.

    Only the keys from the previous state's newest on are counted (a range
    DuckDB prunes by row-group min/max); the older ones keep the manifest's
    counts when the table's total agrees. Otherwise every key is counted.
    """
    source = f"build.main.{quote(table)}"
    published = {value: rows for (name, value), (rows, _) in previous.items() if name == table}
    newest = max((value for value in published if value is not None), default=None)
    if newest is not None and (run_id is None or run_id >= newest):
        recent = {value: int(rows) for value, rows in session.rows(
            f"select {quote(key)}::varchar, count(*) from {source} where {quote(key)} >= ? group by all", [newest])}
        nulls = int(session.scalar(f"select count(*) from {source} where {quote(key)} is null"))
        counts = {value: rows for value, rows in published.items() if value is not None and value < newest}
        counts.update(recent)
        if nulls:
            counts[None] = nulls
        total = int(session.scalar(f"select count(*) from {source}"))  # metadata, no column is read
        if sum(counts.values()) == total:
            ordered = sorted(counts.items(), key=lambda item: (item[0] is not None, item[0] or ""))
            return ordered, sum(recent.values()) + nulls
        log.info("%s: %s rows, the published counts and tonight's keys account for %s: counting every key",
                 table, f"{total:,d}", f"{sum(counts.values()):,d}")
    counts = [(value, int(rows)) for value, rows in session.rows(
        f"select {quote(key)}::varchar, count(*) from {source} group by all order by 1 nulls first")]
    return counts, sum(rows for _, rows in counts)


def _signatures(session: Session, table: str, key: str, previous: Signatures,
                run_id: str | None) -> tuple[list[tuple[str | None, int, str]], int, int]:
    """(key, rows, row_hash) per key, rows hashed and rows counted; only new, resized and tonight's keys are hashed.

    The hash reads whole rows, so it is confined to the keys that may have
    changed (see the module docstring); so is the count (`_key_counts`).
    """
    counts, counted = _key_counts(session, table, key, previous, run_id)
    known = {value: previous[(table, value)][1] for value, rows in counts
             if (table, value) in previous and previous[(table, value)][0] == int(rows)
             and not _is_tonight(value, run_id)}
    stale = [value for value, _ in counts if value not in known]
    hashed: dict[str | None, str] = {}
    if stale:
        keys = [v for v in stale if v is not None]
        where = " or ".join(([f"{quote(key)}::varchar in (select unnest(?::varchar[]))"] if keys else [])
                            + ([f"{quote(key)} is null"] if None in stale else []))
        hashed = dict(session.rows(
            f"select {quote(key)}::varchar, sum(hash(t)::hugeint)::varchar from build.main.{quote(table)} as t "
            f"where {where} group by all", [keys] if keys else []))
    rows_hashed = sum(int(rows) for value, rows in counts if value not in known)
    return [(value, int(rows), known[value] if value in known else str(hashed[value]))
            for value, rows in counts], rows_hashed, counted


def _part_name(table: str, key: str | None, rows: int, row_hash: str, schema: str) -> str:
    """<key>__<signature>.parquet: the same rows under the same columns always get the same name."""
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "null" if key is None else key)[:60]
    signature = hashlib.sha256(f"{table}|{key!r}|{rows}|{row_hash}|{schema}".encode()).hexdigest()[:16]
    return f"{table}/{safe}__{signature}.parquet"


def _write_parts(session: Session, table: str, renames: dict[str, str], folder: Path,
                 previous: Signatures, run_id: str | None) -> _PartsWritten:
    """Each key's rows of a history table as a Parquet part; parts whose name exists are kept as they are.

    Signatures come from the previous manifest where a key's count is
    unchanged (`_signatures`); only new or changed parts are written, to a temp
    name renamed in.
    """
    key = HISTORY_PARTITIONS[table]
    columns = build_columns(session, table)
    schema = ",".join(f"{renames.get(c, c)}:{t}" for c, t in columns)
    signatures, hashed_rows, counted_rows = _signatures(session, table, key, previous, run_id)
    (folder / table).mkdir(parents=True, exist_ok=True)
    parts, written = [], 0
    for value, rows, row_hash in signatures:
        name = _part_name(table, value, int(rows), str(row_hash), schema)
        target = folder / name
        if not target.exists():
            temp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
            where = f"{quote(key)} is null" if value is None else f"{quote(key)}::varchar = {quote_literal(value)}"
            session.execute(
                f"copy (select *{rename_clause(renames)} from build.main.{quote(table)} where {where}) "
                f"to {quote_literal(temp)} (format parquet, compression zstd)")
            fsync(temp)
            os.replace(temp, target)
            written += 1
        parts.append(_Part(table, value, name, int(rows), str(row_hash)))
    fsync(folder / table, directory=True)
    return _PartsWritten(parts, written, len(parts) - written, hashed_rows, counted_rows)


def _part_view(session: Session, table: str, renames: dict[str, str], parts: list[_Part], folder: Path) -> None:
    """The history table as a view over exactly this state's parts, typed as in the build database."""
    columns = ", ".join(f"cast({quote(renames.get(c, c))} as {t}) as {quote(renames.get(c, c))}"
                        for c, t in build_columns(session, table))
    files = ", ".join(quote_literal((folder / p.file).resolve()) for p in parts)
    session.execute(f"create view main.{quote(table)} as select {columns} "
                    f"from read_parquet([{files}], union_by_name = true)")


def referenced_parts(published: Path) -> set[str]:
    """Part files the published state at `published` reads (empty before the first partitioned publish)."""
    if not published.exists():
        return set()
    try:
        with connect(published, read_only=True) as session:
            if not session.exists(PUBLISHED_PARTS):
                return set()
            return {f for f, in session.rows(f"select part_file from {quote(PUBLISHED_PARTS.name)}")}
    except EngineError as exc:  # an unreadable old file references nothing we could keep for it
        log.warning("previous published state %s unreadable (%s): its parts are not kept", published, exc)
        return set()


def previous_signatures(published: Path) -> Signatures:
    """(table, key) -> (rows, row_hash) of the parts the published state reads; empty when unknown.

    A state published before the manifest kept row hashes (or an unreadable
    one) yields nothing, so that publish hashes every part once.
    """
    if not published.exists():
        return {}
    try:
        with connect(published, read_only=True) as session:
            if not session.exists(PUBLISHED_PARTS) or "row_hash" not in session.columns(PUBLISHED_PARTS.name):
                return {}
            rows = session.rows(f"select table_name, partition_key, row_count, row_hash "
                                f"from {quote(PUBLISHED_PARTS.name)} where row_hash is not null")
    except EngineError as exc:
        log.warning("previous published state %s unreadable (%s): every part is hashed", published, exc)
        return {}
    return {(table, key): (int(count), str(row_hash)) for table, key, count, row_hash in rows}


def remove_unreferenced_parts(published: Path, keep: set[str]) -> list[Path]:
    """Delete part files (and temps of dead publishes) that no state in `keep` reads; call under the lock."""
    folder = parts_folder(published)
    removed = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.glob("*/*")):
        if path.is_file() and path.relative_to(folder).as_posix() not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    for table_dir in folder.iterdir():
        if table_dir.is_dir() and not any(table_dir.iterdir()):
            table_dir.rmdir()
    if removed:
        log.info("removed %d part file(s) no published state reads", len(removed))
    return removed


def comment_on(session: Session, table: str, docs: Documentation, renames: dict[str, str]) -> None:
    """Table and column comments, so a BI tool's data dictionary says what each column means."""
    kind = "view" if table not in session.tables() else "table"
    session.execute(f"comment on {kind} {quote(table)} is {quote_literal(docs.table(table))}")
    old_name = {new: old for old, new in renames.items()}
    for column in session.columns(table):
        text = docs.column(table, old_name.get(column, column))
        session.execute(f"comment on column {quote(table)}.{quote(column)} is {quote_literal(text)}")


def legacy_views(session: Session, renamed: dict[str, dict[str, str]]) -> None:
    """Views under the old (keyword) column names, for one release, in schema LEGACY_SCHEMA."""
    if not any(renamed.values()):
        return
    session.execute(f"create schema {quote(LEGACY_SCHEMA)}")
    for table, renames in renamed.items():
        if renames:
            back = ", ".join(f"{quote(n)} as {quote(o)}" for o, n in renames.items())
            session.execute(f"create view {quote(LEGACY_SCHEMA)}.{quote(table)} as "
                            f"select * rename ({back}) from main.{quote(table)}")
            session.execute(f"comment on view {quote(LEGACY_SCHEMA)}.{quote(table)} is "
                            f"{quote_literal(f'main.{table} under its old column names; removed next release')}")


@dataclass(frozen=True)
class _Written:
    rows: dict[str, int]
    parts: list[_Part]
    parts_written: int
    parts_kept: int
    rows_hashed: int
    rows_counted: int


def _write_copy(config: ChurnConfig, target: Path, tables: list[str], run_id: str | None,
                previous: Signatures) -> _Written:
    """A complete, checkpointed DuckDB file holding the tables (history ones as views over parts), closed."""
    rows: dict[str, int] = {}
    docs = documentation(config)
    contract = current_contract(config)
    renamed: dict[str, dict[str, str]] = {}
    folder = parts_folder(config.warehouse.published_db)
    parts: list[_Part] = []
    written = kept = hashed = counted = 0
    with connect(target, settings=config.warehouse.engine) as session:
        # ATTACH takes no parameters: the path goes in as a quoted literal.
        session.execute(f"attach {quote_literal(config.warehouse.build_db)} as build (read_only)")
        mart_types = dict(session.rows(
            "select column_name, data_type from information_schema.columns where table_catalog = 'build' "
            "and table_schema = 'main' and table_name = ?", [contract.model]))
        # every table's names are judged before a single part is written
        renamed = {table: _renames(session, table) for table in tables}
        for table in tables:
            if table in HISTORY_PARTITIONS:
                done = _write_parts(session, table, renamed[table], folder, previous, run_id)
                written, kept, hashed = written + done.written, kept + done.kept, hashed + done.rows_hashed
                counted += done.rows_counted
                if done.parts:
                    _part_view(session, table, renamed[table], done.parts, folder)
                    parts += done.parts
                else:  # nothing to read a part from: an empty table keeps the columns
                    _copy_table(session, table)
                rows[table] = sum(p.rows for p in done.parts)
            else:
                _copy_table(session, table)
                rows[table] = session.row_count(table)
            pause_point(f"publish:{table}")
        session.execute("detach build")
        info = pd.DataFrame([{"run_id": run_id, "dataset": config.dataset.name,
                              "published_at": dt.datetime.now(), "published_tables": ",".join(tables)}])
        session.append(PUBLISH_INFO, info)
        session.append(FEATURE_DICTIONARY, feature_dictionary(contract, docs, mart_types))
        session.append(PUBLISHED_PARTS, pd.DataFrame(
            [{"table_name": p.table, "partition_key": p.key, "part_file": p.file, "row_count": p.rows,
              "row_hash": p.row_hash} for p in parts],
            columns=PUBLISHED_PARTS.column_names))
        for table in [*tables, PUBLISH_INFO.name, FEATURE_DICTIONARY.name, PUBLISHED_PARTS.name]:
            comment_on(session, table, docs, renamed.get(table, {}))
        legacy_views(session, renamed)
        session.execute("checkpoint")
    return _Written(rows, parts, written, kept, hashed, counted)


def replace_published_file(published: Path, write: Callable[[Path], T]) -> T:
    """`write` a complete file beside `published`, then swap it in with one rename; call under the lock.

    A crash before the rename leaves the old file untouched (and a temp file the next
    publish removes); readers get the old complete file or the new one.
    """
    temp = published.parent / f"{_temp_prefix(published)}{os.getpid()}"
    try:
        written = write(temp)
        fsync(temp)
        pause_point("publish:before_replace")
        # A WAL beside the published path would be replayed into the new file.
        Path(f"{published}.wal").unlink(missing_ok=True)
        os.replace(temp, published)
        fsync(published.parent, directory=True)
    except BaseException:
        temp.unlink(missing_ok=True)
        Path(f"{temp}.wal").unlink(missing_ok=True)
        raise
    return written


def publish(config: ChurnConfig, run_id: str | None = None) -> PublishResult:
    """Replace the published database with a copy of the build database's BI tables."""
    published = config.warehouse.published_db
    start = time.perf_counter()
    with timed(f"publish to {published}", log), publish_lock(published):
        remove_stale_temps(published)
        tables = tables_to_publish(config)
        previous = referenced_parts(published)
        signatures = previous_signatures(published)
        written = replace_published_file(
            published, lambda temp: _write_copy(config, temp, tables, run_id, signatures))
        # the previous state's parts stay one more publish, for readers still connected to it
        remove_unreferenced_parts(published, previous | {p.file for p in written.parts})
    rows = written.rows
    result = PublishResult(path=published, tables=rows, seconds=time.perf_counter() - start,
                           parts_written=written.parts_written, parts_kept=written.parts_kept,
                           rows_hashed=written.rows_hashed, rows_counted=written.rows_counted)
    log.info("published %d tables (%s) to %s", len(rows), ", ".join(f"{t}={n:,d}" for t, n in rows.items()), published)
    return result


def published_tables(config: ChurnConfig) -> dict[str, int]:
    """Rows per table of the published database, read the way BI reads it (read-only)."""
    if not config.warehouse.published_db.exists():
        raise WarehouseError(f"nothing published yet: {config.warehouse.published_db}")
    with connect(config.warehouse.published_db, read_only=True, settings=config.warehouse.engine) as session:
        return {t: session.row_count(t) for t in session.tables(base_tables_only=False)}


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    result = publish(config, run_id=args.run_id)
    print(f"published {result.path} in {result.seconds:.1f}s")
    for table, rows in result.tables.items():
        print(f"  {table:38s} {rows:>12,d} rows")
    return 0
