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

A table lands as one file (`<table>.parquet`) or as a folder of date
partitions (`<table>/date=YYYY-MM-DD/*.parquet`, a daily extract). For folders
this module keeps a manifest of the partitions seen by the last successful run
(`landing_partitions`), so the file checks read only tonight's new or
rewritten partitions, and a rewritten or removed one (history changed) is
reported so the pipeline rebuilds from scratch instead of incrementally.

A single file re-exported whole each day (subscriptions) changes every night
although only its recent rows do. For the tables churn.yml lists under
`settled_history`, the manifest also keeps a signature of the rows as the last
build could see them (`landing_settled_history`); a changed file whose
signature of those rows is unchanged only added facts from the last build on,
and the night stays incremental. A changed past row still changes history.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from ml.config import ChurnConfig, SettledTableConfig
from ml.logs import get_logger
from ml.warehouse import (
    MEMORY,
    EngineError,
    Session,
    column_list,
    connect,
    declare,
    partition_folders,
    quote,
    quote_literal,
)

log = get_logger("landing")

PARTITIONS = declare(
    name="landing_partitions",
    owner=__name__,
    grain="one row per dataset, landing table and partition file seen by the last successful run",
    description="The manifest of partitioned landing folders: what the last successful nightly audited, "
                "so the next one reads only new or rewritten partitions and notices removed ones.",
    columns=[
        ("dataset", "VARCHAR", "the churn.yml dataset profile"),
        ("table_name", "VARCHAR", "the landing table (a folder of partitions, or one file)"),
        ("partition_path", "VARCHAR", "the file, relative to the table's folder (e.g. date=2025-12-31/part-0.parquet); "
                                      "a single-file table's file name"),
        ("size_bytes", "BIGINT", "file size when recorded"),
        ("mtime_ns", "BIGINT", "modification time (ns since the epoch) when recorded"),
        ("sha256", "VARCHAR", "content hash: tells a real rewrite from a touched file"),
        ("run_id", "VARCHAR", "the nightly run that recorded it"),
        ("recorded_at", "TIMESTAMP", "when it was recorded"),
    ],
)

SETTLED = declare(
    name="landing_settled_history",
    owner=__name__,
    grain="one row per dataset and settled single-file landing table",
    description="Signature of the rows of a re-exported single-file table as the last successful build saw them, "
                "so a new export that only adds later facts keeps the next build incremental.",
    columns=[
        ("dataset", "VARCHAR", "the churn.yml dataset profile"),
        ("table_name", "VARCHAR", "the landing table (churn.yml settled_history)"),
        ("settled_before", "DATE", "the as_of of the build recorded: rows are taken as they were known before it"),
        ("settled_rows", "BIGINT", "rows known before settled_before"),
        ("signature", "VARCHAR", "order-independent hash sum of those rows, later dates censored at settled_before"),
        ("run_id", "VARCHAR", "the nightly run that recorded it"),
        ("recorded_at", "TIMESTAMP", "when it was recorded"),
    ],
)

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
    # the source's meta.unique_key: a key landing again (another partition, a re-extract) must repeat its row
    key: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        """Where the table lands when it arrives as date partitions."""
        return self.path.with_name(self.name)

    @property
    def partitioned(self) -> bool:
        """A folder of partitions and no single file (the rule dbt's var landing_folders follows too)."""
        return self.name in partition_folders(self.path.parent, self.file_format)

    @property
    def exists(self) -> bool:
        return self.path.exists() or self.folder.is_dir()

    @property
    def label(self) -> str:
        """How messages name the table's data: the file, or the folder."""
        return f"{self.name}/" if self.partitioned else self.path.name

    def files(self) -> list[Path]:
        """Every data file of the table: the one file, or each partition file in path order."""
        if not self.partitioned:
            return [self.path]
        return sorted(p for p in self.folder.rglob(f"*.{self.file_format}") if p.is_file())

    def relation(self, files: Iterable[Path] | None = None, with_file: bool = False) -> str:
        """DuckDB table function reading the table as it lands (CSV as text, like dbt's source).

        `files` narrows a partitioned table to those partitions (tonight's); hive
        columns are never added, so every form has the contract's columns only
        (and, `with_file`, a `filename` column: the path each row was read from).
        """
        chosen = list(files) if files is not None else self.files()
        if not chosen:  # nothing new tonight: the table's columns, no rows (footers only are read)
            return f"(select * from {self.relation(with_file=with_file)} limit 0)"
        target = (quote_literal(chosen[0]) if not self.partitioned and len(chosen) == 1
                  else "[" + ", ".join(quote_literal(p) for p in chosen) + "]")
        named = ", filename = true" if with_file else ""
        if self.file_format == "csv":
            return f"read_csv({target}, header = true, all_varchar = true{named})"
        extra = ", hive_partitioning = false" if self.partitioned else ""
        return f"read_parquet({target}{extra}{named})"

    def typed_relation(self, files: Iterable[Path] | None = None, with_file: bool = False) -> str:
        """The table with every declared column cast to its declared type (blank text -> NULL)."""
        parts = ["filename"] if with_file else []
        for column, dtype in self.columns.items():
            quoted = quote(column)
            value = f"nullif(trim({quoted}), '')" if self.file_format == "csv" else quoted
            parts.append(f"try_cast({value} as {dtype}) as {quoted}" if dtype else quoted)
        return f"(select {', '.join(parts)} from {self.relation(files, with_file)})"


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
                    key=tuple(((table.get("config") or {}).get("meta") or {}).get("unique_key") or ()),
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
    return [t for tables in _sources_of_format(config) if any(t.exists for t in tables) for t in tables]


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


def landing_folders(config: ChurnConfig) -> list[str]:
    """Tables of the dataset that landed as partition folders (dbt var `landing_folders`)."""
    return [t.name for t in landing_tables(config) if t.partitioned]


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


def check_table(session: Session, table: LandingTable, files: list[Path] | None = None) -> tuple[list[str], int]:
    """Problems of one landing table, and the rows read (0 when unreadable).

    `files` (partitioned tables): check only these partitions, tonight's; the
    others passed when they landed. An empty list reads nothing.
    """
    if table.path.exists() and table.folder.is_dir():
        return [f"{table.path.name}: both the file and the folder {table.folder} exist; "
                f"keep one form (table {table.source}.{table.name})"], 0
    if not table.exists:
        return [f"{table.path.name}: file missing from {table.path.parent} (table {table.source}.{table.name})"], 0
    if table.partitioned:
        every = table.files()
        if not every:
            return [f"{table.label}: folder {table.folder} holds no .{table.file_format} partition files"], 0
        chosen = every if files is None else files
        if not chosen:
            return [], 0
        checked = _check_partitions if table.file_format == "parquet" else _check_each_partition
        problems, rows = checked(session, table, chosen)
        if not problems and table.key and files is not None:
            problems += _check_keys(session, table, every, chosen)
        return problems, rows
    return _check_files(session, table, None, table.path.name)


def _partition_name(table: LandingTable, path: Path) -> str:
    return f"{table.name}/{path.relative_to(table.folder)}"


def _check_each_partition(session: Session, table: LandingTable, chosen: list[Path]) -> tuple[list[str], int]:
    """The contract checks one partition at a time, so a problem names its file."""
    problems: list[str] = []
    rows = 0
    for path in chosen:
        found, n = _check_files(session, table, [path], _partition_name(table, path))
        problems += found
        rows += n
    return problems, rows


def _check_partitions(session: Session, table: LandingTable, chosen: list[Path]) -> tuple[list[str], int]:
    """The contract checks on many Parquet partitions in a few statements, each problem still naming its file.

    Checking partition by partition costs three statements per file (schema,
    count, page scan), ~160 ms each night a year of daily partitions is new
    (a first or a full night: 2 minutes at 200,000 customers). Here the
    footers of every partition are read in one statement, partitions are
    grouped by identical schema, and each group's types and pages are checked
    in one statement over all of its files. A group with any problem, or that
    cannot be read at all, is re-checked file by file to say which file.
    """
    listing = "[" + ", ".join(quote_literal(p) for p in chosen) + "]"
    try:
        footers = session.rows(
            f"select file_name, list(struct_pack(name, type, logical_type, duckdb_type) order by column_id) "
            f"from parquet_schema({listing}) group by file_name")
        counts = dict(session.rows(f"select file_name, num_rows from parquet_file_metadata({listing})"))
    except EngineError:  # some footer is unreadable: find which, one file at a time
        return _check_each_partition(session, table, chosen)
    schema_of = {name: repr(schema) for name, schema in footers}
    groups: dict[str, list[Path]] = {}
    for path in chosen:
        groups.setdefault(schema_of.get(str(path), ""), []).append(path)
    problems: list[str] = []
    rows = 0
    for files in groups.values():
        found, n = _check_files(session, table, files, _partition_name(table, files[0]))
        if len(files) > 1 and (found or any(not counts.get(str(p)) for p in files)):
            found, n = _check_each_partition(session, table, files)  # name the file(s) at fault
        problems += found
        rows += n
    return problems, rows


def _check_keys(session: Session, table: LandingTable, every: list[Path], tonight: list[Path]) -> list[str]:
    """Keys of tonight's partitions that land again with different values: one fact told two ways.

    Exact repeats are fine (staging deduplicates them), but on an incremental
    night staging's delete+insert would let a changed row under an old key
    silently replace a fact stored snapshots were built on. One statement over
    the key columns of every partition finds the keys that land more than once
    with a row tonight, narrowed to tonight's range of every key column (a key
    found twice lies inside it), so older files and row groups whose Parquet
    min/max fall outside it, e.g. the days before tonight's first new invoice
    id, are skipped by their statistics (null keys fail staging's not_null
    tests); only for those keys are whole rows hashed, and a key told two ways
    is reported per tonight's partition. A full night needs no such check: it
    stages every partition and dbt's unique tests on staging read the whole
    table.
    """
    keys = column_list(table.key)
    hashed = f"hash({column_list(table.columns)})"
    shown = "concat_ws(', ', " + ", ".join(f"{quote(c)}::varchar" for c in table.key) + ")"
    night = table.typed_relation(tonight)
    landed_tonight = "filename in (" + ", ".join(quote_literal(p) for p in tonight) + ")"
    narrow = " and ".join(
        f"{quote(c)} between (select min({quote(c)}) from {night}) and (select max({quote(c)}) from {night})"
        for c in table.key) or "true"
    landed = f"(select * from {table.typed_relation(every, with_file=True)} where {narrow})"
    repeated = (f"(select {keys} from {landed} group by {keys} "
                f"having count(*) > 1 and bool_or({landed_tonight}))")
    if not session.scalar(f"select count(*) from {repeated}"):
        return []
    found = session.rows(
        f"with landed as (select *, {hashed} as h from {landed} semi join {repeated} using ({keys})), "
        f"differs as (select {keys} from landed group by {keys} having count(distinct h) > 1) "
        f"select filename, count(*), any_value({shown}) from landed semi join differs using ({keys}) "
        f"where {landed_tonight} group by filename order by filename")
    if not found:
        return []
    rows = dict(session.rows(
        f"select filename, count(*) from {table.relation([Path(f) for f, _, _ in found], with_file=True)} "
        "group by filename"))
    return [f"{table.name}/{Path(name).relative_to(table.folder)}: column(s) {', '.join(table.key)}: {bad:,d} of "
            f"{rows[name]:,d} rows reuse a key of another row with different values (e.g. {example}); a correction "
            f"of an earlier day belongs in a rewrite of its partition (the nightly then refreshes in full)"
            for name, bad, example in found]


def _check_files(session: Session, table: LandingTable, files: list[Path] | None, name: str) -> tuple[list[str], int]:
    """The contract checks on one file (or partition): readable, columns present, values of the declared types."""
    relation = table.relation(files)
    try:
        if table.file_format == "csv" and not table.partitioned:
            problems = _check_csv_rows(session, table)
            if problems:
                return problems, 0
        actual = {r[0]: r[1] for r in session.rows(f"describe select * from {relation}")}
        rows = session.scalar(f"select count(*) from {relation}")
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
                f"select count(*), any_value({quoted}::varchar) from {relation} "
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
            session.rows(f"select bit_xor(hash({column_list(actual)})) from {relation}")
        except EngineError as exc:
            problems.append(f"{name}: not readable as parquet: {str(exc).splitlines()[0]}")
    return problems, rows


def validate_landing(config: ChurnConfig, changes: LandingChanges | None = None) -> dict[str, int]:
    """Check every landing file of the dataset; raise LandingValidationError listing all problems.

    With `changes` (from `landing_changes`), a partitioned table's checks read
    only its new and rewritten partitions. Returns rows read per table so the
    caller can log what landed.
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
            files = changes.to_read(table) if changes is not None and table.partitioned else None
            found, rows = check_table(session, table, files)
            problems += found
            counts[table.name] = rows
            read = "" if files is None else f" ({len(files)} new/changed partition(s))"
            log.info("landing %-28s %12s rows%s%s", table.label, f"{rows:,d}", read, "" if not found else "  PROBLEM")
    if problems:
        raise LandingValidationError(
            f"landing folder {config.dataset.landing_dir} breaks the landing contract "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    return counts


# --- the partition manifest ---------------------------------------------------


@dataclass(frozen=True)
class PartitionFile:
    """One partition file of a partitioned landing table as found on disk."""

    table: str
    path: str  # relative to the table's folder
    size_bytes: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class LandingChanges:
    """Partitions since the last successful run: new, rewritten (content changed) and removed.

    `current` is the listing the comparison was made on; the pipeline records
    exactly it once the run succeeds, so a partition landing mid-run is new next night.
    """

    new: tuple[PartitionFile, ...]
    changed: tuple[PartitionFile, ...]
    removed: tuple[PartitionFile, ...]
    current: tuple[PartitionFile, ...]
    folders: dict[str, Path]  # partitioned table -> its folder
    # Whether a manifest of a previous successful run existed: without one nothing says what was built on.
    baseline: bool = True
    # Re-exported single files whose rows before the last build are unchanged (only later facts were added).
    appended: tuple[PartitionFile, ...] = ()

    @property
    def history_changed(self) -> bool:
        """A file already built on was rewritten or removed, or nothing was recorded yet (so nothing proves
        otherwise): an incremental build could keep stale snapshots."""
        return bool(self.changed or self.removed or (not self.baseline and self.current))

    def to_read(self, table: LandingTable) -> list[Path]:
        """Tonight's partition files of one table (new and rewritten), absolute, in path order."""
        names = sorted(p.path for p in (*self.new, *self.changed) if p.table == table.name)
        return [table.folder / name for name in names]

    def describe(self) -> str:
        def shown(parts: tuple[PartitionFile, ...]) -> str:
            names = [f"{p.table}/{p.path}" for p in parts[:3]]
            return ", ".join(names) + (f", ... ({len(parts)} in all)" if len(parts) > 3 else "")

        appended = f", {len(self.appended)} re-exported with settled history unchanged ({shown(self.appended)})"
        return (f"{len(self.new)} new, {len(self.changed)} rewritten ({shown(self.changed) or '-'}), "
                f"{len(self.removed)} removed ({shown(self.removed) or '-'}) partition(s)"
                + (appended if self.appended else ""))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_partitions(config: ChurnConfig, session: Session) -> dict[tuple[str, str], PartitionFile]:
    """The manifest of the last successful run for the dataset, by (table, path)."""
    if not session.exists(PARTITIONS):
        return {}
    rows = session.rows(
        f"select table_name, partition_path, size_bytes, mtime_ns, sha256 from {quote(PARTITIONS.name)} "
        "where dataset = ?", [config.dataset.name])
    return {(r[0], r[1]): PartitionFile(*r) for r in rows}


def settled_signature(session: Session, table: LandingTable, spec: SettledTableConfig,
                      before: dt.date) -> tuple[int, str]:
    """Rows of `table` known before `before`, and an order-independent signature of them as known then.

    A later date on or after `before` (and the columns filled with it) counts
    as not known yet, so a cancellation recorded tonight on an old period does
    not change the signature, while any change to what a stored snapshot read does.
    A sum of row hashes, unlike a xor, also tells a duplicated row.
    """
    limit = f"cast({quote_literal(before.isoformat())} as date)"
    later = dict(spec.filled_with)
    known: dict[str, str] = {}
    for date in spec.later_dates:
        known[date] = f"case when {quote(date)} < {limit} then {quote(date)} end"
        for column in later.get(date, ()):
            known[column] = f"case when {quote(date)} < {limit} then {quote(column)} end"
    values = ", ".join(known.get(c, quote(c)) for c in table.columns)
    rows, total = session.one(
        f"select count(*), coalesce(sum(hash({values})::hugeint), 0)::varchar from {table.typed_relation()} "
        f"where {quote(spec.known_from)} < {limit}")
    return int(rows), str(total)


def _settled_specs(config: ChurnConfig,
                   tables: list[LandingTable]) -> dict[str, tuple[LandingTable, SettledTableConfig]]:
    """Settled-history tables of the dataset that landed as one file."""
    by_name = {t.name: t for t in tables if not t.partitioned and t.path.exists()}
    return {s.table: (by_name[s.table], s) for s in config.dataset.settled_history if s.table in by_name}


def recorded_settled(config: ChurnConfig, session: Session) -> dict[str, tuple[dt.date, int, str]]:
    """table -> (settled_before, rows, signature) as the last successful run recorded them."""
    if not session.exists(SETTLED):
        return {}
    rows = session.rows(f"select table_name, settled_before, settled_rows, signature from {quote(SETTLED.name)} "
                        "where dataset = ?", [config.dataset.name])
    return {r[0]: (r[1], int(r[2]), r[3]) for r in rows}


def landing_changes(config: ChurnConfig, session: Session) -> LandingChanges:
    """Compare the partition folders on disk with the manifest `session`'s warehouse holds.

    A file whose size and mtime match the manifest is taken as unchanged
    without reading it; otherwise its content hash decides (a touched but equal
    file is not a rewrite). A single-file table is tracked as one partition: its
    checks read the whole file every night as before, and since nothing tells an
    append from a rewrite of its past rows, a changed file counts as changed
    history (the incremental build then refreshes in full instead of guessing).
    """
    known = recorded_partitions(config, session)
    tables = [t for t in landing_tables(config) if t.exists]
    settled = _settled_specs(config, tables)
    signatures = recorded_settled(config, session)
    current: list[PartitionFile] = []
    new: list[PartitionFile] = []
    changed: list[PartitionFile] = []
    appended: list[PartitionFile] = []
    for table in tables:
        base = table.folder if table.partitioned else table.path.parent
        for path in table.files():
            stat = path.stat()
            relative = path.relative_to(base).as_posix()
            before = known.get((table.name, relative))
            if before is not None and (before.size_bytes, before.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                digest = before.sha256
            else:
                digest = _sha256(path)
            found = PartitionFile(table.name, relative, stat.st_size, stat.st_mtime_ns, digest)
            current.append(found)
            if before is None:
                new.append(found)
            elif before.sha256 == digest:
                continue
            elif table.name in settled and table.name in signatures and _settled_unchanged(
                    session, *settled[table.name], signatures[table.name]):
                appended.append(found)
            else:
                changed.append(found)
    here = {(p.table, p.path) for p in current}
    watched = {t.name for t in tables}
    # a table that went back to one file, or vanished, has its partitions removed as well
    removed = [p for key, p in sorted(known.items()) if key not in here]
    changes = LandingChanges(tuple(new), tuple(changed), tuple(removed), tuple(current),
                             {t.name: t.folder for t in tables if t.partitioned}, baseline=bool(known),
                             appended=tuple(appended))
    if tables or removed:
        log.info("landing partitions of %s: %s", ", ".join(sorted(watched)) or "-", changes.describe())
    return changes


def _settled_unchanged(session: Session, table: LandingTable, spec: SettledTableConfig,
                       recorded: tuple[dt.date, int, str]) -> bool:
    """Whether the file's rows known before the recorded build are exactly those it recorded."""
    before, rows, signature = recorded
    now = settled_signature(session, table, spec, before)
    if now != (rows, signature):
        log.warning("landing %s: rows known before %s changed (%s rows recorded, %s now): history changed",
                    table.label, before, f"{rows:,d}", f"{now[0]:,d}")
        return False
    log.info("landing %s re-exported: rows before %s unchanged, only later facts added", table.label, before)
    return True


def record_partitions(config: ChurnConfig, session: Session, changes: LandingChanges, run_id: str,
                      as_of: dt.date | None = None) -> int:
    """Store `changes.current` as the dataset's manifest (after a successful run); returns the rows written.

    With `as_of` (the night just built) the settled-history signatures are
    recorded at it too: what the next night's re-exports are compared with.
    """
    frame = pd.DataFrame(
        [{"dataset": config.dataset.name, "table_name": p.table, "partition_path": p.path,
          "size_bytes": p.size_bytes, "mtime_ns": p.mtime_ns, "sha256": p.sha256, "run_id": run_id,
          "recorded_at": dt.datetime.now()} for p in changes.current],
        columns=PARTITIONS.column_names,
    )
    session.append(PARTITIONS, frame, where="dataset = ?", params=[config.dataset.name])
    if as_of is not None:
        record_settled(config, session, as_of, run_id)
    return len(frame)


def record_settled(config: ChurnConfig, session: Session, as_of: dt.date, run_id: str) -> None:
    """Store each settled-history table's signature of the rows known before `as_of`."""
    specs = _settled_specs(config, [t for t in landing_tables(config) if t.exists])
    recorded = []
    for name, (table, spec) in sorted(specs.items()):
        rows, signature = settled_signature(session, table, spec, as_of)
        recorded.append({"dataset": config.dataset.name, "table_name": name, "settled_before": as_of,
                         "settled_rows": rows, "signature": signature, "run_id": run_id,
                         "recorded_at": dt.datetime.now()})
    session.append(SETTLED, pd.DataFrame(recorded, columns=SETTLED.column_names),
                   where="dataset = ?", params=[config.dataset.name])


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
