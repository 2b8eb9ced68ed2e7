"""Retraining rules: each one fires on its own, on the configured boundary."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from ml.config import load_config
from ml.monitoring import policy
from tests.conftest import REPO_ROOT

TODAY = dt.date(2025, 6, 1)


@pytest.fixture(scope="module")
def config():
    return load_config(REPO_ROOT / "churn.yml")


def _inputs(config, **changes):
    base = dict(
        today=TODAY,
        champion_since=TODAY - dt.timedelta(days=10),
        drifted_share=0.0,
        top_features_drifted=(),
        realized_recall=config.problem.success_target,
        estimated_recall=config.problem.success_target,
    )
    return policy.PolicyInputs(**{**base, **changes})


def test_quiet_night_does_not_trigger(config):
    decision = policy.decide(config, _inputs(config))
    assert not decision.triggered and decision.rules == ()
    assert json.loads(decision.values_json())["days_since_champion"] == 10


def test_schedule_fires_on_the_day(config):
    every = config.monitoring.retrain_every_days
    before = policy.decide(config, _inputs(config, champion_since=TODAY - dt.timedelta(days=every - 1)))
    on = policy.decide(config, _inputs(config, champion_since=TODAY - dt.timedelta(days=every)))
    assert not before.triggered
    assert on.rules == (policy.SCHEDULE,)


def test_dataset_drift_share(config):
    share = config.monitoring.dataset_drift_share
    assert not policy.decide(config, _inputs(config, drifted_share=share - 0.01)).triggered
    assert policy.decide(config, _inputs(config, drifted_share=share)).rules == (policy.DATASET_DRIFT,)


def test_top_feature_drift(config):
    decision = policy.decide(config, _inputs(config, top_features_drifted=("some_feature",)))
    assert decision.rules == (policy.TOP_FEATURE_DRIFT,)
    assert decision.values["top_features_drifted"] == ["some_feature"]


def test_recall_rules_use_target_minus_margin(config):
    floor = config.problem.success_target - config.monitoring.recall_margin
    assert not policy.decide(config, _inputs(config, realized_recall=floor + 0.001)).triggered
    low = policy.decide(config, _inputs(config, realized_recall=floor - 0.001,
                                        realized_as_of=dt.date(2025, 4, 1)))
    assert low.rules == (policy.REALIZED_RECALL,)
    assert low.values["realized_as_of"] == "2025-04-01"
    est = policy.decide(config, _inputs(config, estimated_recall=floor - 0.001))
    assert est.rules == (policy.ESTIMATED_RECALL,)


def test_missing_values_do_not_fire_but_several_rules_can(config):
    quiet = policy.decide(config, _inputs(config, realized_recall=None, estimated_recall=float("nan"),
                                          drifted_share=None))
    assert not quiet.triggered
    many = policy.decide(config, _inputs(config, drifted_share=1.0, top_features_drifted=("x",),
                                         estimated_recall=0.1))
    assert many.rules == (policy.DATASET_DRIFT, policy.TOP_FEATURE_DRIFT, policy.ESTIMATED_RECALL)


def test_no_champion_triggers(config):
    decision = policy.decide(config, _inputs(config, champion_since=None))
    assert decision.rules == (policy.NO_CHAMPION,)


def test_rules_that_fire_without_new_labels_do_not_trigger(config):
    blocked = policy.decide(config, _inputs(config, drifted_share=1.0, new_labelled_snapshots=0))
    assert blocked.rules == (policy.DATASET_DRIFT,) and not blocked.triggered and blocked.blocked
    fresh = policy.decide(config, _inputs(config, drifted_share=1.0, new_labelled_snapshots=1))
    assert fresh.triggered and not fresh.blocked
    assert fresh.values["new_labelled_snapshots"] == 1
