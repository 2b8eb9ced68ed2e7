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

import pandas as pd

from ml.config import ChurnConfig
from ml.logs import get_logger, timed
from ml.warehouse import Session, WarehouseError, connect, declare, fsync, quote, quote_literal

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
    "prediction_log",
)
PUBLISH_INFO = declare(
    name="publish_info",
    owner=__name__,
    grain="one row: the publish that wrote this published database",
    description="Which nightly run and dataset the published database comes from, when, and which tables it holds.",
    columns=[("run_id", "VARCHAR"), ("dataset", "VARCHAR"), ("published_at", "TIMESTAMP"), ("tables", "VARCHAR")],
)
INFO_TABLE = PUBLISH_INFO.name
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
    row = session.one(f"select run_id, dataset, published_at, tables from {quote(PUBLISH_INFO.name)} limit 1")
    if row is None:
        return None
    run_id, dataset, published_at, tables = row
    return PublishInfo(run_id, dataset, published_at, tuple(t for t in (tables or "").split(",") if t))


def _write_copy(config: ChurnConfig, target: Path, tables: list[str], run_id: str | None) -> dict[str, int]:
    """A complete, checkpointed DuckDB file holding the tables, closed before returning."""
    rows: dict[str, int] = {}
    with connect(target, settings=config.warehouse.engine) as session:
        # ATTACH takes no parameters: the path goes in as a quoted literal.
        session.execute(f"attach {quote_literal(config.warehouse.build_db)} as build (read_only)")
        for table in tables:
            session.execute(f"create table main.{quote(table)} as select * from build.main.{quote(table)}")
            rows[table] = session.row_count(table)
            pause_point(f"publish:{table}")
        session.execute("detach build")
        info = pd.DataFrame([{"run_id": run_id, "dataset": config.dataset.name,
                              "published_at": dt.datetime.now(), "tables": ",".join(tables)}])
        session.append(PUBLISH_INFO, info)
        session.execute("checkpoint")
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
    result = PublishResult(path=published, tables=rows, seconds=time.perf_counter() - start)
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
