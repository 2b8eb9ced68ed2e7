"""The demo warehouse built by dbt, checked against the raw landing files.

The mart is the ML layer's only input, so these tests recompute what it should
hold straight from the Parquet files with pandas (the active population, the
label, a sample of features) instead of trusting the SQL to check itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.features.build import build_warehouse
from ml.features.dbt import dbt_target_path
from tests.conftest import copy_warehouse, query

STAGING_CATEGORIES = {
    "stg_saas__customers": ["region", "acquisition_channel", "age_band"],
    "stg_saas__subscriptions": ["plan", "contract_type", "cancellation_reason"],
    "stg_saas__payments": ["payment_status"],
    "stg_saas__support_tickets": ["ticket_category", "ticket_priority"],
}
RAW_CATEGORIES = {
    "customers": ["region", "acquisition_channel", "age_band"],
    "subscriptions": ["plan", "contract_type", "cancellation_reason"],
    "payments": ["status"],
    "support_tickets": ["category", "priority"],
    "usage_events": [],
}
STAGING_OF = {
    "customers": "stg_saas__customers",
    "subscriptions": "stg_saas__subscriptions",
    "payments": "stg_saas__payments",
    "support_tickets": "stg_saas__support_tickets",
    "usage_events": "stg_saas__usage_events",
}


def raw_table(config: ChurnConfig, table: str, clean: bool = True) -> pd.DataFrame:
    """A landing table as pandas; `clean` applies staging's rules independently."""
    frame = pd.read_parquet(config.dataset.landing_dir / f"{table}.parquet")
    if clean:
        for column in RAW_CATEGORIES[table]:
            frame[column] = frame[column].str.strip().str.lower()
        frame = frame.drop_duplicates().reset_index(drop=True)
    for column in frame.columns:
        if column.endswith("_date"):
            frame[column] = pd.to_datetime(frame[column])
    return frame




def last_observed_day(config: ChurnConfig) -> pd.Timestamp:
    """Max event date over all landing tables (the brief's definition)."""
    dates = [
        raw_table(config, "usage_events")["event_date"].max(),
        raw_table(config, "payments")["invoice_date"].max(),
        raw_table(config, "support_tickets")["opened_at"].max().normalize(),
        raw_table(config, "subscriptions")["start_date"].max(),
        raw_table(config, "subscriptions")["cancellation_date"].max(),
    ]
    return max(dates)


def expected_as_of_dates(config: ChurnConfig) -> list[pd.Timestamp]:
    first_usage = raw_table(config, "usage_events")["event_date"].min()
    earliest = first_usage + pd.Timedelta(days=90)
    first = earliest if earliest.day == 1 else (earliest + pd.offsets.MonthBegin(1))
    latest = last_observed_day(config) + pd.Timedelta(days=1)
    monthly = list(pd.date_range(first, latest, freq="MS"))
    return sorted(set(monthly) | {latest})


def mart(config: ChurnConfig) -> pd.DataFrame:
    frame = query(config, f"select * from {config.dataset.feature_mart}")
    frame["as_of_date"] = pd.to_datetime(frame["as_of_date"])
    return frame


def active_population(config: ChurnConfig, as_of_dates: list[pd.Timestamp]) -> set[tuple[str, pd.Timestamp]]:
    """(customer_id, as_of_date) of every customer active per the brief's rule."""
    customers = raw_table(config, "customers").set_index("customer_id")
    subs = raw_table(config, "subscriptions")
    lifecycle = subs.groupby("customer_id").agg(
        first_start=("start_date", "min"), cancelled=("cancellation_date", "max")
    )
    lifecycle = lifecycle.join(customers["signup_date"])
    active = set()
    for as_of in as_of_dates:
        rows = lifecycle[
            (lifecycle["signup_date"] < as_of)
            & (lifecycle["first_start"] < as_of)
            & (lifecycle["cancelled"].isna() | (lifecycle["cancelled"] > as_of))
        ]
        active |= {(c, as_of) for c in rows.index}
    return active


def test_every_dbt_node_and_test_passed(built_warehouse: ChurnConfig) -> None:
    results = json.loads((dbt_target_path(built_warehouse) / "run_results.json").read_text())["results"]
    statuses = {r["unique_id"]: r["status"] for r in results}
    bad = {k: v for k, v in statuses.items() if v not in ("success", "pass")}
    assert not bad
    tests = [k for k in statuses if k.startswith("test.")]
    assert "test.churn.assert_features_use_only_past_events" in statuses
    assert any("unique_combination_of_columns_customer_features" in t for t in tests)
    assert len(tests) >= 80
    models = {k.split(".")[-1] for k in statuses if k.startswith("model.")}
    assert {
        "stg_saas__usage_events",
        "int_snapshot_dates",
        "int_customer_snapshots_spined",
        "int_usage_windowed",
        built_warehouse.dataset.feature_mart,
    } <= models


def test_row_counts_and_snapshot_grid(built_warehouse: ChurnConfig) -> None:
    features = mart(built_warehouse)
    dates = sorted(features["as_of_date"].unique())
    assert [pd.Timestamp(d) for d in dates] == expected_as_of_dates(built_warehouse)
    assert len(dates) >= 12
    customers = raw_table(built_warehouse, "customers")
    per_date = features.groupby("as_of_date").size()
    # every snapshot holds a sizeable share of all customers, and no more than all
    assert per_date.min() > 0.3 * len(customers)
    assert per_date.max() <= len(customers)
    assert not features.duplicated(["customer_id", "as_of_date"]).any()


def test_staging_deduplicates_and_cleans_categories(built_warehouse: ChurnConfig) -> None:
    duplicated_somewhere = False
    mixed_case_somewhere = False
    for table, model in STAGING_OF.items():
        raw = raw_table(built_warehouse, table, clean=False)
        cleaned = raw_table(built_warehouse, table, clean=True)
        staged = query(built_warehouse, f"select count(*) as n from {model}")["n"].iloc[0]
        assert staged == len(cleaned), table
        duplicated_somewhere |= len(raw) > len(cleaned)
        for column in RAW_CATEGORIES[table]:
            values = raw[column].dropna()
            mixed_case_somewhere |= bool((values != values.str.strip().str.lower()).any())
    assert duplicated_somewhere, "generated data should contain exact duplicates to remove"
    assert mixed_case_somewhere, "generated data should contain dirty categories to clean"
    for model, columns in STAGING_CATEGORIES.items():
        for column in columns:
            dirty = query(
                built_warehouse,
                f"select count(*) as n from {model} where {column} <> lower(trim({column}))",
            )["n"].iloc[0]
            assert dirty == 0, f"{model}.{column}"


def test_label_null_exactly_when_horizon_unobserved(built_warehouse: ChurnConfig) -> None:
    features = mart(built_warehouse)
    label = built_warehouse.problem.target
    horizon = pd.Timedelta(days=built_warehouse.problem.horizon_days)
    observed = features["as_of_date"] + horizon <= last_observed_day(built_warehouse)
    assert features.loc[observed, label].notna().all()
    assert features.loc[~observed, label].isna().all()
    assert observed.any() and (~observed).any()

    cancelled = raw_table(built_warehouse, "subscriptions").groupby("customer_id")["cancellation_date"].max()
    cancel = features["customer_id"].map(cancelled)
    expected = ((cancel > features["as_of_date"]) & (cancel <= features["as_of_date"] + horizon)).astype(int)
    assert (features.loc[observed, label] == expected[observed]).all()
    assert 0 < features.loc[observed, label].mean() < 0.5


def test_every_active_customer_present_at_each_as_of(built_warehouse: ChurnConfig) -> None:
    features = mart(built_warehouse)
    dates = sorted(pd.Timestamp(d) for d in features["as_of_date"].unique())
    expected = active_population(built_warehouse, dates)
    actual = set(zip(features["customer_id"], features["as_of_date"], strict=True))
    assert actual == expected

    # the generator's own record of who was active agrees on the shared month starts
    oracle = pd.read_parquet(built_warehouse.generator.oracle_dir / "oracle.parquet")
    oracle["as_of_date"] = pd.to_datetime(oracle["as_of_date"])
    shared = oracle[oracle["as_of_date"].isin(dates)]
    shared_dates = set(shared["as_of_date"])
    assert shared_dates
    assert set(zip(shared["customer_id"], shared["as_of_date"], strict=True)) == {
        key for key in actual if key[1] in shared_dates
    }


@pytest.fixture(scope="module")
def raw(built_warehouse: ChurnConfig) -> dict[str, dict[str, pd.DataFrame]]:
    """The cleaned landing tables split by customer, read once for the recomputations."""
    return {
        table: dict(tuple(raw_table(built_warehouse, table).groupby("customer_id")))
        for table in STAGING_OF
    }


def recompute_features(
    raw: dict[str, dict[str, pd.DataFrame]], customer_id: str, as_of: pd.Timestamp
) -> dict[str, object]:
    """Features of one snapshot straight from the cleaned landing tables."""
    day = pd.Timedelta(days=1)

    def rows(table: str) -> pd.DataFrame:
        empty = next(iter(raw[table].values())).iloc[0:0]
        return raw[table].get(customer_id, empty)

    usage = rows("usage_events")
    usage = usage[usage["event_date"] < as_of]
    u30 = usage[usage["event_date"] >= as_of - 30 * day]
    u90 = usage[usage["event_date"] >= as_of - 90 * day]
    payments = rows("payments")
    p90 = payments[(payments["invoice_date"] < as_of) & (payments["invoice_date"] >= as_of - 90 * day)]
    tickets = rows("support_tickets")
    t_open = tickets[tickets["opened_at"] < as_of]
    rated = tickets[tickets["satisfaction_score"].notna() & (tickets["closed_at"] < as_of)]
    r30 = rated[rated["closed_at"] >= as_of - 30 * day]
    subs = rows("subscriptions").sort_values(["start_date", "subscription_id"])
    current = subs[subs["start_date"] < as_of].iloc[-1]
    earlier = subs[subs["start_date"] <= as_of - 90 * day]
    price_then = earlier.iloc[-1]["monthly_price"] if len(earlier) else subs.iloc[0]["monthly_price"]
    plan_changed = subs["plan"].ne(subs["plan"].shift()) & subs["plan"].shift().notna()
    window = (subs["start_date"] < as_of) & (subs["start_date"] >= as_of - 90 * day)
    signup = rows("customers")["signup_date"].iloc[0]
    last_login = usage["event_date"].max() if len(usage) else signup
    return {
        "plan": current["plan"],
        "contract_type": current["contract_type"],
        "monthly_spend": current["monthly_price"],
        "price_change_90d": current["monthly_price"] - price_then,
        "plan_changes_90d": int((plan_changed & window).sum()),
        "months_as_customer": (as_of - signup).days / 30.4375,
        "login_days_30d": len(u30),
        "usage_sessions_30d": int(u30["sessions"].sum()),
        "usage_minutes_30d": float(u30["minutes"].sum()),
        "usage_minutes_90d": float(u90["minutes"].sum()),
        "days_since_last_login": (as_of - last_login).days,
        "failed_payments_90d": int((p90["status"] == "failed").sum()),
        "tickets_30d": int((t_open["opened_at"] >= as_of - 30 * day).sum()),
        "support_tickets_90d": int((t_open["opened_at"] >= as_of - 90 * day).sum()),
        "mean_satisfaction_30d": r30["satisfaction_score"].mean() if len(r30) else None,
    }


def test_features_match_a_recomputation_from_raw_data(
    built_warehouse: ChurnConfig, raw: dict[str, dict[str, pd.DataFrame]]
) -> None:
    features = mart(built_warehouse)
    # the busiest customers (tickets, plan changes, failed payments) plus a spread of others
    interesting = (
        features.sort_values(["support_tickets_90d", "plan_changes_90d", "failed_payments_90d"], ascending=False)
        ["customer_id"].drop_duplicates().head(15).tolist()
    )
    spread = features["customer_id"].drop_duplicates().sample(15, random_state=0).tolist()
    sample = features[features["customer_id"].isin(interesting + spread)]
    assert len(sample) > 100
    checked = 0
    for row in sample.itertuples(index=False):
        expected = recompute_features(raw, row.customer_id, row.as_of_date)
        for name, value in expected.items():
            actual = getattr(row, name)
            where = f"{name} of {row.customer_id} at {row.as_of_date.date()}"
            if value is None:
                assert pd.isna(actual), where
            elif isinstance(value, str):
                assert actual == value, where
            else:
                assert actual == pytest.approx(value, abs=1e-6), where
            checked += 1
    assert checked > 1000
    assert sample["plan_changes_90d"].max() > 0 and sample["mean_satisfaction_30d"].notna().any()


def test_time_travel_hides_data_on_or_after_as_of(built_warehouse: ChurnConfig, tmp_path: Path) -> None:
    full = mart(built_warehouse)
    dates = sorted(full["as_of_date"].unique())
    travel_to = pd.Timestamp(dates[len(dates) // 2]) + pd.Timedelta(days=14)
    config = copy_warehouse(built_warehouse, tmp_path / "travel")
    # earlier than the copied build: build_warehouse full-refreshes it (a bare incremental dbt run refuses)
    build_warehouse(config, as_of=travel_to.date().isoformat())

    past = mart(config)
    label = config.problem.target
    assert past["as_of_date"].max() == travel_to  # latest = (as_of - 1) + 1
    assert (past["as_of_date"] <= travel_to).all()
    last_day = query(config, "select max(last_observed_day) as d from int_snapshot_dates")["d"].iloc[0]
    assert pd.Timestamp(last_day) == travel_to - pd.Timedelta(days=1)
    horizon = pd.Timedelta(days=config.problem.horizon_days)
    near = past["as_of_date"] + horizon > travel_to - pd.Timedelta(days=1)
    assert near.any() and past.loc[near, label].isna().all()
    assert past.loc[~near, label].notna().all()

    # rows both builds share are identical: nothing later than as_of_date leaked in either
    keys = ["customer_id", "as_of_date"]
    shared = past[past["as_of_date"] < travel_to].merge(full, on=keys, suffixes=("", "_full"))
    assert len(shared) == (past["as_of_date"] < travel_to).sum()
    for column in past.columns:
        if column in keys or (column == label):
            continue
        left, right = shared[column], shared[f"{column}_full"]
        same = (left == right) | (left.isna() & right.isna())
        if pd.api.types.is_float_dtype(left):
            same |= (left - right).abs() < 1e-9
        assert same.all(), column
    labelled = shared[label].notna()
    assert (shared.loc[labelled, label] == shared.loc[labelled, f"{label}_full"]).all()

    # who is active on the travel date: cancellations on or after it are not known yet
    subs = raw_table(config, "subscriptions")
    subs.loc[subs["cancellation_date"] >= travel_to, "cancellation_date"] = pd.NaT
    customers = raw_table(config, "customers").set_index("customer_id")
    lifecycle = subs.groupby("customer_id").agg(
        first_start=("start_date", "min"), cancelled=("cancellation_date", "max")
    ).join(customers["signup_date"])
    lifecycle = lifecycle[lifecycle["first_start"] < travel_to]
    active = lifecycle[
        (lifecycle["signup_date"] < travel_to)
        & (lifecycle["cancelled"].isna() | (lifecycle["cancelled"] > travel_to))
    ]
    at_travel = set(past.loc[past["as_of_date"] == travel_to, "customer_id"])
    assert at_travel == set(active.index)
    cancelling_later = set(
        raw_table(config, "subscriptions").query("cancellation_date >= @travel_to")["customer_id"]
    )
    assert at_travel & cancelling_later
