"""Checks of the raw landing files before dbt reads them.

dbt reports a broken extract as a DuckDB error inside a compiled view, if at
all: a missing column fails the view, but text in an amount column or a
truncated Parquet file surfaces as a cast or I/O error far from its cause, and
an empty file builds an empty mart without complaint. These checks read the
landing contract (the dbt source YAML: table names, columns, `data_type`) and
name the file, the column and the number of rows for every problem, before
anything in the warehouse is touched.

Key, category and range rules are not repeated here: dbt tests own them on
staging, and the Great Expectations landing suites (ml/quality.py) add the
row-count, null-share and date bands.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ml.config import ChurnConfig
from ml.logs import get_logger
from ml.warehouse import MEMORY, EngineError, Session, column_list, connect, quote, quote_literal

log = get_logger("landing")

# DuckDB types a landing column may already have for each declared type.
_COMPATIBLE = {
    "varchar": ("VARCHAR",),
    "date": ("DATE",),
    "timestamp": ("TIMESTAMP", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S", "DATE"),
    "double": ("DOUBLE", "FLOAT", "DECIMAL", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT"),
    "integer": ("INTEGER", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT"),
}


class LandingValidationError(RuntimeError):
    """One or more landing files break the landing contract; the message lists every problem."""


@dataclass(frozen=True)
class LandingTable:
    """One raw table of the landing contract and where its file should be."""

    source: str
    name: str
    path: Path
    file_format: str  # parquet | csv
    columns: dict[str, str]  # declared column -> declared type ("" when undeclared)

    def relation(self) -> str:
        """DuckDB table function reading the file as it lands (CSV as text, like dbt's source)."""
        if self.file_format == "csv":
            return f"read_csv({quote_literal(self.path)}, header = true, all_varchar = true)"
        return f"read_parquet({quote_literal(self.path)})"

    def typed_relation(self) -> str:
        """The file with every declared column cast to its declared type (blank text -> NULL)."""
        parts = []
        for column, dtype in self.columns.items():
            quoted = quote(column)
            value = f"nullif(trim({quoted}), '')" if self.file_format == "csv" else quoted
            parts.append(f"try_cast({value} as {dtype}) as {quoted}" if dtype else quoted)
        return f"(select {', '.join(parts)} from {self.relation()})"


def source_files(config: ChurnConfig) -> list[Path]:
    """Every dbt source YAML of the project (the landing contract is declared only there)."""
    return sorted((config.warehouse.dbt_project_dir / "models").rglob("_*__sources.yml"))


def _sources_of_format(config: ChurnConfig) -> list[list[LandingTable]]:
    """Per dbt source whose external location reads files of the dataset's format: its tables."""
    fmt = config.dataset.landing_format
    landing = config.dataset.landing_dir
    found: list[list[LandingTable]] = []
    for path in source_files(config):
        spec = yaml.safe_load(path.read_text()) or {}
        for source in spec.get("sources", []):
            location = ((source.get("config") or {}).get("meta") or {}).get("external_location", "")
            if not re.search(rf"\{{name\}}\.{re.escape(fmt)}\b", location):
                continue
            found.append([
                LandingTable(
                    source=source["name"],
                    name=table["name"],
                    path=landing / f"{table['name']}.{fmt}",
                    file_format=fmt,
                    columns={c["name"]: str(c.get("data_type") or "").lower() for c in table.get("columns", [])},
                )
                for table in source.get("tables", [])
            ])
    return found


def landing_tables(config: ChurnConfig) -> list[LandingTable]:
    """The tables the active dataset lands: sources whose files use its landing format.

    A source belongs to the dataset when its external location reads files of the
    dataset's format and at least one of its tables has a file in the landing folder,
    so a missing table of an otherwise present source is reported by name.
    """
    return [t for tables in _sources_of_format(config) if any(t.path.exists() for t in tables) for t in tables]


def expected_files_message(config: ChurnConfig) -> str:
    """Which file names the dbt sources would read, and where: what an empty landing folder lacks.

    The source named like the dataset (as `churn new-dataset` writes it) is listed first.
    """
    sources = sorted(_sources_of_format(config), key=lambda ts: (ts[0].source != config.dataset.name, ts[0].source)
                     if ts else (True, ""))
    listed = [f"{', '.join(t.path.name for t in tables)} (source {tables[0].source})" for tables in sources if tables]
    if not listed:
        fmt = config.dataset.landing_format
        return (f"no dbt source in {config.warehouse.dbt_project_dir / 'models'} reads .{fmt} files "
                f"(external_location with {{name}}.{fmt})")
    return f"expected in {config.dataset.landing_dir}: " + "; or ".join(listed)


def _check_csv_rows(session: Session, table: LandingTable) -> list[str]:
    """Rows DuckDB cannot parse (wrong column count, bad quoting), counted with the first one."""
    # rows, not one: DuckDB writes the rejects table only once the whole result is consumed.
    session.rows(
        f"select count(*) from read_csv({quote_literal(table.path)}, header = true, all_varchar = true, "
        "store_rejects = true, rejects_table = 'landing_rejects', rejects_scan = 'landing_scans')"
    )
    if not session.scalar("select count(*) from duckdb_tables() where table_name = 'landing_rejects'"):
        return []
    bad, line, message = session.one(
        "select count(*), min(line), arg_min(error_message, line) from landing_rejects"
    )
    session.execute("drop table landing_rejects; drop table if exists landing_scans")
    if bad:
        return [f"{table.path.name}: {bad:,d} malformed row(s), first at line {line}: {message}"]
    return []


def check_table(session: Session, table: LandingTable) -> tuple[list[str], int]:
    """Problems of one landing file, and its row count (0 when unreadable)."""
    name = table.path.name
    if not table.path.exists():
        return [f"{name}: file missing from {table.path.parent} (table {table.source}.{table.name})"], 0
    try:
        if table.file_format == "csv":
            problems = _check_csv_rows(session, table)
            if problems:
                return problems, 0
        actual = {r[0]: r[1] for r in session.rows(f"describe select * from {table.relation()}")}
        rows = session.scalar(f"select count(*) from {table.relation()}")
    except EngineError as exc:
        return [f"{name}: not readable as {table.file_format}: {str(exc).splitlines()[0]}"], 0
    problems = []
    missing = [c for c in table.columns if c not in actual]
    if missing:
        problems.append(f"{name}: required column(s) missing: {', '.join(missing)} ({rows:,d} rows)")
    if rows == 0:
        problems.append(f"{name}: empty (0 rows)")
    for column, dtype in table.columns.items():
        if column not in actual or not dtype or actual[column].split("(")[0] in _COMPATIBLE.get(dtype, ()):
            continue
        quoted = quote(column)
        value = f"nullif(trim({quoted}::varchar), '')"
        try:
            bad, example = session.one(
                f"select count(*), any_value({quoted}::varchar) from {table.relation()} "
                f"where {value} is not null and try_cast({value} as {dtype}) is null"
            )
        except EngineError as exc:
            problems.append(f"{name}: column {column}: not readable: {str(exc).splitlines()[0]}")
            continue
        if bad:
            problems.append(
                f"{name}: column {column}: {bad:,d} of {rows:,d} rows are not {dtype} "
                f"(found {actual[column]}, e.g. {example!r})"
            )
    if not problems and table.file_format == "parquet":
        # Hashing every value decodes every page (a count or an IS NOT NULL filter is answered
        # from the footer's statistics), so a corrupt page is found here, not inside dbt.
        try:
            session.rows(f"select bit_xor(hash({column_list(actual)})) from {table.relation()}")
        except EngineError as exc:
            problems.append(f"{name}: not readable as parquet: {str(exc).splitlines()[0]}")
    return problems, rows


def validate_landing(config: ChurnConfig) -> dict[str, int]:
    """Check every landing file of the dataset; raise LandingValidationError listing all problems.

    Returns rows per table so the caller can log what landed.
    """
    tables = landing_tables(config)
    if not tables:
        raise LandingValidationError(
            f"no landing tables for dataset {config.dataset.name!r}: no {config.dataset.landing_format} "
            f"file of any dbt source in {config.dataset.landing_dir}; {expected_files_message(config)}"
        )
    problems: list[str] = []
    counts: dict[str, int] = {}
    # the files are read in place; no warehouse is opened
    with connect(MEMORY, settings=config.warehouse.engine) as session:
        for table in tables:
            found, rows = check_table(session, table)
            problems += found
            counts[table.name] = rows
            log.info("landing %-28s %12s rows%s", table.path.name, f"{rows:,d}", "" if not found else "  PROBLEM")
    if problems:
        raise LandingValidationError(
            f"landing folder {config.dataset.landing_dir} breaks the landing contract "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    return counts


@dataclass(frozen=True)
class DatedTableFacts:
    """What the gates need of one dated landing table at tonight's cutoff, read in one scan."""

    table: str
    column: str
    rows: int
    late_rows: int  # dated on or after the cutoff: invisible to dbt at this as_of
    late_first: dt.date | None
    late_last: dt.date | None
    newest_visible: dt.date | None  # newest event strictly before the cutoff
    first_day: dt.date | None  # oldest event
    daily: dict[dt.date, int]  # rows per day before the cutoff (days without rows absent)


def _table(config: ChurnConfig, name: str) -> LandingTable:
    for table in landing_tables(config):
        if table.name == name:
            return table
    raise LandingValidationError(f"dataset {config.dataset.name!r}: no landing table {name!r} in the dbt sources")


def dated_table_facts(config: ChurnConfig, cutoff: dt.date, since: dt.date) -> list[DatedTableFacts]:
    """Per configured event table: late rows, the newest visible event and daily volumes since `since`.

    The files are read in place with DuckDB (typed as dbt's sources declare them),
    so the gates judge exactly what dbt is about to read.
    """
    facts = []
    with connect(MEMORY) as session:
        for event in config.dataset.event_tables:
            table = _table(config, event.table)
            day = f"cast({quote(event.date_column)} as date)"
            relation = table.typed_relation()
            rows, late, first, last, newest, oldest = session.one(
                f"select count(*), count(*) filter (where {day} >= ?), min({day}) filter (where {day} >= ?), "
                f"max({day}) filter (where {day} >= ?), max({day}) filter (where {day} < ?), min({day}) "
                f"from {relation}",
                [cutoff, cutoff, cutoff, cutoff],
            )
            daily = dict(session.rows(
                f"select {day} as d, count(*) from {relation} where {day} >= ? and {day} < ? group by d",
                [since, cutoff],
            ))
            facts.append(DatedTableFacts(event.table, event.date_column, rows, late, first, last, newest, oldest,
                                         daily))
    return facts


@dataclass(frozen=True)
class BeforeSignup:
    """Rows of an event table dated before their customer's signup (impossible events)."""

    table: str
    column: str
    rows: int
    customers: int
    first: dt.date | None
    last: dt.date | None


def rows_before_signup(config: ChurnConfig, customers: str = "customers", signup: str = "signup_date",
                       key: str = "customer_id") -> list[BeforeSignup]:
    """Per event table with a customer key: rows dated before that customer's signup."""
    names = {t.name: t for t in landing_tables(config)}
    if customers not in names or signup not in names[customers].columns:
        return []
    found = []
    with connect(MEMORY) as session:
        for event in config.dataset.event_tables:
            table = names.get(event.table)
            if table is None or key not in table.columns or event.table == customers:
                continue
            day = f"cast(e.{quote(event.date_column)} as date)"
            rows, people, first, last = session.one(
                f"select count(*), count(distinct e.{quote(key)}), min({day}), max({day}) "
                f"from {table.typed_relation()} e join {names[customers].typed_relation()} c using ({quote(key)}) "
                f"where {day} < c.{quote(signup)}"
            )
            if rows:
                found.append(BeforeSignup(event.table, event.date_column, rows, people, first, last))
    return found
