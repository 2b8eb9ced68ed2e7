"""The pure parts of the nightly benchmark (benchmarks/nightly.py): no large run here.

The targets, the README table, the load guard and the seed-style pandas
features are checked on tiny hand-made inputs, each with the failure it must
catch planted: a slow night must FAIL, a loaded figure must say so, a
README without markers must not be rewritten, and the pandas features must not
read an event on the snapshot date.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import sys

import pandas as pd
import pytest

from benchmarks import nightly_report
from benchmarks.measure import LoadTooHighError, measure, tree_rss_mb, wait_for_quiet
from benchmarks.seed_pandas import Landing, seed_features, snapshot_dates


def _step(wall: float, cpu: float = 1.0, peak: float = 500.0, load_ok: bool = True) -> dict:
    return {"exit_code": 0, "wall_s": wall, "cpu_s": cpu, "peak_mb": peak, "load_ok": load_ok,
            "load_before": {"one": 0.4}, "load_after": {"one": 1.1}}


def _history(months: int, second_wall: float) -> dict:
    return {
        "customers": 1000, "months": months,
        "steps": {"first_nightly": _step(100.0), "second_nightly": _step(second_wall), "scan_90d": _step(4.0),
                  "retrain": _step(300.0)},
        "second_nightly_stages": [{"step": "build", "status": "success", "seconds": 10.0},
                                  {"step": "score", "status": "success", "seconds": 2.0}],
        "second_nightly_dbt": {"models_s": 6.0},
    }


RESULTS = {
    "command": "python -m benchmarks.nightly --customers 1000", "started": "2026-12-01 16:00 UTC",
    "commit": "abc1234", "machine": {"cpus": 2},
    "histories": [_history(12, 40.0), _history(24, 44.0)],
    "pandas": {"customers": 500, "months": 12, "steps": {"first_nightly": _step(30.0), "seed_pandas": _step(20.0),
                                                         "second_nightly": _step(15.0)},
               "seed": {"roc_auc": 0.77}, "project_auc": 0.79},
}


def _judged(results: dict) -> dict[str, dict]:
    return {t["name"].split(",")[0].split(" (")[0]: t for t in nightly_report.targets(results)}


def test_targets_pass_on_good_figures() -> None:
    judged = _judged(RESULTS)
    assert all(t["passed"] for t in judged.values()), [t for t in judged.values() if not t["passed"]]
    assert judged["flatness: second nightly 24 / 12 months"]["value"] == pytest.approx(1.1)
    assert judged["build step / 90-day scan"]["value"] == pytest.approx(2.5)
    assert judged["first nightly / pandas seed"]["value"] == pytest.approx(1.5)


def test_targets_fail_a_slow_night_a_steep_history_and_a_worse_model() -> None:
    bad = copy.deepcopy(RESULTS)
    bad["histories"][1]["steps"]["second_nightly"] = _step(61.0, load_ok=False)
    bad["pandas"]["project_auc"] = 0.70
    failed = {name for name, t in _judged(bad).items() if not t["passed"]}
    assert failed == {"second nightly wall", "flatness: second nightly 24 / 12 months",
                      "out-of-time ROC-AUC"}
    loaded = {name for name, t in _judged(bad).items() if t["loaded"]}
    assert "flatness: second nightly 24 / 12 months" in loaded


def test_a_failed_step_is_not_judged() -> None:
    broken = copy.deepcopy(RESULTS)
    broken["histories"][0]["steps"]["second_nightly"]["exit_code"] = 1
    names = [t["name"] for t in nightly_report.targets(broken)]
    assert not any("flatness" in n for n in names)
    assert sum("second nightly wall" in n for n in names) == 1


def test_readme_block_replaces_only_the_marked_section() -> None:
    readme = f"# Benchmarks\n\nintro\n\n{nightly_report.BEGIN}\nold table\n{nightly_report.END}\n\n## Next\nkept\n"
    block = nightly_report.readme_block(RESULTS, "nightly-20261201T160000.json")
    rewritten = nightly_report.replace_block(readme, block)
    assert "old table" not in rewritten
    assert rewritten.startswith("# Benchmarks\n\nintro\n") and rewritten.endswith("## Next\nkept\n")
    assert "`python -m benchmarks.nightly --customers 1000`" in rewritten and "abc1234" in rewritten
    assert "| 1,000 x 12 mo | second nightly, one new day, no retraining | 40.0 | 1.0 | 500 | 0.40 -> 1.10 |" \
        in rewritten
    assert "second nightly by step (s): build 10.0, score 2.0" in rewritten
    assert nightly_report.replace_block(rewritten, block) == rewritten  # idempotent
    with pytest.raises(ValueError, match="nightly-results"):
        nightly_report.replace_block("# no markers\n", block)


def test_the_load_guard_refuses_or_marks_a_busy_machine() -> None:
    assert wait_for_quiet(1e9, 0, False, "a step")[1] is True
    load, ok = wait_for_quiet(-1.0, 0, True, "a step")
    assert ok is False and load.one >= 0
    with pytest.raises(LoadTooHighError, match="--allow-load"):
        wait_for_quiet(-1.0, 0, False, "a step", poll_seconds=0)


def test_measure_reports_exit_code_cpu_and_memory(tmp_path) -> None:
    spin = "import sys; x = bytearray(50 * 2**20); sum(range(3_000_000)); sys.exit(3)"
    result = measure("spin", [sys.executable, "-c", spin], tmp_path / "spin.log", cwd=tmp_path, max_load=1e9,
                     settle_seconds=0, allow_load=False)
    assert result.exit_code == 3 and result.load_ok
    assert result.cpu_s > 0 and result.max_process_rss_mb > 50
    assert result.as_dict()["peak_mb"] >= 50 and "load_before" in result.as_dict()
    assert tree_rss_mb(os.getpid()) > 10


def test_measure_counts_cpu_of_a_descendant_nobody_waited_for(tmp_path) -> None:
    # planted: Spark's local-mode JVM is never reaped by its parent, so wait4's rusage misses its CPU
    spinner = "import time; end = time.process_time() + 1.5\nwhile time.process_time() < end: pass"
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {spinner!r}]); "
              "time.sleep(2.5)")  # exits without waiting: the spinner's CPU never reaches rusage
    result = measure("unreaped", [sys.executable, "-c", parent], tmp_path / "unreaped.log", cwd=tmp_path,
                     max_load=1e9, settle_seconds=0, allow_load=False)
    assert result.exit_code == 0
    assert result.user_s + result.sys_s < 1.0  # what rusage alone would report
    assert result.sampled_cpu_s >= 1.0 and result.cpu_s == result.sampled_cpu_s


def _tiny_landing() -> Landing:
    day = pd.Timestamp
    ids = pd.CategoricalDtype(["A", "B", "C"])
    customers = pd.DataFrame({"customer_id": ["A", "B", "C"],
                              "signup_date": [day("2024-01-01"), day("2024-01-01"), day("2024-02-10")]})
    subscriptions = pd.DataFrame({
        "customer_id": ["A", "B", "C"], "contract_type": ["month-to-month", "one-year", "two-year"],
        "monthly_price": [19.0, 39.0, 69.0], "start_date": [day("2024-01-01"), day("2024-01-01"), day("2024-02-10")],
        # B cancelled before the snapshot (inactive); A cancels within the horizon (label 1)
        "cancellation_date": [day("2024-04-20"), day("2024-03-15"), pd.NaT],
    })
    usage = pd.DataFrame({"customer_id": ["A", "A", "A", "C"],
                          "event_date": [day("2024-03-05"), day("2024-03-20"), day("2024-04-01"), day("2024-01-15")]})
    tickets = pd.DataFrame({"customer_id": ["C", "C"], "opened_on": [day("2024-02-20"), day("2024-04-01")]})
    for frame in (customers, subscriptions, usage, tickets):
        frame["customer_id"] = frame["customer_id"].astype(ids)
    return Landing(customers, subscriptions, usage, tickets)


def test_seed_features_use_only_events_before_the_snapshot() -> None:
    rows = seed_features(_tiny_landing(), dt.date(2024, 4, 1), 30).set_index("customer_id")
    assert sorted(rows.index) == ["A", "C"]  # B cancelled before 2024-04-01
    a, c = rows.loc["A"], rows.loc["C"]
    # A's event on the snapshot date itself is planted: it must not count
    assert a["login_days_30d"] == 2 and a["days_since_last_login"] == 12
    assert a["churned"] == 1 and a["is_month_to_month"] == 1 and a["spend_per_login"] == pytest.approx(9.5)
    assert c["churned"] == 0 and c["contract_two_year"] == 1
    assert c["support_tickets_90d"] == 1 and c["login_days_30d"] == 0
    # C's only login is older than the 30-day window: it still dates the last login
    assert c["days_since_last_login"] == (dt.date(2024, 4, 1) - dt.date(2024, 1, 15)).days
    assert c["tickets_per_month"] == pytest.approx(1 / max((dt.date(2024, 4, 1) - dt.date(2024, 2, 10)).days
                                                           / 30.4375, 1))


def test_snapshot_dates_follow_the_marts_rule() -> None:
    # first month start 90 days after the first usage day; only snapshots whose 30-day horizon was observed
    assert snapshot_dates(dt.date(2024, 1, 1), dt.date(2024, 6, 1), 30) == [dt.date(2024, 4, 1), dt.date(2024, 5, 1)]
    # April has 30 days: on 2024-05-01 the horizon of 2024-04-01 (to 05-01) is not yet observed, a day later it is
    assert snapshot_dates(dt.date(2024, 1, 1), dt.date(2024, 5, 1), 30) == []
    assert snapshot_dates(dt.date(2024, 1, 1), dt.date(2024, 5, 2), 30) == [dt.date(2024, 4, 1)]
