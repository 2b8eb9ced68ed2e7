"""`churn generate`: demo subscription data whose churn process is known.

The pipeline is only trustworthy if we can check it against the truth, so the
demo data come from a hidden, believable churn process: every month start each
active customer gets a churn hazard from what happened *before* that day
(contract, failed payments, unhappy support tickets, falling or low usage, a
recent price rise, short tenure, and a latent engagement that drives usage).
The hazard is written to an oracle file the pipeline never reads; tests and
benchmarks compare trained models against it.

`customers` counts everyone ever seen: an initial base (signed up before
start_date, tenure and traits from the process's steady state) plus signups
each month that roughly replace churners. The oracle has one row per customer
active at each month start, including the first day after the data, which is
the date the pipeline scores at. With drift_from, month-to-month customers get
a price rise that day and use the product about a third less from then on.

Customers are simulated in fixed-size blocks, month by month, with numpy
arrays over the block (no per-customer Python loops) and written as Parquet row
groups: a million customers over 12 months take about four minutes and half a
GB (benchmarks/). The same options and seed give
byte-identical files.

With `partitioned` the dated event tables (usage, payments, support tickets)
land the way a daily extract does, one folder per day
(`usage_events/date=YYYY-MM-DD/part-0.parquet`), and `append_days` lands one
more day into every such folder: what "a new day of data arrived" looks like
to an incremental nightly.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ml.config import ChurnConfig
from ml.logs import get_logger, peak_memory_mb, timed
from ml.warehouse import MEMORY, connect, quote_literal, replace_folder

log = get_logger("generate")

EPOCH = dt.date(1970, 1, 1)
NO_DAY = np.iinfo(np.int32).max  # "never" for cancellation and promo-end days
LONG_AGO = np.iinfo(np.int32).min // 2  # "never" for the last price rise
SECONDS_PER_DAY = 86_400
DAYS_PER_MONTH = 30.4375

# The landing contract (dbt_project/models/staging/saas/_saas__sources.yml).
TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "customers": pa.schema([
        ("customer_id", pa.string()),
        ("signup_date", pa.date32()),
        ("region", pa.string()),
        ("acquisition_channel", pa.string()),
        ("age_band", pa.string()),
    ]),
    "subscriptions": pa.schema([
        ("subscription_id", pa.string()),
        ("customer_id", pa.string()),
        ("plan", pa.string()),
        ("contract_type", pa.string()),
        ("monthly_price", pa.float64()),
        ("start_date", pa.date32()),
        ("end_date", pa.date32()),
        ("cancellation_date", pa.date32()),
        ("cancellation_reason", pa.string()),
    ]),
    "payments": pa.schema([
        ("payment_id", pa.string()),
        ("customer_id", pa.string()),
        ("invoice_date", pa.date32()),
        ("amount", pa.float64()),
        ("status", pa.string()),
    ]),
    "support_tickets": pa.schema([
        ("ticket_id", pa.string()),
        ("customer_id", pa.string()),
        ("opened_at", pa.timestamp("us")),
        ("closed_at", pa.timestamp("us")),
        ("category", pa.string()),
        ("priority", pa.string()),
        ("satisfaction_score", pa.int32()),
    ]),
    "usage_events": pa.schema([
        ("customer_id", pa.string()),
        ("event_date", pa.date32()),
        ("sessions", pa.int32()),
        ("minutes", pa.float64()),
    ]),
}
# Tables written as one folder of daily partitions under `partitioned`, with the column that dates them.
PARTITIONED_TABLES: dict[str, str] = {
    "usage_events": "event_date",
    "payments": "invoice_date",
    "support_tickets": "opened_at",
}
PARTITION_FILE = "part-0.parquet"
ORACLE_FILE = "oracle.parquet"
ORACLE_SCHEMA = pa.schema([
    ("customer_id", pa.string()),
    ("as_of_date", pa.date32()),
    ("churn_probability", pa.float64()),
])


class GenerateError(RuntimeError):
    """The generator was asked for something it must not do (bad options, non-empty folder)."""


@dataclass(frozen=True)
class ChurnProcess:
    """The hidden data-generating process: the ground truth the pipeline must rediscover.

    Kept in one object so tests can name the segment a drift hits and the
    hazard's ingredients without repeating numbers, and so the process reads
    as one statement rather than constants scattered through the simulation.
    """

    regions: tuple[str, ...] = ("north", "south", "east", "west", "central")
    region_weights: tuple[float, ...] = (0.24, 0.20, 0.20, 0.20, 0.16)
    channels: tuple[str, ...] = ("organic", "paid_search", "referral", "partner", "social")
    channel_weights: tuple[float, ...] = (0.35, 0.25, 0.15, 0.10, 0.15)
    channel_engagement: tuple[float, ...] = (0.10, -0.20, 0.35, 0.0, -0.30)
    age_bands: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
    age_weights: tuple[float, ...] = (0.14, 0.28, 0.24, 0.17, 0.11, 0.06)
    age_null_rate: float = 0.03
    plans: tuple[str, ...] = ("basic", "standard", "premium")
    plan_prices: tuple[float, ...] = (19.0, 39.0, 69.0)  # USD per month, month-to-month list
    plan_thresholds: tuple[float, ...] = (-0.3, 0.9)  # engagement + noise picks the plan
    contracts: tuple[str, ...] = ("month-to-month", "one-year", "two-year")
    contract_signup_weights: tuple[float, ...] = (0.55, 0.28, 0.17)
    contract_price_factor: tuple[float, ...] = (1.0, 0.9, 0.8)
    # Month-to-month signups pay a promotional price until promo_days after signup.
    promo_factor: float = 0.8
    promo_days: int = 90
    plan_change_rate: float = 0.008  # share of active customers changing plan per month
    # Initial base: sized so signups replace churners; traits and tenure from the
    # process's steady state (capped), using the hazard's persistent part: logit
    # per unit of engagement level (direct and through usage) and for card trouble,
    # measured on simulated data.
    monthly_churn_target: float = 0.03
    max_initial_tenure_months: int = 72
    steady_state_level_logit: float = -0.9
    steady_state_card_logit: float = 0.13
    burn_in_months: int = 4  # simulated but not written, so month one has a history
    # Engagement = per-customer level (channel + noise) + AR(1) monthly deviation.
    engagement_level_sd: float = 0.6
    engagement_deviation_sd: float = 0.6
    engagement_persistence: float = 0.85
    # Usage: active-day probability and minutes per active day follow engagement.
    active_day_logit: float = -0.4
    active_day_engagement: float = 0.9
    log_minutes_mean: float = 3.2
    log_minutes_engagement: float = 0.35
    log_minutes_sd: float = 0.7
    minutes_per_session: float = 25.0
    # Billing and support.
    card_trouble_share: float = 0.15  # customers whose cards fail often
    failure_rate_normal: float = 0.01
    failure_rate_trouble: float = 0.12
    refund_rate: float = 0.004
    payment_statuses: tuple[str, ...] = ("paid", "failed", "refunded")
    tickets_per_month: float = 0.07
    tickets_engagement: float = -0.35
    tickets_after_failure: float = 0.6
    billing_ticket_share: float = 0.6  # tickets of customers whose payment failed that month
    ticket_categories: tuple[str, ...] = ("billing", "technical", "account", "cancellation")
    ticket_category_weights: tuple[float, ...] = (0.25, 0.50, 0.20, 0.05)
    priorities: tuple[str, ...] = ("low", "medium", "high", "urgent")
    priority_weights: tuple[float, ...] = (0.35, 0.40, 0.20, 0.05)
    satisfaction_mean: float = 3.4
    satisfaction_engagement: float = 0.7
    satisfaction_noise_sd: float = 1.1
    satisfaction_unanswered: float = 0.35
    low_satisfaction: int = 2  # scores at or below this count as unhappy
    cancellation_ticket_rate: float = 0.35  # churners who file a cancellation ticket first
    # Hazard: logit = contract intercept + the terms below, all from the windows
    # [t - recent_days, t) and [t - history_days, t) before the month start t.
    recent_days: int = 30
    history_days: int = 90
    contract_logit: tuple[float, ...] = (-3.35, -4.3, -4.9)
    w_short_tenure: float = 0.9  # times exp(-tenure_months / short_tenure_months)
    short_tenure_months: float = 6.0
    w_failed_payment: float = 0.45  # per failed payment in the last 90 days (max 3)
    w_low_satisfaction: float = 0.55  # per unhappy ticket in the last 30 days (max 2)
    w_ticket: float = 0.15  # per ticket in the last 30 days (max 3)
    w_price_rise: float = 0.7  # a price rise in the last 90 days
    w_trend: float = 0.8  # minus log(last-30-day minutes / half the prior 60 days')
    trend_smoothing: float = 20.0  # minutes added to both sides of the trend ratio
    w_low_usage: float = 0.3  # minus (log1p(last-30-day minutes) - usage_reference)
    usage_reference: float = 6.0
    w_engagement: float = 0.45  # minus the latent engagement of the month before
    cancellation_reasons: tuple[str, ...] = ("price", "competitor", "service", "moved", "other")
    cancellation_reason_weights: tuple[float, ...] = (0.18, 0.28, 0.14, 0.14, 0.26)
    reason_boost: float = 0.5  # added to 'price' after a price rise, to 'service' after unhappy tickets
    # Drift (only with drift_from): month-to-month customers get a price rise and use less.
    drift_contract: str = "month-to-month"
    drift_price_factor: float = 1.25
    drift_activity_factor: float = 0.8  # active days and minutes per day: ~36% fewer minutes
    drift_minutes_factor: float = 0.8
    # Dirt: variants of category spellings, exact duplicate rows.
    dirty_category_rate: float = 0.08
    duplicate_rate: float = 0.005
    block_customers: int = 100_000  # customers simulated together (memory vs speed)


PROCESS = ChurnProcess()


@dataclass(frozen=True)
class GenerateOptions:
    """What to generate and where; `from_config` reads churn.yml's generator section."""

    customers: int
    start_date: dt.date
    months: int
    seed: int
    out_dir: Path
    oracle_dir: Path
    drift_from: dt.date | None
    horizon_days: int  # cancellations fall within this many days of the month start
    overwrite: bool = False
    partitioned: bool = False  # PARTITIONED_TABLES as date=YYYY-MM-DD folders instead of one file

    @classmethod
    def from_config(cls, config: ChurnConfig, **changes: object) -> GenerateOptions:
        gen = config.generator
        values: dict[str, object] = {
            "customers": gen.customers,
            "start_date": gen.start_date,
            "months": gen.months,
            "seed": gen.seed,
            "out_dir": config.datasets["demo"].landing_dir,
            "oracle_dir": gen.oracle_dir,
            "drift_from": gen.drift_from,
            "horizon_days": config.problem.horizon_days,
            "partitioned": gen.partitioned,
        }
        values.update(changes)
        return cls(**values)  # type: ignore[arg-type]

    def validate(self) -> None:
        if self.customers < 1:
            raise GenerateError(f"customers must be >= 1, got {self.customers}")
        if self.months < 1:
            raise GenerateError(f"months must be >= 1, got {self.months}")
        if self.start_date.day != 1:
            raise GenerateError(
                f"start_date must be the first of a month (snapshots are monthly), got {self.start_date}"
            )
        if not 1 <= self.horizon_days <= 31:
            raise GenerateError(f"horizon_days must be within 1..31 (one month), got {self.horizon_days}")
        end = _add_months(self.start_date, self.months)
        if self.drift_from is not None and not self.start_date < self.drift_from < end:
            raise GenerateError(
                f"drift_from {self.drift_from} must fall inside the generated period "
                f"({self.start_date} .. {end - dt.timedelta(days=1)})"
            )


@dataclass
class GenerateSummary:
    """What a run wrote: rows and bytes per table, duration and peak memory."""

    rows: dict[str, int]
    bytes: dict[str, int]
    oracle_rows: int
    seconds: float
    peak_memory_mb: float
    out_dir: Path
    oracle_path: Path

    def lines(self) -> list[str]:
        out = [f"{t:16s} {self.rows[t]:>13,d} rows {self.bytes[t] / 1e6:>10.1f} MB" for t in self.rows]
        out.append(f"{'oracle':16s} {self.oracle_rows:>13,d} rows")
        out.append(f"in {self.seconds:.1f}s, peak memory {self.peak_memory_mb:.0f} MB -> {self.out_dir}")
        return out


# --------------------------------------------------------------------------- calendar


def _add_months(day: dt.date, months: int) -> dt.date:
    total = day.year * 12 + day.month - 1 + months
    return dt.date(total // 12, total % 12 + 1, 1)


def _day(day: dt.date) -> int:
    return (day - EPOCH).days


@dataclass(frozen=True)
class Calendar:
    """Month starts as day numbers (days since 1970-01-01), burn-in months first."""

    month_starts: np.ndarray  # burn_in + months + 1 entries; the last is the end (exclusive)
    burn_in: int
    drift_day: int | None

    @classmethod
    def build(cls, options: GenerateOptions, process: ChurnProcess) -> Calendar:
        starts = [
            _day(_add_months(options.start_date, m))
            for m in range(-process.burn_in_months, options.months + 1)
        ]
        drift = _day(options.drift_from) if options.drift_from else None
        return cls(np.array(starts, dtype=np.int64), process.burn_in_months, drift)

    @property
    def start(self) -> int:
        return int(self.month_starts[self.burn_in])

    @property
    def end(self) -> int:
        """First day after the data (exclusive)."""
        return int(self.month_starts[-1])


# --------------------------------------------------------------------------- arrow helpers


def _ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """Text keys like 'C0000001' from integers, formatted in Arrow (fast for millions)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers, pa.int64()), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _dates(days: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    return pa.array(days.astype(np.int32), pa.date32(), mask=null)


def _labels(values: tuple[str, ...], codes: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    idx = pa.array(np.where(codes < 0, 0, codes).astype(np.int32), mask=null)
    return pa.array(values).take(idx)


def _dirty_labels(
    values: tuple[str, ...], codes: np.ndarray, rng: np.random.Generator, rate: float
) -> pa.Array:
    """Category text as exports deliver it: mostly clean, some upper/title case or padded."""
    variants = [
        (v, v.upper(), v.title(), f" {v}", f"{v} ", f" {v.title()} ") for v in values
    ]
    lookup = pa.array([s for group in variants for s in group])
    n_variants = len(variants[0])
    variant = np.where(rng.random(len(codes)) < rate, rng.integers(1, n_variants, len(codes)), 0)
    return lookup.take(pa.array(codes.astype(np.int64) * n_variants + variant))


def _with_duplicates(table: pa.Table, rng: np.random.Generator, rate: float) -> pa.Table:
    """Append exact copies of a few rows (exports re-send rows now and then)."""
    picked = np.flatnonzero(rng.random(table.num_rows) < rate)
    if len(picked) == 0:
        return table
    return pa.concat_tables([table, table.take(pa.array(picked))])


def _choice(rng: np.random.Generator, weights: tuple[float, ...], n: int) -> np.ndarray:
    return rng.choice(len(weights), size=n, p=np.asarray(weights) / np.sum(weights)).astype(np.int8)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# --------------------------------------------------------------------------- population


@dataclass(frozen=True)
class _Population:
    """Every customer's signup day and persistent traits, ordered by signup (ids follow)."""

    signup: np.ndarray
    contract: np.ndarray
    channel: np.ndarray
    level: np.ndarray  # persistent engagement level
    card_trouble: np.ndarray

    def slice(self, lo: int, hi: int) -> _Population:
        return _Population(*(getattr(self, f.name)[lo:hi] for f in dataclasses.fields(self)))


def _draw_traits(rng: np.random.Generator, process: ChurnProcess, n: int) -> dict[str, np.ndarray]:
    """Persistent traits of customers as they sign up."""
    channel = _choice(rng, process.channel_weights, n)
    return {
        "contract": _choice(rng, process.contract_signup_weights, n),
        "channel": channel,
        "level": np.asarray(process.channel_engagement)[channel] + rng.normal(0, process.engagement_level_sd, n),
        "card_trouble": rng.random(n) < process.card_trouble_share,
    }


def _steady_state_base(
    rng: np.random.Generator, process: ChurnProcess, n_base: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Traits and tenure (months) of a base that signed up before the data starts.

    The base should look like the base the process itself produces, otherwise
    tenure, contract mix and engagement trend during the data window and drift
    monitoring sees change that is only a start-up effect. With constant inflow
    the base holds each (traits, tenure) in proportion to signups with those
    traits times their survival to that tenure: candidates drawn as signups are
    kept in proportion to their expected lifetime, then given a tenure drawn
    from their survival curve. Survival uses the hazard's persistent part.
    """
    pool = _draw_traits(rng, process, 3 * n_base)
    if n_base == 0:
        return pool, np.zeros(0, dtype=np.int64)
    level_edges = np.linspace(-3.0, 3.0, 49)
    level_bin = np.clip(np.digitize(pool["level"], level_edges), 1, len(level_edges) - 1) - 1
    level_mid = (level_edges[:-1] + level_edges[1:]) / 2
    n_contracts = len(process.contracts)
    combo = (pool["contract"].astype(np.int64) * len(level_mid) + level_bin) * 2 + pool["card_trouble"]

    months = np.arange(process.max_initial_tenure_months)
    promo = (months >= process.promo_days / DAYS_PER_MONTH) & (months < 2 * process.promo_days / DAYS_PER_MONTH)
    c, lv, card = np.meshgrid(np.arange(n_contracts), level_mid, [0, 1], indexing="ij")
    logit = (
        np.asarray(process.contract_logit)[c].reshape(-1, 1)
        + process.steady_state_level_logit * lv.reshape(-1, 1)
        + process.steady_state_card_logit * card.reshape(-1, 1)
        + process.w_short_tenure * np.exp(-months / process.short_tenure_months)
        + process.w_price_rise * (promo & (c.reshape(-1, 1) == 0))
    )
    hazard = _sigmoid(logit)
    survival = np.concatenate([np.ones((len(hazard), 1)), np.cumprod(1 - hazard, axis=1)[:, :-1]], axis=1)
    lifetime = survival.sum(axis=1)

    # Weighted sampling without replacement (Efraimidis-Spirakis keys).
    keys = np.log(rng.random(len(combo))) / lifetime[combo]
    chosen = np.sort(np.argpartition(-keys, n_base - 1)[:n_base])
    traits = {k: v[chosen] for k, v in pool.items()}
    combo = combo[chosen]
    tenure = np.empty(n_base, dtype=np.int64)
    cdf = np.cumsum(survival / lifetime[:, None], axis=1)
    u = rng.random(n_base)
    for key in np.unique(combo):
        sel = combo == key
        tenure[sel] = np.minimum(np.searchsorted(cdf[key], u[sel]), len(months) - 1)
    return traits, tenure


def _population(options: GenerateOptions, cal: Calendar, process: ChurnProcess) -> _Population:
    """Every customer, ordered by signup day so that ids follow signups.

    The initial base is sized so that monthly signups roughly replace churners,
    keeping the active base about flat over the period.
    """
    rng = np.random.default_rng([options.seed, 0])
    n = options.customers
    n_base = min(n, int(round(n / (1 + process.monthly_churn_target * options.months))))
    base, tenure_months = _steady_state_base(rng, process, n_base)
    tenure_days = (tenure_months + rng.random(n_base)) * DAYS_PER_MONTH
    base_signup = cal.start - 1 - np.floor(tenure_days).astype(np.int64)

    n_new = n - n_base
    starts = cal.month_starts[cal.burn_in:]
    per_month = np.full(options.months, n_new // options.months)
    per_month[: n_new % options.months] += 1
    month_of = np.repeat(np.arange(options.months), per_month)
    lengths = (starts[1:] - starts[:-1])[month_of]
    new_signup = starts[:-1][month_of] + np.floor(rng.random(n_new) * lengths).astype(np.int64)
    new = _draw_traits(rng, process, n_new)

    signup = np.concatenate([base_signup, new_signup])
    order = np.argsort(signup, kind="stable")
    merged = {k: np.concatenate([base[k], new[k]])[order] for k in base}
    return _Population(signup=signup[order], **merged)


# --------------------------------------------------------------------------- writing


class _Writers:
    """One ParquetWriter per table in a scratch folder; row groups appended per block."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows = dict.fromkeys(TABLE_SCHEMAS, 0)
        self.oracle_rows = 0
        self._writers = {
            name: pq.ParquetWriter(folder / f"{name}.parquet", schema, compression="zstd")
            for name, schema in TABLE_SCHEMAS.items()
        }
        self._oracle = pq.ParquetWriter(folder / ORACLE_FILE, ORACLE_SCHEMA, compression="zstd")

    def write(self, name: str, columns: dict[str, pa.Array]) -> None:
        table = pa.table(columns, schema=TABLE_SCHEMAS[name])
        if table.num_rows:
            self._writers[name].write_table(table)
            self.rows[name] += table.num_rows

    def write_table(self, name: str, table: pa.Table) -> None:
        if table.num_rows:
            self._writers[name].write_table(table.cast(TABLE_SCHEMAS[name]))
            self.rows[name] += table.num_rows

    def write_oracle(self, table: pa.Table) -> None:
        if table.num_rows:
            self._oracle.write_table(table.cast(ORACLE_SCHEMA))
            self.oracle_rows += table.num_rows

    def close(self) -> None:
        for writer in (*self._writers.values(), self._oracle):
            writer.close()


@dataclass
class _Counters:
    """Running key numbers, so ids stay unique and ordered across blocks."""

    subscription: int = 0
    payment: int = 0
    ticket: int = 0

    def take(self, kind: str, n: int) -> np.ndarray:
        first = getattr(self, kind)
        setattr(self, kind, first + n)
        return np.arange(first + 1, first + n + 1)


# --------------------------------------------------------------------------- simulation


@dataclass
class _Block:
    """State of one block of customers while their months are simulated."""

    first_number: int  # customer number of the first row (1-based ids)
    people: _Population
    ids: pa.Array = field(init=False)

    @property
    def signup(self) -> np.ndarray:
        return self.people.signup

    @property
    def contract(self) -> np.ndarray:
        return self.people.contract

    def __post_init__(self) -> None:
        n = len(self.signup)
        self.ids = _ids("C", np.arange(self.first_number, self.first_number + n), 7)


class _BlockSimulation:
    """Month-by-month simulation of one block; every step is vectorised over customers."""

    def __init__(
        self,
        block: _Block,
        cal: Calendar,
        options: GenerateOptions,
        process: ChurnProcess,
        rng: np.random.Generator,
        writers: _Writers,
        counters: _Counters,
    ) -> None:
        self.b, self.cal, self.opt, self.p, self.rng = block, cal, options, process, rng
        self.out, self.counters = writers, counters
        n = self.n = len(block.signup)
        p = process
        self.region = _choice(rng, p.region_weights, n)
        self.channel = block.people.channel
        self.age = np.where(rng.random(n) < p.age_null_rate, -1, _choice(rng, p.age_weights, n)).astype(np.int8)
        self.level = block.people.level
        self.deviation = rng.normal(0, p.engagement_deviation_sd, n)
        plan_score = self.engagement + rng.normal(0, 1.0, n)
        self.plan = np.digitize(plan_score, p.plan_thresholds).astype(np.int8)
        self.billing_dom = self._day_of_month(block.signup)
        self.fail_rate = np.where(block.people.card_trouble, p.failure_rate_trouble, p.failure_rate_normal)
        signup = block.signup
        on_promo = (block.contract == 0) & (signup + p.promo_days > cal.month_starts[0])
        self.promo_end = np.where(on_promo, signup + p.promo_days, NO_DAY).astype(np.int64)
        self.drift_segment = block.contract == p.contracts.index(p.drift_contract)
        self.price = self._list_price(self.plan, signup) * np.where(on_promo, p.promo_factor, 1.0)
        self.price = np.round(self.price, 2)
        self.period_start = signup.astype(np.int64)
        self.last_rise = np.full(n, LONG_AGO, dtype=np.int64)
        self.cancel = np.full(n, NO_DAY, dtype=np.int64)
        self.reason = np.full(n, -1, dtype=np.int8)
        # History needed by the hazard: last months of daily minutes, invoices, tickets.
        self.minutes_hist: list[tuple[int, np.ndarray]] = []
        # (customer index, day, day the flag became known or NO_DAY): failed invoices, unhappy tickets.
        self.invoice_hist: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.ticket_hist: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.periods: list[dict[str, np.ndarray]] = []

    # ---------------------------------------------------------------- helpers

    @property
    def engagement(self) -> np.ndarray:
        return self.level + self.deviation

    @staticmethod
    def _day_of_month(days: np.ndarray) -> np.ndarray:
        as_dates = days.astype("datetime64[D]")
        month_start = as_dates.astype("datetime64[M]").astype("datetime64[D]")
        return np.minimum((as_dates - month_start).astype(np.int64) + 1, 28)

    def _list_price(self, plan: np.ndarray, on_day: np.ndarray | int) -> np.ndarray:
        """Current list price for each customer's plan and contract on a day (drift included)."""
        p = self.p
        price = np.asarray(p.plan_prices)[plan] * np.asarray(p.contract_price_factor)[self.b.contract]
        if self.cal.drift_day is not None:
            drifted = self.drift_segment & (np.asarray(on_day) >= self.cal.drift_day)
            price = np.where(drifted, price * p.drift_price_factor, price)
        return price

    def _close_periods(self, idx: np.ndarray, end: np.ndarray, cancelled: bool) -> None:
        self.periods.append({
            "idx": idx,
            "start": self.period_start[idx].copy(),
            "end": end,
            "plan": self.plan[idx].copy(),
            "price": self.price[idx].copy(),
            "cancel": end if cancelled else np.full(len(idx), NO_DAY, dtype=np.int64),
            "reason": self.reason[idx].copy() if cancelled else np.full(len(idx), -1, dtype=np.int8),
        })

    # ---------------------------------------------------------------- hazard

    def _window_minutes(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Minutes in the recent window and in the rest of the history window before t."""
        last30 = np.zeros(self.n)
        prior60 = np.zeros(self.n)
        for first, matrix in self.minutes_hist:
            days = first + np.arange(matrix.shape[1])
            recent = self.p.recent_days
            in30 = (days >= t - recent) & (days < t)
            in60 = (days >= t - self.p.history_days) & (days < t - recent)
            if in30.any():
                last30 += matrix[:, in30].sum(axis=1)
            if in60.any():
                prior60 += matrix[:, in60].sum(axis=1)
        return last30, prior60

    def _count_recent(self, hist: list[tuple[np.ndarray, np.ndarray, np.ndarray]], t: int,
                      days: int) -> tuple[np.ndarray, np.ndarray]:
        """Per customer: records dated in [t - days, t), and those whose flag was known before t."""
        total = np.zeros(self.n)
        flagged = np.zeros(self.n)
        for idx, day, flag_day in hist:
            sel = (day >= t - days) & (day < t)
            total += np.bincount(idx[sel], minlength=self.n)
            flagged += np.bincount(idx[sel & (flag_day < t)], minlength=self.n)
        return total, flagged

    def hazard(self, t: int, idx: np.ndarray) -> np.ndarray:
        """Monthly churn probability at month start t, from information before t only."""
        p = self.p
        last30, prior60 = self._window_minutes(t)
        _, failed90 = self._count_recent(self.invoice_hist, t, p.history_days)
        tickets30, unhappy30 = self._count_recent(self.ticket_hist, t, p.recent_days)
        last30, prior60 = last30[idx], prior60[idx]
        tenure_months = (t - self.b.signup[idx]) / DAYS_PER_MONTH
        # Falling use: the recent window against the rest of the history, per day.
        per_day_before = prior60 * p.recent_days / (p.history_days - p.recent_days)
        trend = np.clip(np.log((last30 + p.trend_smoothing) / (per_day_before + p.trend_smoothing)), -2.0, 2.0)
        rise = self._recent_rise(t, idx)
        z = (
            np.asarray(p.contract_logit)[self.b.contract[idx]]
            + p.w_short_tenure * np.exp(-tenure_months / p.short_tenure_months)
            + p.w_failed_payment * np.minimum(failed90[idx], 3)
            + p.w_low_satisfaction * np.minimum(unhappy30[idx], 2)
            + p.w_ticket * np.minimum(tickets30[idx], 3)
            + p.w_price_rise * rise
            - p.w_trend * trend
            - p.w_low_usage * (np.log1p(last30) - p.usage_reference)
            - p.w_engagement * self.engagement[idx]
        )
        return _sigmoid(z)

    def _recent_rise(self, t: int, idx: np.ndarray) -> np.ndarray:
        return (self.last_rise[idx] >= t - self.p.history_days) & (self.last_rise[idx] < t)

    def _snapshot(self, t: int, in_data: bool, cancel: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Customers active at t (signed up before t, not cancelled) and their hazard."""
        cancel = self.cancel if cancel is None else cancel
        idx = np.flatnonzero((self.b.signup < t) & (cancel > t))
        h = self.hazard(t, idx)
        if in_data:
            self.out.write_oracle(pa.table({
                "customer_id": self.b.ids.take(pa.array(idx)),
                "as_of_date": _dates(np.full(len(idx), t)),
                "churn_probability": h,
            }))
        return idx, h

    # ---------------------------------------------------------------- one month

    def month(self, m: int) -> None:
        cal, p, rng = self.cal, self.p, self.rng
        t = int(cal.month_starts[m])
        t_next = int(cal.month_starts[m + 1])
        length = t_next - t
        in_data = m >= cal.burn_in

        # 1. Churn: hazard at the month start, cancellation within the horizon.
        # Nobody leaves during the burn-in: it only builds the history month one needs.
        idx, h = self._snapshot(t, in_data)
        churners = idx[rng.random(len(idx)) < h] if in_data else idx[:0]
        reach = min(self.opt.horizon_days, length)
        self.cancel[churners] = t + rng.integers(1, reach + 1, len(churners))
        self._draw_reasons(churners, t)

        # 2. The month's engagement (what the next hazard's `engagement` refers to).
        rho = p.engagement_persistence
        self.deviation = rho * self.deviation + np.sqrt(1 - rho**2) * rng.normal(0, p.engagement_deviation_sd, self.n)

        alive = np.flatnonzero((self.b.signup < t_next) & (self.cancel > t))
        lo = np.maximum(self.b.signup[alive], t)
        hi = np.minimum(self.cancel[alive], t_next)  # exclusive

        # 3. Price and plan events, before invoices so invoices see the new price.
        price_before = self.price.copy()
        change_day = self._price_events(alive, lo, hi, t, t_next)

        # 4. Usage, payments, tickets.
        self._usage(alive, lo, hi, t, length, in_data)
        failed_now = self._payments(alive, t, length, change_day, price_before, in_data)
        self._tickets(alive, lo, hi, failed_now, churners, t, length, in_data)

        # 5. Subscription periods of this month's churners end on their cancellation day.
        if len(churners):
            self._close_periods(churners, self.cancel[churners], cancelled=True)

        keep_after = t_next - p.history_days - 31
        self.minutes_hist = [(f, mtx) for f, mtx in self.minutes_hist if f + mtx.shape[1] > keep_after]
        self.invoice_hist = [r for r in self.invoice_hist if r[1].size and r[1].max() >= keep_after]
        self.ticket_hist = [r for r in self.ticket_hist if r[1].size and r[1].max() >= keep_after]

    def _draw_reasons(self, churners: np.ndarray, t: int) -> None:
        if len(churners) == 0:
            return
        p = self.p
        weights = np.tile(np.asarray(p.cancellation_reason_weights), (len(churners), 1))
        _, unhappy = self._count_recent(self.ticket_hist, t, p.recent_days)
        rise = self._recent_rise(t, churners)
        weights[:, p.cancellation_reasons.index("price")] += p.reason_boost * rise
        weights[:, p.cancellation_reasons.index("service")] += p.reason_boost * (unhappy[churners] > 0)
        cum = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
        u = self.rng.random(len(churners))[:, None]
        self.reason[churners] = np.minimum((u > cum).sum(axis=1), len(p.cancellation_reasons) - 1)

    def _price_events(self, alive: np.ndarray, lo: np.ndarray, hi: np.ndarray, t: int, t_next: int) -> np.ndarray:
        """At most one price or plan change per customer per month; returns the day (or NO_DAY)."""
        p, rng = self.p, self.rng
        change_day = np.full(self.n, NO_DAY, dtype=np.int64)
        new_plan = self.plan.copy()
        start = self.period_start[alive]

        def eligible(day: np.ndarray) -> np.ndarray:
            return (day >= lo) & (day < hi) & (day > start) & (change_day[alive] == NO_DAY)

        if self.cal.drift_day is not None and t <= self.cal.drift_day < t_next:
            day = np.full(len(alive), self.cal.drift_day)
            sel = eligible(day) & self.drift_segment[alive]
            change_day[alive[sel]] = self.cal.drift_day
        promo = self.promo_end[alive]
        sel = eligible(promo)
        change_day[alive[sel]] = promo[sel]
        day = lo + np.floor(rng.random(len(alive)) * (hi - lo)).astype(np.int64)
        sel = eligible(day) & (rng.random(len(alive)) < p.plan_change_rate)
        movers, mover_day = alive[sel], day[sel]
        up = rng.random(len(movers)) < 0.5 + 0.3 * np.tanh(self.engagement[movers])
        target = np.clip(self.plan[movers] + np.where(up, 1, -1), 0, len(p.plans) - 1)
        moved = target != self.plan[movers]  # the top plan cannot go up, the bottom not down
        new_plan[movers[moved]] = target[moved]
        change_day[movers[moved]] = mover_day[moved]

        changed = np.flatnonzero(change_day != NO_DAY)
        if len(changed) == 0:
            return change_day
        days = change_day[changed]
        new_price = np.round(self._list_price(new_plan, change_day)[changed], 2)
        self._close_periods(changed, days, cancelled=False)
        self.last_rise[changed] = np.where(new_price > self.price[changed], days, self.last_rise[changed])
        self.plan[changed] = new_plan[changed]
        self.price[changed] = new_price
        self.period_start[changed] = days
        self.promo_end[changed] = NO_DAY
        return change_day

    def _usage(self, alive: np.ndarray, lo: np.ndarray, hi: np.ndarray, t: int, length: int, in_data: bool) -> None:
        """Active days and minutes: engagement sets the odds of a day being active and its length."""
        p, rng = self.p, self.rng
        eng = self.engagement[alive]
        prob = _sigmoid(p.active_day_logit + p.active_day_engagement * eng)[:, None]
        days = t + np.arange(length)
        window = (days[None, :] >= lo[:, None]) & (days[None, :] < hi[:, None])
        drifted = None
        if self.cal.drift_day is not None and self.cal.drift_day < t + length:
            drifted = self.drift_segment[alive][:, None] & (days[None, :] >= self.cal.drift_day)
            prob = np.where(drifted, prob * p.drift_activity_factor, prob)
        rows, cols = np.nonzero((rng.random((len(alive), length)) < prob) & window)
        minutes = np.exp(
            p.log_minutes_mean
            + p.log_minutes_engagement * eng[rows]
            + rng.normal(0.0, p.log_minutes_sd, len(rows))
        )
        if drifted is not None:
            minutes = np.where(drifted[rows, cols], minutes * p.drift_minutes_factor, minutes)
        minutes = np.round(minutes, 1)
        sessions = 1 + rng.poisson(minutes / p.minutes_per_session)
        matrix = np.zeros((self.n, length), dtype=np.float32)
        matrix[alive[rows], cols] = minutes
        self.minutes_hist.append((t, matrix))
        if in_data:
            table = pa.table({
                "customer_id": self.b.ids.take(pa.array(alive[rows])),
                "event_date": _dates(t + cols),
                "sessions": pa.array(sessions.astype(np.int32)),
                "minutes": pa.array(minutes),
            })
            self.out.write_table("usage_events", _with_duplicates(table, rng, p.duplicate_rate))

    def _payments(
        self, alive: np.ndarray, t: int, length: int, change_day: np.ndarray, price_before: np.ndarray, in_data: bool
    ) -> np.ndarray:
        """One invoice per month on the billing day (the signup day in the signup month)."""
        p, rng = self.p, self.rng
        signup = self.b.signup[alive]
        day = np.where(signup >= t, signup, t + np.minimum(self.billing_dom[alive], length) - 1)
        billed = (day >= signup) & (day < self.cancel[alive])
        who, day = alive[billed], day[billed]
        amount = np.where(change_day[who] <= day, self.price[who], price_before[who])
        u = rng.random(len(who))
        failed = u < self.fail_rate[who]
        refunded = ~failed & (rng.random(len(who)) < p.refund_rate)
        status = np.where(failed, 1, np.where(refunded, 2, 0)).astype(np.int8)
        self.invoice_hist.append((who, day, np.where(failed, day, NO_DAY)))
        if in_data:
            table = pa.table({
                "payment_id": _ids("P", self.counters.take("payment", len(who)), 9),
                "customer_id": self.b.ids.take(pa.array(who)),
                "invoice_date": _dates(day),
                "amount": pa.array(amount),
                "status": _dirty_labels(p.payment_statuses, status, rng, p.dirty_category_rate),
            })
            self.out.write_table("payments", _with_duplicates(table, rng, p.duplicate_rate))
        failed_now = np.zeros(self.n, dtype=bool)
        failed_now[who[failed]] = True
        return failed_now

    def _tickets(
        self,
        alive: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        failed_now: np.ndarray,
        churners: np.ndarray,
        t: int,
        length: int,
        in_data: bool,
    ) -> None:
        """Helpdesk tickets: more for disengaged customers and after a failed payment;
        some churners file a cancellation ticket before they leave."""
        p, rng = self.p, self.rng
        eng = self.engagement[alive]
        rate = (
            p.tickets_per_month * np.exp(p.tickets_engagement * eng) * (hi - lo) / length
            + p.tickets_after_failure * failed_now[alive]
        )
        count = rng.poisson(rate)
        pos = np.repeat(np.arange(len(alive)), count)
        who = alive[pos]
        day = lo[pos] + np.floor(rng.random(len(pos)) * (hi - lo)[pos]).astype(np.int64)
        category = _choice(rng, p.ticket_category_weights, len(who))
        billing = p.ticket_categories.index("billing")
        category = np.where(failed_now[who] & (rng.random(len(who)) < p.billing_ticket_share), billing, category)

        leaving = churners[rng.random(len(churners)) < p.cancellation_ticket_rate]
        leave_day = t + np.floor(rng.random(len(leaving)) * (self.cancel[leaving] - t)).astype(np.int64)
        who = np.concatenate([who, leaving])
        day = np.concatenate([day, leave_day])
        category = np.concatenate([category, np.full(len(leaving), p.ticket_categories.index("cancellation"))])
        order = np.lexsort((day, who))
        who, day, category = who[order], day[order], category[order]

        n = len(who)
        opened = day * SECONDS_PER_DAY + (8 * 3600 + rng.random(n) * 12 * 3600).astype(np.int64)
        closed = opened + np.exp(rng.normal(np.log(18 * 3600), 1.0, n)).astype(np.int64)
        still_open = closed >= self.cal.end * SECONDS_PER_DAY
        score = np.clip(
            np.rint(p.satisfaction_mean + p.satisfaction_engagement * self.engagement[who]
                    + rng.normal(0.0, p.satisfaction_noise_sd, n)), 1, 5
        ).astype(np.int32)
        unanswered = still_open | (rng.random(n) < p.satisfaction_unanswered)
        unhappy = ~unanswered & (score <= p.low_satisfaction)
        self.ticket_hist.append((who, day, np.where(unhappy, closed // SECONDS_PER_DAY, NO_DAY)))
        if in_data:
            self.out.write("support_tickets", {
                "ticket_id": _ids("T", self.counters.take("ticket", n), 8),
                "customer_id": self.b.ids.take(pa.array(who)),
                "opened_at": pa.array(opened * 1_000_000, pa.timestamp("us")),
                "closed_at": pa.array(closed * 1_000_000, pa.timestamp("us"), mask=still_open),
                "category": _dirty_labels(p.ticket_categories, category, rng, p.dirty_category_rate),
                "priority": _labels(p.priorities, _choice(rng, p.priority_weights, n)),
                "satisfaction_score": pa.array(score, pa.int32(), mask=unanswered),
            })

    # ---------------------------------------------------------------- end of the block

    def finish(self) -> None:
        """Oracle at the data end, open periods, then the block's customers and subscriptions."""
        p, rng = self.p, self.rng
        # Cancellations dated on the data end are not in the extract (see the
        # subscriptions below): in the last snapshot those customers are active.
        self._snapshot(self.cal.end, in_data=True, cancel=np.where(self.cancel >= self.cal.end, NO_DAY, self.cancel))
        still = np.flatnonzero(self.cancel == NO_DAY)
        self._close_periods(still, np.full(len(still), NO_DAY, dtype=np.int64), cancelled=False)

        customers = pa.table({
            "customer_id": self.b.ids,
            "signup_date": _dates(self.b.signup),
            "region": _dirty_labels(p.regions, self.region, rng, p.dirty_category_rate),
            "acquisition_channel": _dirty_labels(p.channels, self.channel, rng, p.dirty_category_rate),
            "age_band": _labels(p.age_bands, self.age, null=self.age < 0),
        })
        self.out.write_table("customers", _with_duplicates(customers, rng, p.duplicate_rate))

        periods = {k: np.concatenate([part[k] for part in self.periods]) for k in self.periods[0]}
        order = np.lexsort((periods["start"], periods["idx"]))
        periods = {k: v[order] for k, v in periods.items()}
        # The extract is taken at the data end: a cancellation dated on or after it
        # (the last month's horizon reaches one day past it) has not happened yet.
        unseen = (periods["cancel"] != NO_DAY) & (periods["cancel"] >= self.cal.end)
        periods["end"] = np.where(unseen, NO_DAY, periods["end"])
        periods["cancel"] = np.where(unseen, NO_DAY, periods["cancel"])
        periods["reason"] = np.where(unseen, -1, periods["reason"]).astype(periods["reason"].dtype)
        idx = periods["idx"]
        open_end = periods["end"] == NO_DAY
        not_cancelled = periods["cancel"] == NO_DAY
        self.out.write("subscriptions", {
            "subscription_id": _ids("S", self.counters.take("subscription", len(idx)), 8),
            "customer_id": self.b.ids.take(pa.array(idx)),
            "plan": _dirty_labels(p.plans, periods["plan"], rng, p.dirty_category_rate),
            "contract_type": _dirty_labels(p.contracts, self.b.contract[idx], rng, p.dirty_category_rate),
            "monthly_price": pa.array(periods["price"]),
            "start_date": _dates(periods["start"]),
            "end_date": _dates(np.where(open_end, 0, periods["end"]), null=open_end),
            "cancellation_date": _dates(np.where(not_cancelled, 0, periods["cancel"]), null=not_cancelled),
            "cancellation_reason": _labels(p.cancellation_reasons, periods["reason"], null=not_cancelled),
        })


# --------------------------------------------------------------------------- run


def _check_target(options: GenerateOptions) -> None:
    """Refuse to mix new tables with whatever already sits in the landing folder."""
    if options.overwrite or not options.out_dir.exists():
        return
    present = sorted(e.name for e in options.out_dir.iterdir() if not e.name.startswith("."))
    if present:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise GenerateError(
            f"landing folder {options.out_dir} is not empty ({len(present)} entries: {shown}); "
            "pass --overwrite to replace its contents, or choose another folder with --out"
        )


def _publish(scratch: Path, options: GenerateOptions) -> None:
    """Swap the finished files in; until now the old landing and oracle stay untouched."""
    options.oracle_dir.mkdir(parents=True, exist_ok=True)
    oracle_tmp = options.oracle_dir / f".{ORACLE_FILE}.partial"
    shutil.move(str(scratch / ORACLE_FILE), oracle_tmp)
    oracle_tmp.replace(options.oracle_dir / ORACLE_FILE)
    replace_folder(scratch, options.out_dir)


def generate(options: GenerateOptions, process: ChurnProcess = PROCESS) -> GenerateSummary:
    """Simulate the business and write the landing tables and the oracle."""
    options.validate()
    _check_target(options)
    started = time.perf_counter()
    cal = Calendar.build(options, process)
    people = _population(options, cal, process)
    size = process.block_customers
    n_blocks = -(-options.customers // size)
    log.info(
        "generating %d customers, %d months from %s (seed %d%s) into %s",
        options.customers, options.months, options.start_date, options.seed,
        f", drift from {options.drift_from}" if options.drift_from else "", options.out_dir,
    )
    options.out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{options.out_dir.name}-partial-", dir=options.out_dir.parent))
    try:
        writers = _Writers(scratch)
        counters = _Counters()
        try:
            for b in range(n_blocks):
                lo, hi = b * size, min((b + 1) * size, options.customers)
                rng = np.random.default_rng([options.seed, 1, b])
                block = _Block(lo + 1, people.slice(lo, hi))
                sim = _BlockSimulation(block, cal, options, process, rng, writers, counters)
                with timed(f"block {b + 1}/{n_blocks} (customers {lo + 1:,}-{hi:,})", log):
                    for m in range(len(cal.month_starts) - 1):
                        sim.month(m)
                        if m >= cal.burn_in:
                            log.debug(
                                "block %d month %s: %s usage rows so far",
                                b + 1, np.datetime64(int(cal.month_starts[m]), "D"),
                                f"{writers.rows['usage_events']:,}",
                            )
                    sim.finish()
                log.info("rows so far: %s", ", ".join(f"{k} {v:,}" for k, v in writers.rows.items()))
        finally:
            writers.close()
        sizes = {name: (scratch / f"{name}.parquet").stat().st_size for name in TABLE_SCHEMAS}
        if options.partitioned:
            for name, column in PARTITIONED_TABLES.items():
                _split_by_day(scratch / f"{name}.parquet", scratch / name, column)
        _publish(scratch, options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = GenerateSummary(
        rows=dict(writers.rows),
        bytes=sizes,
        oracle_rows=writers.oracle_rows,
        seconds=time.perf_counter() - started,
        peak_memory_mb=peak_memory_mb(),
        out_dir=options.out_dir,
        oracle_path=options.oracle_dir / ORACLE_FILE,
    )
    log.info("generated in %.1fs, peak memory %.0f MB", summary.seconds, summary.peak_memory_mb)
    return summary


# --------------------------------------------------------------------------- partitions


def _split_by_day(file: Path, folder: Path, column: str) -> None:
    """Rewrite one table file as date=YYYY-MM-DD/part-0.parquet folders, then drop the file.

    The partition key is written in the folder name only (the contract's column
    stays in the file), so reading the folder without hive columns gives the
    same columns as the file. One thread keeps row order, and so the bytes, reproducible.
    """
    with connect(MEMORY) as session:
        session.execute("set threads = 1")
        session.execute(
            f"copy (select *, strftime({column}, '%Y-%m-%d') as date from read_parquet({quote_literal(file)})) "
            f"to {quote_literal(folder)} (format parquet, partition_by (date), compression zstd, "
            f"filename_pattern 'part-{{i}}')"
        )
    file.unlink()


@dataclass(frozen=True)
class AppendedDay:
    """What `append_day` landed."""

    table: str
    day: dt.date
    path: Path
    rows: int


def newest_partition(folder: Path) -> dt.date | None:
    """The newest date=YYYY-MM-DD partition of a folder, or None when it has none."""
    days = []
    for entry in folder.glob("date=*"):
        try:
            days.append(dt.date.fromisoformat(entry.name.removeprefix("date=")))
        except ValueError:
            continue
    return max(days, default=None)


def _day_sql(table: str, column: str, source: Path, subscriptions: Path, shift_days: int, seed: int,
             day: dt.date) -> str:
    """The SELECT drawing `day`'s rows of `table` from an earlier day's partition `source`.

    The rows of customers whose subscription still runs that day, shifted by
    `shift_days`, with values jittered by a seeded hash and, for invoices and
    tickets, new keys (the day's ordinal appended), so keys stay unique.
    """
    jitter = f"((hash(customer_id, {seed}, {day.toordinal()}) % 1000) / 1000.0)"
    running = (f"customer_id in (select customer_id from read_parquet({quote_literal(subscriptions)}) "
               f"where start_date <= date '{day}' and (end_date is null or end_date > date '{day}'))")
    rows = f"read_parquet({quote_literal(source / '*.parquet')})"
    if table == "usage_events":
        select = (f"select customer_id, date '{day}' as {column}, "
                  f"greatest(1, sessions + cast({jitter} * 3 as integer) - 1)::integer as sessions, "
                  f"round(minutes * (0.8 + 0.4 * {jitter}), 1) as minutes")
    elif table == "payments":
        select = (f"select payment_id || '-{day.toordinal()}' as payment_id, customer_id, "
                  f"date '{day}' as {column}, amount, status")
    elif table == "support_tickets":
        select = (f"select ticket_id || '-{day.toordinal()}' as ticket_id, customer_id, "
                  f"opened_at + interval {shift_days} day as opened_at, closed_at + interval {shift_days} day "
                  "as closed_at, category, priority, satisfaction_score")
    else:
        raise GenerateError(f"--append-day: no rule to draw a day of {table!r}")
    return f"{select} from {rows} where {running} order by all"


# Where a new day's rows are drawn from: the same weekday a week before (usage, tickets) or the same day of
# the previous month (invoices, billed monthly), so volumes keep the seasonality the completeness gate expects.
_SOURCE_DAY = {"usage_events": "week", "payments": "month", "support_tickets": "week"}


def _source_day(table: str, day: dt.date) -> dt.date:
    if _SOURCE_DAY[table] == "week":
        return day - dt.timedelta(days=7)
    month = (day.replace(day=1) - dt.timedelta(days=1)).replace(day=1)
    return month.replace(day=min(day.day, 28))


def append_day(landing_dir: Path, table: str = "usage_events", seed: int = 0,
               day: dt.date | None = None) -> AppendedDay | None:
    """Land one more day of `table` (default: after its newest partition), drawn from an earlier day.

    See `_day_sql` for how the day is drawn. Usage must have its week-earlier
    partition; invoices and tickets land nothing (None) when their source day
    had none, as on a quiet day. Written beside the folder and renamed in, so a
    reader never sees half a day.
    """
    folder = landing_dir / table
    column = PARTITIONED_TABLES.get(table)
    if column is None:
        raise GenerateError(f"--append-day: table {table!r} is not one of the partitioned tables "
                            f"({', '.join(PARTITIONED_TABLES)})")
    newest = newest_partition(folder) if folder.is_dir() else None
    if newest is None:
        raise GenerateError(f"--append-day: {folder} holds no date=YYYY-MM-DD partitions; "
                            "generate the landing with --partitioned first")
    day = day or newest + dt.timedelta(days=1)
    source = folder / f"date={_source_day(table, day).isoformat()}"
    subscriptions = landing_dir / "subscriptions.parquet"
    if not subscriptions.exists() or (table == "usage_events" and not source.is_dir()):
        raise GenerateError(f"--append-day: needs {source} and {subscriptions} to draw the new day from")
    if not source.is_dir():
        return None
    target = folder / f"date={day.isoformat()}"
    staged = folder / f".date={day.isoformat()}.partial"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    with connect(MEMORY) as session:
        session.execute("set threads = 1")
        sql = _day_sql(table, column, source, subscriptions, (day - _source_day(table, day)).days, seed, day)
        rows = int(session.scalar(f"select count(*) from ({sql})"))
        if rows:
            session.execute(f"copy ({sql}) to {quote_literal(staged / PARTITION_FILE)} "
                            "(format parquet, compression zstd)")
    if not rows:
        shutil.rmtree(staged, ignore_errors=True)
        return None
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    log.info("appended %s: %s rows of %s dated %s", target, f"{rows:,d}", table, day)
    return AppendedDay(table, day, target / PARTITION_FILE, rows)


def append_days(landing_dir: Path, seed: int = 0) -> list[AppendedDay]:
    """Land the next day into every partitioned folder: the day after the newest partition of any of them.

    One day for all tables, as one night's extract brings it; usage always gets
    a partition, invoices and tickets only when their source day had rows, and
    the single-file customers and subscriptions are re-exported with the day's
    new rows (`reexport_day`).
    """
    folders = [t for t in PARTITIONED_TABLES if (landing_dir / t).is_dir()]
    if "usage_events" not in folders:
        raise GenerateError(f"--append-day: {landing_dir / 'usage_events'} holds no date=YYYY-MM-DD partitions; "
                            "generate the landing with --partitioned first")
    day = max(d for t in folders if (d := newest_partition(landing_dir / t)) is not None) + dt.timedelta(days=1)
    added = [append_day(landing_dir, table, seed, day) for table in folders]
    return [a for a in added if a is not None] + reexport_day(landing_dir, day)


def reexport_day(landing_dir: Path, day: dt.date) -> list[AppendedDay]:
    """Re-export customers and subscriptions whole with `day`'s sign-ups and plan changes, as a daily extract would.

    Drawn from the same weekday a week before, so the volume of new periods
    keeps the seasonality the completeness gate expects: each sign-up of that
    day signs up again as a new customer (the day's ordinal appended to its
    ids), and each customer who changed plan that day and still runs it
    changes again: the running period ends on `day` and a new one starts.
    Only facts dated `day` are added, so the settled history stays unchanged
    and the next night stays incremental. Each file is written beside itself
    and renamed in.
    """
    customers, subscriptions = landing_dir / "customers.parquet", landing_dir / "subscriptions.parquet"
    if not (customers.exists() and subscriptions.exists()):
        return []
    source, suffix = day - dt.timedelta(days=7), f"-{day.toordinal()}"
    drawn = (f"select s.*, c.signup_date = s.start_date as signed_up "
             f"from read_parquet({quote_literal(subscriptions)}) s "
             f"join read_parquet({quote_literal(customers)}) c using (customer_id) "
             f"where s.start_date = date '{source}' and s.end_date is null and s.cancellation_date is null")
    new_periods = (f"select subscription_id || '{suffix}' as subscription_id, "
                   f"case when signed_up then customer_id || '{suffix}' else customer_id end as customer_id, "
                   f"plan, contract_type, monthly_price, date '{day}' as start_date, "
                   "null::date as end_date, null::date as cancellation_date, null::varchar as cancellation_reason "
                   "from drawn")
    changed = "select customer_id from drawn where not signed_up"
    periods = (f"with drawn as ({drawn}) "
               f"select * replace (case when customer_id in ({changed}) and end_date is null "
               f"and start_date < date '{day}' then date '{day}' else end_date end as end_date) "
               f"from read_parquet({quote_literal(subscriptions)}) "
               f"union all ({new_periods}) order by customer_id, start_date, subscription_id")
    people = (f"with drawn as ({drawn}) select * from read_parquet({quote_literal(customers)}) "
              f"union all (select c.customer_id || '{suffix}' as customer_id, date '{day}' as signup_date, "
              f"c.* exclude (customer_id, signup_date) from read_parquet({quote_literal(customers)}) c "
              f"semi join (select customer_id from drawn where signed_up) using (customer_id)) order by customer_id")
    added = []
    with connect(MEMORY) as session:
        session.execute("set threads = 1")
        new_subscriptions = int(session.scalar(f"with drawn as ({drawn}) select count(*) from drawn"))
        new_customers = int(session.scalar(f"with drawn as ({drawn}) select count(*) from drawn where signed_up"))
        for path, sql, rows in ((subscriptions, periods, new_subscriptions), (customers, people, new_customers)):
            staged = path.with_name(f".{path.name}.partial")
            session.execute(f"copy ({sql}) to {quote_literal(staged)} (format parquet, compression zstd)")
            staged.replace(path)
            log.info("re-exported %s with %s new row(s) dated %s", path, f"{rows:,d}", day)
            added.append(AppendedDay(path.stem, day, path, rows))
    return added


# --------------------------------------------------------------------------- CLI


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    changes: dict[str, object] = {
        key: value
        for key, value in {
            "customers": args.customers,
            "start_date": args.start_date,
            "months": args.months,
            "seed": args.seed,
            "out_dir": args.out.resolve() if args.out else None,
            "oracle_dir": args.oracle_out.resolve() if args.oracle_out else None,
            "drift_from": args.drift_from,
        }.items()
        if value is not None
    }
    if changes.get("drift_from") == "none":
        changes["drift_from"] = None
    if args.append_day:
        landing = args.out.resolve() if args.out else config.datasets["demo"].landing_dir
        days = append_days(landing, seed=args.seed if args.seed is not None else config.generator.seed)
        for added in days:
            print(f"{added.table}: {added.rows:,d} rows dated {added.day} -> {added.path}")
        print(f"replay the nightly on it with --as-of {days[0].day + dt.timedelta(days=1)}")
        return 0
    if args.partitioned:
        changes["partitioned"] = True
    summary = generate(GenerateOptions.from_config(config, overwrite=args.overwrite, **changes))
    print("\n".join(summary.lines()))
    return 0
