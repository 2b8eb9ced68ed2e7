"""Freshness per source: a source that stopped delivering fails the run, naming the table and how late."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.quality.freshness import Freshness
from ml.quality.gates import GateError, check_gates

from .conftest import rewrite
from .test_completeness import landing_copy


def test_lag_is_counted_from_the_last_observable_day() -> None:
    fresh = Freshness("usage_events", "event_date", dt.date(2025, 6, 25), dt.date(2025, 7, 1), 2)
    assert fresh.lag_days == 5 and fresh.stale
    assert "3 day(s) late" in fresh.describe()
    assert not Freshness("usage_events", "event_date", dt.date(2025, 6, 30), dt.date(2025, 7, 1), 0).stale
    assert Freshness("usage_events", "event_date", None, dt.date(2025, 7, 1), 2).stale


def test_a_stale_source_fails_naming_table_and_lateness(generated: ChurnConfig, tmp_path: Path) -> None:
    config = landing_copy(generated, tmp_path)
    rewrite(config, "support_tickets", "select * from t where opened_at < timestamp '2025-06-15'")
    with pytest.raises(GateError) as caught:
        check_gates(config, config.decided_as_of())
    assert "stale source: support_tickets (column opened_at): newest event 2025-06-14" in str(caught.value)
    assert "16 day(s) before the last observable day 2025-06-30 (allowed: 7, so 9 day(s) late)" in str(caught.value)


def test_every_clean_source_is_fresh_at_the_decided_cutoff(generated: ChurnConfig) -> None:
    assert check_gates(generated, generated.decided_as_of()).failures == ()
