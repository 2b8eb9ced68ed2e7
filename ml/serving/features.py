"""The mart's own compiled SQL, compiled once, inlined into one statement and prepared per connection.

The dbt project is compiled once, at server start, with a sentinel as_of date;
the sentinel literal is then replaced by the request's as_of, so one compiled
chain serves every as_of date and nothing is compiled on the request path. At
start the staging -> intermediate -> mart chain is inlined into one statement
of CTEs (each model's compiled select, its relation references renamed to CTE
names), together with the landing contract's types, the landing suite's
critical date bands and the nightly's row-level dbt tests on staging, whose
failing counts come back on every row: the staging models are computed once
for the tests and the mart (as two statements they were computed twice).

Each pooled in-memory DuckDB PREPAREs the statement once. DuckDB re-plans a
prepared statement that scans a table, that uses a parameter twice, or whose
parameter type differs from the prepared one, so the request reaches the SQL
as one typed STRUCT parameter (as_of, today, and per source table one text
list per column), read once by a `__request` CTE and unnested there: a request
sets one variable and executes a ready plan, instead of parsing, binding and
optimising ~60 kB of SQL (about 3/4 of its cost before).

No feature is re-implemented in Python, so the API and `churn_scores` agree.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import re
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ml.config import ChurnConfig, EngineSettings
from ml.features.contract import load_contract
from ml.features.dbt import model_lineage, run_dbt
from ml.logs import get_logger, timed
from ml.warehouse import MEMORY, Session, connect, quote, quote_literal

log = get_logger("serve")

# Compiling against ":memory:" makes every relation "memory"."main"."<model>",
# the default catalog of a fresh in-memory DuckDB connection.
COMPILE_DATABASE = ":memory:"
# A date no data holds; the point-in-time macros compile it as '<date>'::date.
SENTINEL_AS_OF = "1111-11-11"
AS_OF_VARIABLE = "churn_as_of"  # snapshot_features: the whole landing through the models, once per state
REQUEST_VARIABLE = "churn_request"  # the request's STRUCT, passed to the prepared statements
_SENTINEL_SQL = f"'{SENTINEL_AS_OF}'::date"
_AS_OF_SQL = f"getvariable('{AS_OF_VARIABLE}')::date"
_REQUEST_CTE = '"__request"'
# The request's dates as the prepared statements read them (one reference to the parameter, in __request).
_REQUEST_AS_OF = f'(select as_of from {_REQUEST_CTE})'
_REQUEST_TODAY = f'(select today from {_REQUEST_CTE})'
_STATEMENT = "churn_request"
_PARAMETER = "source_"  # $source_<i>: the i-th source's text rows
# dbt tests of the staging models that judge single values or rows, so they hold for any subset of
# customers (uniqueness and relationships need the whole table and stay with the nightly).
ROW_TESTS = ("accepted_values", "accepted_range", "expression_is_true", "not_null")
_DATE_TYPES = ("date", "timestamp")
_STRING_TYPES = ("", "varchar", "text", "string")
# What is not code in SQL: string literals, quoted identifiers and comments (quotes doubled inside).
_NOT_CODE = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?(?:\*/|$)""", re.S)


class RequestError(ValueError):
    """The request cannot be scored as given; the message says what to fix."""


@dataclass(frozen=True)
class CompiledSource:
    """A raw table as the compiled SQL reads it."""

    name: str
    relation: str  # the expression the compiled SQL uses, e.g. read_parquet('.../customers.parquet')
    columns: dict[str, str | None]  # declared column -> declared data_type
    key_column: str | None
    date_bounds: dict[str, tuple[str | None, str | None]]  # column -> (min, max) the landing suite allows
    # churn.yml's event_tables date column, when it is a DATE or TIMESTAMP: a row dated on or after
    # an as_of is invisible to that snapshot (the point-in-time rule), so reading it can be skipped
    date_column: str | None = None

    @property
    def raw_table(self) -> str:
        return f"__raw_{self.name}"


@dataclass(frozen=True)
class RowTest:
    """One of the nightly's dbt tests on a staging model, as compiled SQL returning the failing rows."""

    name: str
    model: str
    column: str | None
    sql: str


@dataclass(frozen=True)
class CompiledFeatures:
    """The mart and everything upstream of it, compiled once for any as_of date."""

    mart: str
    key: str
    as_of_column: str
    models: tuple[tuple[str, str], ...]  # (relation_name, select with the as_of variable) in dependency order
    sources: tuple[CompiledSource, ...]
    tests: tuple[RowTest, ...]


def parametrise(sql: str, where: str) -> str:
    """`sql` with the sentinel as_of literal replaced by the session variable; refuse any other trace of it."""
    out = sql.replace(_SENTINEL_SQL, _AS_OF_SQL)
    if SENTINEL_AS_OF in out:
        raise RequestError(
            f"{where}: the as_of var is used other than through the point-in-time macros "
            f"(found {SENTINEL_AS_OF!r} outside {_SENTINEL_SQL}); the API cannot serve it without compiling"
        )
    return out


def _date_bounds(config: ChurnConfig, table: str) -> dict[str, tuple[str | None, str | None]]:
    """Literal or `today` date bounds of the landing suite's critical between-checks on `table`."""
    path = config.warehouse.expectations_dir / config.dataset.name / f"raw_{table}.json"
    if not path.exists():
        return {}
    bounds: dict[str, tuple[str | None, str | None]] = {}
    for expectation in json.loads(path.read_text()).get("expectations", []):
        kwargs = expectation.get("kwargs", {})
        if expectation.get("type") != "expect_column_values_to_be_between" or "column" not in kwargs:
            continue
        if (expectation.get("meta") or {}).get("severity") != "critical":
            continue

        def literal(value: Any) -> str | None:
            if isinstance(value, dict):
                named = {"today": "today", "earliest_date": config.quality.earliest_date.isoformat()}
                return named.get(value.get("$PARAMETER"))
            return None if value is None else str(value)

        bounds[kwargs["column"]] = (literal(kwargs.get("min_value")), literal(kwargs.get("max_value")))
    return bounds


def _event_date_column(config: ChurnConfig, table: str, columns: dict[str, str | None]) -> str | None:
    """The table's event date column (churn.yml event_tables) when declared a DATE or TIMESTAMP."""
    for event_table in config.dataset.event_tables:
        if event_table.table == table and (columns.get(event_table.date_column) or "").lower() in _DATE_TYPES:
            return event_table.date_column
    return None


def compile_features(config: ChurnConfig, workdir: Path | None = None) -> CompiledFeatures:
    """Compile the dataset's mart once (sentinel as_of) and collect the SQL every request runs."""
    target = (workdir or Path(tempfile.mkdtemp(prefix="churn-serve-"))) / f"compiled-{config.dataset.name}"
    with timed("compiling the feature SQL once for every as_of date", log):
        run_dbt(config, "compile", as_of=SENTINEL_AS_OF, target_path=target, database=COMPILE_DATABASE)
    manifest = json.loads((target / "manifest.json").read_text())
    nodes = manifest["nodes"]
    mart_id = next(
        (k for k, n in nodes.items() if n["resource_type"] == "model" and n["name"] == config.dataset.feature_mart),
        None,
    )
    if mart_id is None:
        raise RequestError(f"dbt project has no model {config.dataset.feature_mart!r}")
    contract = load_contract(target / "manifest.json", config.dataset.feature_mart)
    order = model_lineage(nodes, mart_id)
    used_sources = {p for n in order for p in nodes[n]["depends_on"]["nodes"] if p.startswith("source.")}
    sources = []
    for source_id in sorted(used_sources):
        source = manifest["sources"][source_id]
        meta = {**(source.get("meta") or {}), **((source.get("config") or {}).get("meta") or {})}
        columns = {name: col.get("data_type") for name, col in source["columns"].items()}
        key_column = meta.get("entity_key", contract.key)
        sources.append(CompiledSource(
            name=source["name"], relation=source["relation_name"], columns=columns,
            key_column=key_column if key_column in columns else None,
            date_bounds=_date_bounds(config, source["name"]),
            date_column=_event_date_column(config, source["name"], columns),
        ))
    staging = {n for n in order if nodes[n]["fqn"][1:2] == ["staging"]}
    tests = []
    for node in nodes.values():
        meta = node.get("test_metadata") or {}
        attached = node.get("attached_node")
        if node["resource_type"] != "test" or attached not in staging or meta.get("name") not in ROW_TESTS:
            continue
        if (node.get("config") or {}).get("severity", "error").lower() != "error":
            continue
        tests.append(RowTest(meta["name"], nodes[attached]["name"], node.get("column_name"),
                             parametrise(node["compiled_code"], node["name"])))
    return CompiledFeatures(
        mart=config.dataset.feature_mart,
        key=contract.key,
        as_of_column=contract.as_of,
        models=tuple((nodes[n]["relation_name"], parametrise(nodes[n]["compiled_code"], nodes[n]["name"]))
                     for n in order),
        sources=tuple(sources),
        tests=tuple(sorted(tests, key=lambda t: (t.model, t.column or "", t.name))),
    )


def _declared_type(dtype: str | None) -> str:
    return dtype or "varchar"


def _text_columns(source: CompiledSource, rows: list[dict[str, Any]]) -> dict[str, list[str | None]]:
    """Request rows as one text list per declared column (typing is SQL's job, with a named error)."""
    unknown = sorted({c for row in rows for c in row} - set(source.columns))
    if unknown:
        raise RequestError(f"table {source.name!r} ({len(rows)} rows) has undeclared column(s) {', '.join(unknown)}")
    missing = [c for c in source.columns if rows and any(c not in row for row in rows)]
    if missing:
        raise RequestError(f"table {source.name!r} ({len(rows)} rows) lacks column(s) {', '.join(missing)}")
    return {c: [None if r[c] is None else str(r[c]) for r in rows] for c in source.columns}


@dataclass(frozen=True)
class Check:
    """One count in the request's check row: nonzero means the rows fail it, and `message` says how."""

    kind: str  # "type" (value does not cast), "band" (landing date band), "test" (a dbt test on staging)
    table: str  # source table (type, band) or staging model (test)
    column: str | None
    detail: str  # declared type, "[low, high]" band, or dbt test name

    def message(self, failing: int, rows: int, today: dt.date) -> str:
        if self.kind == "type":
            return f"table {self.table!r}, column {self.column!r}: {failing} of {rows} value(s) are not {self.detail}"
        if self.kind == "band":
            return (f"table {self.table!r}, column {self.column!r}: {failing} of {rows} row(s) outside "
                    f"{self.detail.replace('today', today.isoformat())} (the landing suite's critical date band)")
        column = f", column {self.column!r}" if self.column else ""
        return f"table {self.table!r}{column}: {failing} row(s) fail the nightly's {self.detail} test"


@dataclass(frozen=True)
class RequestSql:
    """The one statement a request runs, inlined once from the compiled DAG.

    One `with` of CTEs: the request's text rows, typed like the landing
    contract, the checks, then the dbt models in dependency order (each
    model's compiled select, its relation references renamed to CTEs). It
    returns one row per mart row at the request's as_of, each carrying the
    check counts (one row of nulls when the mart has none), so the staging
    models the dbt tests read are computed once for the tests and the mart.
    The models read the typed rows only when every type and date-band check
    passed, so a far-off date never reaches the date series of the windows.
    """

    sources: tuple[CompiledSource, ...]
    request_type: str  # STRUCT(as_of DATE, today DATE, <source> STRUCT(<column> VARCHAR[], ...), ...)
    check_list: tuple[Check, ...]  # one count per Check, in this order, in column CHECK_COUNTS
    statement: str
    execute: str  # runs the prepared statement on the request variable


CHECK_COUNTS = "__check_counts"  # the request's failing counts: one list per check part, its number first
MART_ROW = "__mart_row"  # true on a mart row; null on the one row of a request the mart has no row for


def _bound_sql(bound: str) -> str:
    return _REQUEST_TODAY if bound == "today" else f"{quote_literal(bound)}::date"


def _request_type(sources: tuple[CompiledSource, ...]) -> str:
    tables = ", ".join(f"{quote(s.name)} {_source_type(s)}" for s in sources)
    return f"STRUCT(as_of DATE, today DATE, {tables})"


def _source_type(source: CompiledSource) -> str:
    return f"STRUCT({', '.join(f'{quote(c)} VARCHAR[]' for c in source.columns)})"


def _request_ctes(sources: tuple[CompiledSource, ...]) -> list[str]:
    """The dates, and each source's text rows, each parameter read once (a second reference re-plans).

    The dates have a CTE of their own that every as_of reference reads: a CTE
    holding the whole request copied all its rows at each of those ~20 reads."""
    ctes = [f"{_REQUEST_CTE} as (select $as_of::date as as_of, $today::date as today)"]
    for i, source in enumerate(sources):
        columns = ", ".join(f"unnest(t.{quote(c)}) as {quote(c)}" for c in source.columns)
        ctes.append(f"{_text_cte(source)} as (select {columns} from (select ${_PARAMETER}{i}::{_source_type(source)} "
                    "as t) as request)")
    return ctes


def _execute_sql(sources: tuple[CompiledSource, ...]) -> str:
    """EXECUTE of the prepared statement with the request variable's fields as its parameters."""
    request = f"getvariable('{REQUEST_VARIABLE}')"
    arguments = [f"as_of := {request}.as_of", f"today := {request}.today",
                 *(f"{_PARAMETER}{i} := {request}.{quote(s.name)}" for i, s in enumerate(sources))]
    return f"execute {_STATEMENT}({', '.join(arguments)})"


def _text_cte(source: CompiledSource) -> str:
    return quote(f"__text_{source.name}")


def _typed_cte(source: CompiledSource) -> str:
    return quote(f"__typed_{source.name}")


def _model_cte(relation: str, models: dict[str, str]) -> str:
    return quote(f"__model_{models[relation]}")


_GATE_CTE = '"__rows_pass"'  # one boolean: every type and date-band count is zero
_CHEAP_CTE = '"__cheap_checks"'
_CHECKS_CTE = '"__checks"'
_MART_CTE = '"__mart"'


def inline_request_sql(compiled: CompiledFeatures) -> RequestSql:
    """Build the request statement once (at start): no dbt, no parsing on the request path."""
    value = "nullif(trim({c}::varchar), '')"
    typed_ctes, raw_ctes, cheap_parts, checks = [], [], [], []
    for source in compiled.sources:
        text, typed = _text_cte(source), _typed_cte(source)
        # try_cast: a value that does not fit is counted by the type check, which is reported first
        casts = ", ".join(f"try_cast({value.format(c=quote(c))} as {_declared_type(t)}) as {quote(c)}"
                          for c, t in source.columns.items())
        typed_ctes.append(f"{typed} as (select {casts} from {text})")
        # what the models read: the typed rows, or none when a type or band check failed
        raw_ctes.append(f"{quote(source.raw_table)} as (select * from {typed} where (select ok from {_GATE_CTE}))")
        counts = []
        for column, dtype in source.columns.items():
            if dtype:
                v = value.format(c=quote(column))
                counts.append(f"count(*) filter (where {v} is not null and try_cast({v} as {dtype}) is null)")
                checks.append(Check("type", source.name, column, dtype))
        if counts:
            cheap_parts.append(f"(select [{', '.join(counts)}] from {text})")
        bands = []
        for column, (low, high) in source.date_bounds.items():
            if column not in source.columns:
                continue
            tests = [f"cast({quote(column)} as date) {op} {_bound_sql(bound)}"
                     for bound, op in ((low, "<"), (high, ">")) if bound is not None]
            if tests:
                bands.append(f"count(*) filter (where {' or '.join(tests)})")
                checks.append(Check("band", source.name, column,
                                    f"[{low or '-inf'}, {'today' if high == 'today' else high or '+inf'}]"))
        if bands:
            cheap_parts.append(f"(select [{', '.join(bands)}] from {typed})")
    names = {relation: relation.rsplit(".", 1)[-1].strip('"') for relation, _ in compiled.models}
    local = {s.relation: quote(s.raw_table) for s in compiled.sources}
    local.update({relation: _model_cte(relation, names) for relation in names})
    model_ctes = [f"{_model_cte(relation, names)} as (\n{_request_dates(replace_relations(sql, local))}\n)"
                  for relation, sql in compiled.models]
    test_parts = []
    for test in compiled.tests:
        failures = _request_dates(replace_relations(test.sql, local))
        test_parts.append(f"(select [count(*)] from (\n{failures}\n) as failures)")
        checks.append(Check("test", test.model, test.column, test.name))
    # one row per part (union all, not a cross join: joining ~50 one-row parts costs the join-order search)
    cheap = _parts(cheap_parts, 0) or "select 0 as part, []::bigint[] as counts"
    tested = _parts(test_parts, len(cheap_parts))
    gate = f"{_GATE_CTE} as (select coalesce(max(list_max(counts)), 0) = 0 as ok from {_CHEAP_CTE})"
    every = f"select * from {_CHEAP_CTE}" + (f"\nunion all\n{tested}" if tested else "")
    # each part's number leads its counts: ordering in Python costs less than an ordered aggregate
    checked = f"{_CHECKS_CTE} as (select list([part] || counts) as counts from (\n{every}\n) as parts)"
    mart = _model_cte(compiled.models[-1][0], names)
    request_type = _request_type(compiled.sources)
    ctes = [*_request_ctes(compiled.sources), *typed_ctes, f"{_CHEAP_CTE} as (\n{cheap}\n)", gate,
            *raw_ctes, *model_ctes, checked]
    statement = (
        f"with {', '.join(ctes)}\n"
        f"select {_CHECKS_CTE}.counts as {quote(CHECK_COUNTS)}, {_MART_CTE}.* from {_CHECKS_CTE} left join ("
        f"select true as {quote(MART_ROW)}, * from {mart} "
        f"where {quote(compiled.as_of_column)} = {_REQUEST_AS_OF}) as {_MART_CTE} on true"
    )
    return RequestSql(sources=compiled.sources, request_type=request_type, check_list=tuple(checks),
                      statement=statement, execute=_execute_sql(compiled.sources))


def _parts(parts: list[str], first: int) -> str:
    return "\nunion all\n".join(f"select {first + i} as part, {part} as counts" for i, part in enumerate(parts))


def _request_dates(sql: str) -> str:
    """`sql` reading as_of from the request parameter instead of the session variable."""
    return sql.replace(_AS_OF_SQL, _REQUEST_AS_OF)


class FeatureConnection:
    """One in-memory DuckDB with the request statement prepared, used by one request at a time."""

    def __init__(self, compiled: CompiledFeatures, sql: RequestSql, settings: EngineSettings | None = None) -> None:
        self.compiled = compiled
        self.sql = sql
        self._stack = ExitStack()
        self.session: Session = self._stack.enter_context(connect(MEMORY, settings=settings))
        # the as_of route reads the same landing files every request: parse their footers once
        self.session.execute("set parquet_metadata_cache = true")
        self.session.execute(f"prepare {_STATEMENT} as {sql.statement}")

    def close(self) -> None:
        self._stack.close()

    def features(self, tables: dict[str, list[dict[str, Any]]], as_of: dt.date, today: dt.date) -> pd.DataFrame:
        """Features of the request's customers at `as_of`, after the nightly's checks on their rows."""
        request: dict[str, Any] = {"as_of": as_of, "today": today}
        rows = {}
        for source in self.sql.sources:
            if source.name not in tables:
                raise RequestError(f"table {source.name!r} is missing from the request")
            request[source.name] = _text_columns(source, tables[source.name])
            rows[source.name] = len(tables[source.name])
        session = self.session
        # cast to the prepared type: a list of only nulls (or none) would otherwise re-plan the statement
        session.execute(f"set variable {REQUEST_VARIABLE} = ?::{self.sql.request_type}", [request])
        frame = session.frame(self.sql.execute)
        counts = [count for part in sorted(frame[CHECK_COUNTS].iloc[0], key=lambda p: p[0]) for count in part[1:]]
        for check, failing in zip(self.sql.check_list, counts, strict=True):
            if failing:
                raise RequestError(check.message(failing, rows.get(check.table, 0), today))
        found = frame[frame[MART_ROW].notna()] if frame[MART_ROW].isna().any() else frame
        return found.drop(columns=[CHECK_COUNTS, MART_ROW]).reset_index(drop=True)


class FeaturePool:
    """A fixed number of prepared feature connections; a request borrows one and returns it clean."""

    def __init__(self, compiled: CompiledFeatures, size: int, settings: EngineSettings | None = None) -> None:
        self.compiled = compiled
        self.sql = inline_request_sql(compiled)
        self._all = [FeatureConnection(compiled, self.sql, settings) for _ in range(size)]
        self._free: queue.Queue[FeatureConnection] = queue.Queue()
        for connection in self._all:
            self._free.put(connection)

    @contextmanager
    def connection(self) -> Iterator[FeatureConnection]:
        connection = self._free.get()
        try:
            yield connection
        finally:
            self._free.put(connection)

    def close(self) -> None:
        for connection in self._all:
            connection.close()


def read_landing_rows(compiled: CompiledFeatures, customer_ids: list[str], session: Session | None = None,
                      as_of: dt.date | None = None,
                      relations: dict[str, str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The raw rows of `customer_ids` in every source, read from the landing files, as request rows.

    `session`: an open connection to read with (the API passes a pooled one: a new DuckDB costs ~20 ms).
    `as_of`: leave out the event-table rows dated on or after it, which the as_of snapshot cannot see
    (the point-in-time rule the leakage test holds the mart to); Parquet row groups and partition
    files whose date statistics lie after it are then skipped unread. Rows with no date are kept.
    The key is compared as stored (no cast), so the filter is pushed into the Parquet scan.
    `relations`: per source name, a table to read instead of its landing files (`LandingIndex`).
    """
    tables: dict[str, list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        if session is None:
            session = stack.enter_context(connect(MEMORY))
        for source in compiled.sources:
            if source.key_column is None:
                raise RequestError(
                    f"source table {source.name!r} has no customer key column; "
                    "set `entity_key` in its source meta to look customers up"
                )
            key = quote(source.key_column)
            if (source.columns.get(source.key_column) or "").lower() not in _STRING_TYPES:
                key = f"{key}::varchar"
            where = [f"{key} in ({', '.join('?' for _ in customer_ids)})"]
            params: list[Any] = list(customer_ids)
            if as_of is not None and source.date_column is not None:
                where.append(f"({_before(source)} or {quote(source.date_column)} is null)")
                params.append(as_of)
            columns = [*source.columns]
            select = ", ".join(f"cast({quote(c)} as varchar) as {quote(c)}" for c in columns)
            relation = (relations or {}).get(source.name, source.relation)
            found = session.rows(f"select {select} from {relation} where {' and '.join(where)}", params)
            tables[source.name] = [dict(zip(columns, row, strict=True)) for row in found]
    return tables


def _before(source: CompiledSource) -> str:
    """The source's rows dated before the parameter (its date column compared as stored)."""
    assert source.date_column is not None
    return f"{quote(source.date_column)} < ?::{source.columns[source.date_column]}"


class LandingIndex:
    """The landing rows earlier served dates can read, sorted by customer in one in-memory DuckDB.

    GET ?as_of= reads one customer's rows of every source. Landing files are in
    arrival order and carry no key statistics, so each read scanned all of them:
    ~100 ms of CPU at the demo's 3.9M usage rows, most of that route's cost. A
    copy sorted by key lets DuckDB's zone maps skip all but one row group: a
    request reading one customer's rows of all five sources through the route
    measured 7.4 ms of CPU. Built with each published state (at start and on
    every new publish), so it holds the landing files as they were then; event
    rows dated on or after the newest earlier served date are left out, since no
    served snapshot can see them. Only when the copy would exceed `max_rows` (a
    memory bound: ~30 bytes a usage row) do requests read the files as before.
    """

    def __init__(self, compiled: CompiledFeatures, settings: EngineSettings | None) -> None:
        self.compiled = compiled
        self.relations = {source.name: quote(f"__landing_{source.name}") for source in compiled.sources}
        self._stack = ExitStack()
        self.session: Session = self._stack.enter_context(connect(MEMORY, settings=settings))

    @classmethod
    def build(cls, compiled: CompiledFeatures, served: tuple[dt.date, ...], tonight: dt.date,
              settings: EngineSettings | None, max_rows: int) -> LandingIndex | None:
        """The index for the served dates before tonight, or None when there are none or it is too big."""
        earlier = [d for d in served if d != tonight]
        if not earlier or max_rows == 0 or any(s.key_column is None for s in compiled.sources):
            return None
        index = cls(compiled, settings)
        try:
            with timed(f"indexing at most {max_rows:,d} landing rows by customer for GET ?as_of=", log):
                copied = index._copy(max(earlier), max_rows)
        except BaseException:
            index.close()
            raise
        if copied is None:
            index.close()  # the in-memory database and what was copied into it go together
            log.info("GET ?as_of= reads the landing files: they hold more than serving.landing_index_max_rows "
                     "(%s) rows", f"{max_rows:,d}")
            return None
        log.info("GET ?as_of= reads %s landing rows from the copy", f"{copied:,d}")
        return index

    def _copy(self, before: dt.date, max_rows: int) -> int | None:
        """Copy every source's rows dated before `before`, sorted by key: the rows copied, or None above `max_rows`.

        Each file is read once. Counting first, to decide, read every file a
        second time; instead each copy is limited to one row more than the cap
        still allows, so a landing too big stops being read there (its later
        sources not at all), and the rows held never pass the cap by more than one.
        """
        left = max_rows
        for source in self.compiled.sources:
            where, params = ("", []) if source.date_column is None else (
                f"where {_before(source)} or {quote(source.date_column)} is null", [before])
            relation = self.relations[source.name]
            # the limit sits below the sort, so a too-big source is neither read to its end nor sorted
            self.session.execute(f"create table {relation} as select * from (select * from {source.relation} "
                                 f"{where} limit {left + 1}) order by {quote(source.key_column or '')}", params)
            left -= int(self.session.scalar(f"select count(*) from {relation}"))
            if left < 0:
                return None
        return max_rows - left

    def rows(self, customer_ids: list[str], as_of: dt.date) -> dict[str, list[dict[str, Any]]]:
        """What `read_landing_rows` returns from the files, from the sorted copy (any thread)."""
        with self.session.cursor() as cursor:
            return read_landing_rows(self.compiled, customer_ids, cursor, as_of, self.relations)

    def close(self) -> None:
        self._stack.close()


def snapshot_features(compiled: CompiledFeatures, as_of: dt.date) -> pd.DataFrame:
    """Every active customer's features at `as_of`, by the same SQL over the whole landing files."""
    with connect(MEMORY) as session:
        session.execute(f"set variable {AS_OF_VARIABLE} = ?", [as_of.isoformat()])
        for relation, sql in compiled.models:
            session.execute(f"create table {relation} as {sql}")
        return session.frame(
            f"select * from {compiled.models[-1][0]} where {quote(compiled.as_of_column)} = ?", [as_of]
        )


def replace_relations(sql: str, relations: dict[str, str]) -> str:
    """`sql` with each relation reference (dict key, as dbt compiled it) replaced by its value.

    A reference matches only where a SQL name or expression can start: in code
    or at the opening quote of a quoted identifier, never inside a string
    literal, a comment or a quoted identifier, and never as part of a longer
    (e.g. qualified) name. So a column or a literal that happens to spell a
    relation's name is left alone. A match may run on through literals and
    identifiers: dbt compiles a file source as `read_parquet('.../x.parquet')`
    and a table as `"db"."schema"."x"`.
    """
    if not relations:
        return sql
    inside: list[tuple[int, int]] = []  # spans where no reference may start
    for token in _NOT_CODE.finditer(sql):
        first = token.start() + (1 if token.group().startswith('"') else 0)  # a quoted name may start one
        inside.append((first, token.end()))
    pattern = re.compile("|".join(re.escape(r) for r in sorted(relations, key=len, reverse=True)))
    out, last = [], 0
    for match in pattern.finditer(sql):
        start, end = match.span()
        if any(a <= start < b for a, b in inside):
            continue
        if (start > 0 and _name_char(sql[start - 1])) or (end < len(sql) and _name_char(sql[end])):
            continue
        out += [sql[last:start], relations[match.group()]]
        last = end
    out.append(sql[last:])
    return "".join(out)


def _name_char(char: str) -> bool:
    """Whether `char` next to a match would make it part of a longer name (`x.customers`, `customers_2`)."""
    return char.isalnum() or char in '_."'
