"""Plain JSON values from numpy, pandas and datetime values: one conversion for every stored JSON.

Registry metadata, data-quality details, drift summaries, policy values and the
API's answers all hold values that came out of pandas or numpy (numpy scalars,
NaN, pd.NA, Timestamps). JSON has none of these, and `json.dumps` either fails
on them or writes `NaN`, which strict readers (browsers, BI tools) reject. So
every stored or served JSON goes through `json_value`: missing values become
null, numpy scalars and arrays become Python numbers and lists, dates become ISO
text.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import numpy as np
import pandas as pd


def is_missing(value: Any) -> bool:
    """None, NaN, pd.NA and NaT; never raises on containers."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def json_value(value: Any) -> Any:
    """`value` as plain JSON data (recursively for dicts, lists and tuples)."""
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_value(v) for v in value.tolist()]
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if is_missing(value):
        return None
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if math.isinf(value) else value  # JSON has no infinity
    if isinstance(value, (pd.Timestamp, dt.datetime, dt.date)):
        return value.isoformat()
    if hasattr(value, "item"):
        return json_value(value.item())
    return str(value)


def to_json(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `json_value(value)`; strict JSON (no NaN)."""
    return json.dumps(json_value(value), allow_nan=False, **kwargs)


def float_or_none(value: Any) -> float | None:
    """A float, or None for a missing value."""
    return None if is_missing(value) else float(value)


def finite_or_none(value: Any) -> float | None:
    """A float, or None for a missing value, NaN or an infinity (what a stored statistic may hold)."""
    return float_or_none(json_value(value))
