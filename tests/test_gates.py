"""The decided snapshot date, the late-row policy and the drift publish gate.

The planted early-dated row runs through a real `churn nightly` subprocess on a
copy of the published baseline: it must not move the snapshot, it is reported,
and the scores equal the clean run's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from ml.config import FUTURE_ROWS_FAIL, ChurnConfig, PublishGateConfig
from ml.data.landing import DatedTableFacts
from ml.monitoring.gate import publish_gate
from ml.quality.gates import judge
from ml.warehouse import connect

from .conftest import QUICK_TRAINING, copy_warehouse, rewrite
from .test_bad_input import digest, run_nightly

GATE = PublishGateConfig(drifted_share=0.3, top_feature_drift=True)


def test_the_clock_decides_the_as_of(small_config: ChurnConfig) -> None:
    assert small_config.decided_as_of() == dt.date(2025, 7, 1)  # start 2024-01-01 + 18 months
    assert small_config.decided_as_of("2025-03-04") == dt.date(2025, 3, 4)
    today = dataclasses.replace(small_config, dataset=dataclasses.replace(small_config.dataset, clock="today"))
    assert today.decided_as_of(today=dt.date(2030, 1, 2)) == dt.date(2030, 1, 2)
    assert small_config.with_dataset("telco").decided_as_of() == dt.date(2018, 1, 1)


def facts(late: int, rows: int = 100_000) -> DatedTableFacts:
    daily = {dt.date(2025, 6, 30) - dt.timedelta(days=i): 500 for i in range(400)}
    return DatedTableFacts("usage_events", "event_date", rows, late, dt.date(2025, 7, 14), dt.date(2025, 7, 14),
                           dt.date(2025, 6, 30), dt.date(2024, 1, 1), daily)


def test_a_few_late_rows_are_held_back_many_fail_and_replays_expect_them(small_config: ChurnConfig) -> None:
    cutoff = dt.date(2025, 7, 1)
    demo = dataclasses.replace(small_config, dataset=dataclasses.replace(
        small_config.dataset, event_tables=small_config.dataset.event_tables[:1]))
    held = judge(demo, cutoff, [facts(1)])
    assert held.failures == ()
    assert "1 of 100,000 rows (0.001%) dated on or after the cutoff 2025-07-01" in held.warnings[0]
    assert "from 2025-07-14 to 2025-07-14: held back" in held.warnings[0]
    many = judge(demo, cutoff, [facts(500)])
    assert "fail the run (allowed share 0.100%, policy hold_back)" in many.failures[0]
    strict = dataclasses.replace(demo, gates=dataclasses.replace(demo.gates, future_rows=FUTURE_ROWS_FAIL))
    assert judge(strict, cutoff, [facts(1)]).failures
    assert judge(demo, cutoff, [facts(50_000)], replay=True).failures == ()


def test_drift_gate_blocks_unresolved_drift_only() -> None:
    assert not publish_gate(GATE, ["a"], 0.1, [], promoted=False, accept_reason=None).blocked
    share = publish_gate(GATE, ["a", "b", "c"], 0.3, [], promoted=False, accept_reason=None)
    assert share.blocked and "drifted-feature share 30% >= 30% (3 features: a, b, c)" in share.message()
    top = publish_gate(GATE, ["a"], 0.1, ["a"], promoted=False, accept_reason=None)
    assert top.blocked and "top features drifted: a" in top.message()
    assert publish_gate(GATE, ["a"], 0.1, ["a"], promoted=True, accept_reason=None).resolution == "retrain"
    accepted = publish_gate(GATE, ["a"], 0.1, ["a"], promoted=False, accept_reason="price rise")
    assert not accepted.blocked and accepted.resolution == "accepted"
    off = PublishGateConfig(drifted_share=0.5, top_feature_drift=False)
    assert not publish_gate(off, ["a"], 0.1, ["a"], promoted=False, accept_reason=None).blocked


def scores(path: Path) -> dict[str, float]:
    with connect(path, read_only=True) as session:
        return dict(session.rows("select customer_id, churn_probability from churn_scores"))


def test_one_row_two_weeks_ahead_does_not_move_the_snapshot(published_warehouse: ChurnConfig, tmp_path: Path) -> None:
    config = copy_warehouse(published_warehouse, tmp_path / "wh", QUICK_TRAINING)
    rewrite(config, "usage_events", "select * from t union all "
            "select * replace (date '2025-07-14' as event_date) from (select * from t limit 1)")
    code, output = run_nightly(config)
    assert code == 0, output[-3000:]
    assert "usage_events (column event_date): 1 of" in output and "dated on or after the cutoff 2025-07-01" in output
    assert "held back" in output
    with connect(config.warehouse.published_db, read_only=True) as session:
        assert session.scalar("select max(as_of_date) from churn_scores_history") == dt.date(2025, 7, 1)
    clean = scores(published_warehouse.warehouse.published_db)
    planted = scores(config.warehouse.published_db)
    assert planted.keys() == clean.keys()
    assert max(abs(planted[k] - clean[k]) for k in clean) < 1e-9


def test_accept_drift_is_recorded_and_publishes(published_warehouse: ChurnConfig, tmp_path: Path) -> None:
    # Every drift threshold at (almost) zero: tonight "drifts" everywhere, so the gate must fire.
    overrides = {**QUICK_TRAINING, "monitoring": {"psi_threshold": 1e-9, "distance_threshold": 1e-9,
                                                  "max_p_value": 1.0, "retrain_every_days": 100000}}
    config = copy_warehouse(published_warehouse, tmp_path / "wh", overrides)
    before = digest(config.warehouse.published_db)
    code, output = run_nightly(config)
    assert code != 0 and "drift gate: tonight's snapshot 2025-07-01" in output, output[-3000:]
    assert digest(config.warehouse.published_db) == before
    code, output = run_nightly(config, options=("--accept-drift", "planned price change"))
    assert code == 0, output[-3000:]
    with connect(config.warehouse.build_db, read_only=True) as session:
        message = session.scalar(
            "select message from pipeline_runs where step = 'accept_drift' and status = 'override'")
    assert "planned price change" in message
