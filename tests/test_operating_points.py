"""Operating points without retraining, promote/rollback, and reacting to redefined features.

Each test plants what it claims to catch: a changed success_target between two
nightlies (the threshold must move with no training), a capacity below what
the rule flags, a pinned threshold, a second model promoted and rolled back,
a feature's SQL changed under the champion (scoring it silently is refused),
and a feature added to the mart (a challenger learns from it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ml.config import ChurnConfig
from ml.modeling import operating_point
from ml.modeling.operating_point import capped_threshold
from ml.modeling.registry import (
    EVENT_PROMOTE,
    EVENT_ROLLBACK,
    PromotionError,
    champion_events,
    champion_version,
    load_model,
    promote,
    registry_frame,
    rollback,
    stored_predictions,
)
from ml.modeling.score import ScoreError, score
from ml.modeling.train import choose_threshold, train
from ml.warehouse import connect
from tests.conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse, query

# Challengers here only need to exist and be judged: the cheapest search, the champion's held-out snapshots.
TINY_TRAINING = {"training": {"search_iterations": 1, "cv_folds": 2, "out_of_time_snapshots": 3}}
MART_SQL = Path("models/marts/customer_features.sql")
MART_YAML = Path("models/marts/_marts__models.yml")


def with_overrides(config: ChurnConfig, root: Path, overrides: dict, training: dict = QUICK_TRAINING) -> ChurnConfig:
    merged = {**training, **overrides}
    return copy_warehouse(config, root, merged)


def latest_point(config: ChurnConfig, version: str) -> dict:
    with connect(config.warehouse.build_db, read_only=True) as session:
        return operating_point.history(session, version).iloc[0].to_dict()


# ---------------------------------------------------------------- pure rules

def test_capacity_never_exceeds_the_cap_even_with_ties() -> None:
    p = np.array([0.9, 0.8, 0.8, 0.8, 0.5, 0.2])
    assert capped_threshold(p, 0.3, 10) == 0.3  # fits: unchanged
    t = capped_threshold(p, 0.3, 3)  # 0.5 and up is 5 rows; the tie at 0.8 makes 4: only 0.9 fits
    assert (p >= t).sum() <= 3 and t == 0.9
    assert (p >= capped_threshold(p, 0.3, 0)).sum() == 0


# ---------------------------------------------------------------- threshold without retraining

def test_a_changed_success_target_moves_the_threshold_at_the_next_nightly_without_training(
    published_warehouse: ChurnConfig, tmp_path: Path,
) -> None:
    from ml.pipeline import nightly

    version = champion_version(published_warehouse)
    before = latest_point(published_warehouse, version)
    runs_before = len(query(published_warehouse, "select * from model_runs"))
    config = with_overrides(published_warehouse, tmp_path / "wh", {"problem": {"success_target": 0.6}})
    nightly(config)

    assert len(query(config, "select * from model_runs")) == runs_before, "a threshold change must not train"
    assert champion_version(config) == version
    after = latest_point(config, version)
    oof = stored_predictions(config, version)
    oof = oof[oof["split"] == "out_of_fold"]
    expected = choose_threshold(config, oof["label"].to_numpy(), oof["probability"].to_numpy()).threshold
    assert after["threshold"] == pytest.approx(expected)
    assert after["threshold"] > before["threshold"], "a lower recall target flags fewer customers"
    assert after["success_target"] == 0.6 and after["rule"] == "recall_target"
    scores = query(config, "select churn_probability, will_churn from churn_scores")
    assert ((scores["churn_probability"] >= after["threshold"]) == scores["will_churn"]).all()
    registry = query(config, "select threshold from model_registry where model_version = ?", [version])
    assert registry["threshold"].iloc[0] == pytest.approx(after["threshold"])  # monitoring and the API follow


def test_capacity_caps_tonights_flagged_customers(trained_warehouse: ChurnConfig, tmp_path: Path) -> None:
    config = with_overrides(trained_warehouse, tmp_path / "wh", {"operating_point": {"capacity_customers": 40}})
    result = score(config)
    point = latest_point(config, result.model_version)
    assert result.flagged <= 40
    assert point["capacity_limited"] and point["capacity_rows"] == 40
    assert point["threshold"] > point["rule_threshold"]
    assert result.flagged == point["flagged_rows"]


def test_a_pinned_threshold_wins_until_unpinned(trained_warehouse: ChurnConfig, tmp_path: Path) -> None:
    config = with_overrides(trained_warehouse, tmp_path / "wh", {})
    with pytest.raises(operating_point.OperatingPointError, match="reason"):
        operating_point.pin(config, 0.5, "", "tester")
    operating_point.pin(config, 0.5, "campaign budget halved", "tester")
    result = score(config)
    scores = query(config, "select churn_probability, will_churn from churn_scores")
    assert ((scores["churn_probability"] >= 0.5) == scores["will_churn"]).all()
    assert latest_point(config, result.model_version)["rule"] == "pinned"
    lines = operating_point.show_lines(config)
    assert any("pinned by hand at 0.5000" in line for line in lines)
    assert any("<- in force" in line for line in lines)
    operating_point.pin(config, None, "budget restored", "tester")
    score(config)
    point = latest_point(config, result.model_version)
    assert point["rule"] == "recall_target" and point["threshold"] != 0.5
    pins = query(config, "select set_by, reason from operating_points where source = 'churn threshold'")
    assert set(pins["reason"]) == {"campaign budget halved", "budget restored"}


# ---------------------------------------------------------------- promote / rollback

def test_promote_and_rollback_record_the_reason_and_scores_follow(
    trained_warehouse: ChurnConfig, tmp_path: Path,
) -> None:
    config = with_overrides(trained_warehouse, tmp_path / "wh", {}, TINY_TRAINING)
    first = champion_version(config)
    second = train(config, force=True).version
    other = second if champion_version(config) == first else first
    current = champion_version(config)
    with pytest.raises(PromotionError, match="already the champion"):
        promote(config, current, "no-op", "tester")

    change = promote(config, other, "challenger ties; prefer the newer data", "tester")
    assert champion_version(config) == other and change.previous_champion == current
    assert score(config).model_version == other
    assert set(query(config, "select model_version from churn_scores")["model_version"]) == {other}

    back = rollback(config, "complaints from the call centre", "tester")
    assert back.version == current and champion_version(config) == current
    assert score(config).model_version == current
    with connect(config.warehouse.build_db, read_only=True) as session:
        events = champion_events(session, config.dataset.name)
    assert list(events["event"]) == [EVENT_ROLLBACK, EVENT_PROMOTE]
    assert list(events["reason"]) == ["complaints from the call centre", "challenger ties; prefer the newer data"]
    statuses = registry_frame(config).set_index("model_version")["status"]
    assert statuses[current] == "champion" and statuses[other] == "retired"


# ---------------------------------------------------------------- feature definitions

def _edited_project(tmp_path: Path, edit) -> Path:
    project = tmp_path / "dbt_project"
    shutil.copytree(REPO_ROOT / "dbt_project", project,
                    ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    edit(project)
    return project


def _rebuild(trained: ChurnConfig, root: Path, edit) -> ChurnConfig:
    from ml.features.build import build_warehouse

    project = _edited_project(root, edit)
    config = with_overrides(trained, root / "wh", {"warehouse": {"dbt_project_dir": str(project)}}, TINY_TRAINING)
    build_warehouse(config)
    return config


def _minutes_in_seconds(project: Path) -> None:
    sql = project / MART_SQL
    text = sql.read_text()
    old = "        usage_sessions_90d,\n        usage_minutes_30d,\n"
    assert text.count(old) == 1
    new = "        usage_sessions_90d,\n        usage_minutes_30d * 60 as usage_minutes_30d,\n"
    sql.write_text(text.replace(old, new))


def _add_minutes_per_login_day(project: Path) -> None:
    sql = project / MART_SQL
    text = sql.read_text()
    old = "        usage_minutes_90d,\n        usage_trend_30_vs_prior_60,\n"
    assert text.count(old) == 1
    sql.write_text(text.replace(old, old + "        usage_minutes_30d / greatest(login_days_30d, 1)"
                                          " as minutes_per_login_day,\n"))
    yml = project / MART_YAML
    text = yml.read_text()
    anchor = "      - name: usage_minutes_30d\n"
    yml.write_text(text.replace(anchor, "      - name: minutes_per_login_day\n"
                                        "        description: \"Minutes per active day in the last 30 days.\"\n"
                                        "        config:\n"
                                        "          meta: {role: feature, kind: numeric}\n" + anchor, 1))


def _nightly_train_step(config: ChurnConfig) -> str:
    from ml.pipeline import PipelineRun, train_if_needed

    return train_if_needed(PipelineRun(config), force=False)


def test_a_redefined_feature_is_never_scored_silently_and_trains_a_fairly_judged_challenger(
    trained_warehouse: ChurnConfig, tmp_path: Path,
) -> None:
    champion = champion_version(trained_warehouse)
    config = _rebuild(trained_warehouse, tmp_path, _minutes_in_seconds)
    with pytest.raises(ScoreError, match="usage_minutes_30d"):
        score(config)  # the old model on the new definition: refused, nothing written

    note = _nightly_train_step(config)
    assert "redefined" in note and "usage_minutes_30d" in note
    steps = query(config, "select message from pipeline_runs where step = 'feature_definitions'")
    assert note in list(steps["message"])
    registry = registry_frame(config).set_index("model_version")
    challenger = registry[registry["compared_with"] == champion].iloc[0]
    # judged on the champion's own definitions: its stored held-out predictions, same (key, as_of) rows
    assert "stored predictions" in challenger["decision"] and "promotion.margin" in challenger["decision"]
    assert challenger["comparison_rows"] > 0
    if challenger["status"] == "champion":
        assert score(config).model_version == challenger.name
        assert _nightly_train_step(config) == "", "the new champion was trained on tonight's definitions"
    else:
        assert champion_version(config) == champion
        with pytest.raises(ScoreError, match="churn promote"):
            score(config)
        assert "not retrained" in _nightly_train_step(config), "the same definitions train one challenger, once"


def test_a_new_feature_trains_a_challenger_that_uses_it(trained_warehouse: ChurnConfig, tmp_path: Path) -> None:
    champion = champion_version(trained_warehouse)
    config = _rebuild(trained_warehouse, tmp_path, _add_minutes_per_login_day)
    note = _nightly_train_step(config)
    assert "added: minutes_per_login_day" in note
    registry = registry_frame(config).set_index("model_version")
    challenger = registry[registry["compared_with"] == champion].index[0]
    assert "minutes_per_login_day" in load_model(config, challenger).contract.feature_names
    # the champion's own features are unchanged, so it is re-scored on the challenger's rows
    assert "champion re-scored" in registry.loc[challenger, "decision"]
    result = score(config)  # whoever won scores: an added feature does not invalidate the champion
    assert result.model_version == champion_version(config)
