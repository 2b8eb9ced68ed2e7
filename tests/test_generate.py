"""The demo generator: the landing contract, a believable churn process, and an honest oracle.

Small sizes (2,000 customers, 12 months) keep each generation under a second;
the million-customer run lives in benchmarks/.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from ml.cli import main as cli_main
from ml.config import ChurnConfig
from ml.data.generate import (
    ORACLE_FILE,
    PROCESS,
    TABLE_SCHEMAS,
    GenerateError,
    GenerateOptions,
    generate,
)
from tests.conftest import REPO_ROOT, make_config

SOURCES_YAML = REPO_ROOT / "dbt_project" / "models" / "staging" / "saas" / "_saas__sources.yml"
START = dt.date(2024, 1, 1)
MONTHS = 12
DRIFT_FROM = dt.date(2024, 7, 1)


def _options(config: ChurnConfig, root: Path, **changes: object) -> GenerateOptions:
    values: dict[str, object] = {
        "customers": 2000,
        "start_date": START,
        "months": MONTHS,
        "seed": 11,
        "out_dir": root / "landing",
        "oracle_dir": root / "oracle",
        "drift_from": None,
    }
    values.update(changes)
    return GenerateOptions.from_config(config, **values)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    return make_config(tmp_path_factory.mktemp("gen-config"))


@pytest.fixture(scope="module")
def landing(config: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> GenerateOptions:
    options = _options(config, tmp_path_factory.mktemp("gen"))
    generate(options)
    return options


@pytest.fixture(scope="module")
def drifted(config: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> GenerateOptions:
    options = _options(config, tmp_path_factory.mktemp("gen-drift"), drift_from=DRIFT_FROM)
    generate(options)
    return options


def _duck(options: GenerateOptions) -> duckdb.DuckDBPyConnection:
    """Views over the raw files plus cleaned helpers the checks below share."""
    con = duckdb.connect()
    for table in TABLE_SCHEMAS:
        con.execute(
            f"create view {table} as select * from read_parquet('{options.out_dir / table}.parquet')"
        )
    con.execute(f"create view oracle as select * from read_parquet('{options.oracle_dir / ORACLE_FILE}')")
    con.execute(
        """
        create view lifetimes as
        select
            c.customer_id,
            any_value(c.signup_date) as signup_date,
            max(s.cancellation_date) as cancellation_date,
            any_value(lower(trim(s.contract_type))) as contract_type,
        from customers as c
        join subscriptions as s using (customer_id)
        group by 1
        """
    )
    con.execute(
        """
        create view labelled as
        select o.*, coalesce(l.cancellation_date > o.as_of_date
                             and l.cancellation_date <= o.as_of_date + 30, false)::int as churned
        from oracle as o
        join lifetimes as l using (customer_id)
        where o.as_of_date < (select max(as_of_date) from oracle)
        """
    )
    return con


def _files(options: GenerateOptions) -> dict[str, bytes]:
    paths = [*(options.out_dir / f"{t}.parquet" for t in TABLE_SCHEMAS), options.oracle_dir / ORACLE_FILE]
    return {p.name: p.read_bytes() for p in paths}


# --------------------------------------------------------------------------- contract


def test_tables_have_exactly_the_columns_of_the_sources_yaml(landing: GenerateOptions) -> None:
    declared = {
        t["name"]: [c["name"] for c in t["columns"]]
        for t in yaml.safe_load(SOURCES_YAML.read_text())["sources"][0]["tables"]
    }
    written = {p.stem: pq.read_schema(p).names for p in sorted(landing.out_dir.glob("*.parquet"))}
    assert written == declared


def test_column_types_are_the_declared_duckdb_types(landing: GenerateOptions) -> None:
    con = _duck(landing)
    types = {
        (table, name): dtype
        for table in TABLE_SCHEMAS
        for name, dtype, *_ in con.execute(f"describe {table}").fetchall()
    }
    assert types[("customers", "signup_date")] == "DATE"
    assert types[("subscriptions", "monthly_price")] == "DOUBLE"
    assert types[("subscriptions", "end_date")] == "DATE"
    assert types[("payments", "amount")] == "DOUBLE"
    assert types[("support_tickets", "opened_at")] == "TIMESTAMP"
    assert types[("support_tickets", "satisfaction_score")] == "INTEGER"
    assert types[("usage_events", "sessions")] == "INTEGER"
    assert types[("usage_events", "minutes")] == "DOUBLE"
    assert con.execute("select min(customer_id), max(length(customer_id)) from customers").fetchone() == ("C0000001", 8)


def test_keys_amounts_and_dates_are_sane(landing: GenerateOptions) -> None:
    con = _duck(landing)
    end = dt.date(2024 + MONTHS // 12, 1, 1)
    checks = {
        "null keys": """select (select count(*) from customers where customer_id is null)
                             + (select count(*) from subscriptions where subscription_id is null or customer_id is null)
                             + (select count(*) from payments where payment_id is null or customer_id is null)
                             + (select count(*) from support_tickets where ticket_id is null or customer_id is null)
                             + (select count(*) from usage_events where customer_id is null or event_date is null)""",
        "negative amounts": "select count(*) from payments where amount < 0 or amount is null",
        "bad usage": "select count(*) from usage_events where sessions < 1 or minutes < 0",
        "usage outside window": ("select count(*) from usage_events "
                                 f"where event_date < '{START}' or event_date >= '{end}'"),
        "invoices outside window": ("select count(*) from payments "
                                    f"where invoice_date < '{START}' or invoice_date >= '{end}'"),
        "tickets outside window": f"""select count(*) from support_tickets
                                      where opened_at < '{START}' or opened_at >= '{end}'
                                         or closed_at >= '{end}' or closed_at < opened_at""",
        "cancellations outside window": f"""select count(*) from subscriptions
                                            where cancellation_date < '{START}' or cancellation_date >= '{end}'""",
        "bad scores": "select count(*) from support_tickets where satisfaction_score not between 1 and 5",
        "events of unknown customers": "select count(*) from usage_events anti join customers using (customer_id)",
        "events after cancellation": """select count(*) from usage_events u join lifetimes l using (customer_id)
                                        where u.event_date >= l.cancellation_date or u.event_date < l.signup_date""",
    }
    found = {name: con.execute(sql).fetchone()[0] for name, sql in checks.items()}
    assert found == dict.fromkeys(checks, 0)


def test_subscription_periods_chain_without_gaps(landing: GenerateOptions) -> None:
    con = _duck(landing)
    broken = con.execute(
        """
        with ordered as (
            select *,
                lead(start_date) over (partition by customer_id order by start_date) as next_start,
                row_number() over (partition by customer_id order by start_date desc) as from_last,
            from subscriptions
        )
        select
            count(*) filter (where from_last > 1 and (end_date is null or end_date <> next_start)),
            count(*) filter (where from_last > 1 and cancellation_date is not null),
            count(*) filter (where cancellation_date is not null and
                             (end_date <> cancellation_date or cancellation_reason is null)),
            count(*) filter (where end_date <= start_date),
        from ordered
        """
    ).fetchone()
    assert broken == (0, 0, 0, 0)
    # Plan and price changes do happen (a new period the same day).
    assert con.execute("select count(*) - count(distinct customer_id) from subscriptions").fetchone()[0] > 100


def test_dirt_is_present_but_bounded(landing: GenerateOptions) -> None:
    con = _duck(landing)
    for table in ("customers", "payments", "usage_events"):
        total, distinct = con.execute(
            f"select count(*), (select count(*) from (select distinct * from {table})) from {table}"
        ).fetchone()
        assert 0.001 < (total - distinct) / total < 0.02, table
    for table, column in [
        ("customers", "region"),
        ("customers", "acquisition_channel"),
        ("subscriptions", "plan"),
        ("subscriptions", "contract_type"),
        ("payments", "status"),
        ("support_tickets", "category"),
    ]:
        raw, clean = con.execute(
            f"select count(distinct {column}), count(distinct lower(trim({column}))) from {table}"
        ).fetchone()
        assert raw > clean, f"{table}.{column} has no mixed-case or padded values"
    null_age = con.execute("select avg((age_band is null)::int) from customers").fetchone()[0]
    null_score = con.execute("select avg((satisfaction_score is null)::int) from support_tickets").fetchone()[0]
    assert 0.005 < null_age < 0.1
    assert 0.2 < null_score < 0.6


# --------------------------------------------------------------------------- determinism and safety


def test_same_seed_gives_identical_files_and_another_seed_does_not(
    config: ChurnConfig, landing: GenerateOptions, tmp_path: Path
) -> None:
    again = _options(config, tmp_path / "again")
    generate(again)
    assert _files(again) == _files(landing)
    other = _options(config, tmp_path / "other", seed=12)
    generate(other)
    assert all(_files(other)[name] != data for name, data in _files(landing).items())


def test_refuses_a_non_empty_landing_folder_unless_overwriting(config: ChurnConfig, tmp_path: Path) -> None:
    options = _options(config, tmp_path, customers=300, months=3)
    options.out_dir.mkdir(parents=True)
    (options.out_dir / "customers.parquet").write_text("precious")
    with pytest.raises(GenerateError, match=r"not empty.*customers\.parquet.*--overwrite"):
        generate(options)
    assert (options.out_dir / "customers.parquet").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landing"]  # no scratch left behind

    summary = generate(dataclasses.replace(options, overwrite=True))
    assert pq.read_metadata(options.out_dir / "customers.parquet").num_rows == summary.rows["customers"]
    assert sorted(p.name for p in options.out_dir.iterdir()) == sorted(f"{t}.parquet" for t in TABLE_SCHEMAS)


def test_cli_defaults_come_from_churn_yml_and_options_override(tmp_path: Path) -> None:
    config = make_config(tmp_path / "wh", {"generator": {"customers": 250, "months": 2, "start_date": "2024-03-01",
                                                         "seed": 5, "drift_from": None}})
    args = ["--config", str(config.source_file), "generate"]
    assert cli_main(args) == 0
    landing = config.datasets["demo"].landing_dir
    con = duckdb.connect()
    first, last = con.execute(
        f"select min(event_date), max(event_date) from read_parquet('{landing}/usage_events.parquet')"
    ).fetchone()
    assert (first, last) == (dt.date(2024, 3, 1), dt.date(2024, 4, 30))
    assert (config.generator.oracle_dir / ORACLE_FILE).is_file()

    assert cli_main(args) == 1  # landing now holds files
    out = tmp_path / "elsewhere"
    assert cli_main([*args, "--customers", "120", "--months", "1", "--out", str(out),
                     "--oracle-out", str(tmp_path / "o2")]) == 0
    assert con.execute(
        f"select count(distinct customer_id) from read_parquet('{out}/customers.parquet')"
    ).fetchone()[0] == 120
    assert cli_main([*args, "--overwrite", "--months", "1"]) == 0


def test_rejects_a_start_date_that_is_not_a_month_start(config: ChurnConfig, tmp_path: Path) -> None:
    with pytest.raises(GenerateError, match="first of a month"):
        generate(_options(config, tmp_path, start_date=dt.date(2024, 1, 15)))
    with pytest.raises(GenerateError, match="drift_from"):
        generate(_options(config, tmp_path, drift_from=dt.date(2030, 1, 1)))


# --------------------------------------------------------------------------- the churn process and its oracle


def test_monthly_churn_rate_is_two_to_four_percent(landing: GenerateOptions) -> None:
    rates = _duck(landing).execute(
        "select as_of_date, avg(churned) from labelled group by 1 order by 1"
    ).fetchall()
    assert len(rates) == MONTHS
    overall = sum(r for _, r in rates) / len(rates)
    assert 0.02 <= overall <= 0.04
    assert all(0.01 <= r <= 0.06 for _, r in rates), rates


def test_active_base_stays_about_flat(landing: GenerateOptions) -> None:
    counts = [n for _, n in _duck(landing).execute(
        "select as_of_date, count(*) from oracle group by 1 order by 1").fetchall()]
    assert max(counts) / min(counts) < 1.1


def test_oracle_lists_exactly_the_active_customers_at_each_month_start(landing: GenerateOptions) -> None:
    con = _duck(landing)
    dates = [d for (d,) in con.execute("select distinct as_of_date from oracle order by 1").fetchall()]
    expected = [dt.date(2024 + m // 12, m % 12 + 1, 1) for m in range(MONTHS + 1)]
    assert dates == expected
    mismatched = con.execute(
        """
        with active as (
            select g.as_of_date, l.customer_id
            from (select distinct as_of_date from oracle) as g
            join lifetimes as l
              on l.signup_date < g.as_of_date
             and (l.cancellation_date is null or l.cancellation_date > g.as_of_date)
        )
        select count(*) from (
            (select as_of_date, customer_id from active except select as_of_date, customer_id from oracle)
            union all
            (select as_of_date, customer_id from oracle except select as_of_date, customer_id from active)
        )
        """
    ).fetchone()[0]
    assert mismatched == 0
    assert con.execute("select count(*) - count(distinct (customer_id, as_of_date)) from oracle").fetchone()[0] == 0


def test_oracle_probability_is_calibrated_and_ranks_churners(landing: GenerateOptions) -> None:
    frame = _duck(landing).execute("select churn_probability, churned from labelled").df()
    assert frame["churn_probability"].between(0, 1).all()
    assert frame["churn_probability"].mean() == pytest.approx(frame["churned"].mean(), abs=0.005)
    assert roc_auc_score(frame["churned"], frame["churn_probability"]) > 0.7


def test_month_to_month_customers_churn_most(landing: GenerateOptions) -> None:
    rates = dict(_duck(landing).execute(
        "select contract_type, avg(churned) from labelled join lifetimes using (customer_id) group by 1"
    ).fetchall())
    assert rates["month-to-month"] > 2 * rates["one-year"]
    assert rates["one-year"] > rates["two-year"]


# --------------------------------------------------------------------------- drift


def test_drift_raises_price_and_cuts_usage_for_the_segment_only(
    landing: GenerateOptions, drifted: GenerateOptions
) -> None:
    con = _duck(drifted)
    segment = PROCESS.drift_contract
    rises = dict(con.execute(
        f"""
        with periods as (
            select lower(trim(contract_type)) as contract_type, start_date, monthly_price,
                lag(monthly_price) over (partition by customer_id order by start_date) as previous_price
            from subscriptions
        )
        select contract_type = '{segment}', count(*)
        from periods
        where start_date = '{DRIFT_FROM}' and monthly_price >= 1.2 * previous_price
        group by 1
        """
    ).fetchall())
    active_segment = con.execute(
        f"select count(*) from oracle join lifetimes using (customer_id) "
        f"where as_of_date = '{DRIFT_FROM}' and contract_type = '{segment}'"
    ).fetchone()[0]
    assert rises.get(True, 0) >= 0.9 * active_segment
    assert rises.get(False, 0) == 0

    usage = dict(con.execute(
        f"""
        select l.contract_type = '{segment}',
            sum(minutes) filter (where event_date >= '{DRIFT_FROM}' and event_date < '{DRIFT_FROM}'::date + 60)
          / sum(minutes) filter (where event_date < '{DRIFT_FROM}' and event_date >= '{DRIFT_FROM}'::date - 60)
        from usage_events join lifetimes as l using (customer_id)
        group by 1
        """
    ).fetchall())
    assert 0.5 < usage[True] < 0.75  # about a third less use
    assert 0.85 < usage[False] < 1.15

    # Nothing before the drift date differs from the undrifted run with the same seed.
    base = _duck(landing)
    before = f"select * from usage_events where event_date < '{DRIFT_FROM}' order by all"
    assert con.execute(before).fetchall() == base.execute(before).fetchall()

    # The segment's hazard rises through the same mechanism (price rise, falling use).
    lift = dict(con.execute(
        f"""
        select l.contract_type = '{segment}',
            avg(churn_probability) filter (where as_of_date > '{DRIFT_FROM}')
          / avg(churn_probability) filter (where as_of_date < '{DRIFT_FROM}')
        from oracle join lifetimes as l using (customer_id)
        group by 1
        """
    ).fetchall())
    assert lift[True] > 1.3
    assert 0.8 < lift[False] < 1.2
