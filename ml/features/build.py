"""`churn build`: the dbt build of the selected dataset's feature mart.

Landing files are checked before dbt runs so that a missing table is reported
by file name, not as a DuckDB error deep inside a compiled view. The snapshot
models are incremental; ml.features.incremental decides what a night must
rebuild from scratch (`--full-refresh`, an earlier as_of, a changed definition).
"""

from __future__ import annotations

import argparse
import datetime as dt

from ml.config import ChurnConfig
from ml.features.contract import load_contract
from ml.features.dbt import DbtResult, dbt_vars, run_dbt
from ml.features.incremental import definition_checksums, mark_started, plan_build, record_build, tests_since
from ml.features.night import MartBefore, mart_before_build, record_mart_build
from ml.features.sql_check import check_mart_sql
from ml.logs import get_logger
from ml.warehouse import connect

log = get_logger("build")


def build_warehouse(config: ChurnConfig, as_of: str | None = None, *, full_refresh: bool = False) -> DbtResult:
    """dbt build (models + tests) of the dataset's mart and everything upstream.

    The as_of is always explicit (the dataset's clock when not given), so the
    snapshot date never follows the newest event in the data. `full_refresh`
    rebuilds every incremental model from scratch (the pipeline passes it when
    the landing history itself changed); otherwise a night builds only its new
    snapshots unless the stored state says it must not (see
    ml.features.incremental). The mart's contract is first checked against
    its compiled SQL (`ml.features.sql_check`), so a YAML feature the SQL
    lacks fails here, naming the model and columns.
    """
    as_of = as_of or config.decided_as_of().isoformat()
    if config.engine == "spark":
        return build_on_spark(config, as_of)
    # the check's compile parsed tonight's definitions (same project and vars): they are compared with
    # those the stored rows were built by, without a `dbt parse` of their own (a full parse per night)
    check = check_mart_sql(config, as_of)
    night = dt.date.fromisoformat(as_of)
    checksums = definition_checksums(check.manifest_path, dbt_vars(config))
    plan = plan_build(config, night, checksums, requested=full_refresh)
    extra: list[str] = []
    if plan.full_refresh:
        if plan.reason != "--full-refresh":
            log.warning("FULL REFRESH of the incremental models: %s", plan.reason)
        extra.append("--full-refresh")
    elif plan.refresh_models:
        log.warning("FULL REFRESH of %s: %s; their stored snapshots are rebuilt from all history",
                    ", ".join(plan.refresh_models), plan.reason)
    else:
        log.info("incremental build as of %s (%s)", as_of, plan.reason)
    # read before dbt runs: the stored high-water marks tell tonight's rows from the stored ones
    since = tests_since(config, check.manifest_path, plan)
    if since:
        log.info("row-wise dbt tests read tonight's rows of %d incremental model(s); table-level tests the whole",
                 len(since))
    # which mart rows tonight changes, for the audits and the profile (ml.features.night); a mart
    # rebuilt whole needs nothing of what it held
    contract = load_contract(check.manifest_path, config.dataset.feature_mart)
    rebuilt = (plan.full_refresh or config.dataset.feature_mart in plan.refresh_models
               or config.dataset.feature_mart not in checksums)
    before = MartBefore(False, None, ()) if rebuilt else mart_before_build(config, contract)
    mark_started(config, night)
    # recorded as a full rebuild until it succeeds: after a killed or failed build, what changed is
    # unknown, so the next audit and profile read the whole mart
    started = record_mart_build(config, night, before, full_refresh=True, contract=contract, finished=False)
    result = run_dbt(config, "build", *extra, as_of=as_of,
                     night={"full_refresh_models": list(plan.refresh_models), "tests_since": since})
    record_mart_build(config, night, before, full_refresh=rebuilt, replacing=started, contract=contract)
    if checksums:
        record_build(config, night, checksums)
    return result


def build_on_spark(config: ChurnConfig, as_of: str) -> DbtResult:
    """dbt build (models + tests) on Spark, every model in full.

    Plain Parquet tables cannot delete or update rows, so on Spark the
    incremental models are rebuilt whole (README, Scaling out); the build is
    recorded as a full one, so the audits and the profile read the whole mart.
    The contract is checked against the compiled SQL first, as on DuckDB.
    """
    check = check_mart_sql(config, as_of)
    contract = load_contract(check.manifest_path, config.dataset.feature_mart)
    record_mart_build(config, dt.date.fromisoformat(as_of), MartBefore(False, None, ()), full_refresh=True,
                      contract=contract, finished=False)
    return run_dbt(config, "build", as_of=as_of, target="spark")


def mart_row_counts(config: ChurnConfig) -> dict[str, int]:
    """Rows per model of the last build, read back from the build database."""
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        return {table: session.row_count(table) for table in session.tables()}


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    build_warehouse(config, as_of=args.as_of, full_refresh=args.full_refresh)
    for table, rows in mart_row_counts(config).items():
        print(f"{table:40s} {rows:>12,d} rows")
    return 0
