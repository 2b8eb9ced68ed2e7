"""A night is checked on what it brought: incremental landing of every event table, night-only tests.

Payments and tickets land as daily partitions like usage and are staged
incrementally; a re-exported subscriptions file that only adds later facts
keeps the build incremental while a changed past row does not; the landing
checks read only tonight's partitions but still catch a key re-landed with
other values; and row-wise dbt tests read only tonight's rows unless the build
is a full refresh. Each case plants its fault.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import pytest

from ml.config import ChurnConfig
from ml.data.generate import PARTITIONED_TABLES, GenerateOptions, append_days, generate
from ml.data.landing import LandingValidationError, landing_changes, landing_tables, record_partitions, validate_landing
from ml.features.build import build_warehouse
from ml.features.dbt import DbtError, dbt_target_path
from ml.quality.audit import AuditError, audit
from ml.warehouse import connect

from .conftest import make_config, rewrite

TINY = {"generator": {"customers": 250, "months": 6, "start_date": "2024-01-01", "seed": 3, "partitioned": True}}
BUILT_ON = dt.date(2024, 5, 1)  # the night the recorded manifest was built on


@pytest.fixture
def tiny(tmp_path: Path) -> ChurnConfig:
    """A few hundred customers whose usage, payments and tickets landed as daily partitions (no build)."""
    config = make_config(tmp_path / "tiny", TINY)
    generate(GenerateOptions.from_config(config))
    return config


def table(config: ChurnConfig, name: str):
    return next(t for t in landing_tables(config) if t.name == name)


def replace_file(path: Path, select: str) -> None:
    """Rewrite one landing file by `select` over its rows (`t`), as an upstream extract would."""
    with duckdb.connect() as con:
        con.execute(f"create view t as select * from read_parquet('{path}')")
        con.execute(f"copy ({select}) to '{path}.new' (format parquet)")
    Path(f"{path}.new").replace(path)


def record(config: ChurnConfig, as_of: dt.date = BUILT_ON) -> None:
    """What a successful night leaves: the manifest, and the settled rows as of its night."""
    with connect(config.warehouse.build_db) as session:
        record_partitions(config, session, landing_changes(config, session), "earlier-run", as_of)


def changes_now(config: ChurnConfig):
    with connect(config.warehouse.build_db) as session:
        return landing_changes(config, session)


# --- landing --------------------------------------------------------------------


def test_payments_and_tickets_land_partitioned_and_a_day_lands_in_each(tiny: ChurnConfig) -> None:
    for name in ("usage_events", "payments", "support_tickets"):
        assert table(tiny, name).partitioned and not (tiny.dataset.landing_dir / f"{name}.parquet").exists()
    record(tiny)
    landed = append_days(tiny.dataset.landing_dir)
    added = [a for a in landed if a.table in PARTITIONED_TABLES]
    assert {a.table for a in added} >= {"usage_events", "payments"} and len({a.day for a in landed}) == 1
    changes = changes_now(tiny)
    assert sorted((p.table, p.path) for p in changes.new) == sorted(
        (a.table, a.path.relative_to(tiny.dataset.landing_dir / a.table).as_posix()) for a in added)
    # the single files are re-exported with the day's sign-ups and plan changes: only later facts
    assert {a.table for a in landed} - set(PARTITIONED_TABLES) == {"customers", "subscriptions"}
    assert {p.path for p in changes.appended} == {"customers.parquet", "subscriptions.parquet"}
    assert not changes.changed and not changes.history_changed
    read = validate_landing(tiny, changes)
    assert read["payments"] == next(a.rows for a in added if a.table == "payments")


def test_a_reexported_subscriptions_file_with_only_later_facts_stays_incremental(tiny: ChurnConfig) -> None:
    record(tiny)
    # tonight's export: a period started after the last build, and a cancellation dated after it
    # recorded on a period that was running then (its reason filled in with it)
    rewrite(tiny, "subscriptions",
            "select * from t union all (select 'S_NEW', customer_id, plan, contract_type, monthly_price, "
            f"date '{BUILT_ON}' + 3, null, null, null from t where start_date < date '{BUILT_ON}' limit 1)")
    rewrite(tiny, "subscriptions",
            "select * replace ("
            f"case when subscription_id = (select min(subscription_id) from t where end_date is null "
            f"and start_date < date '{BUILT_ON}') then date '{BUILT_ON}' + 5 else end_date end as end_date, "
            f"case when subscription_id = (select min(subscription_id) from t where end_date is null "
            f"and start_date < date '{BUILT_ON}') then date '{BUILT_ON}' + 5 else cancellation_date end "
            "as cancellation_date, "
            f"case when subscription_id = (select min(subscription_id) from t where end_date is null "
            f"and start_date < date '{BUILT_ON}') then 'price' else cancellation_reason end as cancellation_reason"
            ") from t")
    changes = changes_now(tiny)
    assert [p.path for p in changes.appended] == ["subscriptions.parquet"]
    assert not changes.changed and not changes.history_changed


@pytest.mark.parametrize("planted", [
    # a price of a period every stored snapshot saw
    f"select * replace (case when start_date < date '{BUILT_ON}' - 60 then monthly_price + 1 "
    "else monthly_price end as monthly_price) from t",
    # a cancellation before the last build that arrives only now (a late label)
    "select * replace ("
    f"case when subscription_id = (select min(subscription_id) from t where end_date is null and start_date "
    f"< date '{BUILT_ON}' - 30) then date '{BUILT_ON}' - 10 else cancellation_date end as cancellation_date) from t",
], ids=["past-price", "late-cancellation"])
def test_a_changed_past_subscription_row_changes_history(tiny: ChurnConfig, planted: str) -> None:
    record(tiny)
    rewrite(tiny, "subscriptions", planted)
    changes = changes_now(tiny)
    assert [p.path for p in changes.changed] == ["subscriptions.parquet"] and changes.history_changed


def test_an_old_bad_partition_is_not_reread_and_a_new_one_is_named(tiny: ChurnConfig) -> None:
    payments = table(tiny, "payments")
    old = payments.files()[3]
    # a bad value in a partition an earlier night accepted (and recorded): tonight does not read it again
    replace_file(old, "select * replace ('lots' as amount) from t")
    record(tiny)
    added = {a.table: a for a in append_days(tiny.dataset.landing_dir)}
    changes = changes_now(tiny)
    assert changes.to_read(payments) == [added["payments"].path]
    validate_landing(tiny, changes)
    audit(tiny, "landing", "night-2", changes=changes)
    with pytest.raises(LandingValidationError, match=rf"payments/{old.parent.name}/part-0.parquet: column amount"):
        validate_landing(tiny)  # reading everything (a first night) finds it
    # tonight's partition with the same fault is named by path, column and rows
    new = added["payments"]
    replace_file(new.path, "select * replace ('lots' as amount) from t")
    with pytest.raises(LandingValidationError, match=rf"payments/date={new.day}/part-0.parquet: column amount: "
                                                     rf"{new.rows:,d} of {new.rows:,d} rows are not double"):
        validate_landing(tiny, changes_now(tiny))
    # and a date out of the suite's band in tonight's rows fails the landing audit
    replace_file(new.path, "select * replace (date '2099-01-01' as invoice_date) from t")
    with pytest.raises(AuditError, match="invoice_date"):
        audit(tiny, "landing", "night-2b", changes=changes_now(tiny))


def test_a_key_relanded_with_other_values_is_caught_across_partitions(tiny: ChurnConfig) -> None:
    record(tiny)
    added = {a.table: a for a in append_days(tiny.dataset.landing_dir)}
    first = table(tiny, "payments").files()[0]
    with duckdb.connect() as con:
        key = con.execute(f"select min(payment_id) from read_parquet('{first}')").fetchone()[0]
    new = added["payments"]
    # one of tonight's invoices reuses an invoice key of the first day with another amount
    replace_file(new.path, f"select * replace (case when payment_id = (select min(payment_id) from t) "
                           f"then '{key}' else payment_id end as payment_id) from t")
    with pytest.raises(LandingValidationError, match=rf"payments/date={new.day}/part-0.parquet: column\(s\) "
                                                     rf"payment_id: 1 of {new.rows:,d} rows reuse a key .*{key}"):
        validate_landing(tiny, changes_now(tiny))
    # an exact repeat of the old row is a duplicate staging removes, not a conflict
    replace_file(new.path, f"select * from t where payment_id <> '{key}' union all "
                           f"select * from read_parquet('{first}') where payment_id = '{key}'")
    validate_landing(tiny, changes_now(tiny))


# --- dbt tests on tonight's rows --------------------------------------------------


def test_a_duplicate_key_landed_tonight_fails_the_narrowed_key_test(tiny: ChurnConfig) -> None:
    """The usage key test reads only tonight's dates, and still catches a key staged twice tonight."""
    build_warehouse(tiny, as_of="2024-06-20")
    added = {a.table: a for a in append_days(tiny.dataset.landing_dir)}
    # plant: tonight's partition tells one (customer, day) twice with different minutes (staging keeps both)
    replace_file(added["usage_events"].path, "select * from t union all "
                                             "(select * replace (minutes + 1 as minutes) from t order by all limit 1)")
    night = (added["usage_events"].day + dt.timedelta(days=1)).isoformat()
    with pytest.raises(DbtError, match=r"unique_combination_of_columns_stg_saas__usage_events.*failures: 1"):
        build_warehouse(tiny, as_of=night)


def test_row_wise_dbt_tests_read_tonights_rows_and_a_full_refresh_reads_all(tiny: ChurnConfig) -> None:
    build_warehouse(tiny, as_of="2024-06-20")
    # an old invoice gone negative, stored and in its landing partition: an incremental night keeps it unread
    old = table(tiny, "payments").files()[3]
    day = dt.date.fromisoformat(old.parent.name.removeprefix("date="))
    replace_file(old, "select * replace (-1.0 as amount) from t")
    with connect(tiny.warehouse.build_db) as session:
        session.execute("update stg_saas__payments set amount = -1.0 where invoice_date = ?", [day])
        stored_bad = session.scalar("select count(*) from stg_saas__payments where amount < 0")
    # tonight: one usage row with negative minutes
    added = {a.table: a for a in append_days(tiny.dataset.landing_dir)}
    replace_file(added["usage_events"].path, "select * replace (case when customer_id = (select min(customer_id) "
                                             "from t) then -1.0 else minutes end as minutes) from t")
    night = (added["usage_events"].day + dt.timedelta(days=1)).isoformat()
    with pytest.raises(DbtError, match=r"accepted_range_stg_saas__usage_events_minutes_used.*failures: 1") as caught:
        build_warehouse(tiny, as_of=night)
    assert "stg_saas__payments_amount" not in str(caught.value)
    results = json.loads((dbt_target_path(tiny) / "run_results.json").read_text())["results"]
    verdicts = {r["unique_id"].split(".")[2]: r["status"] for r in results}
    assert verdicts["accepted_range_stg_saas__payments_amount__0"] == "pass"
    assert verdicts["unique_stg_saas__payments_payment_id"] == "pass"  # table-level: read whole, as always
    assert stored_bad > 0
    compiled = {r["unique_id"].split(".")[2]: r.get("compiled_code") or "" for r in results}
    usage_key = next(k for k in compiled if k.startswith("unique_combination_of_columns_stg_saas__usage_events"))
    assert "usage_date >= cast(" in compiled[usage_key]  # its key holds the date: tonight's rows suffice
    assert ">= cast(" not in compiled["unique_stg_saas__payments_payment_id"]
    with pytest.raises(DbtError, match=rf"accepted_range_stg_saas__payments_amount.*failures: {stored_bad}"):
        build_warehouse(tiny, as_of=night, full_refresh=True)
