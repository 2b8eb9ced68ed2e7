"""`churn build`: the dbt build of the selected dataset's feature mart.

Landing files are checked before dbt runs so that a missing table is reported
by file name, not as a DuckDB error deep inside a compiled view.
"""

from __future__ import annotations

import argparse

from ml.config import ChurnConfig
from ml.features.dbt import DbtResult, run_dbt
from ml.features.sql_check import check_mart_sql
from ml.logs import get_logger
from ml.warehouse import connect

log = get_logger("build")


def build_warehouse(config: ChurnConfig, as_of: str | None = None, *, full_refresh: bool = False) -> DbtResult:
    """dbt build (models + tests) of the dataset's mart and everything upstream.

    The as_of is always explicit (the dataset's clock when not given), so the
    snapshot date never follows the newest event in the data. The mart's
    contract is first checked against its compiled SQL (`ml.features.sql_check`),
    so a YAML feature the SQL lacks fails here, naming the model and columns.
    `full_refresh` rebuilds incremental models from scratch: the nightly asks
    for it when a landing partition already built on was rewritten or removed.
    """
    as_of = as_of or config.decided_as_of().isoformat()
    check_mart_sql(config, as_of)
    extra = ("--full-refresh",) if full_refresh else ()
    return run_dbt(config, "build", *extra, as_of=as_of)


def mart_row_counts(config: ChurnConfig) -> dict[str, int]:
    """Rows per model of the last build, read back from the build database."""
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        return {table: session.row_count(table) for table in session.tables()}


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    build_warehouse(config, as_of=args.as_of)
    for table, rows in mart_row_counts(config).items():
        print(f"{table:40s} {rows:>12,d} rows")
    return 0
