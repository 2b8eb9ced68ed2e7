"""Backfill: the replay schedule, the no-future rule, and the ground truth.

The ground-truth tests generate data whose churn process changes on a known
date (`drift_from`: month-to-month customers get a price rise and use less),
replay the nightly across that date, and check that monitoring flags drift on
the features that changed and that the retraining policy fires; the same replay
without the change must stay quiet.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from ml.backfill import BackfillError, backfill, check_no_future_champion, sandbox_config, schedule
from ml.config import ChurnConfig
from ml.warehouse import connect
from tests.conftest import make_config


def test_schedule_steps_and_always_includes_month_starts_and_the_end():
    dates = schedule(dt.date(2025, 9, 20), dt.date(2025, 11, 2), "14d")
    assert dates == [
        dt.date(2025, 9, 20), dt.date(2025, 10, 1), dt.date(2025, 10, 4), dt.date(2025, 10, 18),
        dt.date(2025, 11, 1), dt.date(2025, 11, 2),
    ]
    assert schedule(dt.date(2025, 1, 31), dt.date(2025, 4, 30), "1m") == [
        dt.date(2025, 1, 31), dt.date(2025, 2, 1), dt.date(2025, 2, 28), dt.date(2025, 3, 1),
        dt.date(2025, 3, 31), dt.date(2025, 4, 1), dt.date(2025, 4, 30),
    ]
    assert schedule(dt.date(2025, 1, 1), dt.date(2025, 1, 15), "1w") == [
        dt.date(2025, 1, 1), dt.date(2025, 1, 8), dt.date(2025, 1, 15)]


@pytest.mark.parametrize("bad", ["7", "0d", "3y", "d7", ""])
def test_bad_every_is_refused(bad):
    with pytest.raises(BackfillError, match="--every"):
        schedule(dt.date(2025, 1, 1), dt.date(2025, 2, 1), bad)


def test_start_after_end_is_refused():
    with pytest.raises(BackfillError, match="after its end"):
        schedule(dt.date(2025, 2, 1), dt.date(2025, 1, 1), "7d")


def test_sandbox_moves_outputs_but_reads_the_same_landing(tmp_path: Path):
    config = make_config(tmp_path / "wh")
    sandbox = sandbox_config(config)
    assert sandbox.warehouse.build_db == config.warehouse.dir.resolve() / "backfill" / config.warehouse.build_db.name
    assert sandbox.warehouse.models_dir.parent == sandbox.warehouse.dir
    assert sandbox.dataset.landing_dir == config.dataset.landing_dir
    assert sandbox.warehouse.dbt_project_dir == config.warehouse.dbt_project_dir


def test_in_place_replay_before_the_champions_data_is_refused(trained_warehouse: ChurnConfig):
    from ml.modeling.registry import load_champion

    last = load_champion(trained_warehouse).metadata.snapshot_range[1]
    with pytest.raises(BackfillError, match="see the future"):
        check_no_future_champion(trained_warehouse, dt.date.fromisoformat(last))
    check_no_future_champion(trained_warehouse, dt.date.fromisoformat(last) + dt.timedelta(days=1))


# Small replay (default run): 1,500 customers over 12 months, the change on
# 2024-10-01, two nights: one before the change (trains the champion; its
# false-alarm share is checked) and one a month after it. Quick training
# settings. ~4 minutes on the shared 2-core machine, almost all of it the
# nightly's fixed cost per night (dbt build and tests, audits, profile).
GENERATOR = {"customers": 1500, "months": 12, "start_date": "2024-01-01", "seed": 11}
TRAINING = {"search_iterations": 1, "cv_folds": 2, "out_of_time_snapshots": 1}
CHANGE = dt.date(2024, 10, 1)
SMALL = {"start": dt.date(2024, 9, 1), "end": dt.date(2024, 11, 1), "every": "2m", "month_starts": False}
# Large replay (slow): 3,000 customers, weekly nights plus month starts from two
# months before the change to the end of the data.
LARGE_GENERATOR = {**GENERATOR, "customers": 3000}
LARGE = {"start": dt.date(2024, 8, 1), "end": dt.date(2025, 1, 1), "every": "7d", "month_starts": True}


def _replay(root: Path, drift_from: dt.date | None, generator: dict, nights: dict) -> ChurnConfig:
    config = make_config(root, {
        "generator": {**generator, "drift_from": drift_from.isoformat() if drift_from else None},
        "training": TRAINING,
    })
    backfill(config, in_place=True, **nights)
    return config


def _feature_flags(config: ChurnConfig) -> pd.DataFrame:
    with connect(config.warehouse.build_db, read_only=True) as con:
        flags = con.frame(
            """select as_of_date, model_version, feature, bool_or(coalesce(drifted, false)) as drifted
               from drift_stats where kind in ('numeric', 'categorical')
               group by all"""
        )
    flags["as_of_date"] = pd.to_datetime(flags["as_of_date"]).dt.date
    return flags


def _decisions(config: ChurnConfig) -> pd.DataFrame:
    with connect(config.warehouse.build_db, read_only=True) as con:
        decisions = con.frame("select * from retrain_decisions order by decided_at")
    decisions["decision_date"] = pd.to_datetime(decisions["decision_date"]).dt.date
    return decisions


def _changed_features(config: ChurnConfig) -> tuple[set[str], set[str]]:
    """Price and usage features, found by the words in their names and contract descriptions."""
    from ml.modeling.registry import load_champion

    contract = load_champion(config).contract

    def matching(*words: str) -> set[str]:
        return {f.name for f in contract.features if any(w in (f.name + " " + f.description).lower() for w in words)}

    return matching("price", "spend"), matching("usage", "session", "minutes", "login")


def check_drift_after_the_change(config: ChurnConfig) -> None:
    flags = _feature_flags(config)
    price, usage = _changed_features(config)
    assert price and usage
    before = flags[flags["as_of_date"] < CHANGE]
    assert before["drifted"].mean() < 0.05, before[before["drifted"]]
    assert not before[before["drifted"]]["feature"].isin(price | usage).any()
    # The first champion's view of the nights at least a month after the change:
    first_champion = flags.sort_values("as_of_date")["model_version"].iloc[0]
    after = flags[(flags["as_of_date"] >= CHANGE + dt.timedelta(days=31)) & (flags["model_version"] == first_champion)]
    drifted_after = set(after[after["drifted"]]["feature"])
    assert drifted_after & price, drifted_after
    assert drifted_after & usage, drifted_after


def check_retrain_after_the_change(config: ChurnConfig) -> None:
    decisions = _decisions(config)
    before = decisions[decisions["decision_date"] < CHANGE]
    assert not before["triggered"].any(), before[["decision_date", "rules", "outcome"]]
    fired = decisions[decisions["triggered"] & (decisions["decision_date"] > CHANGE)]
    assert len(fired) >= 1, decisions[["decision_date", "rules", "outcome", "rule_values"]]
    assert fired["rules"].str.contains("drift").any()
    assert set(fired["outcome"]) <= {"promoted", "rejected challenger"}
    assert fired["challenger_version"].notna().all()


def check_quiet(config: ChurnConfig, nights: int) -> None:
    flags = _feature_flags(config)
    assert flags["as_of_date"].nunique() == nights
    assert flags["drifted"].mean() < 0.05, flags[flags["drifted"]]
    decisions = _decisions(config)
    assert len(decisions) == nights
    assert not decisions["rules"].str.contains("dataset_drift").any(), decisions[["decision_date", "rules"]]


@pytest.fixture(scope="module")
def drifted_replay(tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    return _replay(tmp_path_factory.mktemp("drift"), CHANGE, GENERATOR, SMALL)


def test_drift_is_flagged_after_the_change_on_the_changed_features(drifted_replay: ChurnConfig):
    check_drift_after_the_change(drifted_replay)


def test_the_policy_retrains_after_the_change(drifted_replay: ChurnConfig):
    check_retrain_after_the_change(drifted_replay)


@pytest.mark.slow
def test_without_the_change_false_alarms_stay_below_five_percent(tmp_path: Path):
    """The default run checks the drifted replay's night before the change instead
    (every replayed night costs a full nightly: ~1.5 minutes on a busy machine)."""
    check_quiet(_replay(tmp_path / "quiet", None, GENERATOR, SMALL), nights=2)


@pytest.mark.slow
def test_weekly_replay_across_the_change_and_without_it(tmp_path: Path):
    drifted = _replay(tmp_path / "drift", CHANGE, LARGE_GENERATOR, LARGE)
    check_drift_after_the_change(drifted)
    check_retrain_after_the_change(drifted)
    with connect(drifted.warehouse.build_db, read_only=True) as con:
        perf = con.frame(
            """select as_of_date, model_version, kind, recall from model_performance
               where as_of_date < ? order by as_of_date""", [CHANGE])
    both = perf.pivot_table(index=["as_of_date", "model_version"], columns="kind", values="recall").dropna()
    assert len(both) >= 1
    assert (both["estimated"] - both["realized"]).abs().max() < 0.1
    nights = len(schedule(LARGE["start"], LARGE["end"], LARGE["every"], LARGE["month_starts"]))
    check_quiet(_replay(tmp_path / "quiet", None, LARGE_GENERATOR, LARGE), nights=nights)
