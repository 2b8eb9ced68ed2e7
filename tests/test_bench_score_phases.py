"""The scoring-phases benchmark (benchmarks/score_phases.py) times the real scoring, small.

Its synthetic night repeats the newest snapshot under new ids; every copy of a
customer must get the probability the nightly published for that customer, and
churn_scores must hold every synthetic row, or the benchmark times something
other than `churn score`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.score_phases import measure, synthetic_night
from ml.config import ChurnConfig, load_config
from ml.warehouse import connect


def test_synthetic_night_is_scored_like_the_real_one(published_warehouse: ChurnConfig, tmp_path: Path) -> None:
    with connect(published_warehouse.warehouse.build_db, read_only=True) as session:
        published = dict(session.rows("select customer_id, churn_probability from churn_scores"))
    customers = 2 * len(published) + 7  # a partial third copy: the limit is honoured
    config_file = synthetic_night(published_warehouse, customers, tmp_path / "warehouse")
    result = measure(config_file, chunk_rows=len(published) // 3)  # several chunks
    assert result["customers"] == customers
    assert set(result["phases"]) == {"read", "preprocess", "predict", "reasons", "rank and band", "write"}
    assert result["scoring_customers_per_s"] > 0
    with connect(load_config(config_file).warehouse.build_db, read_only=True) as session:
        rows = session.rows("select customer_id, churn_probability, will_churn, reason_1 from churn_scores")
    assert len(rows) == customers
    for customer, probability, flagged, reason in rows:
        real, copy = customer.rsplit("-", 1)
        assert copy in {"0", "1", "2"}
        assert probability == pytest.approx(published[real], abs=1e-9), customer
        assert (reason is not None) == bool(flagged)  # exact reasons for every flagged customer, none for others


def test_repeated_runs_report_the_median_run() -> None:
    from benchmarks.score_phases import median_run

    def run(seconds: float) -> dict:
        phases = {name: {"wall_s": seconds, "cpu_s": 2 * seconds} for name in ("read", "reasons")}
        return {"customers": 100, "flagged": 50, "phases": phases, "scoring_wall_s": seconds}

    result = median_run([run(3.0), run(1.0), run(10.0)])
    assert result["phases"]["read"] == {"wall_s": 3.0, "cpu_s": 6.0}
    assert result["scoring_wall_s"] == 3.0 and result["scoring_customers_per_s"] == 33
    assert result["reasons_rows_per_s"] == 17 and result["repeat"] == 3 and len(result["runs"]) == 3
