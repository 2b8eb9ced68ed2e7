"""Freshness per source, in the spirit of `dbt source freshness`; pure, no I/O.

The cutoff is decided by the run, so a source that stopped delivering no longer
moves the snapshot back quietly: it is late, and the gate says by how much.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Freshness:
    """One source's newest event against the last day before the cutoff."""

    table: str
    column: str
    newest: dt.date | None
    cutoff: dt.date
    max_lag_days: int

    @property
    def lag_days(self) -> int | None:
        """Days between the newest event and the last observable day (cutoff - 1); None when empty."""
        return None if self.newest is None else (self.cutoff - dt.timedelta(days=1) - self.newest).days

    @property
    def stale(self) -> bool:
        return self.lag_days is None or self.lag_days > self.max_lag_days

    def describe(self) -> str:
        if self.newest is None:
            return f"{self.table} (column {self.column}): no event before the cutoff {self.cutoff}"
        return (f"{self.table} (column {self.column}): newest event {self.newest} is {self.lag_days} day(s) "
                f"before the last observable day {self.cutoff - dt.timedelta(days=1)} "
                f"(allowed: {self.max_lag_days}, so {self.lag_days - self.max_lag_days} day(s) late)")
