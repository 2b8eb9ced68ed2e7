"""Small DuckDB helpers shared by the stages that read and write warehouse tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd


class WarehouseError(RuntimeError):
    """A warehouse table is missing or not what a stage expects."""


@contextmanager
def connect(path: Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open a DuckDB file and always close it: DuckDB locks the file while open."""
    if read_only and not Path(path).exists():
        raise WarehouseError(f"database not found: {path}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only)
    try:
        yield con
    finally:
        con.close()


def table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    row = con.execute(
        "select count(*) from information_schema.tables where table_name = ?", [table]
    ).fetchone()
    return bool(row and row[0])


def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """Column name -> DuckDB type, in table order; empty when the table is absent."""
    rows = con.execute(
        "select column_name, data_type from information_schema.columns "
        "where table_name = ? order by ordinal_position",
        [table],
    ).fetchall()
    return {name: dtype for name, dtype in rows}


def write_table(
    con: duckdb.DuckDBPyConnection,
    table: str,
    frame: pd.DataFrame,
    replace_where: tuple[str, list] | None = None,
) -> int:
    """Append `frame` to `table` (created on first write) inside one transaction.

    `replace_where=("run_id = ?", [run_id])` first deletes the rows it matches,
    which is how re-running a step replaces its own rows instead of duplicating them.
    """
    con.register("_incoming", frame)
    try:
        con.execute("begin transaction")
        if not table_exists(con, table):
            con.execute(f'create table "{table}" as select * from _incoming limit 0')
        if replace_where is not None:
            clause, params = replace_where
            con.execute(f'delete from "{table}" where {clause}', params)
        con.execute(f'insert into "{table}" by name select * from _incoming')
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    finally:
        con.unregister("_incoming")
    return len(frame)
