"""Registry: champion/challenger on the same rows, hash-checked loading, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.modeling.model import (
    ChurnModel,
    ModelMetadata,
    ScoreCalibrator,
    contract_feature_frame,
)
from ml.modeling.registry import (
    BOOSTER_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    PIPELINE_FILE,
    RegistryError,
    champion_version,
    load_champion,
    load_model,
    model_record,
    register,
    registry_frame,
)
from ml.modeling.train import make_pipeline
from ml.warehouse import connect
from tests.conftest import make_config
from tests.test_train import SYNTHETIC_CONTRACT, synthetic_mart

EVAL_DATE = "2024-04-01"


@pytest.fixture
def config(tmp_path: Path) -> ChurnConfig:
    config = make_config(tmp_path / "wh")
    with connect(config.warehouse.build_db) as con:
        con.append(config.dataset.feature_mart, synthetic_mart())
    return config


def _frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    mart = synthetic_mart()
    mart = mart[mart["churned_within_30d"].notna()].copy()
    mart["churned_within_30d"] = mart["churned_within_30d"].astype(int)
    is_eval = mart["as_of_date"] == pd.Timestamp(EVAL_DATE)
    return mart[~is_eval].reset_index(drop=True), mart[is_eval].reset_index(drop=True)


def fitted_model(algorithm: str = "logistic_regression", shuffle_labels: bool = False, seed: int = 0,
                 params: dict | None = None) -> ChurnModel:
    """A small fitted model; shuffled labels make a deliberately worse one."""
    train_rows, _ = _frames()
    X = contract_feature_frame(SYNTHETIC_CONTRACT, train_rows)
    y = train_rows["churned_within_30d"].to_numpy(int)
    if shuffle_labels:
        y = np.random.default_rng(seed).permutation(y)
    params = params or ({"C": 1.0} if algorithm == "logistic_regression" else {"n_estimators": 30, "max_depth": 3})
    pipeline = make_pipeline(SYNTHETIC_CONTRACT, algorithm, params, seed, 3.0).fit(X, y)
    calibrator = ScoreCalibrator("sigmoid").fit(pipeline.predict_proba(X)[:, 1], y)
    return ChurnModel(pipeline, calibrator, SYNTHETIC_CONTRACT, algorithm, params, threshold=0.3,
                      metadata=ModelMetadata(validation={"strategy": "out_of_time", "eval_as_of_dates": [EVAL_DATE]}))


def test_champion_challenger_rule_compares_on_the_same_rows(config: ChurnConfig) -> None:
    _, eval_rows = _frames()
    weak = register(config, fitted_model(shuffle_labels=True), "r1", {"pr_auc": 0.3},
                    evaluation_frame=eval_rows).version
    assert champion_version(config) == weak  # the first model is champion by default
    with connect(config.warehouse.build_db, read_only=True) as session:
        record = model_record(session, weak)
    assert (record.status, record.decision) == ("champion", "first model for this dataset")

    weaker = register(config, fitted_model(shuffle_labels=True, seed=5), "r2", {"pr_auc": 0.9},
                      evaluation_frame=eval_rows).version
    strong = register(config, fitted_model(), "r3", {"pr_auc": 0.1}, evaluation_frame=eval_rows).version

    registry = registry_frame(config).set_index("model_version")
    # reported oot metrics are not what decides: the champion is re-scored on the same rows
    assert registry.loc[weaker, "status"] == "challenger"
    assert registry.loc[strong, "status"] == "champion"
    assert registry.loc[weak, "status"] == "retired"
    assert champion_version(config) == strong
    row = registry.loc[strong]
    assert row["compared_with"] == weak
    assert row["comparison_rows"] == len(eval_rows)
    assert row["challenger_metric_same_rows"] > row["champion_metric_same_rows"]
    # Both models' full metrics on the same rows are kept for the model report's comparison chart.
    with connect(config.warehouse.build_db, read_only=True) as session:
        judged = model_record(session, strong)
    both = judged.comparison_metrics
    assert (judged.compared_with, judged.comparison_rows) == (weak, len(eval_rows))
    assert both["challenger"]["pr_auc"] == pytest.approx(row["challenger_metric_same_rows"])
    assert both["champion"]["pr_auc"] == pytest.approx(row["champion_metric_same_rows"])
    assert both["champion"]["rows"] == both["challenger"]["rows"] == len(eval_rows)
    assert record.comparison_metrics is None  # the first model was judged against nobody
    # a worse challenger later leaves the champion in place
    register(config, fitted_model(shuffle_labels=True, seed=9), "r4", {}, evaluation_frame=eval_rows)
    assert champion_version(config) == strong
    assert (registry_frame(config)["status"] == "champion").sum() == 1


def test_comparison_rows_are_reread_from_the_mart_when_not_given(config: ChurnConfig) -> None:
    first = register(config, fitted_model(shuffle_labels=True), "r1", {}).version
    second = register(config, fitted_model(), "r2", {}).version
    registry = registry_frame(config).set_index("model_version")
    assert registry.loc[second, "status"] == "champion" and registry.loc[first, "status"] == "retired"
    assert registry.loc[second, "comparison_rows"] == 300  # the synthetic mart's 2024-04-01 rows


def test_load_refuses_a_changed_artifact_naming_the_file(config: ChurnConfig) -> None:
    version = register(config, fitted_model(), "r1", {}).version
    path = config.warehouse.models_dir / version / PIPELINE_FILE
    with open(path, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(RegistryError, match=str(path)):
        load_model(config, version)
    with pytest.raises(RegistryError, match="changed after registration"):
        load_champion(config)


def test_load_refuses_a_missing_artifact(config: ChurnConfig) -> None:
    version = register(config, fitted_model(), "r1", {}).version
    path = config.warehouse.models_dir / version / METADATA_FILE
    path.unlink()
    with pytest.raises(RegistryError, match=f"{path}.*missing"):
        load_model(config, version)


def test_unknown_version_and_empty_registry(config: ChurnConfig) -> None:
    assert champion_version(config) is None
    assert load_champion(config) is None
    register(config, fitted_model(), "r1", {})
    with pytest.raises(RegistryError, match="no-such-version"):
        load_model(config, "no-such-version")


def test_xgboost_booster_saved_as_json_and_round_trips(config: ChurnConfig) -> None:
    model = fitted_model("xgboost", params={"n_estimators": 20, "max_depth": 3})
    version = register(config, model, "r1", {}).version
    folder = config.warehouse.models_dir / version
    assert json.loads((folder / BOOSTER_FILE).read_text())["learner"]  # XGBoost's own JSON format
    metadata = json.loads((folder / METADATA_FILE).read_text())
    assert set(metadata["artifact_sha256"]) == {BOOSTER_FILE, PIPELINE_FILE}
    assert metadata["contract"]["label"] == "churned_within_30d"
    assert metadata["library_versions"]["xgboost"]
    assert metadata["calibration"] == "sigmoid" and metadata["threshold"] == 0.3
    loaded = load_model(config, version)
    _, eval_rows = _frames()
    np.testing.assert_allclose(loaded.predict_proba(eval_rows), model.predict_proba(eval_rows), rtol=1e-6)
    assert loaded.version == version and loaded.algorithm == "xgboost"
    assert loaded.transformed_feature_sources() == model.transformed_feature_sources()


def test_champions_are_kept_per_dataset(config: ChurnConfig) -> None:
    demo = register(config, fitted_model(), "r1", {}).version
    telco = config.with_dataset("telco")
    assert champion_version(telco) is None
    assert champion_version(config) == demo


def test_champion_that_cannot_score_the_current_mart_is_replaced(config: ChurnConfig) -> None:
    """A feature dropped from the mart: the old champion cannot be re-scored, so it cannot win."""
    import dataclasses

    from ml.features.contract import Feature

    old_contract = dataclasses.replace(
        SYNTHETIC_CONTRACT, features=(*SYNTHETIC_CONTRACT.features, Feature("dropped_later", "numeric")))
    train_rows, eval_rows = _frames()
    train_rows = train_rows.assign(dropped_later=1.0)
    X = contract_feature_frame(old_contract, train_rows)
    y = train_rows["churned_within_30d"].to_numpy(int)
    pipeline = make_pipeline(old_contract, "logistic_regression", {"C": 1.0}, 0, 3.0).fit(X, y)
    calibrator = ScoreCalibrator("sigmoid").fit(pipeline.predict_proba(X)[:, 1], y)
    old = ChurnModel(pipeline, calibrator, old_contract, "logistic_regression", {"C": 1.0}, 0.3,
                     metadata=ModelMetadata(validation={"strategy": "out_of_time", "eval_as_of_dates": [EVAL_DATE]}))
    old_version = register(config, old, "r1", {}).version
    new_version = register(config, fitted_model(shuffle_labels=True), "r2", {}, evaluation_frame=eval_rows).version
    registry = registry_frame(config).set_index("model_version")
    assert registry.loc[new_version, "status"] == "champion"
    assert registry.loc[old_version, "status"] == "retired"
    assert "cannot score" in registry.loc[new_version, "decision"]
    assert "dropped_later" in registry.loc[new_version, "decision"]


def test_model_saved_before_typed_metadata_still_loads_and_scores(config: ChurnConfig) -> None:
    """A metadata.json in the format written before ModelMetadata existed (commit c676dec: the
    model's facts, then the metadata dict as given) loads: keys it lacks are None, others kept."""
    from ml.modeling.registry import REGISTRY, sha256_file

    model = fitted_model()
    version = register(config, model, "r1", {}).version
    folder = config.warehouse.models_dir / version
    written = json.loads((folder / METADATA_FILE).read_text())
    old_style = {
        key: written[key]
        for key in ("version", "algorithm", "params", "threshold", "calibration", "contract",
                    "library_versions", "artifact_sha256")
    }
    old_style.update(run_id="r1", dataset="demo", snapshot_range=["2024-01-01", "2024-03-01"],
                     validation={"strategy": "out_of_time", "eval_as_of_dates": [EVAL_DATE]},
                     metrics={"out_of_time": {"pr_auc": 0.5}})  # no reference, threshold_choice, candidates...
    (folder / METADATA_FILE).write_text(json.dumps(old_style, indent=2))
    hashes = {**json.loads(registry_frame(config).set_index("model_version").loc[version, "artifact_sha256"]),
              METADATA_FILE: sha256_file(folder / METADATA_FILE)}
    with connect(config.warehouse.build_db) as con:
        con.execute(f"update {REGISTRY.name} set artifact_sha256 = ? where model_version = ?",
                    [json.dumps(hashes, sort_keys=True), version])
    (folder / MANIFEST_FILE).unlink()  # models of that time had no signed manifest

    loaded = load_model(config, version)
    assert (folder / MANIFEST_FILE).is_file()  # trusted by the build registry's hashes, so now signed
    assert loaded.metadata.snapshot_range == ["2024-01-01", "2024-03-01"]
    assert loaded.metadata.validation["eval_as_of_dates"] == [EVAL_DATE]
    assert loaded.metadata.metrics == {"out_of_time": {"pr_auc": 0.5}}
    assert loaded.metadata.reference is None and loaded.metadata.threshold_choice is None
    assert loaded.metadata.library_versions == written["library_versions"]
    _, eval_rows = _frames()
    np.testing.assert_allclose(loaded.predict_proba(eval_rows), model.predict_proba(eval_rows), rtol=1e-9)


def test_metadata_json_keeps_its_keys_and_values() -> None:
    """ModelMetadata writes back exactly the keys and values it was read from (training's full set)."""
    stored = {
        "library_versions": {"python": "3.12"}, "artifact_sha256": {PIPELINE_FILE: "ab"}, "run_id": "r1",
        "dataset": "demo", "feature_mart": "customer_features", "config_hash": "c", "training_data_hash": "t",
        "training_rows": 900, "snapshot_range": ["2024-01-01", "2024-03-01"],
        "validation": {"strategy": "out_of_time", "eval_as_of_dates": [EVAL_DATE]}, "selection_metric": "pr_auc",
        "threshold_choice": {"threshold": 0.2, "rule": "recall_target"}, "metrics": {"baseline": {"pr_auc": 0.1}},
        "candidates": {"xgboost": {"params": {}}}, "reference": {"n_rows": 900, "features": {}},
    }
    assert ModelMetadata.from_dict(stored).to_dict() == stored
    assert list(ModelMetadata.from_dict(stored).to_dict()) == list(stored)
    assert ModelMetadata(validation={"strategy": "x"}).to_dict() == {"validation": {"strategy": "x"}}


def test_model_parts_pickled_before_the_package_layout_still_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models registered before ml/ was split into packages pickled `ml.model.ScoreCalibrator`."""
    import sys

    import joblib
    import numpy as np

    import ml.modeling.model as model_module
    from ml.modeling.registry import load_pickled_parts

    calibrator = model_module.ScoreCalibrator("sigmoid").fit(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    with monkeypatch.context() as old_layout:
        old_layout.setitem(sys.modules, "ml.model", model_module)
        old_layout.setattr(model_module.ScoreCalibrator, "__module__", "ml.model")
        joblib.dump({"calibrator": calibrator}, tmp_path / "model.joblib")
    assert b"ml.model" in (tmp_path / "model.joblib").read_bytes()
    assert "ml.model" not in sys.modules
    loaded = load_pickled_parts(tmp_path / "model.joblib")["calibrator"]
    assert isinstance(loaded, model_module.ScoreCalibrator)
    assert np.allclose(loaded.predict(np.array([0.15, 0.85])), calibrator.predict(np.array([0.15, 0.85])))


def test_a_registry_from_before_comparison_metrics_gains_the_column(config: ChurnConfig) -> None:
    first = register(config, fitted_model(shuffle_labels=True), "r1", {}).version
    with connect(config.warehouse.build_db) as session:
        session.execute("alter table model_registry drop column comparison_metrics")
        assert model_record(session, first).comparison_metrics is None  # readable without the column
    second = register(config, fitted_model(), "r2", {}).version
    with connect(config.warehouse.build_db, read_only=True) as session:
        assert set(model_record(session, second).comparison_metrics) == {"challenger", "champion"}


def test_a_tie_keeps_the_champion_and_the_decision_says_which_rule(config: ChurnConfig) -> None:
    _, eval_rows = _frames()
    champion = register(config, fitted_model(), "r1", {}, evaluation_frame=eval_rows).version
    twin = register(config, fitted_model(), "r2", {}, evaluation_frame=eval_rows).version  # identical fit
    registry = registry_frame(config).set_index("model_version")
    assert champion_version(config) == champion and registry.loc[twin, "status"] == "challenger"
    assert "tie: champion kept" in registry.loc[twin, "decision"]
    assert "promotion.margin 0" in registry.loc[twin, "decision"]


def test_a_better_challenger_within_the_margin_keeps_the_champion(tmp_path: Path) -> None:
    config = make_config(tmp_path / "wh", {"promotion": {"margin": 0.9}})
    with connect(config.warehouse.build_db) as con:
        con.append(config.dataset.feature_mart, synthetic_mart())
    _, eval_rows = _frames()
    weak = register(config, fitted_model(shuffle_labels=True), "r1", {}, evaluation_frame=eval_rows).version
    strong = register(config, fitted_model(), "r2", {}, evaluation_frame=eval_rows).version
    row = registry_frame(config).set_index("model_version").loc[strong]
    assert row["challenger_metric_same_rows"] > row["champion_metric_same_rows"]
    assert champion_version(config) == weak and "-> champion kept" in row["decision"]


def test_a_champion_that_misses_the_success_target_is_marked_and_the_nightly_warns(
        config: ChurnConfig, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from ml.modeling.registry import champion_record
    from ml.pipeline import warn_if_champion_misses_target

    target = config.problem.success_target
    register(config, fitted_model(), "r1", {"recall": target - 0.1})
    record = champion_record(config)
    assert (record.success_metric, record.success_target, record.meets_success_target) == ("recall", target, False)
    with caplog.at_level(logging.WARNING, logger="churn"):
        warn_if_champion_misses_target(config)
    assert f"misses the success target on its hold-out: recall >= {target} not met" in caplog.text

    from ml.modeling.registry import success_columns

    assert success_columns(config, {"recall": target})["meets_success_target"] is True
    assert success_columns(config, {})["meets_success_target"] is None, "not measured is not a miss"
