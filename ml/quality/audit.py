"""`churn audit`: Great Expectations suites run against landing files and warehouse tables.

dbt tests are the first line (keys, not-null, accepted values, ranges on
staging and marts). The suites in `expectations/<dataset>/*.json` (GX Core 1.x
ExpectationSuite JSON, versioned with the code) add what dbt does not express
well: row-count bands against the last audited run, null-share bounds
(`mostly`), dates not in the future, the label share in a plausible band and
the sanity of the score distribution. Each suite's `meta` names the stage
(`landing`, `mart`, `scores`) and the table it targets; each expectation's
`meta.severity` is `critical` (the run stops, nothing is published) or
`warning` (recorded, the run goes on). Bands that are settings live in
churn.yml and reach the suites as suite parameters (`{"$PARAMETER": ...}`).

Route (measured, see the report in benchmarks and README): GX's SQL datasource
cannot be used on DuckDB as shipped (GX issues 10738 and 11579: the connection
is closed before results are read, every expectation "fails" with an
IndexError hidden in exception_info), and its workaround needs SQLAlchemy and
duckdb_engine, neither installed. So GX's pandas engine judges the
expectations, and the engine feeds it only what each expectation needs:

* row-wise checks with one exact SQL spelling (not null, numeric ranges,
  accepted values, uniqueness; ml/quality/pushdown.py) as SQL counts on the
  engine, judged by GX's `mostly` rule on the counts, as streamed batches
  are: no row of the table reaches this process (on Spark, the driver);
* one column per batch (column projection), never the whole table;
* row-wise (map) expectations in streamed batches of `quality.chunk_rows`
  rows; their counts are summed over batches and GX's own `mostly` rule is
  re-applied to the totals, so keys and nulls are checked on every row, not a
  sample, with memory bounded by one batch of one column;
* uniqueness in hash partitions of the column (a duplicate always falls in
  one partition, so per-partition duplicate counts add up exactly);
* column min/max on a two-row frame DuckDB reduces the column to (exact for
  both metrics), row counts on index-only batches of `chunk_rows` rows whose
  lengths are summed and judged by the same between/equal rule;
* column means (label share, score mean) on a one-row frame holding the
  column's SQL average (GX's mean of it is that average), standard
  deviations on a two-row frame m -/+ s/sqrt(2) of the SQL mean and sample
  deviation (GX's ddof=1 deviation of it is s);
* other aggregates on the full column.

The mart is audited on the night, not the history: its row-wise checks read
only the snapshots the builds since the last passed mart audit rebuilt or
relabelled (`ml.features.night`; everything after a full refresh), and its
table-level checks (row counts, key uniqueness, freshness, label share, and
row-wise checks with `mostly` below 1, which judge a share of the table) stay
SQL aggregates or bounded batches over the whole mart. Each stored verdict
says which rows it read (`rows_checked`, `scope` = `tonight` or `all`).

Engines: the mart and the scores are data plane, read where they live, the
build database or Spark (`audit(..., data=SparkWarehouse)`), through the
`Reader` vocabulary both offer; every statement those stages send is SQL both
run (ANSI, double-quoted names, `?` parameters, columns from `limit 0`, hash
partitions folded to non-negative remainders). Frames reach GX with the same
dtypes on both (SparkWarehouse converts Arrow by DuckDB's rules), so the
verdicts are the same; only a float column's SQL mean may differ in its last
bits, each engine summing in its own order. The verdicts, the row-count
history and the night's scope are control plane and stay in the build
database on every engine; the landing stage reads files through an in-memory
DuckDB on every engine.

The pandas engine hashes every batch it is given (about 0.1 us per value), so
batches are per column and shared by every expectation on that column. An
expectation whose metric raised (exception_info set) is a failure carrying the
exception's message, never a pass and never an anonymous fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ml.config import ChurnConfig
from ml.data.landing import LandingChanges, LandingTable, landing_tables
from ml.features.mart import current_contract, latest_snapshot_date, snapshot_size
from ml.features.night import NightScope, scope_since, scoped_relation
from ml.logs import get_logger, timed
from ml.quality.data_docs import SuiteRun, write_data_docs
from ml.quality.default_suites import write_default_suites
from ml.quality.pushdown import CompiledCheck, Counts, compile_check, count_checks
from ml.quality.verdicts import CheckResult
from ml.warehouse import MEMORY, Reader, Session, column_list, connect, declare, is_missing, json_value, quote
from ml.warehouse.connection import VECTOR_ROWS

log = get_logger("quality")

STAGES = ("landing", "mart", "scores")
SEVERITIES = ("critical", "warning")

RESULTS = declare(
    name="data_quality_results",
    owner=__name__,
    grain="one row per (run_id, dataset, stage, suite, expectation)",
    description="The verdict on every Great Expectations expectation of every audit; BI shows failures.",
    columns=[
        ("run_id", "VARCHAR"), ("dataset", "VARCHAR"), ("stage", "VARCHAR"), ("suite", "VARCHAR"),
        ("table_name", "VARCHAR"), ("expectation_type", "VARCHAR"), ("column_name", "VARCHAR"),
        ("severity", "VARCHAR"), ("success", "BOOLEAN"), ("observed_value", "VARCHAR"),
        ("unexpected_count", "BIGINT"), ("element_count", "BIGINT"), ("details", "VARCHAR"),
        ("checked_at", "TIMESTAMP"),
        ("rows_checked", "BIGINT"),  # rows the check read: tonight's for row-wise checks of a night's scope
        ("scope", "VARCHAR"),  # tonight (new and rebuilt snapshots or partitions only) or all
    ],
)
ROW_COUNTS = declare(
    name="data_quality_row_counts",
    owner=__name__,
    grain="one row per (run_id, dataset, suite)",
    description="Rows each suite's table had in a passed audit: the base of the next run's row-count band.",
    columns=[
        ("dataset", "VARCHAR"), ("suite", "VARCHAR"), ("table_name", "VARCHAR"), ("as_of", "VARCHAR"),
        ("row_count", "BIGINT"), ("run_id", "VARCHAR"), ("recorded_at", "TIMESTAMP"),
    ],
)
RESULTS_TABLE = RESULTS.name
COUNTS_TABLE = ROW_COUNTS.name
MINMAX = ("expect_column_min_to_be_between", "expect_column_max_to_be_between")
UNIQUE = ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique")
MEAN = "expect_column_mean_to_be_between"
STDEV = "expect_column_stdev_to_be_between"


class SuiteError(ValueError):
    """An expectation suite file is malformed (bad JSON, unknown expectation, missing severity)."""


class AuditError(RuntimeError):
    """A critical expectation failed; the message names suite, expectation, column and rows."""

    def __init__(self, message: str, report: AuditReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Suite:
    """One suite file: its GX suite, the stage it runs in and the table it targets."""

    path: Path
    name: str
    stage: str
    table: str
    expectations: tuple[Any, ...]  # GX Expectation objects, in file order

    @property
    def dataset(self) -> str:
        return self.path.parent.name


@dataclass
class AuditReport:
    stage: str
    run_id: str
    results: list[CheckResult] = field(default_factory=list)
    docs: list[Path] = field(default_factory=list)

    @property
    def critical_failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success and r.severity == "critical"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success and r.severity == "warning"]


# --- suites -----------------------------------------------------------------


ROLE_PLACEHOLDERS = ("$entity_key", "$as_of_column", "$target")


def _names(config: ChurnConfig) -> dict[str, str]:
    """Placeholders a suite may use for names the dataset owns, so no suite repeats them.

    The key, snapshot and label names are the mart contract's (its dbt YAML roles),
    not churn.yml's defaults: a mart keyed by `account_id` with label `exited` is
    audited on those columns. Before the first build there is no manifest; a suite
    that needs a role name then fails naming the placeholder (see `_resolve_name`).
    """
    from ml.features.dbt import dbt_target_path

    names = {"$feature_mart": config.dataset.feature_mart}
    if (dbt_target_path(config) / "manifest.json").exists():
        contract = current_contract(config)
        names |= dict(zip(ROLE_PLACEHOLDERS, (contract.key, contract.as_of, contract.label), strict=True))
    return names


def _resolve_name(value: str, names: dict[str, str], path: Path) -> str:
    if value in ROLE_PLACEHOLDERS and value not in names:
        raise SuiteError(f"{path}: {value} is the mart contract's name and needs dbt's manifest "
                         "(run `churn build` first)")
    return names.get(value, value)


def _feature_names(config: ChurnConfig) -> list[str]:
    """The mart's features from the contract in dbt's manifest (`$each_feature` expands to these)."""
    from ml.features.dbt import dbt_target_path

    manifest = dbt_target_path(config) / "manifest.json"
    if not manifest.exists():
        raise SuiteError(f"$each_feature needs dbt's manifest, not found: {manifest} (run `churn build` first)")
    return list(current_contract(config).feature_names)


def load_suite(path: Path, config: ChurnConfig) -> Suite:
    """Read and check one GX suite file; every problem names the file and the expectation.

    Strings `$feature_mart`, `$entity_key`, `$as_of_column` and `$target` are replaced
    by the dataset's mart and its contract's key, snapshot and label names; an
    expectation on column `$each_feature` is repeated for every feature of the
    mart's contract (features are defined in SQL only).
    """
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path}: not valid JSON: {exc}") from exc
    names = _names(config)
    meta = raw.get("meta") or {}
    if meta.get("stage") not in STAGES or not meta.get("table"):
        raise SuiteError(f"{path}: meta must give stage ({'/'.join(STAGES)}) and table")
    specs: list[tuple[int, dict[str, Any]]] = []
    for i, spec in enumerate(raw.get("expectations", [])):
        kwargs = {k: _resolve_name(v, names, path) if isinstance(v, str)
                  else [_resolve_name(c, names, path) if isinstance(c, str) else c for c in v] if k == "column_list"
                  else v for k, v in (spec.get("kwargs") or {}).items()}
        if kwargs.get("column") == "$each_feature":
            specs += [(i, {**spec, "kwargs": {**kwargs, "column": f}}) for f in _feature_names(config)]
        else:
            specs.append((i, {**spec, "kwargs": kwargs}))
    expectations = []
    for index, (i, spec) in enumerate(specs):
        severity = (spec.get("meta") or {}).get("severity")
        if severity not in SEVERITIES:
            raise SuiteError(f"{path}: expectation #{i} ({spec.get('type')}): "
                             "meta.severity must be critical or warning")
        try:
            configuration = ExpectationConfiguration(
                type=spec["type"], kwargs=spec["kwargs"], meta={**spec["meta"], "index": index})
            expectations.append(configuration.to_domain_obj())
        except Exception as exc:  # GX validates kwargs with pydantic; say which expectation
            raise SuiteError(f"{path}: expectation #{i} ({spec.get('type')}) is invalid: {exc}") from exc
    table = names.get(meta["table"], meta["table"])
    return Suite(path=path, name=raw.get("name") or path.stem, stage=meta["stage"], table=table,
                 expectations=tuple(expectations))


def load_suites(config: ChurnConfig, stage: str) -> list[Suite]:
    """The active dataset's suites for one stage, in file-name order.

    A stage without suites is not passed with 0 expectations: it is warned about
    loudly and judged by a default suite generated from the contract.
    """
    folder = config.warehouse.expectations_dir / config.dataset.name
    paths = [p for p in sorted(folder.glob("*.json"))
             if json.loads(p.read_text()).get("meta", {}).get("stage") == stage]
    if not paths:
        paths = write_default_suites(config, stage)
        log.warning("NO %s SUITES for dataset %r in %s: auditing with %d default suite(s) generated from the "
                    "contract (%s); copy them into %s to review and own them", stage.upper(), config.dataset.name,
                    folder, len(paths), ", ".join(str(p) for p in paths) or "none: no landing tables", folder)
    return [load_suite(p, config) for p in paths]


# --- reading what each expectation needs --------------------------------------


def _columns_of(expectation: Any) -> list[str]:
    kwargs = expectation.configuration.kwargs
    if "column" in kwargs:
        return [kwargs["column"]]
    if "column_list" in kwargs:
        return list(kwargs["column_list"])
    return [kwargs[k] for k in ("column_A", "column_B") if k in kwargs]


def _is_map(expectation: Any) -> bool:
    from great_expectations.expectations.expectation import ColumnMapExpectation

    return isinstance(expectation, ColumnMapExpectation)


def _plan(expectation: Any) -> tuple[str, tuple[str, ...]]:
    """How to feed this expectation: (strategy, columns). Expectations sharing a plan share batches."""
    columns = tuple(_columns_of(expectation))
    kind = expectation.expectation_type
    if not columns:
        return ("rows" if kind.startswith("expect_table_row_count") else "schema"), ()
    if kind in UNIQUE:  # a duplicate falls in one hash partition, compound keys included
        return "partitions", columns
    if len(columns) == 1 and _is_map(expectation):
        return "stream", columns
    if kind in MINMAX:
        return "minmax", columns
    if kind == MEAN:
        return "mean", columns
    if kind == STDEV:
        return "stdev", columns
    return "whole", columns


def _vectorizable(frame: pd.DataFrame) -> pd.DataFrame:
    """Dtypes GX's pandas metrics compare vectorized: int64/float64 and datetime64[ns].

    DuckDB hands over datetime64[us] and int32; for those GX falls back to a Python
    call per value (about 17 us per row, 30 minutes for 120M usage events).
    """
    for column, dtype in frame.dtypes.items():
        try:
            if pd.api.types.is_datetime64_dtype(dtype) and dtype != "datetime64[ns]":
                frame[column] = frame[column].astype("datetime64[ns]")
            elif (pd.api.types.is_integer_dtype(dtype) and dtype != "int64"
                  and not pd.api.types.is_extension_array_dtype(dtype)):
                frame[column] = frame[column].astype("int64")
            elif pd.api.types.is_float_dtype(dtype) and dtype != "float64":
                frame[column] = frame[column].astype("float64")
        except (OverflowError, ValueError, pd.errors.OutOfBoundsDatetime):
            pass  # a date outside the ns range stays as it is: slower, still exact
    return frame


def hash_partition(projection: str, parts: int, part: int) -> str:
    """SQL true for the rows of hash partition `part` of `parts`, on DuckDB and Spark alike.

    DuckDB's `hash` is unsigned, Spark's a signed 32-bit int whose `%` keeps the
    sign: a plain `hash % parts = part` would put Spark's negative hashes in no
    partition, and the duplicates among them would never be seen. Folding the
    remainder into 0..parts-1 keeps every row in exactly one partition on both,
    and leaves DuckDB's partitions what they always were (its remainder is never
    negative).
    """
    return f"((hash({projection}) % {parts}) + {parts}) % {parts} = {part}"


def _present_double(column: str) -> str:
    """The column as a double with NaN as NULL: SQL aggregates skip what pandas (GX's engine) skips."""
    x = f"try_cast({column} as double)"
    return f"case when isnan({x}) then null else {x} end"


def _frames(session: Reader, relation: str, strategy: str, columns: tuple[str, ...],
            rows: int, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The batches GX sees for one plan; see the module docstring for why each is exact."""
    projection = column_list(columns)
    if strategy == "rows":
        # GX hashes every batch it gets; an index of 120M rows would cost GBs, so batches of chunk_rows.
        for start in range(0, max(rows, 1), chunk_rows):
            yield pd.DataFrame(index=pd.RangeIndex(min(chunk_rows, rows - start)))
    elif strategy == "schema":
        yield session.frame(f"select * from {relation} limit 0")
    elif strategy == "minmax":
        c = quote(columns[0])

        def bounds(value: str) -> pd.DataFrame:
            return _vectorizable(session.frame(f"select min({value}) as {c} from {relation} "
                                               f"union all select max({value}) from {relation}"))

        frame = bounds(c)
        if pd.api.types.is_float_dtype(frame[columns[0]]) and frame[columns[0]].isna().any():
            # SQL sorts a float's NaN above every number, pandas (GX's engine) skips it; asked
            # again only then, since isnan takes numbers and the column may hold dates or text
            frame = bounds(f"case when isnan({c}) then null else {c} end")
        yield frame
    elif strategy == "mean":
        c = quote(columns[0])
        yield _vectorizable(session.frame(f"select avg({_present_double(c)}) as {c} from {relation}"))
    elif strategy == "stdev":
        # Two rows with the column's mean and sample standard deviation (pandas' ddof=1, as GX's
        # metric): m -/+ s/sqrt(2). NULL (fewer than two values) gives two NaNs, GX's verdict on them.
        c = quote(columns[0])
        x = _present_double(c)
        mean, std = session.one(f"select avg({x}), stddev_samp({x}) from {relation}") or (None, None)
        half = None if mean is None or std is None else float(std) / math.sqrt(2)
        values = [math.nan, math.nan] if half is None else [float(mean) - half, float(mean) + half]
        yield pd.DataFrame({columns[0]: values})
    elif strategy == "partitions":
        parts = max(1, math.ceil(rows / chunk_rows))
        for part in range(parts):
            where = f" where {hash_partition(projection, parts, part)}" if parts > 1 else ""
            yield _vectorizable(session.frame(f"select {projection} from {relation}{where}"))
    elif strategy == "stream":
        # Whole vectors, rounded down as the audit always streamed (so batch counts, and with
        # them the stored results, stay what they were); the first chunk even of an empty table,
        # so GX still judges (and names) the expectation on zero rows.
        whole_vectors = VECTOR_ROWS * max(1, chunk_rows // VECTOR_ROWS)
        for frame in session.chunks(f"select {projection} from {relation}", chunk_rows=whole_vectors, always_one=True):
            yield _vectorizable(frame)
    else:
        yield _vectorizable(session.frame(f"select {projection} from {relation}"))


# --- judging ------------------------------------------------------------------


def exception_message(result: Any) -> str | None:
    """The message of an exception GX caught while computing an expectation's metrics.

    GX reports it either flat ({raised_exception, exception_message}) or keyed by
    the metric that raised; both mean the expectation could not be evaluated.
    """
    info = getattr(result, "exception_info", None) or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "exception without message")
    for value in info.values():
        if isinstance(value, dict) and (value.get("raised_exception") or value.get("exception_message")):
            return str(value.get("exception_message") or "exception without message")
    return None


def _result_json(value: Any) -> Any:
    """Plain JSON of a GX result (for storage and Data Docs), timestamps written as `str()` does.

    `json_value` writes datetimes ISO ("2031-01-01T00:00:00"); data_quality_results
    and the Data Docs have always shown them as "2031-01-01 00:00:00", and that
    stored text stays as it was, so datetimes become text before the conversion.
    """
    if isinstance(value, dict):
        return {str(k): _result_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_result_json(v) for v in value]
    if isinstance(value, dt.datetime) and not is_missing(value):  # pd.Timestamp is a datetime
        return str(value)
    return json_value(value)


@dataclass
class _Tally:
    """Counts of one map expectation summed over batches."""

    element_count: int = 0
    missing_count: int = 0
    unexpected_count: int = 0
    has_missing: bool = False
    sample: list[Any] = field(default_factory=list)
    error: str | None = None
    last: Any = None

    def add(self, result: Any) -> None:
        self.last = result
        error = exception_message(result)
        if error:
            self.error = self.error or error
            return
        r = result.result or {}
        if "observed_value" in r and result.expectation_config.type.startswith("expect_table_row_count"):
            self.element_count += int(r["observed_value"])  # a batch's rows
            return
        self.element_count += int(r.get("element_count") or 0)
        self.unexpected_count += int(r.get("unexpected_count") or 0)
        if "missing_count" in r:
            self.has_missing = True
            self.missing_count += int(r.get("missing_count") or 0)
        self.sample += list(r.get("partial_unexpected_list") or [])[: 20 - len(self.sample)]

    def row_count_verdict(self, kwargs: dict[str, Any], parameters: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """GX's row-count rule (between, or equal) on the rows summed over batches."""
        def value(v: Any) -> Any:
            return parameters.get(v["$PARAMETER"]) if isinstance(v, dict) and "$PARAMETER" in v else v
        rows = self.element_count
        if "value" in kwargs:
            success = rows == value(kwargs["value"])
        else:
            low, high = value(kwargs.get("min_value")), value(kwargs.get("max_value"))
            success = (low is None or rows >= low) and (high is None or rows <= high)
        return success, {"observed_value": rows}

    def counts(self) -> Counts:
        """The totals so far, as the engine's counts of a compiled check are held."""
        return Counts(element_count=self.element_count, missing_count=self.missing_count,
                      unexpected_count=self.unexpected_count, has_missing=self.has_missing,
                      sample=tuple(self.sample))


def mostly_verdict(counts: Counts, mostly: float) -> tuple[bool, dict[str, Any]]:
    """GX's rule on totals: the expected share of considered rows is at least `mostly`.

    One rule for a column streamed in several batches and for the engine's own counts."""
    considered = counts.element_count - (counts.missing_count if counts.has_missing else 0)
    success = considered == 0 or (considered - counts.unexpected_count) / considered >= mostly
    result = {
        "element_count": counts.element_count,
        "unexpected_count": counts.unexpected_count,
        "unexpected_percent": 100.0 * counts.unexpected_count / considered if considered else 0.0,
        "partial_unexpected_list": _result_json(list(counts.sample)),
    }
    if counts.has_missing:
        result["missing_count"] = counts.missing_count
    return success, result


class Judge:
    """One GX ephemeral context with a pandas datasource, reused for every batch."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self.context.data_sources.add_pandas("duckdb_projection")
        self.batch_definition = source.add_dataframe_asset("batch").add_batch_definition_whole_dataframe("all")

    def validate(self, frame: pd.DataFrame, expectations: list[Any], parameters: dict[str, Any]) -> list[Any]:
        """GX's verdicts on one batch, in the order of `expectations`."""
        from great_expectations.core import ExpectationSuite

        suite = ExpectationSuite(name="batch", expectations=[e.copy() for e in expectations])
        batch = self.batch_definition.get_batch(batch_parameters={"dataframe": frame})
        outcome = batch.validate(suite, expectation_parameters=parameters, result_format="SUMMARY")
        by_index = {r.expectation_config.meta["index"]: r for r in outcome.results}
        return [by_index[e.configuration.meta["index"]] for e in expectations]


def _observed(result: dict[str, Any]) -> str | None:
    if "observed_value" in result:
        return json.dumps(_result_json(result["observed_value"]))
    if "unexpected_percent" in result:
        percent = result["unexpected_percent"]  # None when every value is null
        return "no non-null values" if percent is None else f"{percent:.4g}% unexpected"
    return None


def _details(result: dict[str, Any], error: str | None) -> str:
    if error:
        return f"expectation raised: {error}"
    sample = result.get("partial_unexpected_list")
    if sample:
        return "e.g. " + ", ".join(str(v) for v in sample[:5])
    return ""


Plan = tuple[str, tuple[str, ...]]  # (strategy, columns): how one group of expectations is fed


@dataclass(frozen=True)
class _RelationFacts:
    """What every plan needs to know of the relation before reading it."""

    rows: int
    columns: frozenset[str]
    dtypes: Mapping[str, Any]  # column -> pandas dtype of the engine's frames (what GX would be fed)


@dataclass(frozen=True)
class _Fed:
    """One plan's expectations after every batch went through GX."""

    tallies: tuple[_Tally, ...]  # in the order of the plan's expectations
    batches: int


def _index(expectation: Any) -> int:
    return expectation.configuration.meta["index"]


def _relation_facts(session: Reader, relation: str) -> _RelationFacts:
    """Rows and column names of a table or subquery, in SQL both engines run.

    The names come from an empty result's frame, plain SQL: `describe <query>`
    is each engine's own extension with its own result columns (DuckDB's
    column_name, column_type, ...; Spark's col_name, data_type, comment), and
    `Reader.columns` takes tables only, while a relation may be tonight's
    subquery or a typed landing file. Neither engine reads a row for `limit 0`
    (Spark plans it as an empty relation).
    """
    rows = int(session.scalar(f"select count(*) from {relation}"))
    empty = session.frame(f"select * from {relation} limit 0")
    return _RelationFacts(rows=rows, columns=frozenset(empty.columns), dtypes=dict(empty.dtypes.items()))


def plan_batches(suite: Suite) -> dict[Plan, list[Any]]:
    """The suite's expectations grouped by how they are fed; a group shares every batch."""
    plans: dict[Plan, list[Any]] = {}
    for expectation in suite.expectations:
        plans.setdefault(_plan(expectation), []).append(expectation)
    return plans


def _failed(expectation: Any, message: str) -> Any:
    """A GX result for an expectation that could not be evaluated: a failure carrying why."""
    from great_expectations.core import ExpectationValidationResult

    return ExpectationValidationResult(
        success=False, expectation_config=expectation.configuration, result={},
        exception_info={"raised_exception": True, "exception_message": message, "exception_traceback": message})


def _missing_column_results(group: list[Any], missing: list[str], table: str) -> dict[int, Any]:
    message = f"column(s) {', '.join(missing)} not in {table}"
    return {_index(e): _failed(e, message) for e in group}


def feed_batches(session: Reader, relation: str, suite: Suite, plan: Plan, group: list[Any], rows: int,
                 chunk_rows: int, judge: Judge, parameters: dict[str, Any]) -> _Fed:
    """Every batch of one plan through GX, each expectation's verdicts summed in its tally."""
    strategy, columns = plan
    tallies = tuple(_Tally() for _ in group)
    batches, started = 0, time.perf_counter()
    for frame in _frames(session, relation, strategy, columns, rows, chunk_rows):
        batches += 1
        results = judge.validate(frame, group, parameters)
        if len(results) != len(tallies):  # a short list would silently drop checks
            raise SuiteError(
                f"{suite.name} (table {suite.table}): GX returned {len(results)} result(s) for "
                f"{len(tallies)} expectation(s) on batch {batches} ({len(frame):,d} rows, plan {strategy})"
            )
        for tally, result in zip(tallies, results, strict=True):
            tally.add(result)
    log.debug("%s: %s %s, %d expectation(s), %d batch(es) in %.2fs", suite.name, strategy,
              ",".join(columns) or "-", len(group), batches, time.perf_counter() - started)
    return _Fed(tallies=tallies, batches=batches)


def _totals_result(expectation: Any, success: bool, summary: dict[str, Any]) -> Any:
    """A GX result judged by GX's rule on counts this module summed (over batches, or in SQL)."""
    from great_expectations.core import ExpectationValidationResult

    return ExpectationValidationResult(
        success=success, expectation_config=expectation.configuration, result=summary,
        exception_info={"raised_exception": False, "exception_message": None, "exception_traceback": None},
    )


def judge_counts(group: list[Any], counts: Mapping[int, Counts]) -> dict[int, Any]:
    """Verdicts of row-wise expectations the engine counted (ml/quality/pushdown.py), by the rule
    a column streamed in several batches is judged by."""
    verdicts: dict[int, Any] = {}
    for e in group:
        verdicts[_index(e)] = _totals_result(e, *mostly_verdict(counts[_index(e)], _mostly(e)))
    return verdicts


def judge_group(strategy: str, group: list[Any], fed: _Fed, parameters: dict[str, Any]) -> dict[int, Any]:
    """Each expectation's verdict over all batches: GX's own for one batch, GX's rule on the totals for more."""
    verdicts: dict[int, Any] = {}
    for e, tally in zip(group, fed.tallies, strict=True):
        if tally.error:  # an error in any batch fails the expectation
            verdicts[_index(e)] = tally.last if fed.batches == 1 else _failed(e, tally.error)
            continue
        if fed.batches == 1:
            verdicts[_index(e)] = tally.last
            continue
        if strategy == "rows":
            success, summary = tally.row_count_verdict(e.configuration.kwargs, parameters)
        else:
            success, summary = mostly_verdict(tally.counts(), _mostly(e))
        verdicts[_index(e)] = _totals_result(e, success, summary)
    return verdicts


def _plain_results(results: list[Any]) -> list[Any]:
    """GX's renderers cannot show pandas NA in unexpected-value lists: plain JSON in every result."""
    for result in results:
        result.result = _result_json(result.result or {})
    return results


def check_results(suite: Suite, results: list[Any], rows: int,
                  read_rows: dict[int, tuple[int, str]] | None = None) -> list[CheckResult]:
    """The rows data_quality_results stores, one per expectation in suite order.

    `read_rows`: expectation index -> (rows it read, scope); unlisted ones read all `rows`.
    """
    checks = []
    for e, result in zip(suite.expectations, results, strict=True):
        rows_checked, scope = (read_rows or {}).get(_index(e), (rows, "all"))
        error = exception_message(result)
        r = result.result or {}
        columns = _columns_of(e)
        checks.append(CheckResult(
            suite=suite.name,
            table_name=suite.table,
            expectation_type=e.expectation_type,
            column_name=",".join(columns) or None,
            severity=e.configuration.meta["severity"],
            success=bool(result.success) and error is None,
            observed_value=_observed(r),
            unexpected_count=None if error or "unexpected_count" not in r else int(r["unexpected_count"]),
            element_count=None if error else int(r.get("element_count", rows)),
            details=_details(r, error),
            rows_checked=rows_checked,
            scope=scope,
        ))
    return checks


def _suite_validation(suite: Suite, results: list[Any], checks: list[CheckResult],
                      parameters: dict[str, Any], rows: int) -> Any:
    """The GX suite result of one suite: its verdict, statistics and the rows it judged."""
    from great_expectations.core import ExpectationSuiteValidationResult

    passed = sum(c.success for c in checks)
    return ExpectationSuiteValidationResult(
        success=all(c.success or c.severity != "critical" for c in checks),
        results=results,
        suite_name=suite.name,
        suite_parameters=_result_json(parameters),
        statistics={
            "evaluated_expectations": len(checks),
            "successful_expectations": passed,
            "unsuccessful_expectations": len(checks) - passed,
            "success_percent": 100.0 * passed / max(1, len(checks)),
        },
        meta={"table": suite.table, "rows": rows},
    )


def _mostly(expectation: Any) -> float:
    return float(expectation.configuration.kwargs.get("mostly", 1.0))


def _compiled(plan: Plan, group: list[Any], facts: _RelationFacts,
              parameters: dict[str, Any]) -> dict[int, CompiledCheck]:
    """The row-wise expectations of a streamed plan (or a pair of columns fed whole) that the engine can
    count itself, by index."""
    if plan[0] not in ("stream", "partitions", "whole"):
        return {}
    found = {_index(e): compile_check(e, _index(e), facts.dtypes, parameters) for e in group}
    return {index: check for index, check in found.items() if check is not None}


def run_suite(session: Reader, relation: str, suite: Suite, parameters: dict[str, Any],
              chunk_rows: int, judge: Judge, night: str | None = None,
              shares_whole: bool = False) -> tuple[list[CheckResult], Any]:
    """Validate one suite against a relation; returns stored rows and the GX suite result (for docs).

    Plan the batches, feed each plan's batches through GX, judge the totals,
    then build the stored rows and the Data Docs result. `night` (tonight's
    new and rewritten landing partitions, or the mart's rebuilt and relabelled
    snapshots): the rows the row-wise checks read instead of the whole history
    that passed them before; table checks (row counts, uniqueness, aggregates)
    still read `relation`, the whole. `shares_whole` (the mart): a row-wise
    check with `mostly` below 1 judges a share of the table, not each row (the
    label is null on tonight's snapshot by design), so it reads the whole too.
    """
    facts = _relation_facts(session, relation)
    night_facts = _relation_facts(session, night) if night is not None else facts
    verdicts: dict[int, Any] = {}
    read_rows: dict[int, tuple[int, str]] = {}
    for plan, group in plan_batches(suite).items():
        missing = [c for c in plan[1] if c not in facts.columns]
        if missing:
            verdicts.update(_missing_column_results(group, missing, suite.table))
            continue
        nightly = night is not None and plan[0] == "stream"
        parts = ([[e for e in group if _mostly(e) >= 1.0], [e for e in group if _mostly(e) < 1.0]]
                 if nightly and shares_whole else [group])
        for part in (p for p in parts if p):
            tonight = nightly and (not shares_whole or _mostly(part[0]) >= 1.0)
            read, rows = (night, night_facts.rows) if tonight else (relation, facts.rows)
            compiled = _compiled(plan, part, facts, parameters)
            if compiled:
                counts = count_checks(session, read, plan[1], list(compiled.values()))
                verdicts.update(judge_counts([e for e in part if _index(e) in compiled], counts))
            streamed = [e for e in part if _index(e) not in compiled]
            if streamed:
                fed = feed_batches(session, read, suite, plan, streamed, rows, chunk_rows, judge, parameters)
                verdicts.update(judge_group(plan[0], streamed, fed, parameters))
            read_rows.update({_index(e): (rows, "tonight" if tonight else "all") for e in part})
    results = _plain_results([verdicts[_index(e)] for e in suite.expectations])
    checks = check_results(suite, results, facts.rows, read_rows)
    return checks, _suite_validation(suite, results, checks, parameters, facts.rows)


# --- parameters and history ---------------------------------------------------


def _previous_rows(config: ChurnConfig, suite: Suite, as_of: str | None) -> int | None:
    """Rows of the suite's table in the last audited run (at or before `as_of` when given)."""
    if not config.warehouse.build_db.exists():
        return None
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        if not session.exists(ROW_COUNTS):
            return None
        value = session.scalar(
            f"select row_count from {quote(ROW_COUNTS.name)} where dataset = ? and suite = ? "
            "and (? is null or as_of is null or as_of <= ?) order by recorded_at desc limit 1",
            [config.dataset.name, suite.name, as_of, as_of],
        )
    return None if value is None else int(value)


@contextmanager
def data_plane(config: ChurnConfig, data: Reader | None = None) -> Iterator[Reader]:
    """Where the mart and the scores are read: `data` (e.g. Spark) when given, else the build database.

    The build database is opened read-only for the one job and closed after it,
    as every read of it is; a given `data` reader is the caller's and stays open.
    """
    if data is not None:
        yield data
        return
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        yield session


def _suite_reader(config: ChurnConfig, stage: str, data: Reader | None) -> AbstractContextManager[Reader]:
    """What one suite reads its table with: landing files through an in-memory DuckDB (the build
    database is not touched), the mart and the scores on the data plane."""
    if stage == "landing":
        return connect(MEMORY, settings=config.warehouse.engine)
    return data_plane(config, data)


def _active_customers(config: ChurnConfig, data: Reader | None = None) -> int | None:
    """Rows of the feature mart on its latest as_of_date: the customers scoring must cover."""
    with data_plane(config, data) as session:
        if not session.exists(config.dataset.feature_mart):
            return None
        contract = current_contract(config)
        latest = latest_snapshot_date(session, config, contract)
        return 0 if latest is None else snapshot_size(session, config, contract, latest)


def suite_parameters(config: ChurnConfig, suite: Suite, as_of: str | None,
                     data: Reader | None = None) -> dict[str, Any]:
    """Values the suites refer to with {"$PARAMETER": name}: settings and run facts, never constants.

    Run facts about the data (the customers scoring must cover) are read where
    the data lives (`data`, see `data_plane`); the row-count history is the
    build database's, on every engine.
    """
    today = dt.date.today()
    latest = dt.date.fromisoformat(as_of) if as_of else today + dt.timedelta(days=1)
    low, high = config.quality.label_share_band
    previous = _previous_rows(config, suite, as_of)
    tolerance = config.quality.row_count_tolerance
    params: dict[str, Any] = {
        "today": pd.Timestamp(today),
        "earliest_date": pd.Timestamp(config.quality.earliest_date),
        "latest_as_of_date": pd.Timestamp(latest),
        "label_share_min": low,
        "label_share_max": high,
        "min_rows": 1 if previous is None else max(1, math.floor(previous * (1 - tolerance))),
        "max_rows": None if previous is None else math.ceil(previous * (1 + tolerance)),
        "risk_bands": sorted(config.scoring.risk_band_names),
    }
    if suite.stage == "scores":
        params["active_customers"] = _active_customers(config, data)
    return params


def _relation(suite: Suite, tables: dict[str, LandingTable]) -> str:
    if suite.stage == "landing":
        if suite.table not in tables:
            raise SuiteError(f"{suite.path}: landing table {suite.table!r} is not in the dataset's sources")
        return tables[suite.table].typed_relation()
    return quote(suite.table)


def _night_relation(suite: Suite, tables: dict[str, LandingTable], changes: LandingChanges | None) -> str | None:
    """Tonight's partitions of a partitioned landing table; None (read the whole) otherwise."""
    table = tables.get(suite.table) if suite.stage == "landing" else None
    if changes is None or table is None or not table.partitioned:
        return None
    return table.typed_relation(changes.to_read(table))


def _last_passed(session: Session, config: ChurnConfig, suite: Suite) -> dt.datetime | None:
    """When the suite last passed (its row counts are recorded only then); None before."""
    if not session.exists(ROW_COUNTS):
        return None
    value = session.scalar(f"select max(recorded_at) from {quote(ROW_COUNTS.name)} where dataset = ? and suite = ?",
                           [config.dataset.name, suite.name])
    return None if value is None else pd.Timestamp(value).to_pydatetime()


def mart_night_scope(config: ChurnConfig, suite: Suite) -> NightScope | None:
    """The mart snapshots changed since the suite last passed; None for suites on other tables."""
    if suite.stage != "mart" or suite.table != config.dataset.feature_mart:
        return None
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        return scope_since(session, config, _last_passed(session, config, suite))


# --- the audit ------------------------------------------------------------------


def suite_run(suite: Suite, checks: list[CheckResult], rows: int, parameters: dict[str, Any]) -> SuiteRun:
    """What the Data Docs page of one judged suite shows."""
    arguments = [dict(e.configuration.kwargs) for e in suite.expectations]
    return SuiteRun(suite.name, suite.path.name, suite.table, rows, arguments, checks, parameters)


def docs_folder(config: ChurnConfig) -> Path:
    return config.warehouse.reports_dir / "data_docs" / config.dataset.name


def write_docs(config: ChurnConfig, stage: str, run_id: str, runs: list[SuiteRun],
               as_of: str | None = None) -> list[Path]:
    """Data Docs pages of this audit (one per suite) and the index of all audits kept (see data_docs)."""
    try:
        return write_data_docs(docs_folder(config), config.dataset.name, stage, run_id, as_of, runs)
    except OSError as exc:  # the verdicts are stored regardless; unwritable docs must not stop the run
        log.warning("data docs of the %s audit not written: %s", stage, exc)
        return []


def _results_frame(config: ChurnConfig, report: AuditReport, checked_at: dt.datetime) -> pd.DataFrame:
    frame = pd.DataFrame([
        {"run_id": report.run_id, "dataset": config.dataset.name, "stage": report.stage, **dataclasses.asdict(r),
         "checked_at": checked_at}
        for r in report.results
    ], columns=RESULTS.column_names)
    return frame.astype({"unexpected_count": "Int64", "element_count": "Int64", "rows_checked": "Int64",
                         "success": "bool"})


def _row_counts_frame(config: ChurnConfig, report: AuditReport, rows: dict[str, tuple[str, int]],
                      as_of: str | None, checked_at: dt.datetime) -> pd.DataFrame:
    return pd.DataFrame(
        [{"dataset": config.dataset.name, "suite": s, "table_name": t, "as_of": as_of, "row_count": n,
          "run_id": report.run_id, "recorded_at": checked_at} for s, (t, n) in rows.items()],
        columns=ROW_COUNTS.column_names,
    ).astype({"as_of": "string"})


def _store(config: ChurnConfig, report: AuditReport, rows: dict[str, tuple[str, int]], as_of: str | None) -> None:
    """Replace this run's verdicts (and, when it passed, its row counts) in one transaction.

    Only a passed audit records row counts: a failed run's counts must not
    become the base of the next run's row-count band.
    """
    checked_at = dt.datetime.now()
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session, session.transaction():
        if session.exists(RESULTS):  # a table from before rows_checked/scope: add them, older rows read NULL
            session.add_missing_columns(RESULTS, RESULTS.column_types)
        session.append(RESULTS, _results_frame(config, report, checked_at),
                       where="run_id = ? and dataset = ? and stage = ?",
                       params=[report.run_id, config.dataset.name, report.stage])
        if not report.critical_failures:
            session.append(ROW_COUNTS, _row_counts_frame(config, report, rows, as_of, checked_at),
                           where="run_id = ? and dataset = ? and suite in (select unnest(?::varchar[]))",
                           params=[report.run_id, config.dataset.name, list(rows)])


def audit(config: ChurnConfig, stage: str, run_id: str, as_of: str | None = None,
          changes: LandingChanges | None = None, data: Reader | None = None) -> AuditReport:
    """Run the dataset's suites of one stage, store the results and docs; raise AuditError on a critical failure.

    `changes` (landing stage): row-wise checks of partitioned tables read only its new and rewritten partitions.
    `data` (mart and scores stages): where their tables are read, e.g. a `SparkWarehouse`; None reads the
    build database. Verdicts, row counts and the night's scope stay in the build database either way.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown audit stage {stage!r}; known: {', '.join(STAGES)}")
    if stage == "landing" and data is not None:
        raise ValueError("the landing audit reads the landing files through DuckDB on every engine; "
                         "`data` is for the mart and scores stages")
    report = AuditReport(stage=stage, run_id=run_id)
    suites = load_suites(config, stage)
    if not suites:
        log.info("no %s suites for dataset %r", stage, config.dataset.name)
        return report
    with timed(f"audit {stage} ({config.dataset.name}, {len(suites)} suites)", log):
        judge = Judge()
        tables = {t.name: t for t in landing_tables(config)} if stage == "landing" else {}
        runs, rows = [], {}
        for suite in suites:
            parameters = suite_parameters(config, suite, as_of, data)
            relation = _relation(suite, tables)
            night = _night_relation(suite, tables, changes)
            scope = mart_night_scope(config, suite) if stage == "mart" else None
            if scope is not None and not scope.full:
                night = scoped_relation(config, current_contract(config), scope)
                log.info("%s: row-wise checks on %s (changed since its last passed audit)", suite.name,
                         scope.describe())
            with _suite_reader(config, stage, data) as session:
                if stage != "landing" and not session.exists(suite.table):
                    raise AuditError(f"{suite.name}: table {suite.table} does not exist in {session.path}", report)
                with timed(f"suite {suite.name}", log):
                    checks, validation = run_suite(session, relation, suite, parameters,
                                                   config.quality.chunk_rows, judge, night,
                                                   shares_whole=stage == "mart")
            report.results += checks
            runs.append(suite_run(suite, checks, int(validation.meta["rows"]), parameters))
            rows[suite.name] = (suite.table, validation.meta["rows"])
        report.docs = write_docs(config, stage, run_id, runs, as_of)
        _store(config, report, rows, as_of)
    for warning in report.warnings:
        log.warning("data quality warning: %s", warning.describe())
    if report.critical_failures:
        lines = "\n  ".join(r.describe() for r in report.critical_failures)
        raise AuditError(
            f"data quality audit ({stage}, dataset {config.dataset.name}) failed "
            f"{len(report.critical_failures)} critical expectation(s):\n  {lines}", report)
    log.info("audit %s passed: %d expectations, %d warning(s)", stage, len(report.results), len(report.warnings))
    return report


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    run_id = dt.datetime.now().strftime("audit-%Y%m%dT%H%M%S")
    stages = STAGES if args.stage == "all" else (args.stage,)
    failed = False
    for stage in stages:
        missing = _missing_tables(config, stage)
        if missing:
            print(f"{stage}: skipped, table(s) not built yet: {', '.join(missing)}")
            continue
        try:
            report = audit(config, stage, run_id, as_of=args.as_of)
        except AuditError as exc:
            print(exc)
            report, failed = exc.report, True
        print(f"{stage}: {len(report.results)} expectations, {len(report.critical_failures)} critical failure(s), "
              f"{len(report.warnings)} warning(s)")
        if report.docs:
            print(f"  data docs: {report.docs[0].parent / 'index.html'}")
    return 1 if failed else 0


def _missing_tables(config: ChurnConfig, stage: str, data: Reader | None = None) -> list[str]:
    """Warehouse tables a stage's suites target that do not exist in `data` (see `data_plane`;
    landing reads files)."""
    if stage == "landing":
        return []
    folder = config.warehouse.expectations_dir / config.dataset.name
    names = _names(config)
    targets = {names.get(t, t) for t in (json.loads(p.read_text()).get("meta", {}).get("table")
                                         for p in folder.glob("*.json")
                                         if json.loads(p.read_text()).get("meta", {}).get("stage") == stage)}
    if data is None and not config.warehouse.build_db.exists():
        return sorted(targets)
    with data_plane(config, data) as session:
        return sorted(t for t in targets if not session.exists(t))


@dataclass(frozen=True)
class AuditOutcome:
    """A nightly run's audits in three numbers, for the reports' index."""

    run_id: str
    checks: int
    critical_failures: int
    warnings: int
    checked_at: dt.datetime | None = None

    @property
    def passed(self) -> bool:
        return self.critical_failures == 0


def latest_audit_outcome(session: Session, dataset: str) -> AuditOutcome | None:
    """Checks and failures of the dataset's most recent audited run, or None before the first audit."""
    if not session.exists(RESULTS):
        return None
    row = session.one(
        f"select run_id, count(*), count(*) filter (where not success and severity = 'critical'), "
        f"count(*) filter (where not success and severity <> 'critical') from {quote(RESULTS.name)} "
        "where dataset = ? group by run_id order by max(checked_at) desc limit 1",
        [dataset],
    )
    return None if row is None else AuditOutcome(row[0], int(row[1]), int(row[2]), int(row[3]))


def audit_history(session: Session, dataset: str) -> list[AuditOutcome]:
    """Every audited run of the dataset (all its stages together), oldest first; empty before the first audit."""
    if not session.exists(RESULTS):
        return []
    rows = session.rows(
        f"select run_id, count(*), count(*) filter (where not success and severity = 'critical'), "
        f"count(*) filter (where not success and severity <> 'critical'), max(checked_at) "
        f"from {quote(RESULTS.name)} where dataset = ? group by run_id order by max(checked_at)",
        [dataset],
    )
    return [AuditOutcome(run_id, int(checks), int(critical), int(warnings), pd.Timestamp(at).to_pydatetime())
            for run_id, checks, critical, warnings, at in rows]
