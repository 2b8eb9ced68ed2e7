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
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from ml.config import ChurnConfig
from ml.logs import get_logger, timed
from ml.warehouse import WarehouseError, connect, table_exists

log = get_logger("publish")

# Tables BI reads, in the order they are copied. churn_scores is required: a
# published warehouse without scores would be a broken dashboard.
REQUIRED_TABLES = ("churn_scores",)
PUBLISHED_TABLES = (
    "churn_scores",
    "churn_scores_history",
    "model_metrics",
    "model_registry",
    "feature_importance",
    "threshold_curve",
    "data_quality_results",
    "pipeline_runs",
    "drift_stats",
    "model_performance",
    "retrain_decisions",
)
INFO_TABLE = "publish_info"
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


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tables_to_publish(config: ChurnConfig) -> list[str]:
    """The BI tables present in the build database; fail when a required one is missing."""
    with connect(config.warehouse.build_db, read_only=True) as con:
        present = [t for t in PUBLISHED_TABLES if table_exists(con, t)]
    missing = [t for t in REQUIRED_TABLES if t not in present]
    if missing:
        raise PublishError(
            f"build database {config.warehouse.build_db} lacks {', '.join(missing)}: nothing published "
            "(run `churn score` first)"
        )
    return present


def _write_copy(config: ChurnConfig, target: Path, tables: list[str], run_id: str | None) -> dict[str, int]:
    """A complete, checkpointed DuckDB file holding the tables, closed before returning."""
    build = str(config.warehouse.build_db).replace("'", "''")
    rows: dict[str, int] = {}
    con = duckdb.connect(str(target))
    try:
        con.execute(f"attach '{build}' as build (read_only)")
        for table in tables:
            con.execute(f'create table main."{table}" as select * from build.main."{table}"')
            rows[table] = con.execute(f'select count(*) from main."{table}"').fetchall()[0][0]
            pause_point(f"publish:{table}")
        con.execute("detach build")
        con.execute(
            f'create table main."{INFO_TABLE}" as select ?::varchar as run_id, ?::varchar as dataset, '
            "?::timestamp as published_at, ?::varchar as tables",
            [run_id, config.dataset.name, dt.datetime.now(), ",".join(tables)],
        )
        con.execute("checkpoint")
    finally:
        con.close()
    return rows


def publish(config: ChurnConfig, run_id: str | None = None) -> PublishResult:
    """Replace the published database with a copy of the build database's BI tables."""
    published = config.warehouse.published_db
    start = time.perf_counter()
    with timed(f"publish to {published}", log), publish_lock(published):
        remove_stale_temps(published)
        tables = tables_to_publish(config)
        temp = published.parent / f"{_temp_prefix(published)}{os.getpid()}"
        try:
            rows = _write_copy(config, temp, tables, run_id)
            _fsync(temp)
            pause_point("publish:before_replace")
            # A WAL beside the published path would be replayed into the new file.
            Path(f"{published}.wal").unlink(missing_ok=True)
            os.replace(temp, published)
            _fsync(published.parent, directory=True)
        except BaseException:
            temp.unlink(missing_ok=True)
            Path(f"{temp}.wal").unlink(missing_ok=True)
            raise
    result = PublishResult(path=published, tables=rows, seconds=time.perf_counter() - start)
    log.info("published %d tables (%s) to %s", len(rows), ", ".join(f"{t}={n:,d}" for t, n in rows.items()), published)
    return result


def published_tables(config: ChurnConfig) -> dict[str, int]:
    """Rows per table of the published database, read the way BI reads it (read-only)."""
    if not config.warehouse.published_db.exists():
        raise WarehouseError(f"nothing published yet: {config.warehouse.published_db}")
    with connect(config.warehouse.published_db, read_only=True) as con:
        names = [r[0] for r in con.execute(
            "select table_name from information_schema.tables where table_schema = 'main' order by table_name"
        ).fetchall()]
        return {t: con.execute(f'select count(*) from "{t}"').fetchall()[0][0] for t in names}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", help="the nightly run the published state comes from (recorded in publish_info)")


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    result = publish(config, run_id=args.run_id)
    print(f"published {result.path} in {result.seconds:.1f}s")
    for table, rows in result.tables.items():
        print(f"  {table:38s} {rows:>12,d} rows")
    return 0
