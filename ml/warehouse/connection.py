"""Connections to the warehouse, and the one object every SQL statement of the ML layer goes through.

DuckDB allows one read-write process or many read-only ones on a file, and a
process that keeps a connection open sees its own cached copy of the file. So
connections are opened for one job and always closed (`connect`), and the
stages never hold a raw engine connection: they get a `Session`, whose small
vocabulary (read a frame, a row or a value; stream chunks; a transaction;
append, replace rows, replace a table; table existence and columns) is all
they need. A second engine can be added behind the same vocabulary: its read
half is the `Reader` protocol, which Spark's `ml.warehouse.spark.SparkWarehouse`
satisfies too, so a read typed `Reader` runs on either engine.

Transactions nest: an inner `transaction()` joins the outer one, so a helper
that writes "atomically" can be called on its own or as part of a larger
atomic write without committing early.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pandas as pd
import pyarrow as pa

from ml.warehouse.catalog import TableSpec
from ml.warehouse.sql import quote

# DuckDB hands results over in vectors of this many rows.
VECTOR_ROWS = 2048
MEMORY = ":memory:"

_frame_names = itertools.count()


class WarehouseError(RuntimeError):
    """A warehouse table is missing or not what a stage expects."""


class DatabaseBusyError(WarehouseError):
    """Another process has the database file open, so this one cannot lock it."""


# What the engine raises for a statement it cannot run (a corrupt file, a bad cast):
# stages that turn such failures into named errors catch this, not the engine's module.
EngineError = duckdb.Error


Params = Sequence[Any] | None


class EngineSettings(Protocol):
    """What `connect` needs of the configured engine settings (ml.config.EngineSettings)."""

    def pragmas(self) -> dict[str, str | int]: ...


class Reader(Protocol):
    """What a stage reads the data plane with, on either engine.

    The feature mart and the scores live on the configured engine: a DuckDB
    `Session` on the build database, or `ml.warehouse.spark.SparkWarehouse`,
    which offers this same vocabulary on Spark. A stage that reads big tables
    through a `Reader` (in SQL both engines share: ANSI, double-quoted names,
    `?` parameters bound positionally, one `?` per value: DuckDB's list
    parameters such as `unnest(?::date[])` have no Spark twin) runs unchanged on
    both; its small results still go to the build database through a `Session`.
    """

    path: str

    def rows(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]: ...

    def one(self, sql: str, params: Params = None) -> tuple[Any, ...] | None: ...

    def scalar(self, sql: str, params: Params = None) -> Any: ...

    def frame(self, sql: str, params: Params = None) -> pd.DataFrame: ...

    def chunks(self, sql: str, params: Params = None, chunk_rows: int = 200_000,
               always_one: bool = False) -> Iterator[pd.DataFrame]: ...

    def exists(self, table: str | TableSpec) -> bool: ...

    def columns(self, table: str | TableSpec) -> dict[str, str]: ...

    def temp_table(self, name: str, select_sql: str, params: Params = None) -> AbstractContextManager[str]:
        """`select_sql`'s rows computed once and readable as `name` inside the block (a sample, counts
        that several statements read); gone after it."""
        ...

    def registered(self, frame: pd.DataFrame) -> AbstractContextManager[str]:
        """`frame` visible to this reader's SQL under a fresh name for the block (e.g. keys to join)."""
        ...


class Session:
    """An open warehouse connection with the operations the stages use (a `Reader`, and the writes)."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, path: str, read_only: bool) -> None:
        self._con = connection
        self.path = path
        self.read_only = read_only
        self._depth = 0

    @contextmanager
    def cursor(self) -> Iterator[Session]:
        """Another connection to the same database, for one thread: DuckDB connections are not
        shared between threads, while cursors of one database are independent and cheap (~10 us)."""
        cursor = self._con.cursor()
        try:
            yield Session(cursor, self.path, self.read_only)
        finally:
            cursor.close()

    # ------------------------------------------------------------ reading

    def execute(self, sql: str, params: Params = None) -> None:
        """Run a statement whose result nobody reads (DDL, DML, ATTACH)."""
        self._con.execute(sql, list(params) if params is not None else None)

    def rows(self, sql: str, params: Params = None) -> list[tuple[Any, ...]]:
        return self._con.execute(sql, list(params) if params is not None else None).fetchall()

    def one(self, sql: str, params: Params = None) -> tuple[Any, ...] | None:
        """The first row, or None. The whole result is consumed: DuckDB refuses the next
        statement on a connection with an unfinished result (so no `fetchone`)."""
        rows = self._con.execute(sql, list(params) if params is not None else None).fetchall()
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Params = None) -> Any:
        row = self.one(sql, params)
        return row[0] if row else None

    def frame(self, sql: str, params: Params = None) -> pd.DataFrame:
        return self._con.execute(sql, list(params) if params is not None else None).df()

    def chunks(self, sql: str, params: Params = None, chunk_rows: int = 200_000,
               always_one: bool = False) -> Iterator[pd.DataFrame]:
        """The result in frames of about `chunk_rows` rows, so memory stays bounded by one chunk.

        `always_one` yields the (empty) first chunk of an empty result too, for
        consumers that must see the columns even when there are no rows.
        """
        result = self._con.execute(sql, list(params) if params is not None else None)
        vectors = max(1, math.ceil(chunk_rows / VECTOR_ROWS))
        first = True
        while True:
            chunk = result.fetch_df_chunk(vectors)
            if chunk.empty and not (first and always_one):
                return
            yield chunk
            if chunk.empty:
                return
            first = False

    @contextmanager
    def temp_table(self, name: str, select_sql: str, params: Params = None) -> Iterator[str]:
        """`select_sql`'s result as temp table `name` (a plain identifier) for the block, then dropped.

        For a relation several statements read: as a subquery each of them would
        recompute it (re-scan the table it filters). A temp table is the
        connection's own, so a read-only connection can make one too.
        """
        self.execute(f"create or replace temp table {name} as {select_sql}", params)
        try:
            yield name
        except BaseException:
            # Inside a failed transaction the drop fails too (the table then goes with the connection).
            with suppress(duckdb.Error):
                self.execute(f"drop table if exists {name}")
            raise
        self.execute(f"drop table {name}")

    # ------------------------------------------------------------ introspection

    def exists(self, table: str | TableSpec) -> bool:
        return bool(self.scalar(
            "select count(*) from information_schema.tables where table_name = ?", [_name(table)]
        ))

    def columns(self, table: str | TableSpec) -> dict[str, str]:
        """Column name -> SQL type, in table order; empty when the table is absent."""
        rows = self.rows(
            "select column_name, data_type from information_schema.columns "
            "where table_name = ? order by ordinal_position",
            [_name(table)],
        )
        return {name: dtype for name, dtype in rows}

    def tables(self, schema: str = "main", base_tables_only: bool = True) -> list[str]:
        """Names of the tables in `schema`, sorted (views too unless `base_tables_only`)."""
        kind = " and table_type = 'BASE TABLE'" if base_tables_only else ""
        return [r[0] for r in self.rows(
            f"select table_name from information_schema.tables where table_schema = ?{kind} order by table_name",
            [schema],
        )]

    def setting(self, name: str) -> Any:
        """The engine's current value of a setting (e.g. memory_limit), as it reports it."""
        return self.scalar("select current_setting(?)", [name])

    def row_count(self, table: str | TableSpec) -> int:
        return int(self.scalar(f"select count(*) from {quote(_name(table))}"))

    # ------------------------------------------------------------ writing

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """All writes inside commit together or not at all; nested calls join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._con.execute("begin transaction")
        self._depth = 1
        try:
            yield self
        except BaseException:
            self._depth = 0
            self._con.execute("rollback")
            raise
        self._depth = 0
        self._con.execute("commit")

    @contextmanager
    def registered(self, frame: pd.DataFrame | pa.Table) -> Iterator[str]:
        """`frame` (pandas, or Arrow, which DuckDB scans faster) visible to SQL under a fresh name for the block."""
        name = f"_frame_{next(_frame_names)}"
        self._con.register(name, frame)
        try:
            yield name
        except BaseException:
            # Inside a failed transaction unregistering fails too; the first error is the one to see.
            with suppress(duckdb.Error):
                self._con.unregister(name)
            raise
        self._con.unregister(name)

    def create(self, spec: TableSpec) -> None:
        """Create a declared table with its declared column types, if it does not exist."""
        self.execute(spec.ddl())

    def append(self, table: str | TableSpec, frame: pd.DataFrame, where: str | None = None,
               params: Params = None) -> int:
        """Insert `frame` by column name, in one transaction; `where` first deletes the rows it matches.

        A declared table is created from its declaration; an undeclared (or
        contract-shaped) one from the frame's own columns on first write.
        Deleting first is how re-running a step replaces its own rows instead of
        duplicating them.
        """
        name = _name(table)
        with self.registered(frame) as incoming, self.transaction():
            if isinstance(table, TableSpec) and not table.contract_columns:
                self.create(table)
            elif not self.exists(name):
                self.execute(f"create table {quote(name)} as select * from {incoming} limit 0")
            if where is not None:
                self.execute(f"delete from {quote(name)} where {where}", params)
            if len(frame):
                self.execute(f"insert into {quote(name)} by name select * from {incoming}")
        return len(frame)

    def replace_table(self, table: str | TableSpec, select_sql: str, params: Params = None) -> None:
        """Replace the whole table with the result of `select_sql` (atomic for readers)."""
        self.execute(f"create or replace table {quote(_name(table))} as {select_sql}", params)

    def add_missing_columns(self, table: str | TableSpec, columns: dict[str, str]) -> list[str]:
        """Add the columns `table` lacks (name -> SQL type); returns the names added."""
        existing = self.columns(table)
        added = [c for c in columns if c not in existing]
        for column in added:
            self.execute(f"alter table {quote(_name(table))} add column {quote(column)} {columns[column]}")
        return added


def _name(table: str | TableSpec) -> str:
    return table.name if isinstance(table, TableSpec) else str(table)


def busy_message(path: Path, engine_message: str) -> str:
    """What to do when another process holds the file (DuckDB's own hint, "open it read-only", is
    no help to a nightly that must write)."""
    holder = re.search(r"\(PID (\d+)\)", engine_message)
    who = f"process {holder.group(1)}" if holder else "another process"
    return (f"database {path} is open in {who}, and DuckDB lets only one process open a file while it is "
            "written. BI tools and ad-hoc queries should read the published database "
            "(warehouse.published_db, published.duckdb), which each nightly replaces atomically and never "
            f"locks; close {who} (or wait for the run holding it) and run again.")


def _open(path: Path, read_only: bool, settings: dict[str, str | int]) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only, config=settings)
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower():
            raise
        raise DatabaseBusyError(busy_message(path, str(exc))) from None


@contextmanager
def connect(path: Path | str, read_only: bool = False, settings: EngineSettings | None = None) -> Iterator[Session]:
    """Open a warehouse file (or `":memory:"`) and always close it: DuckDB locks the file while open.

    `settings` (churn.yml's warehouse memory_limit, threads, temp_directory) bound
    what the engine may use; every connection of the pipeline passes them.
    """
    pragmas = settings.pragmas() if settings is not None else {}
    if str(path) == MEMORY:
        con = duckdb.connect(MEMORY, config=pragmas)
    else:
        path = Path(path)
        if read_only and not path.exists():
            raise WarehouseError(f"database not found: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        con = _open(path, read_only, pragmas)
    try:
        yield Session(con, str(path), read_only)
    finally:
        con.close()
