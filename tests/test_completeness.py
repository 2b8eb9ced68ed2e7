"""Completeness per day: planted partial extracts of several shapes are caught, clean nights are not.

The pure band statistics are tested on hand-made volumes; the gate itself runs on
the session's generated landing files, copied per plant, with the cutoff decided
as the nightly decides it.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import duckdb
import pytest

from ml.config import ChurnConfig
from ml.quality.completeness import band, judge_days, reference_days
from ml.quality.gates import GateError, check_gates

from .conftest import make_config, rewrite


def test_band_uses_the_poisson_floor_when_the_reference_is_flat() -> None:
    median, low, high = band([100] * 8, factor=5)
    assert median == 100 and low == pytest.approx(50) and high == pytest.approx(150)


def test_weekday_reference_lies_before_the_window() -> None:
    day = dt.date(2025, 6, 30)
    days = reference_days(day, dt.date(2025, 6, 3), "weekday", 4)
    assert all(d < dt.date(2025, 6, 3) and d.weekday() == day.weekday() for d in days) and len(days) == 4


def test_month_day_reference_skips_months_without_the_day() -> None:
    days = reference_days(dt.date(2025, 5, 31), dt.date(2025, 5, 1), "month_day", 3)
    assert days == [dt.date(2025, 3, 31), dt.date(2025, 1, 31), dt.date(2024, 12, 31)]


def test_a_missing_day_is_outside_and_a_normal_week_is_not() -> None:
    cutoff = dt.date(2025, 7, 1)
    daily = {cutoff - dt.timedelta(days=i): 1000 + (i % 7) * 30 for i in range(1, 200)}
    assert not [v for v in judge_days(daily, cutoff, 28, "weekday", 8, 5, 20) if v.outside]
    daily.pop(cutoff - dt.timedelta(days=3))
    alarms = [v for v in judge_days(daily, cutoff, 28, "weekday", 8, 5, 20) if v.outside]
    assert [v.day for v in alarms] == [cutoff - dt.timedelta(days=3)] and alarms[0].observed == 0


def landing_copy(config: ChurnConfig, root: Path) -> ChurnConfig:
    new = make_config(root)
    shutil.copytree(config.dataset.landing_dir, new.dataset.landing_dir)
    return new


# Each plant leaves all other rows alone; the cutoff is the generated data's end (2025-07-01).
PLANTS = {
    "one_day_missing": "select * from t where event_date <> date '2025-06-20'",
    # a third of the usage rows of the last three weeks: about 1.5% of the whole table
    "third_missing_last_weeks": "select * from t where not (event_date >= date '2025-06-10' and hash(customer_id, "
                                "event_date) % 3 = 0)",
    "partial_last_day": "select * from t where not (event_date = date '2025-06-30' and hash(customer_id) % 2 = 0)",
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_drop_fails_naming_table_days_band_and_rows(generated: ChurnConfig, tmp_path: Path,
                                                             plant: str) -> None:
    config = landing_copy(generated, tmp_path)
    with duckdb.connect() as con:
        total = con.execute(f"select count(*) from read_parquet('{config.dataset.landing_dir}/usage_events.parquet')"
                            ).fetchone()[0]
    rewrite(config, "usage_events", PLANTS[plant])
    with duckdb.connect() as con:
        kept = con.execute(f"select count(*) from read_parquet('{config.dataset.landing_dir}/usage_events.parquet')"
                           ).fetchone()[0]
    assert (total - kept) / total < 0.03  # a few percent of the table at most: invisible to a whole-table band
    with pytest.raises(GateError) as caught:
        check_gates(config, config.decided_as_of())
    message = str(caught.value)
    assert "incomplete extract: usage_events (column event_date)" in message
    assert "rows (expected" in message
    first_day = {"one_day_missing": "2025-06-20", "third_missing_last_weeks": "2025-06-10",
                 "partial_last_day": "2025-06-30"}[plant]
    assert first_day in message


@pytest.mark.parametrize("cutoff", ["2025-07-01", "2025-06-01", "2025-05-15", "2025-03-01", "2024-12-10",
                                    "2024-10-01", "2025-04-03"])
def test_clean_generated_nights_raise_no_alarm(generated: ChurnConfig, cutoff: str) -> None:
    day = dt.date.fromisoformat(cutoff)
    report = check_gates(generated, day, replay=day != generated.decided_as_of())
    assert report.failures == () and report.warnings == ()


def test_clean_nights_with_the_planted_behaviour_change_raise_no_alarm(tmp_path: Path) -> None:
    from ml.data.generate import GenerateOptions, generate

    config = make_config(tmp_path, {"generator": {"customers": 3000, "months": 18, "start_date": "2024-01-01",
                                                  "seed": 11, "drift_from": "2025-03-01"}})
    generate(GenerateOptions.from_config(config))
    for cutoff in ("2025-07-01", "2025-05-01", "2025-04-01", "2025-03-15"):
        day = dt.date.fromisoformat(cutoff)
        assert check_gates(config, day, replay=day != config.decided_as_of()).failures == ()
