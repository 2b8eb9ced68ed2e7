"""`churn monitor` on the small trained warehouse: rows written, drift found, labels joined."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from ml import pipeline
from ml.cli import main
from ml.config import ChurnConfig
from ml.modeling.registry import load_champion
from ml.modeling.train import top_features
from ml.monitoring import monitor as mon
from ml.monitoring.performance import estimated_metrics
from ml.monitoring.policy import OUTCOME_FAILED, OUTCOME_PROMOTED
from ml.warehouse import connect
from tests.conftest import QUICK_TRAINING, copy_warehouse, query

ORACLE_VERSION = "oracle"


@pytest.fixture(scope="module")
def scored_warehouse(trained_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    """The trained warehouse, scored once. Read-only: copy it to change it."""
    from ml.modeling.score import score

    config = copy_warehouse(trained_warehouse, tmp_path_factory.mktemp("scored"), QUICK_TRAINING)
    score(config)
    return config


@pytest.fixture
def scored_copy(scored_warehouse: ChurnConfig, tmp_path: Path) -> ChurnConfig:
    return copy_warehouse(scored_warehouse, tmp_path / "wh", QUICK_TRAINING)




def test_monitor_writes_every_statistic_once(scored_copy: ChurnConfig) -> None:
    model = load_champion(scored_copy)
    result = mon.measure(scored_copy, run_id="night-1")
    mon.measure(scored_copy, run_id="night-1")  # a re-run replaces its own rows
    drift = query(scored_copy, "select * from drift_stats where run_id = 'night-1'")
    assert (drift["model_version"] == model.version).all()
    assert drift["as_of_date"].nunique() == 1
    per_feature = drift.groupby(["feature", "kind"])["statistic"].apply(sorted).to_dict()
    for name in model.contract.numeric:
        assert per_feature[(name, "numeric")] == sorted(["psi", "ks", "wasserstein_normalised", "null_share_change"])
    for name in model.contract.categorical:
        assert per_feature[(name, "categorical")] == sorted(
            ["psi", "chi_square", "jensen_shannon", "new_category_share", "null_share_change"])
    assert ("score", "score") in per_feature and ("share_flagged", "score") in per_feature
    assert per_feature[("dataset", "dataset")] == ["drifted_feature_share", "top_feature_drift"]
    assert not drift.duplicated(["feature", "kind", "statistic"]).any()
    psi = drift[drift["statistic"] == "psi"]
    assert psi["value"].notna().all() and (psi["value"] >= 0).all()
    summary = json.loads(drift.loc[drift["statistic"] == "psi", "current_summary"].iloc[0])
    assert "null_share" in summary and "n" in summary

    perf = query(scored_copy, "select * from model_performance where run_id = 'night-1'")
    assert list(perf["kind"]) == ["estimated"]
    scores = query(scored_copy, "select churn_probability, will_churn from churn_scores")
    row = perf.iloc[0]
    assert row["n_rows"] == len(scores)
    assert row["flagged_share"] == pytest.approx(scores["will_churn"].mean())
    assert row["positives"] == pytest.approx(scores["churn_probability"].sum())
    assert 0.5 < row["roc_auc"] < 1.0 and 0 < row["recall"] <= 1
    assert result.drifted_share == pytest.approx(len(result.drifted_features) / len(model.contract.features))


def test_injected_changes_are_flagged(scored_copy: ChurnConfig) -> None:
    model = load_champion(scored_copy)
    contract = model.contract
    reference = model.metadata.reference["features"]
    with connect(scored_copy.warehouse.build_db, read_only=True) as con:
        top = top_features(con, model.version, scored_copy.monitoring.top_features)
    shifted = next(name for name in top if name in contract.numeric)
    nulled = next(name for name in contract.numeric if name != shifted)
    relabelled, untouched = contract.categorical[0], contract.categorical[1]
    mart, a = scored_copy.dataset.feature_mart, contract.as_of
    spread = reference[shifted]["spread"]
    with connect(scored_copy.warehouse.build_db) as con:
        latest = con.scalar(f'select max("{a}") from "{mart}"')
        con.execute(f'update "{mart}" set "{shifted}" = "{shifted}" + ? where "{a}" = ?', [3 * spread, latest])
        con.execute(f'update "{mart}" set "{nulled}" = null where "{a}" = ? and hash("{contract.key}") % 10 < 3',
                    [latest])
        con.execute(f"update \"{mart}\" set \"{relabelled}\" = 'brand_new' "
                    f'where "{a}" = ? and hash("{contract.key}") % 10 >= 7', [latest])
    result = mon.measure(scored_copy, run_id="drifted")
    drift = query(scored_copy, "select * from drift_stats where run_id = 'drifted'").set_index(["feature", "statistic"])
    assert drift.loc[(shifted, "psi"), "drifted"] and drift.loc[(shifted, "wasserstein_normalised"), "drifted"]
    assert drift.loc[(shifted, "wasserstein_normalised"), "value"] == pytest.approx(3.0, abs=0.3)
    assert drift.loc[(shifted, "ks"), "p_value"] < 1e-6
    null_row = drift.loc[(nulled, "null_share_change")]
    assert null_row["drifted"] and null_row["value"] == pytest.approx(0.3, abs=0.06)
    new_row = drift.loc[(relabelled, "new_category_share")]
    assert new_row["drifted"] and new_row["value"] == pytest.approx(0.3, abs=0.06)
    assert json.loads(new_row["current_summary"])["new_levels"] == ["brand_new"]
    assert not drift.loc[(untouched, "jensen_shannon"), "drifted"]
    assert {shifted, nulled, relabelled} <= set(result.drifted_features)
    assert shifted in result.top_features_drifted
    assert drift.loc[("dataset", "top_feature_drift"), "drifted"]


def _insert_history(config: ChurnConfig, frame: pd.DataFrame) -> None:
    with connect(config.warehouse.build_db) as con:
        with con.registered(frame) as rows:
            con.execute(f"insert into churn_scores_history by name select * from {rows}")


def _labelled_dates(config: ChurnConfig, contract) -> list:
    mart = config.dataset.feature_mart
    rows = query(config, f'select "{contract.as_of}" d from "{mart}" group by 1 '
                          f'having count(*) = count("{contract.label}") order by 1')
    return [pd.Timestamp(d).date() for d in rows["d"]]


def _scored_past_snapshot(config: ChurnConfig):
    """The champion, the latest fully labelled past snapshot's mart rows and their scores, as a
    night before tonight would have written them to `churn_scores_history`."""
    model = load_champion(config)
    c = model.contract
    past = _labelled_dates(config, c)[-1]
    rows = query(config, f'select * from "{config.dataset.feature_mart}" where "{c.as_of}" = ?', [past])
    probability = model.predict_proba(rows)
    scored = pd.DataFrame({c.key: rows[c.key], c.as_of: rows[c.as_of], "churn_probability": probability,
                           "will_churn": probability >= model.threshold})
    return model, past, rows, probability, scored


def test_realized_performance_once_labels_are_known(scored_copy: ChurnConfig) -> None:
    """History of an earlier labelled snapshot gets realized metrics, computed once."""
    model, past, rows, probability, scored = _scored_past_snapshot(scored_copy)
    c = model.contract
    scored["model_version"] = model.version
    scored["run_id"] = "past-night"
    _insert_history(scored_copy, scored)

    result = mon.measure(scored_copy, run_id="later-night")
    realized = query(scored_copy, "select * from model_performance where kind = 'realized'")
    assert len(realized) == 1 and len(result.realized) == 1
    row = realized.iloc[0]
    assert pd.Timestamp(row["as_of_date"]).date() == past and row["model_version"] == model.version
    y = rows[c.label].to_numpy(dtype=int)
    flagged = scored["will_churn"].to_numpy(dtype=bool)
    assert row["n_rows"] == len(rows) and row["positives"] == y.sum()
    assert row["recall"] == pytest.approx((flagged & (y == 1)).sum() / y.sum())
    assert row["threshold"] == pytest.approx(model.threshold)
    # Labels of a closed horizon do not change: the next night does not add a second row.
    mon.measure(scored_copy, run_id="night-after")
    assert len(query(scored_copy, "select * from model_performance where kind = 'realized'")) == 1


def test_realized_performance_with_customers_missing_from_the_later_mart(scored_copy: ChurnConfig) -> None:
    """Plant scored customers the mart no longer has: the snapshot still gets realized metrics, on the
    labelled rows, with the missing ones counted (before, one absent customer blocked it forever)."""
    model, past, rows, probability, scored = _scored_past_snapshot(scored_copy)
    c = model.contract
    ghosts = scored.head(13).assign(**{c.key: [f"gone-{i}" for i in range(13)]})
    scored = pd.concat([scored, ghosts], ignore_index=True).assign(model_version=model.version, run_id="past")
    _insert_history(scored_copy, scored)

    mon.measure(scored_copy, run_id="later-night")
    realized = query(scored_copy, "select * from model_performance where kind = 'realized'")
    assert len(realized) == 1
    row = realized.iloc[0]
    assert row["missing_labels"] == 13 and row["n_rows"] == len(rows)
    y = rows[c.label].to_numpy(dtype=int)
    assert row["recall"] == pytest.approx((probability[y == 1] >= model.threshold).mean())


def test_performance_table_made_before_missing_labels_gains_the_column(scored_copy: ChurnConfig) -> None:
    with connect(scored_copy.warehouse.build_db) as con:
        mon.ensure_tables(con)
        con.execute("create or replace table model_performance as select * exclude (missing_labels) "
                    "from model_performance")
    mon.measure(scored_copy, run_id="after-upgrade")
    columns = query(scored_copy, "select * from model_performance limit 0").columns
    assert "missing_labels" in columns


def test_estimate_tracks_realized_without_concept_drift(scored_copy: ChurnConfig) -> None:
    """With the generator's true probabilities as scores, CBPE recall matches the
    realized recall computed from the mart's labels (pooled over labelled snapshots)."""
    model = load_champion(scored_copy)
    c = model.contract
    mart = scored_copy.dataset.feature_mart
    oracle_file = scored_copy.generator.oracle_dir / "oracle.parquet"
    dates = _labelled_dates(scored_copy, c)
    oracle = query(
        scored_copy,
        f"""select o.customer_id as "{c.key}", o.as_of_date as "{c.as_of}", o.churn_probability
            from read_parquet(?) o join "{mart}" m
              on m."{c.key}" = o.customer_id and m."{c.as_of}" = o.as_of_date
            where m."{c.label}" is not null""",
        [str(oracle_file)],
    )
    assert set(pd.to_datetime(oracle[c.as_of]).dt.date) == set(dates)
    threshold = float(np.quantile(oracle["churn_probability"], 0.7))
    oracle["will_churn"] = oracle["churn_probability"] >= threshold
    oracle["model_version"] = ORACLE_VERSION
    oracle["run_id"] = "oracle-history"
    _insert_history(scored_copy, oracle)
    with connect(scored_copy.warehouse.build_db) as con:
        mon.ensure_tables(con)
        realized = mon.realized_performance(con, scored_copy, c, dates[-1] + dt.timedelta(days=1), "check")
    realized = realized[realized["model_version"] == ORACLE_VERSION]
    assert len(realized) == len(dates)
    pooled_true = (realized["recall"] * realized["positives"]).sum() / realized["positives"].sum()
    estimate = estimated_metrics(oracle["churn_probability"].to_numpy(), oracle["will_churn"].to_numpy())
    assert estimate["recall"] == pytest.approx(pooled_true, abs=0.05)
    assert estimate["positives"] == pytest.approx(realized["positives"].sum(), rel=0.1)


def test_policy_records_promotion_and_failure(scored_copy: ChurnConfig, monkeypatch) -> None:
    from ml.modeling.train import TrainResult

    result = mon.measure(scored_copy, run_id="policy-night")
    calls = []

    def promoted(config, force=False, run_id=None, data=None):
        calls.append((force, run_id))
        return TrainResult("m-new", "xgboost", {}, True, run_id, message="challenger won")

    monkeypatch.setattr("ml.pipeline.train", promoted)
    monkeypatch.setattr("ml.monitoring.monitor.decide",
                        lambda config, inputs: mon.RetrainDecision(True, ("schedule",), {}))
    today = dt.date(2025, 7, 2)
    out = pipeline.apply_policy(scored_copy, result, today)
    assert calls == [(True, "policy-night-retrain")]
    assert out.outcome == OUTCOME_PROMOTED and out.challenger_version == "m-new"
    decisions = query(scored_copy, "select * from retrain_decisions")
    assert decisions[["outcome", "challenger_version", "rules"]].values.tolist() == [
        [OUTCOME_PROMOTED, "m-new", "schedule"]]
    with connect(scored_copy.warehouse.build_db, read_only=True) as con:
        assert mon.champion_since(con, "m-new", dt.date(2025, 9, 1)) == today

    def broken(config, force=False, run_id=None, data=None):
        raise RuntimeError("no labelled rows")

    monkeypatch.setattr("ml.pipeline.train", broken)
    with pytest.raises(RuntimeError, match="no labelled rows"):
        pipeline.apply_policy(scored_copy, result, today)
    row = query(scored_copy, "select outcome, message from retrain_decisions").iloc[0]
    assert row["outcome"] == OUTCOME_FAILED and "no labelled rows" in row["message"]


def test_policy_ages_the_champion_in_replayed_days(scored_copy: ChurnConfig) -> None:
    result = mon.measure(scored_copy, run_id="first")
    first = dt.date(2025, 1, 1)
    pipeline.apply_policy(scored_copy, result, first, retrain=False)
    result = dataclasses.replace(result, run_id="later")  # MonitorResult is frozen
    later = first + dt.timedelta(days=scored_copy.monitoring.retrain_every_days)
    out = pipeline.apply_policy(scored_copy, result, later, retrain=False)
    assert "schedule" in out.decision.rules
    assert out.decision.values["days_since_champion"] == scored_copy.monitoring.retrain_every_days


def test_monitor_needs_tonights_scores(trained_warehouse: ChurnConfig, tmp_path: Path) -> None:
    config = copy_warehouse(trained_warehouse, tmp_path / "wh", QUICK_TRAINING)
    with pytest.raises(mon.MonitorError, match="run churn score"):
        mon.measure(config)
    assert query(config, "select count(*) n from drift_stats")["n"][0] == 0


def test_cli_monitor_reports(scored_copy: ChurnConfig, capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", str(scored_copy.source_file), "monitor"]) == 0
    out = capsys.readouterr().out
    assert "drifted features" in out and "estimated:" in out and "retrain:" in out
    with duckdb.connect(str(scored_copy.warehouse.build_db), read_only=True) as con:
        assert con.execute("select count(*) from retrain_decisions").fetchone()[0] == 1


def test_a_rejected_challenger_uses_up_the_new_labels(scored_copy: ChurnConfig, monkeypatch) -> None:
    """Once any training run has seen the newest labelled snapshot, the policy finds
    nothing new: it must not retrain on the same data (and reject again) every night."""
    from ml.features.contract import load_contract
    from ml.features.dbt import dbt_target_path
    from ml.modeling.train import newest_trained_snapshot
    from ml.monitoring.monitor import measure, new_labelled_snapshots, policy_inputs

    config = scored_copy
    contract = load_contract(dbt_target_path(config) / "manifest.json", config.dataset.feature_mart)
    labelled = _labelled_dates(config, contract)
    with connect(config.warehouse.build_db, read_only=True) as con:
        assert new_labelled_snapshots(con, config, contract, str(labelled[0])) > 0
    with connect(config.warehouse.build_db) as con:
        con.execute(
            "insert into model_runs by name select 'rejected-challenger' as run_id, ? as dataset, "
            "'success' as status, ?::timestamp as snapshot_max",
            [config.dataset.name, pd.Timestamp(labelled[-1])],
        )
        assert newest_trained_snapshot(con, config.dataset.name) == pd.Timestamp(labelled[-1]).date()
    # The champion was trained on the first labelled snapshot only; newer ones exist,
    # but the rejected challenger above already learned from all of them.
    import ml.modeling.registry

    real_load_model = ml.modeling.registry.load_model

    def older_champion(*args, **kwargs):
        model = real_load_model(*args, **kwargs)
        older = dataclasses.replace(model.metadata, snapshot_range=[str(labelled[0]), str(labelled[0])])
        return dataclasses.replace(model, metadata=older)

    monkeypatch.setattr(ml.modeling.registry, "load_model", older_champion)
    result = measure(config)
    inputs = policy_inputs(config, result, pd.Timestamp(result.as_of_date).date())
    assert inputs.new_labelled_snapshots == 0
    # Without the training runs' record, only the champion's range counts: new snapshots.
    with connect(config.warehouse.build_db) as con:
        con.execute("delete from model_runs")
    assert policy_inputs(config, result, pd.Timestamp(result.as_of_date).date()).new_labelled_snapshots > 0
