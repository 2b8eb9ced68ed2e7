"""Spelling SQL names and types the one way the whole ML layer uses.

Table and column names reach SQL from YAML (the contract), churn.yml and
Python constants; quoting every one of them through `quote` means a column
named like a keyword (`rank`, `precision`) or holding a quote character can
never change what a statement does.
"""

from __future__ import annotations

from collections.abc import Iterable

# DuckDB type names (as information_schema spells them) that hold numbers.
NUMERIC_TYPE_PREFIXES = (
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
    "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "REAL", "DOUBLE", "DECIMAL", "NUMERIC", "BOOLEAN",
)


def quote(identifier: str) -> str:
    """A double-quoted SQL identifier; embedded quotes are doubled."""
    return '"' + str(identifier).replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A single-quoted SQL string literal (for the few places a parameter cannot go, e.g. ATTACH)."""
    return "'" + str(value).replace("'", "''") + "'"


def spark_quote(identifier: str) -> str:
    """A backquoted Spark identifier, for Spark's own APIs and SQL (table names, writer predicates)."""
    return "`" + str(identifier).replace("`", "``") + "`"


def double_literal(value: float) -> str:
    """A double both engines read exactly: the shortest round-trip text, cast from a string (a bare
    `0.1` is DECIMAL on Spark, and a bound or bin edge must compare as the very double it was)."""
    return f"cast('{float(value)!r}' as double)"


def column_list(names: Iterable[str]) -> str:
    """`"a", "b", "c"`: a select list of quoted columns."""
    return ", ".join(quote(name) for name in names)


def is_numeric_type(sql_type: str) -> bool:
    """Whether a column type (as the warehouse reports it) holds numbers."""
    return str(sql_type).upper().startswith(NUMERIC_TYPE_PREFIXES)
