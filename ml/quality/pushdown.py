"""Row-wise expectations as SQL counts on the engine that holds the table.

A row-wise (map) expectation's verdict is a function of three counts: the
rows, the rows it does not consider (missing), and the rows that break it
(unexpected); GX's `mostly` rule then judges the totals. Streaming every row
of a column to GX's pandas engine to learn those counts is what kept the
audits on the driver: at 100M customers, hours of batches through one
process. For the expectations whose rule has one exact SQL spelling on both
engines, the counts are one aggregate statement per column instead, and the
failing values GX would list (at most SAMPLE_VALUES) are fetched only when
there are any. The audit (ml/quality/audit.py) judges the counts by the same
rule it applies to a column streamed in several batches.

Compiled, with GX's semantics for pandas kept (a float NaN is missing, as
pandas' isnull says, so `not_null` counts it and the others skip it):
- `expect_column_values_to_not_be_null`: unexpected = null (or NaN) rows;
- `expect_column_values_to_be_between` with numeric bounds on a numeric
  column (`strict_min`/`strict_max` honoured): unexpected = present rows
  outside the bounds, missing = null rows;
- `expect_column_values_to_be_in_set` with a set of text on a text column,
  of numbers on a numeric one, or of booleans on a boolean one: unexpected =
  present rows not in the set;
- `expect_column_pair_values_to_be_in_set` (each listed value a boolean, text
  or number as its column is, or null for a missing one; `ignore_row_if`
  honoured): unexpected = considered rows whose pair is not listed. GX's
  pandas metric walks the rows with `iterrows`: 12.5 s for 726k scores;
- `expect_column_values_to_be_unique` and `expect_compound_columns_to_be_unique`:
  unexpected = rows whose value (or combination, NULLs equal as in pandas)
  occurs more than once, one grouped statement; missing = NULL rows (for a
  compound key, rows whose columns are all NULL). Before this, every key of
  the mart went through the driver in hash partitions.
Anything else (date bounds, other kwargs such as `row_condition`, a type GX
would compare its own way) returns None from `compile_check` and stays with
GX's batches: a pushdown is taken only where its verdict is GX's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ml.warehouse import Reader, column_list, double_literal, quote, quote_literal

NOT_NULL = "expect_column_values_to_not_be_null"
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
UNIQUE = "expect_column_values_to_be_unique"
COMPOUND_UNIQUE = "expect_compound_columns_to_be_unique"
PAIR_IN_SET = "expect_column_pair_values_to_be_in_set"
# ignore_row_if of a pair expectation -> the rows it does not consider (GX's default: both missing)
_PAIR_IGNORED = {"both_values_are_missing": "({a} and {b})", "either_value_is_missing": "({a} or {b})",
                 "neither": None}
# kwargs a compiled check understands; any other (row_condition, ignore_row_if, ...) keeps GX.
KNOWN_KWARGS = {
    NOT_NULL: {"column", "mostly"},
    BETWEEN: {"column", "mostly", "min_value", "max_value", "strict_min", "strict_max"},
    IN_SET: {"column", "mostly", "value_set"},
    UNIQUE: {"column", "mostly"},
    COMPOUND_UNIQUE: {"column_list", "mostly"},
    PAIR_IN_SET: {"column_A", "column_B", "value_pairs_set", "mostly", "ignore_row_if"},
}
SAMPLE_VALUES = 20  # GX's partial_unexpected_list length


@dataclass(frozen=True)
class CompiledCheck:
    """One row-wise expectation as SQL over its column(s): conditions, or the values grouped for duplicates."""

    index: int  # the expectation's index in its suite
    unexpected: str | None  # true for the rows that break it (None: a uniqueness check, by `groups`)
    missing: str | None  # true for the rows it does not consider (None: it considers every row)
    groups: tuple[str, ...] = ()  # uniqueness: the expressions whose repeated values are unexpected


@dataclass(frozen=True)
class Counts:
    """What the engine counted for one compiled check."""

    element_count: int
    missing_count: int
    unexpected_count: int
    has_missing: bool
    sample: tuple[Any, ...]


def _resolved(value: Any, parameters: Mapping[str, Any]) -> Any:
    if isinstance(value, dict) and "$PARAMETER" in value:
        return parameters.get(value["$PARAMETER"], _UNRESOLVED)
    return value


_UNRESOLVED = object()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _literal(value: Any) -> str:
    """A boolean, a number as a double both engines read exactly, or a text literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return double_literal(value) if _number(value) else quote_literal(str(value))


def _same_kind(value: Any, dtype: Any) -> bool:
    """Whether SQL's `=` between `value` and a column of `dtype` is Python's `==` (GX's pandas `in`)."""
    if pd.api.types.is_bool_dtype(dtype):
        return isinstance(value, bool)
    if pd.api.types.is_numeric_dtype(dtype):
        return _number(value)
    textual = pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)
    return textual and isinstance(value, str)


def _pair_in_set(kwargs: Mapping[str, Any], index: int, dtypes: Mapping[str, Any],
                 parameters: Mapping[str, Any]) -> CompiledCheck | None:
    """A pair of columns whose (A, B) must be one of the listed pairs; a missing value matches only null."""
    names = (kwargs["column_A"], kwargs["column_B"])
    pairs = _resolved(kwargs.get("value_pairs_set"), parameters)
    ignored = _resolved(kwargs.get("ignore_row_if", "both_values_are_missing"), parameters)
    if not isinstance(pairs, list | tuple) or not pairs or ignored not in _PAIR_IGNORED \
            or not all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in pairs):
        return None
    if not all(value is None or _same_kind(value, dtypes[name])
               for pair in pairs for name, value in zip(names, pair, strict=True)):
        return None
    missing_a, missing_b = (_missing(name, dtypes[name]) for name in names)
    listed = " or ".join(
        "(" + " and ".join(_missing(name, dtypes[name]) if value is None else f"{quote(name)} = {_literal(value)}"
                           for name, value in zip(names, pair, strict=True)) + ")"
        for pair in pairs)
    outside = f"not coalesce({listed}, false)"  # a NULL compared is no match, as (None, b) not in the set
    template = _PAIR_IGNORED[ignored]
    if template is None:
        return CompiledCheck(index, outside, None)
    missing = template.format(a=missing_a, b=missing_b)
    return CompiledCheck(index, f"not {missing} and {outside}", missing)


def _missing(column: str, dtype: Any) -> str:
    """SQL true where pandas' isnull would be: NULL, and NaN in a float column."""
    c = quote(column)
    return f"({c} is null or isnan({c}))" if pd.api.types.is_float_dtype(dtype) else f"{c} is null"


def _grouped(column: str, dtype: Any) -> str:
    """The value duplicates are found by: NaN as NULL in a float column (pandas takes both for one)."""
    c = quote(column)
    return f"case when isnan({c}) then null else {c} end" if pd.api.types.is_float_dtype(dtype) else c


def compile_check(expectation: Any, index: int, dtypes: Mapping[str, Any],
                  parameters: Mapping[str, Any]) -> CompiledCheck | None:
    """The expectation as SQL on columns of these pandas `dtypes` (as the engine's frames type them),
    or None when its verdict has no exact SQL twin here."""
    kind = expectation.expectation_type
    kwargs = expectation.configuration.kwargs
    if kind not in KNOWN_KWARGS or not set(kwargs) <= KNOWN_KWARGS[kind]:
        return None
    if kind == PAIR_IN_SET:
        return _pair_in_set(kwargs, index, dtypes, parameters)
    if kind == COMPOUND_UNIQUE:  # rows whose columns are all missing are not considered (GX's default)
        columns = list(kwargs["column_list"])
        missing = " and ".join(_missing(name, dtypes[name]) for name in columns)
        return CompiledCheck(index, None, f"({missing})", tuple(_grouped(name, dtypes[name]) for name in columns))
    dtype = dtypes[kwargs["column"]]
    c = quote(kwargs["column"])
    numeric = pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
    missing = _missing(kwargs["column"], dtype)
    present = f"not {missing}"
    if kind == UNIQUE:
        return CompiledCheck(index, None, missing, (_grouped(kwargs["column"], dtype),))
    if kind == NOT_NULL:
        return CompiledCheck(index, missing, None)
    if kind == BETWEEN:
        low, high = (_resolved(kwargs.get(k), parameters) for k in ("min_value", "max_value"))
        if not numeric or (low is None and high is None) or any(
                v is not None and not _number(v) for v in (low, high)):
            return None
        outside = []
        if low is not None:
            outside.append(f"{c} {'<=' if kwargs.get('strict_min') else '<'} {_literal(low)}")
        if high is not None:
            outside.append(f"{c} {'>=' if kwargs.get('strict_max') else '>'} {_literal(high)}")
        return CompiledCheck(index, f"{present} and ({' or '.join(outside)})", missing)
    values = _resolved(kwargs.get("value_set"), parameters)
    if not isinstance(values, list | tuple) or not values:
        return None
    if not all(_same_kind(v, dtype) for v in values):
        return None
    listed = ", ".join(_literal(v) for v in values)
    return CompiledCheck(index, f"{present} and {c} not in ({listed})", missing)


def count_checks(data: Reader, relation: str, columns: Sequence[str],
                 checks: Sequence[CompiledCheck]) -> dict[int, Counts]:
    """Every compiled check of one plan's columns counted on the engine: the condition checks in one
    scan of `relation`, each uniqueness check in one grouped scan; failing values fetched (at most
    SAMPLE_VALUES per check) only for the checks that found some."""
    parts = ["count(*)"]
    for check in checks:
        parts.append(f"count(case when {check.unexpected} then 1 end)" if check.unexpected else "0")
        parts.append(f"count(case when {check.missing} then 1 end)" if check.missing else "0")
    row = data.one(f"select {', '.join(parts)} from {relation}")
    assert row is not None  # an aggregate without group by returns one row
    n = int(row[0])
    out: dict[int, Counts] = {}
    for i, check in enumerate(checks):
        unexpected, missing = int(row[1 + 2 * i]), int(row[2 + 2 * i])
        if check.groups:
            unexpected, sample = _duplicates(data, relation, check, columns)
        else:
            sample = _sample(data, relation, check, columns) if unexpected else ()
        out[check.index] = Counts(element_count=n, missing_count=missing, unexpected_count=unexpected,
                                  has_missing=check.missing is not None, sample=sample)
    return out


def _sample(data: Reader, relation: str, check: CompiledCheck, columns: Sequence[str]) -> tuple[Any, ...]:
    """The first failing values GX would list: values of a column, (A, B) pairs of a pair check."""
    rows = data.rows(f"select {column_list(columns)} from {relation} where {check.unexpected} limit {SAMPLE_VALUES}")
    return tuple(r[0] if len(columns) == 1 else tuple(r) for r in rows)


def _duplicates(data: Reader, relation: str, check: CompiledCheck,
                columns: Sequence[str]) -> tuple[int, tuple[Any, ...]]:
    """Rows whose (considered) values occur more than once, GX's unexpected count for uniqueness,
    and a sample of the repeated values (one entry per repeated value; a dict per compound key)."""
    names = [quote(f"g{i}") for i in range(len(check.groups))]
    keyed = ", ".join(f"{g} as {n}" for g, n in zip(check.groups, names, strict=True))
    repeated = (f"select {keyed}, count(*) as {quote('rows_with_value')} from {relation} "
                f"where not {check.missing} group by {', '.join(check.groups)} having count(*) > 1")
    total = data.scalar(f"select sum({quote('rows_with_value')}) from ({repeated}) as repeated")
    if not total:
        return 0, ()
    rows = data.rows(f"select {', '.join(names)} from ({repeated}) as repeated limit {SAMPLE_VALUES}")
    if len(columns) == 1:
        return int(total), tuple(r[0] for r in rows)
    return int(total), tuple(dict(zip(columns, r, strict=True)) for r in rows)
