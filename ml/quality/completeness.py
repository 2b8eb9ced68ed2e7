"""Completeness per day: is each of tonight's recent days as full as the same days before?

Pure statistics, no I/O (the reading is `ml.data.landing.dated_table_facts`, the
gate `ml.quality.gates`). A whole-table row count cannot see a partial extract
that is a few percent of the table; a day-by-day comparison can. Each recent day
is compared with the same weekday (or the same day of the month, for tables
billed on a monthly calendar) in the periods just before the window, so the
generator's weekly and monthly rhythm is the reference, not an alarm. The band is
the median plus or minus a factor times a robust spread: the larger of the
scaled MAD and the Poisson noise sqrt(median), so a quiet reference does not make
ordinary counting noise an alarm. The reference lies wholly before the window,
so a drop spanning the last weeks cannot drag its own reference down.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from dataclasses import dataclass

MAD_TO_SIGMA = 1.4826  # MAD x this estimates the standard deviation of normal data


@dataclass(frozen=True)
class DayVerdict:
    """One recent day against its reference: the band and what was observed."""

    day: dt.date
    observed: int
    median: float
    low: float
    high: float
    reference_days: int

    @property
    def outside(self) -> bool:
        return not self.low <= self.observed <= self.high


def _months_before(day: dt.date, months: int) -> dt.date | None:
    """The same day of the month `months` earlier, or None when that month lacks the day."""
    total = day.year * 12 + day.month - 1 - months
    try:
        return dt.date(total // 12, total % 12 + 1, day.day)
    except ValueError:
        return None


def reference_days(day: dt.date, window_start: dt.date, seasonality: str, periods: int) -> list[dt.date]:
    """The `periods` comparable days before the window: same weekday, or same day of the month."""
    days: list[dt.date] = []
    step = 1
    while len(days) < periods and step < periods * 3:
        if seasonality == "weekday":
            candidate: dt.date | None = day - dt.timedelta(weeks=step)
        else:
            candidate = _months_before(day, step)
        if candidate is not None and candidate < window_start:
            days.append(candidate)
        step += 1
    return days


def band(reference: list[int], factor: float) -> tuple[float, float, float]:
    """(median, low, high) from reference volumes: median +- factor x max(1.4826 MAD, sqrt(median))."""
    median = statistics.median(reference)
    mad = statistics.median(abs(v - median) for v in reference)
    spread = max(MAD_TO_SIGMA * mad, math.sqrt(median))
    return median, max(0.0, median - factor * spread), median + factor * spread


def judge_days(daily: dict[dt.date, int], cutoff: dt.date, window_days: int, seasonality: str,
               periods: int, factor: float, min_rows: int, first_day: dt.date | None = None) -> list[DayVerdict]:
    """A verdict for every day of the window [cutoff - window_days, cutoff) that can be judged.

    A day is judged when its full reference lies inside the data (on or after
    `first_day`) and the reference median reaches `min_rows`; days with no rows
    count as 0 (a missing day is the loudest drop there is).
    """
    window_start = cutoff - dt.timedelta(days=window_days)
    verdicts = []
    for offset in range(window_days):
        day = window_start + dt.timedelta(days=offset)
        days = reference_days(day, window_start, seasonality, periods)
        if len(days) < periods or (first_day is not None and min(days) < first_day):
            continue
        median, low, high = band([daily.get(d, 0) for d in days], factor)
        if median < min_rows:
            continue
        verdicts.append(DayVerdict(day, daily.get(day, 0), median, low, high, len(days)))
    return verdicts


def describe(table: str, column: str, alarms: list[DayVerdict]) -> str:
    """The alarm in an operator's words: table, column, how many days, and each day's band and rows."""
    shown = ", ".join(
        f"{v.day} {v.observed:,d} rows (expected {v.low:,.0f}-{v.high:,.0f}, median {v.median:,.0f})"
        for v in alarms[:10]
    )
    more = f" and {len(alarms) - 10} more" if len(alarms) > 10 else ""
    return f"{table} (column {column}): {len(alarms)} day(s) outside the expected volume: {shown}{more}"
