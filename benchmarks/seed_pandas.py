"""The seed-style pandas pipeline: what the project is measured against (issue 10).

Run:  .venv/bin/python -m benchmarks.seed_pandas --landing DIR --as-of YYYY-MM-DD [--json OUT]

The script a data scientist would write first, without a warehouse: read the
landing Parquet into pandas, compute the seed's basic churn features at every
monthly snapshot (monthly spend, login days, support tickets, contract type,
months as customer, spend per login, tickets per month, is month-to-month, days
since last login and its ratio to tenure), fit one XGBoost with fixed
parameters, and report ROC-AUC on the newest fully labelled snapshot (out of
time, the hold-out the project's training uses too). Features read only events
before the snapshot date; the label is a cancellation in (as_of, as_of + horizon].
No audits, no search, no calibration, no publishing: the floor the project's
nightly is compared with.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score
from xgboost import XGBClassifier

DAYS_PER_MONTH = 30.4375
WARM_UP_DAYS = 90  # the first snapshot is the first month start this long after the first usage day
FEATURES = [
    "monthly_spend", "login_days_30d", "support_tickets_90d", "months_as_customer", "spend_per_login",
    "tickets_per_month", "is_month_to_month", "days_since_last_login", "days_since_last_login_to_tenure_ratio",
    "contract_one_year", "contract_two_year",
]
XGB_PARAMS = {"n_estimators": 300, "max_depth": 4, "learning_rate": 0.08, "subsample": 0.8,
              "colsample_bytree": 0.8, "tree_method": "hist"}


@dataclass(frozen=True)
class Landing:
    """The landing tables the seed reads, with categories cleaned the way staging does."""

    customers: pd.DataFrame  # customer_id, signup_date
    subscriptions: pd.DataFrame  # customer_id, contract_type, monthly_price, start_date, cancellation_date
    usage: pd.DataFrame  # customer_id, event_date
    tickets: pd.DataFrame  # customer_id, opened_on


def _read(landing: Path, table: str, columns: list[str]) -> pd.DataFrame:
    """One landing table, as one file or a folder of date partitions (the date is in the files)."""
    single = landing / f"{table}.parquet"
    source = single if single.exists() else landing / table
    return pd.read_parquet(source, columns=columns)


def read_landing(landing: Path) -> Landing:
    customers = _read(landing, "customers", ["customer_id", "signup_date"]).drop_duplicates("customer_id")
    subscriptions = _read(landing, "subscriptions", [
        "customer_id", "contract_type", "monthly_price", "start_date", "cancellation_date"])
    subscriptions["contract_type"] = subscriptions["contract_type"].str.strip().str.lower()
    usage = _read(landing, "usage_events", ["customer_id", "event_date"])
    tickets = _read(landing, "support_tickets", ["customer_id", "opened_at"])
    tickets = pd.DataFrame({"customer_id": tickets["customer_id"],
                            "opened_on": tickets["opened_at"].dt.normalize()})
    # one code space for every table's customer ids: groupbys on integers, not strings
    ids = pd.CategoricalDtype(pd.Index(customers["customer_id"]).union(subscriptions["customer_id"].unique()))
    for frame in (customers, subscriptions, usage, tickets):
        frame["customer_id"] = frame["customer_id"].astype(ids)
    for frame, columns in ((customers, ["signup_date"]), (subscriptions, ["start_date", "cancellation_date"]),
                           (usage, ["event_date"])):
        for column in columns:
            frame[column] = pd.to_datetime(frame[column])
    return Landing(customers, subscriptions, usage, tickets)


def snapshot_dates(first_usage: dt.date, as_of: dt.date, horizon_days: int) -> list[dt.date]:
    """Month starts from the first one WARM_UP_DAYS after the first usage day, whose horizon was observed by as_of."""
    start = first_usage + dt.timedelta(days=WARM_UP_DAYS)
    month = start if start.day == 1 else (start.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
    last_observed = as_of - dt.timedelta(days=1)
    dates = []
    while month + dt.timedelta(days=horizon_days) <= last_observed:
        dates.append(month)
        month = (month + dt.timedelta(days=32)).replace(day=1)
    return dates


def seed_features(data: Landing, as_of: dt.date, horizon_days: int) -> pd.DataFrame:
    """The seed's features and label for every customer active on `as_of`, from events before it."""
    t = pd.Timestamp(as_of)
    subs = data.subscriptions[data.subscriptions["start_date"] < t].sort_values("start_date", kind="stable")
    in_force = subs.drop_duplicates("customer_id", keep="last")
    active = in_force[in_force["cancellation_date"].isna() | (in_force["cancellation_date"] > t)]
    frame = active.merge(data.customers, on="customer_id")
    frame = frame[frame["signup_date"] < t].set_index("customer_id")

    usage = data.usage[data.usage["event_date"] < t]
    recent = usage[usage["event_date"] >= t - pd.Timedelta(days=30)]
    login_days = recent.groupby("customer_id", observed=True).size()
    last_login = usage.groupby("customer_id", observed=True)["event_date"].max()
    tickets = data.tickets[data.tickets["opened_on"] < t]
    tickets_total = tickets.groupby("customer_id", observed=True).size()
    tickets_90d = tickets[tickets["opened_on"] >= t - pd.Timedelta(days=90)].groupby(
        "customer_id", observed=True).size()
    cancels = data.subscriptions[(data.subscriptions["cancellation_date"] > t)
                                 & (data.subscriptions["cancellation_date"] <= t + pd.Timedelta(days=horizon_days))]

    tenure_days = (t - frame["signup_date"]).dt.days
    months = tenure_days / DAYS_PER_MONTH
    out = pd.DataFrame(index=frame.index)
    out["monthly_spend"] = frame["monthly_price"]
    out["login_days_30d"] = login_days.reindex(frame.index, fill_value=0).to_numpy()
    out["support_tickets_90d"] = tickets_90d.reindex(frame.index, fill_value=0).to_numpy()
    out["months_as_customer"] = months
    out["spend_per_login"] = out["monthly_spend"] / out["login_days_30d"].clip(lower=1)
    out["tickets_per_month"] = tickets_total.reindex(frame.index, fill_value=0).to_numpy() / months.clip(lower=1)
    out["is_month_to_month"] = (frame["contract_type"] == "month-to-month").astype(int)
    # never logged in: counted from signup
    last = last_login.reindex(frame.index).fillna(frame["signup_date"])
    out["days_since_last_login"] = (t - last).dt.days
    out["days_since_last_login_to_tenure_ratio"] = out["days_since_last_login"] / tenure_days.clip(lower=1)
    out["contract_one_year"] = (frame["contract_type"] == "one-year").astype(int)
    out["contract_two_year"] = (frame["contract_type"] == "two-year").astype(int)
    out["churned"] = out.index.isin(cancels["customer_id"].unique()).astype(int)
    out["as_of_date"] = as_of
    return out.reset_index()


def run(landing: Path, as_of: dt.date, horizon_days: int) -> dict[str, object]:
    """Read, build every snapshot, fit on all but the newest labelled one, judge on that one."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = read_landing(landing)
    timings["read_s"] = time.perf_counter() - start
    first_usage = data.usage["event_date"].min().date()
    dates = snapshot_dates(first_usage, as_of, horizon_days)
    if len(dates) < 2:
        raise SystemExit(f"seed_pandas: {landing} has {len(dates)} labelled monthly snapshot(s) before {as_of}; "
                         "an out-of-time hold-out needs at least 2 (generate more months)")
    mark = time.perf_counter()
    frame = pd.concat([seed_features(data, day, horizon_days) for day in dates], ignore_index=True)
    timings["features_s"] = time.perf_counter() - mark
    held_out = frame["as_of_date"] == dates[-1]
    mark = time.perf_counter()
    model = XGBClassifier(**XGB_PARAMS, n_jobs=os.cpu_count(), random_state=42)
    model.fit(frame.loc[~held_out, FEATURES], frame.loc[~held_out, "churned"])
    timings["fit_s"] = time.perf_counter() - mark
    scores = model.predict_proba(frame.loc[held_out, FEATURES])[:, 1]
    auc = float(roc_auc_score(frame.loc[held_out, "churned"], scores))
    return {
        "roc_auc": round(auc, 4), "held_out_as_of": dates[-1].isoformat(), "snapshots": len(dates),
        "train_rows": int((~held_out).sum()), "held_out_rows": int(held_out.sum()),
        "held_out_positives": int(frame.loc[held_out, "churned"].sum()),
        **{k: round(v, 2) for k, v in timings.items()},
        "seconds_in_process": round(time.perf_counter() - start, 2),
        "peak_rss_mb_in_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seed_pandas", description=__doc__.splitlines()[0])
    parser.add_argument("--landing", type=Path, required=True, help="the landing folder (Parquet)")
    parser.add_argument("--as-of", type=dt.date.fromisoformat, required=True,
                        help="the run's date: the day after the data (the nightly's cutoff)")
    parser.add_argument("--horizon-days", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.landing, args.as_of, args.horizon_days)
    text = json.dumps(result)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
