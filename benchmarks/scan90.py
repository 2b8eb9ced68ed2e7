"""The yardstick for one night's feature build: one DuckDB scan-and-aggregate of the last 90 days.

Run:  .venv/bin/python -m benchmarks.scan90 --config WORKDIR/churn.yml --as-of YYYY-MM-DD

An incremental night computes one new snapshot, and its 30/90-day windows must
read at least the last 90 days of every event table. This single query does
just that and nothing else: it reads the landing Parquet of the dataset's
event tables (a file or a folder of date partitions), keeps [as_of - 90, as_of),
aggregates per customer and joins the three, under the same DuckDB memory and
thread limits as the pipeline (churn.yml's warehouse section). The nightly's
build step is judged against it (issue 10: <= 3x).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from ml.config import ChurnConfig, load_config
from ml.warehouse import MEMORY, connect, partition_folders, quote_literal

WINDOW_DAYS = 90


def parquet_source(landing: Path, table: str) -> str:
    """read_parquet over the table's one file or its partition folder (the date is in the files)."""
    if table in partition_folders(landing, "parquet"):
        return f"read_parquet({quote_literal(landing / table / '**' / '*.parquet')}, hive_partitioning = false)"
    return f"read_parquet({quote_literal(landing / f'{table}.parquet')})"


def scan_sql(landing: Path) -> str:
    """Per customer: 90-day usage, payment and ticket aggregates (parameters: window start, as_of, x3)."""
    return f"""
        create temp table scan_90d as
        with usage as (
            select customer_id, count(*) as active_days, sum(sessions) as sessions, sum(minutes) as minutes,
                max(event_date) as last_usage_date
            from {parquet_source(landing, 'usage_events')}
            where event_date >= ?::date and event_date < ?::date
            group by customer_id
        ),
        payments as (
            select customer_id, count(*) as invoices, count(*) filter (where lower(trim(status)) = 'failed')
                as failed_payments, sum(amount) as amount
            from {parquet_source(landing, 'payments')}
            where invoice_date >= ?::date and invoice_date < ?::date
            group by customer_id
        ),
        tickets as (
            select customer_id, count(*) as tickets, avg(satisfaction_score) as mean_satisfaction
            from {parquet_source(landing, 'support_tickets')}
            where opened_at >= ?::date and opened_at < ?::date
            group by customer_id
        )
        select * from usage
        full outer join payments using (customer_id)
        full outer join tickets using (customer_id)
    """


def scan(config: ChurnConfig, as_of: dt.date) -> dict[str, object]:
    landing = config.dataset.landing_dir
    window = [as_of - dt.timedelta(days=WINDOW_DAYS), as_of] * 3
    start = time.perf_counter()
    with connect(MEMORY, settings=config.warehouse.engine) as session:
        session.execute(scan_sql(landing), window)
        customers = int(session.scalar("select count(*) from scan_90d"))
    return {"customers": customers, "window_days": WINDOW_DAYS, "as_of": as_of.isoformat(),
            "seconds_in_process": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scan90", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the (relocated) churn.yml")
    parser.add_argument("--as-of", type=dt.date.fromisoformat, required=True, help="the night's as_of date")
    args = parser.parse_args(argv)
    print(json.dumps(scan(load_config(args.config), args.as_of)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
