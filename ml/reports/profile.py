"""`churn profile`: what the feature mart looks like before a model sees it.

Missing values, class balance, outliers, distributions by label and
correlations are the questions an analyst asks of a new mart, and they are
asked again every night because the data changes. Every statistic is computed
in SQL on the engine that holds the mart (the build DuckDB database, or Spark's
warehouse passed as `data`), in the dialect both engines share; only the
quantile lists are spelt per engine (`quantiles_sql`). Counts, means, extremes
and outlier counts read the full mart, while quantiles, medians and
correlations read a seeded sample of at most ORDER_STATISTICS_ROWS rows (all
rows of a smaller mart), so the step stays cheap as history grows; only the
plots read a bounded, seeded sample into Python. Both samples are picked by an
md5 of key, snapshot date and seed, which computes the same on both engines,
so both profile the same rows. The columns and their roles come from the
mart's contract, so the same code profiles any dataset.

Results are tables of the build database whichever engine holds the mart
(replaced per feature mart on each run, in one transaction) and a
self-contained report folder: PNG plots and an index.html that references
them. The per-snapshot figures the profile shows over time
(`profile_snapshot_stats`: rows, label share, null shares, sums, quantiles per
snapshot) are kept across runs instead: a night recomputes only the snapshots
its build rebuilt or relabelled (`ml.features.night`), and the class balance
is read from them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.mart import SAMPLE_HEX_DIGITS, MartError, current_contract, mart_columns, sample_cut
from ml.features.night import FULL as FULL_SCOPE
from ml.features.night import scope_since, scoped_relation
from ml.logs import get_logger, timed
from ml.warehouse import (
    Reader,
    Session,
    TableSpec,
    column_list,
    connect,
    declare,
    quote,
    replace_folder,
    staging_path,
)
from ml.warehouse.spark import SparkWarehouse

log = get_logger("profile")

# Counts, means and extremes use every row. Quantiles, medians and correlations (a sort or ~n^2/2 sums per
# row) use every row up to this many and a seeded sample of this many beyond, so a night's profile does not
# grow with the length of history (2.9M rows: 8 s of quantiles on 2 cores).
ORDER_STATISTICS_ROWS = 200_000
# The temp table that holds that sample for one profile run (`order_statistics_source`).
ORDER_STATISTICS_SAMPLE = "_profile_order_sample"
# The temp table of the categories' counts, which the category table and Cramér's V both read.
CATEGORY_COUNTS = "_profile_category_counts"
# These bound only what the plots and the report show.
PLOT_SAMPLE_ROWS = 20_000
PLOT_TOP_FEATURES = 8
HEATMAP_MAX_FEATURES = 30
REPORT_TOP_CATEGORIES = 10
# Categories kept per categorical feature in profile_categories; rarer ones are
# folded into OTHER_CATEGORY so a high-cardinality column cannot flood the table.
MAX_CATEGORIES = 30
OTHER_CATEGORY = "(other)"
MISSING_CATEGORY = "(missing)"
IQR_FENCE = 1.5  # Tukey's rule: outside [p25 - 1.5 IQR, p75 + 1.5 IQR]
QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)

PLOTS = ("class_balance.png", "feature_distributions.png", "correlation_heatmap.png", "missing_values.png")

# Every profile table starts with the run's stamp; each mart's rows are replaced on every run.
_STAMP = [("feature_mart", "VARCHAR"), ("run_id", "VARCHAR"), ("profiled_at", "TIMESTAMP")]
_GRAIN = "per feature_mart, replaced by each profiling run: "

PROFILE_COLUMNS = declare(
    name="profile_columns",
    owner=__name__,
    grain=_GRAIN + "one row per contract column",
    description="Missing values, distinct values, quantiles, IQR outliers and label association of each mart column.",
    columns=[
        *_STAMP,
        ("column_name", "VARCHAR"), ("role", "VARCHAR"), ("kind", "VARCHAR"), ("data_type", "VARCHAR"),
        ("rows", "BIGINT"), ("missing_count", "BIGINT"), ("missing_share", "DOUBLE"), ("distinct_count", "BIGINT"),
        ("mean", "DOUBLE"), ("std", "DOUBLE"), ("min_value", "DOUBLE"), ("max_value", "DOUBLE"),
        ("mean_label_0", "DOUBLE"), ("mean_label_1", "DOUBLE"), ("median_label_0", "DOUBLE"),
        ("median_label_1", "DOUBLE"), ("p01", "DOUBLE"), ("p25", "DOUBLE"), ("median", "DOUBLE"),
        ("p75", "DOUBLE"), ("p99", "DOUBLE"), ("low_fence", "DOUBLE"), ("high_fence", "DOUBLE"),
        # DOUBLE, not BIGINT: non-numeric columns have none (NULL), and the table always stored them so.
        ("outliers_low", "DOUBLE"), ("outliers_high", "DOUBLE"), ("outlier_share", "DOUBLE"),
        ("label_association", "DOUBLE"),
    ],
)
PROFILE_CATEGORIES = declare(
    name="profile_categories",
    owner=__name__,
    grain=_GRAIN + "one row per (categorical feature, category), rare categories folded into one",
    description="Share and churn rate of each category of each categorical feature.",
    columns=[
        *_STAMP,
        ("column_name", "VARCHAR"), ("category", "VARCHAR"), ("rows", "BIGINT"), ("share", "DOUBLE"),
        ("labelled_rows", "BIGINT"), ("positives", "BIGINT"), ("churn_rate", "DOUBLE"), ("is_other", "BOOLEAN"),
    ],
)
PROFILE_CLASS_BALANCE = declare(
    name="profile_class_balance",
    owner=__name__,
    grain=_GRAIN + "one overall row and one row per snapshot_date",
    description="Rows, labelled rows and positive rate of the mart, overall and per snapshot.",
    columns=[
        *_STAMP,
        ("scope", "VARCHAR"), ("snapshot_date", "DATE"), ("rows", "BIGINT"), ("labelled_rows", "BIGINT"),
        ("positives", "BIGINT"), ("positive_rate", "DOUBLE"),
    ],
)
PROFILE_CORRELATIONS = declare(
    name="profile_correlations",
    owner=__name__,
    grain=_GRAIN + "one row per (column_a, column_b, method)",
    description="Pearson correlations between numeric features, and each feature's association with the label.",
    columns=[
        *_STAMP,
        ("column_a", "VARCHAR"), ("column_b", "VARCHAR"), ("method", "VARCHAR"), ("scope", "VARCHAR"),
        ("correlation", "DOUBLE"),
    ],
)
PROFILE_SNAPSHOTS = declare(
    name="profile_snapshot_stats",
    owner=__name__,
    grain="one row per (feature_mart, snapshot_date, column): the label and each numeric feature",
    description="Per-snapshot aggregates the profile shows over time (rows, label share, null share, sums, "
                "min/max, quantiles), kept across runs: a night recomputes only the snapshots its build changed.",
    columns=[
        ("feature_mart", "VARCHAR"), ("snapshot_date", "DATE"), ("column_name", "VARCHAR"),
        ("rows", "BIGINT"), ("labelled_rows", "BIGINT"), ("positives", "BIGINT"),
        ("missing_count", "BIGINT"), ("value_sum", "DOUBLE"), ("value_sum_squares", "DOUBLE"),
        ("min_value", "DOUBLE"), ("max_value", "DOUBLE"), ("p01", "DOUBLE"), ("p25", "DOUBLE"),
        ("median", "DOUBLE"), ("p75", "DOUBLE"), ("p99", "DOUBLE"),
        ("run_id", "VARCHAR"), ("computed_at", "TIMESTAMP"),
    ],
)
SPECS: tuple[TableSpec, ...] = (PROFILE_COLUMNS, PROFILE_CATEGORIES, PROFILE_CLASS_BALANCE, PROFILE_CORRELATIONS)
TABLES = tuple(spec.name for spec in SPECS)


class ProfileError(RuntimeError):
    """The feature mart cannot be profiled as its contract describes."""


@dataclass(frozen=True)
class ProfileResult:
    """What one profiling run produced."""

    feature_mart: str
    run_id: str
    rows: int
    columns: int
    report_path: Path
    plots: tuple[Path, ...]
    seconds: float


def report_dir(config: ChurnConfig) -> Path:
    """One report folder per dataset, so profiling one never overwrites another's."""
    return config.warehouse.reports_dir / "profile" / config.dataset.name


# ------------------------------------------------------------------ checks

def check_mart(session: Reader, config: ChurnConfig, contract: FeatureContract) -> dict[str, str]:
    """The mart's column types, after refusing a mart that does not match its contract.

    The contract check is the mart's own (`mart_columns`); the profile adds that
    the mart has rows and a 0/1 label, which every statistic below assumes.
    """
    mart = config.dataset.feature_mart
    try:
        columns = mart_columns(session, config, contract, require_label=True, numeric_label=True)
    except MartError as exc:
        raise ProfileError(str(exc)) from exc
    rows = session.scalar(f"select count(*) from {quote(mart)}")
    if rows == 0:
        raise ProfileError(f"feature mart {mart!r} in {session.path} has no rows")
    bad_labels = session.scalar(f"select count(*) from {quote(mart)} where {quote(contract.label)} not in (0, 1)")
    if bad_labels:
        raise ProfileError(
            f"feature mart {mart!r} in {session.path}: label {contract.label!r} is not 0/1/NULL in {bad_labels} row(s)"
        )
    return columns


# ------------------------------------------------------------- statistics

def column_summary(
    session: Reader, mart: str, contract: FeatureContract, types: dict[str, str]
) -> pd.DataFrame:
    """Rows, missing count and share, and distinct values of every contract column."""
    roles = {contract.key: "key", contract.as_of: "as_of", contract.label: "label",
             **({contract.split: "split"} if contract.split else {})}
    kinds = {f.name: f.kind for f in contract.features}
    columns = contract.columns
    expressions = ["count(*)"]
    for column in columns:
        expressions += [f"count({quote(column)})", f"count(distinct {quote(column)})"]
    values = session.one(f"select {', '.join(expressions)} from {quote(mart)}")
    rows = int(values[0])
    records = []
    for i, column in enumerate(columns):
        present, distinct = int(values[1 + 2 * i]), int(values[2 + 2 * i])
        records.append({
            "column_name": column,
            "role": roles.get(column, "feature"),
            "kind": kinds.get(column),
            "data_type": types[column],
            "rows": rows,
            "missing_count": rows - present,
            "missing_share": (rows - present) / rows,
            "distinct_count": distinct,
        })
    return pd.DataFrame(records)


def row_digest(contract: FeatureContract, seed: int) -> str:
    """SQL of a row's seeded hex digest: md5 of key, snapshot date and seed, as text.

    md5, casts to text and || compute the same on DuckDB and Spark (DuckDB's
    hash() has no Spark twin), so both engines pick and order the same rows.
    """
    return (f"md5(cast({quote(contract.key)} as string) || ':' || "
            f"cast(cast({quote(contract.as_of)} as date) as string) || ':{int(seed)}')")


@contextmanager
def order_statistics_source(session: Reader, mart: str, contract: FeatureContract, seed: int,
                            rows: int = ORDER_STATISTICS_ROWS) -> Iterator[tuple[str, int]]:
    """The relation quantiles and correlations read, and its row count: the mart, or a seeded sample of it.

    A row's digest (`row_digest`) below the cut for `rows / total` keeps about
    `rows` rows, the same ones on every run, thread count and engine, without
    reading the mart into Python. The sample (the numeric features and the
    label) is built once for the block (`Reader.temp_table`: a DuckDB temp
    table, a cached Spark view): as a subquery its filter re-scanned the mart
    in each of the count, quantile and correlation statements. Dropped when
    the block ends.
    """
    total = int(session.scalar(f"select count(*) from {quote(mart)}"))
    if total <= rows:
        yield quote(mart), total
        return
    picked = f"substr({row_digest(contract, seed)}, 1, {SAMPLE_HEX_DIGITS}) < '{sample_cut(rows / total)}'"
    select = f"select {column_list([*contract.numeric, contract.label])} from {quote(mart)} where {picked}"
    with session.temp_table(ORDER_STATISTICS_SAMPLE, select) as sample:
        yield sample, int(session.scalar(f"select count(*) from {sample}"))


def quantiles_sql(session: Reader, expression: str) -> str:
    """SQL of the QUANTILES of `expression` as one list, exact and linearly interpolated on either engine.

    The one statistic spelt per engine: DuckDB's quantile_cont(x, [...]) and
    Spark's percentile(x, array(...)) compute the whole list from one sort of
    the column. The spelling both accept, one percentile_cont(q) within group
    per level, sorts once per level: ~3x slower on DuckDB.
    """
    levels = ", ".join(str(q) for q in QUANTILES)
    if isinstance(session, SparkWarehouse):
        return f"percentile({expression}, array({levels}))"
    return f"quantile_cont({expression}, [{levels}])"


def numeric_summary(session: Reader, mart: str, contract: FeatureContract, ordered: str | None = None) -> pd.DataFrame:
    """Quantiles, IQR outlier counts and mean/median per label of each numeric feature.

    Moments and extremes are one scan of the whole mart, every column's
    aggregates side by side; quantiles and medians one scan of `ordered` (the
    mart or its sample, `order_statistics_source`); the outlier counts one more
    scan of the whole mart, beyond the fences the quantiles produced.
    (Unpivoting to one long column costs several times more.)
    """
    numeric = contract.numeric
    if not numeric:
        return pd.DataFrame(columns=["column_name"])
    label = quote(contract.label)
    whole = {
        "mean": "avg({c})",
        "std": "stddev_samp({c})",
        "min_value": "min({c})",
        "max_value": "max({c})",
        "mean_label_0": f"avg({{c}}) filter (where {label} = 0)",
        "mean_label_1": f"avg({{c}}) filter (where {label} = 1)",
    }
    sorted_ = {
        "q": quantiles_sql(session, "{c}"),
        "median_label_0": f"median({{c}}) filter (where {label} = 0)",
        "median_label_1": f"median({{c}}) filter (where {label} = 1)",
    }

    def side_by_side(measures: dict[str, str], relation: str) -> list[dict[str, Any]]:
        expressions = [template.format(c=f"cast({quote(column)} as double)")
                       for column in numeric for template in measures.values()]
        values = session.one(f"select {', '.join(expressions)} from {relation}")
        width = len(measures)
        return [dict(zip(measures, values[i * width:(i + 1) * width], strict=True)) for i in range(len(numeric))]

    records = []
    for column, moments, order in zip(numeric, side_by_side(whole, quote(mart)),
                                      side_by_side(sorted_, ordered or quote(mart)), strict=True):
        record = {**moments, **order}
        q = record.pop("q") or [None] * len(QUANTILES)
        record.update({f"p{round(level * 100):02d}": value for level, value in zip(QUANTILES, q, strict=True)})
        p25, p75 = record["p25"], record["p75"]
        has_values = p25 is not None
        record["low_fence"] = p25 - IQR_FENCE * (p75 - p25) if has_values else None
        record["high_fence"] = p75 + IQR_FENCE * (p75 - p25) if has_values else None
        records.append({"column_name": column, **record})

    counts: list[str] = []
    fences: list[float] = []  # parameters: a double on both engines (Spark reads 1.5 as a decimal)
    for record in records:
        column = f"cast({quote(record['column_name'])} as double)"
        for fence, side in ((record["low_fence"], "<"), (record["high_fence"], ">")):
            counts.append(f"count(*) filter (where {column} {side} ?)" if fence is not None else "0")
            fences += [float(fence)] if fence is not None else []
        counts.append(f"count({column})")
    totals = session.one(f"select {', '.join(counts)} from {quote(mart)}", fences)
    for i, record in enumerate(records):
        low_count, high_count, present = totals[3 * i:3 * i + 3]
        record["outliers_low"], record["outliers_high"] = int(low_count), int(high_count)
        record["outlier_share"] = (low_count + high_count) / present if present else None
    frame = pd.DataFrame(records).rename(columns={"p50": "median"})
    return frame.astype({c: float for c in frame.columns if c not in ("column_name", "outliers_low", "outliers_high")})


def category_summary(session: Reader, mart: str, contract: FeatureContract) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Share and churn rate per category (rare ones folded), and Cramér's V with the label.

    Cramér's V (for a binary label, sqrt(chi-square / n)) is computed on every
    category before folding, so folding only shortens the table.
    """
    categorical = contract.categorical
    if not categorical:
        empty = pd.DataFrame(columns=["column_name", "category", "rows", "share", "labelled_rows",
                                      "positives", "churn_rate", "is_other"])
        return empty, pd.DataFrame(columns=["column_name", "cramers_v"])
    casts = ", ".join(f"cast({quote(c)} as string) as {quote(c)}" for c in categorical)
    counts = f"""
        with src as (
            select cast({quote(contract.label)} as double) as __label, {casts} from {quote(mart)}
        ),
        long as (
            select * from src unpivot include nulls (category for column_name in ({column_list(categorical)}))
        )
        select
            column_name,
            coalesce(category, '{MISSING_CATEGORY}') as category,
            count(*) as rows,
            count(__label) as labelled_rows,
            cast(coalesce(sum(__label), 0) as bigint) as positives
        from long
        group by all
    """
    with session.temp_table(CATEGORY_COUNTS, counts) as category_counts:
        return _folded_categories(session, category_counts), _cramers_v(session, category_counts)


def _folded_categories(session: Reader, counts: str) -> pd.DataFrame:
    """The category table from the counts: the MAX_CATEGORIES most frequent per column, the rest folded."""
    return session.frame(f"""
        with ranked as (
            select
                *,
                row_number() over (partition by column_name order by rows desc, category) as position
            from {counts}
        ),
        folded as (
            select
                column_name,
                case when position <= {MAX_CATEGORIES} then category else '{OTHER_CATEGORY}' end as category,
                position > {MAX_CATEGORIES} as is_other,
                cast(sum(rows) as bigint) as rows,
                cast(sum(labelled_rows) as bigint) as labelled_rows,
                cast(sum(positives) as bigint) as positives
            from ranked
            group by all
        )
        select
            column_name,
            category,
            rows,
            rows / sum(rows) over (partition by column_name) as share,
            labelled_rows,
            positives,
            positives / nullif(labelled_rows, 0) as churn_rate,
            is_other
        from folded
        order by column_name, is_other, rows desc, category
    """)


def _cramers_v(session: Reader, counts: str) -> pd.DataFrame:
    """Cramér's V of each categorical feature with the binary label, from every category's counts, by name
    (a grouped result's order is the engine's own, and profile_correlations keeps this order)."""
    return session.frame(f"""
        with totals as (
            select column_name, sum(labelled_rows) as n, sum(positives) / nullif(sum(labelled_rows), 0) as p
            from {counts}
            group by column_name
        ),
        cells as (
            select
                c.column_name,
                t.n,
                power(c.positives - c.labelled_rows * t.p, 2) / nullif(c.labelled_rows * t.p, 0)
                + power((c.labelled_rows - c.positives) - c.labelled_rows * (1 - t.p), 2)
                  / nullif(c.labelled_rows * (1 - t.p), 0) as chi_square
            from {counts} c
            join totals t using (column_name)
            where c.labelled_rows > 0
        )
        select column_name, sqrt(sum(chi_square) / any_value(n)) as cramers_v
        from cells
        group by column_name
        order by column_name
    """)


def _snapshot_stats(session: Reader, relation: str, contract: FeatureContract) -> pd.DataFrame:
    """PROFILE_SNAPSHOTS rows (without the stamp) of every snapshot in `relation`, one grouped scan."""
    label, as_of = quote(contract.label), quote(contract.as_of)
    columns = [contract.label, *[c for c in contract.numeric if c != contract.label]]
    expressions = []
    for i, column in enumerate(columns):
        c = f"cast({quote(column)} as double)"
        expressions += [f"count({c}) as n{i}", f"sum({c}) as s{i}", f"sum({c} * {c}) as ss{i}",
                        f"min({c}) as lo{i}", f"max({c}) as hi{i}", f"{quantiles_sql(session, c)} as q{i}"]
    grouped = session.frame(f"""
        select cast({as_of} as date) as snapshot_date, count(*) as rows, count({label}) as labelled_rows,
            cast(coalesce(sum({label}), 0) as bigint) as positives, {', '.join(expressions)}
        from {relation}
        group by all
        order by snapshot_date
    """)
    records = []
    for row in grouped.itertuples(index=False):
        values = row._asdict()
        for i, column in enumerate(columns):
            q = values[f"q{i}"]
            q = [None] * len(QUANTILES) if q is None or (not isinstance(q, (list, np.ndarray)) and pd.isna(q)) else q
            records.append({
                "snapshot_date": pd.Timestamp(values["snapshot_date"]).date(), "column_name": column,
                "rows": int(values["rows"]), "labelled_rows": int(values["labelled_rows"]),
                "positives": int(values["positives"]), "missing_count": int(values["rows"]) - int(values[f"n{i}"]),
                "value_sum": values[f"s{i}"], "value_sum_squares": values[f"ss{i}"],
                "min_value": values[f"lo{i}"], "max_value": values[f"hi{i}"],
                **{name: q[k] for k, name in enumerate(("p01", "p25", "median", "p75", "p99"))},
            })
    frame = pd.DataFrame(records, columns=[c for c in PROFILE_SNAPSHOTS.column_names
                                           if c not in ("feature_mart", "run_id", "computed_at")])
    floats = ["value_sum", "value_sum_squares", "min_value", "max_value", "p01", "p25", "median", "p75", "p99"]
    return frame.astype({c: "float64" for c in floats})


def update_snapshot_stats(session: Session, config: ChurnConfig, contract: FeatureContract, run_id: str,
                          computed_at: dt.datetime, data: Reader | None = None) -> str:
    """Recompute the stored per-snapshot aggregates of the snapshots changed since the last run; returns the scope.

    The snapshots come from `ml.features.night` (the builds since these rows
    were computed); everything when that is unknown, after a full refresh, or
    when the mart's label or numeric features are not the ones stored. The
    aggregates are computed where the mart is (`data`; None: `session`'s
    build database) and stored through `session`. The delete and insert are
    one transaction; the rows are facts of the mart, so they stand even if the
    rest of the profile then fails.
    """
    mart = config.dataset.feature_mart
    columns = {contract.label, *contract.numeric}
    stored, since = set(), None
    if session.exists(PROFILE_SNAPSHOTS):
        stored = {c for c, in session.rows(f"select distinct column_name from {quote(PROFILE_SNAPSHOTS.name)} "
                                           "where feature_mart = ?", [mart])}
        value = session.scalar(f"select max(computed_at) from {quote(PROFILE_SNAPSHOTS.name)} "
                               "where feature_mart = ?", [mart])
        since = None if value is None else pd.Timestamp(value).to_pydatetime()
    scope = scope_since(session, config, since) if stored == columns else FULL_SCOPE
    predicate = scope.predicate("snapshot_date")
    fresh = _snapshot_stats(session if data is None else data, scoped_relation(config, contract, scope), contract)
    fresh = fresh.assign(feature_mart=mart, run_id=run_id, computed_at=computed_at)[PROFILE_SNAPSHOTS.column_names]
    where = "feature_mart = ?" + ("" if predicate is None else f" and ({predicate})")
    session.append(PROFILE_SNAPSHOTS, fresh, where=where, params=[mart])
    return scope.describe()


def stored_snapshot_stats(session: Session, mart: str) -> pd.DataFrame:
    """The stored per-snapshot aggregates of one mart, by snapshot and column."""
    return session.frame(f"select * exclude (run_id, computed_at) from {quote(PROFILE_SNAPSHOTS.name)} "
                         "where feature_mart = ? order by snapshot_date, column_name", [mart])


def class_balance_from_snapshots(stats: pd.DataFrame, contract: FeatureContract) -> pd.DataFrame:
    """class_balance's frame from the stored aggregates: the same counts, no scan of the mart."""
    per_date = stats[stats["column_name"] == contract.label].sort_values("snapshot_date")
    snapshot = pd.DataFrame({
        "scope": "snapshot",
        "snapshot_date": pd.Series([pd.Timestamp(d).date() for d in per_date["snapshot_date"]], dtype=object),
        "rows": per_date["rows"].to_numpy(), "labelled_rows": per_date["labelled_rows"].to_numpy(),
        "positives": per_date["positives"].to_numpy(),
    })
    overall = pd.DataFrame([{"scope": "overall", "snapshot_date": None, "rows": int(snapshot["rows"].sum()),
                             "labelled_rows": int(snapshot["labelled_rows"].sum()),
                             "positives": int(snapshot["positives"].sum())}])
    frame = pd.concat([overall, snapshot], ignore_index=True)
    frame["snapshot_date"] = frame["snapshot_date"].astype(object)
    labelled = frame["labelled_rows"].astype(float)
    frame["positive_rate"] = (frame["positives"] / labelled.where(labelled > 0)).astype(float)
    return frame.astype({"rows": "int64", "labelled_rows": "int64", "positives": "int64"})


def correlations(
    session: Reader, mart: str, contract: FeatureContract, cramers_v: pd.DataFrame, ordered: str | None = None
) -> pd.DataFrame:
    """Pearson matrix of the numeric features, and each feature against the label.

    Numeric features use Pearson (point-biserial, as the label is 0/1) over the
    labelled rows of `ordered` (the mart or its sample); categorical ones
    Cramér's V over the whole mart. Both are 0 for no association.
    """
    numeric, label = contract.numeric, contract.label
    pairs = [(a, b) for i, a in enumerate(numeric) for b in numeric[i + 1:]]
    expressions = [f"corr({quote(a)}, {quote(b)})" for a, b in pairs]
    expressions += [f"corr({quote(c)}, {quote(label)})" for c in numeric]
    values = session.one(f"select {', '.join(expressions)} from {ordered or quote(mart)}") if expressions else ()

    def clean(value: float | None) -> float | None:
        return None if value is None or not np.isfinite(value) else float(value)

    records = []
    for (a, b), value in zip(pairs, values[: len(pairs)], strict=True):
        for x, y in ((a, b), (b, a)):
            records.append({"column_a": x, "column_b": y, "method": "pearson",
                            "scope": "feature_pair", "correlation": clean(value)})
    for column in numeric:
        records.append({"column_a": column, "column_b": column, "method": "pearson",
                        "scope": "feature_pair", "correlation": 1.0})
    for column, value in zip(numeric, values[len(pairs):], strict=True):
        records.append({"column_a": column, "column_b": label, "method": "pearson",
                        "scope": "feature_label", "correlation": clean(value)})
    for row in cramers_v.itertuples(index=False):
        records.append({"column_a": row.column_name, "column_b": label, "method": "cramers_v",
                        "scope": "feature_label", "correlation": clean(row.cramers_v)})
    frame = pd.DataFrame(records, columns=["column_a", "column_b", "method", "scope", "correlation"])
    return frame.astype({"correlation": float})


def label_association(corr: pd.DataFrame) -> pd.Series:
    """Strength of each feature's association with the label (|Pearson| or Cramér's V)."""
    with_label = corr[corr["scope"] == "feature_label"]
    return with_label.set_index("column_a")["correlation"].abs().astype(float)


def plot_sample(
    session: Reader, mart: str, contract: FeatureContract, columns: list[str], rows: int, seed: int
) -> pd.DataFrame:
    """A bounded, seeded sample of labelled rows for the plots only.

    Ordering by the rows' digests (`row_digest`; key and snapshot break a tie)
    picks the same rows in the same order on every run, thread count and
    engine, without reading the mart into Python.
    """
    selected = column_list([contract.label, *columns])
    return session.frame(f"""
        select {selected} from {quote(mart)}
        where {quote(contract.label)} is not null
        order by {row_digest(contract, seed)}, {quote(contract.key)}, {quote(contract.as_of)}
        limit {int(rows)}
    """)


# ------------------------------------------------------------------ plots

def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)  # constrained layout: one draw, no second tight-bbox pass
    return path


def plot_class_balance(balance: pd.DataFrame, label: str, path: Path) -> Path:
    """Positive rate per snapshot, with labelled and unlabelled rows beneath."""
    per_date = balance[balance["scope"] == "snapshot"].sort_values("snapshot_date")
    overall = balance[balance["scope"] == "overall"].iloc[0]
    fig = Figure(figsize=(10, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    x = np.arange(len(per_date))
    labels = [str(d)[:10] for d in per_date["snapshot_date"]]
    top.bar(x, per_date["positive_rate"].fillna(0.0), color="#c0392b", width=0.7)
    if pd.notna(overall["positive_rate"]):
        top.axhline(overall["positive_rate"], color="black", linestyle="--", linewidth=1,
                    label=f"overall {overall['positive_rate']:.1%}")
        top.legend(loc="upper right")
    top.set_ylabel(f"share {label} = 1")
    top.set_title(f"Class balance per snapshot ({int(overall['labelled_rows']):,d} labelled rows)")
    top.yaxis.set_major_formatter(PercentFormatter(1.0))
    unlabelled = per_date["rows"] - per_date["labelled_rows"]
    bottom.bar(x, per_date["labelled_rows"], color="#2c3e50", width=0.7, label="labelled")
    bottom.bar(x, unlabelled, bottom=per_date["labelled_rows"], color="#bdc3c7", width=0.7,
               label="label not yet observed")
    bottom.set_ylabel("rows")
    bottom.legend(loc="upper left", fontsize=8)
    step = max(1, len(x) // 24)
    bottom.set_xticks(x[::step], labels[::step], rotation=45, ha="right")
    pad = max(0.0, (6 - len(x)) / 2)  # a few snapshots should not become one wall of colour
    bottom.set_xlim(-0.5 - pad, len(x) - 0.5 + pad)
    top.set_ylim(0, max(float(per_date["positive_rate"].max() or 0.0), 0.01) * 1.3)
    return _save(fig, path)


def plot_distributions(
    sample: pd.DataFrame, categories: pd.DataFrame, contract: FeatureContract,
    features: list[str], overall_rate: float, path: Path,
) -> Path:
    """Per-feature distributions by label: histograms (numeric), churn rate per category."""
    kinds = {f.name: f.kind for f in contract.features}
    cols = 2
    rows = max(1, int(np.ceil(len(features) / cols)))
    fig = Figure(figsize=(12, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    label = contract.label
    for ax, feature in zip(axes, features, strict=False):  # the grid may have spare axes
        if kinds[feature] == "numeric":
            values = sample[feature].astype(float)
            finite = values.dropna()
            if finite.empty:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
            else:
                low, high = np.nanquantile(finite, [0.01, 0.99])
                if np.all(finite == np.round(finite)) and high - low <= 60:
                    bins = np.arange(np.floor(low) - 0.5, np.ceil(high) + 1.5)  # one bar per count, no gaps
                else:
                    if low == high:
                        low, high = low - 0.5, high + 0.5
                    bins = np.linspace(low, high, 31)
                for value, color in ((0, "#2c3e50"), (1, "#c0392b")):
                    part = values[(sample[label] == value) & values.notna()].clip(low, high)
                    if len(part):
                        ax.hist(part, bins=bins, density=True, alpha=0.55, color=color,
                                label=f"{label} = {value} (n={len(part):,d})")
                ax.legend(fontsize=7)
                ax.set_ylabel("density")
            ax.set_title(f"{feature} (numeric, clipped to p1-p99)", fontsize=9)
        else:
            rates = categories[categories["column_name"] == feature].head(REPORT_TOP_CATEGORIES)
            rates = rates.iloc[::-1]
            ax.barh([str(c)[:30] for c in rates["category"]], rates["churn_rate"].fillna(0.0), color="#c0392b")
            ax.axvline(overall_rate, color="black", linestyle="--", linewidth=1, label=f"overall {overall_rate:.1%}")
            ax.xaxis.set_major_formatter(PercentFormatter(1.0))
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=7)
            ax.set_title(f"{feature} (categorical): share {label} = 1 per category", fontsize=9)
    for ax in axes[len(features):]:
        ax.set_visible(False)
    fig.suptitle("Distributions by label, features most associated with the label first", fontsize=11)
    return _save(fig, path)


def plot_correlation_heatmap(corr: pd.DataFrame, order: list[str], path: Path) -> Path:
    """Pearson correlations between the numeric features most associated with the label."""
    pairs = corr[corr["scope"] == "feature_pair"]
    matrix = (
        pairs.pivot(index="column_a", columns="column_b", values="correlation").reindex(index=order, columns=order)
        if order else pd.DataFrame()
    )
    size = max(4.0, 0.42 * len(order) + 2.5)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.subplots()
    if matrix.empty:
        ax.text(0.5, 0.5, "no numeric features", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    image = ax.imshow(matrix.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(order)), order, fontsize=7)
    if len(order) <= 15:
        for i in range(len(order)):
            for j in range(len(order)):
                value = matrix.iat[i, j]
                if pd.notna(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson correlation")
    ax.set_title("Correlation of numeric features (most label-associated first)")
    return _save(fig, path)


def plot_missing(summary: pd.DataFrame, path: Path) -> Path:
    """Share of missing values per column, only for columns that have any."""
    missing = summary[summary["missing_count"] > 0].sort_values("missing_share")
    fig = Figure(figsize=(9, max(2.5, 0.3 * len(missing) + 1.5)), layout="constrained")
    ax = fig.subplots()
    if missing.empty:
        ax.text(0.5, 0.5, f"no missing values in any of the {len(summary)} contract columns",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        ax.barh(missing["column_name"], missing["missing_share"], color="#8e44ad")
        for y, (share, count) in enumerate(zip(missing["missing_share"], missing["missing_count"], strict=True)):
            ax.text(share, y, f" {share:.1%} ({count:,d})", va="center", fontsize=7)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlim(0, min(1.0, missing["missing_share"].max() * 1.3 + 0.01))
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"Missing values ({len(missing)} of {len(summary)} columns have any)")
    return _save(fig, path)


# ------------------------------------------------------------------ report

def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:,.4g}", border=0, classes="t")


def _statistics_scope(rows: int, ordered_rows: int | None) -> str:
    if ordered_rows is None or ordered_rows >= rows:
        return f"Statistics over all {rows:,d} rows"
    return (f"Counts, means, extremes and outliers over all {rows:,d} rows; quantiles, medians and "
            f"correlations over a seeded sample of {ordered_rows:,d} of them")


def write_report(
    folder: Path, mart: str, run_id: str, profiled_at: dt.datetime, columns: pd.DataFrame,
    balance: pd.DataFrame, categories: pd.DataFrame, corr: pd.DataFrame, plots: list[Path],
    ordered_rows: int | None = None,
) -> Path:
    """index.html with the plots (relative links) and the key tables."""
    shown = columns[[
        "column_name", "role", "kind", "data_type", "missing_count", "missing_share", "distinct_count",
        "label_association", "min_value", "p01", "p25", "median", "p75", "p99", "max_value",
        "outliers_low", "outliers_high", "mean_label_0", "mean_label_1",
    ]]
    top_categories = categories.groupby("column_name", sort=False).head(REPORT_TOP_CATEGORIES)
    with_label = corr[corr["scope"] == "feature_label"].sort_values(
        "correlation", key=lambda s: s.abs(), ascending=False)
    images = "\n".join(
        f'<figure><img src="{p.name}" alt="{html.escape(p.stem)}">'
        f'<figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in plots
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Profile of {html.escape(mart)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table.t {{ border-collapse: collapse; font-size: 12px; margin-bottom: 2em; }}
table.t th, table.t td {{ padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
table.t th {{ background: #f4f4f4; }}
figure {{ margin: 1em 0 2em; }} img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
<h1>Profile of <code>{html.escape(mart)}</code></h1>
<p>Run {html.escape(run_id)} at {profiled_at:%Y-%m-%d %H:%M:%S}. {_statistics_scope(int(columns["rows"].iloc[0]),
ordered_rows)}; plots from a seeded sample of at most {PLOT_SAMPLE_ROWS:,d} labelled rows.
Outliers by Tukey's rule ({IQR_FENCE} IQR beyond the quartiles). Label association: |Pearson| for
numeric features, Cramér's V for categorical ones.</p>
<h2>Class balance</h2>
{_table_html(balance.fillna({'snapshot_date': ''}))}
<h2>Plots</h2>
{images}
<h2>Columns</h2>
{_table_html(shown)}
<h2>Association with the label</h2>
{_table_html(with_label[["column_a", "method", "correlation"]].rename(columns={"column_a": "feature"}))}
<h2>Categories (top {REPORT_TOP_CATEGORIES} per feature)</h2>
{_table_html(top_categories)}
</body></html>
"""
    path = folder / "index.html"
    path.write_text(page)
    return path


def write_tables(session: Session, mart: str, tables: dict[TableSpec, pd.DataFrame]) -> None:
    """Replace this mart's rows of every profile table in one transaction; other marts' rows are kept.

    A table written before its declaration existed may lack a column a newer
    profile has (e.g. the numeric summary of a mart without numeric features),
    so missing declared columns are added first instead of failing the insert.
    """
    with session.transaction():
        for spec, frame in tables.items():
            if session.exists(spec):
                session.add_missing_columns(spec, spec.column_types)
            session.append(spec, frame, where="feature_mart = ?", params=[mart])


# ------------------------------------------------------------------ entry

def profile(config: ChurnConfig, run_id: str | None = None, sample_rows: int = PLOT_SAMPLE_ROWS,
            data: Reader | None = None) -> ProfileResult:
    """Profile the dataset's feature mart into warehouse tables and a report folder.

    The statistics are computed where the mart is: `data` (Spark's warehouse,
    the data plane) or, when None, the build database. The profile tables and
    the per-snapshot aggregates are stored in the build database either way.
    """
    started = time.perf_counter()
    run_id = run_id or dt.datetime.now().strftime("profile-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    profiled_at = dt.datetime.now()
    mart = config.dataset.feature_mart
    contract = current_contract(config)
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        reader = session if data is None else data
        types = check_mart(reader, config, contract)
        with timed(f"profile statistics of {mart}", log):
            with order_statistics_source(reader, mart, contract, config.training.random_state) as (
                    ordered, ordered_rows):
                columns = column_summary(reader, mart, contract, types)
                numeric = numeric_summary(reader, mart, contract, ordered)
                categories, cramers_v = category_summary(reader, mart, contract)
                scope = update_snapshot_stats(session, config, contract, run_id, profiled_at, reader)
                log.info("profile snapshot aggregates recomputed for %s", scope)
                balance = class_balance_from_snapshots(stored_snapshot_stats(session, mart), contract)
                corr = correlations(reader, mart, contract, cramers_v, ordered)
        association = label_association(corr)
        columns = columns.merge(numeric, on="column_name", how="left")
        columns["label_association"] = columns["column_name"].map(association).astype(float)
        ranked = association.dropna().sort_values(ascending=False).index.tolist()
        top = [f for f in ranked if f in contract.feature_names][:PLOT_TOP_FEATURES]
        sample = plot_sample(reader, mart, contract, top, sample_rows, config.training.random_state)

        stamp = {"feature_mart": mart, "run_id": run_id, "profiled_at": profiled_at}
        tables = {
            PROFILE_COLUMNS: columns,
            PROFILE_CATEGORIES: categories,
            PROFILE_CLASS_BALANCE: balance,
            PROFILE_CORRELATIONS: corr,
        }
        tables = {spec: frame.assign(**stamp)[[*stamp, *frame.columns]] for spec, frame in tables.items()}

        target = report_dir(config)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_path(target)
        staged.mkdir(mode=0o755)  # a report folder is meant to be shared
        try:
            with timed(f"profile plots and report of {mart} ({len(sample):,d} sampled rows)", log):
                overall = balance[balance["scope"] == "overall"].iloc[0]
                numeric_order = [f for f in ranked if f in contract.numeric][:HEATMAP_MAX_FEATURES]
                plots = [
                    plot_class_balance(balance, contract.label, staged / PLOTS[0]),
                    plot_distributions(sample, categories, contract, top,
                                       float(overall["positive_rate"] or 0.0), staged / PLOTS[1]),
                    plot_correlation_heatmap(corr, numeric_order, staged / PLOTS[2]),
                    plot_missing(columns, staged / PLOTS[3]),
                ]
                write_report(staged, mart, run_id, profiled_at, columns, balance, categories, corr, plots,
                             ordered_rows)
            write_tables(session, mart, tables)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        replace_folder(staged, target)
    result = ProfileResult(
        feature_mart=mart,
        run_id=run_id,
        rows=int(columns["rows"].iloc[0]),
        columns=len(columns),
        report_path=target / "index.html",
        plots=tuple(target / p for p in PLOTS),
        seconds=time.perf_counter() - started,
    )
    log.info("profiled %s: %d rows, %d columns in %.1fs; report %s",
             mart, result.rows, result.columns, result.seconds, result.report_path)
    return result


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    if args.sample_rows < 1:
        raise ProfileError(f"--sample-rows must be at least 1, got {args.sample_rows}")
    result = profile(config, sample_rows=args.sample_rows)
    print(f"profiled {result.feature_mart}: {result.rows:,d} rows, {result.columns} columns "
          f"in {result.seconds:.1f}s")
    for table in TABLES:
        print(f"  table  {table}")
    print(f"  report {result.report_path}")
    return 0
