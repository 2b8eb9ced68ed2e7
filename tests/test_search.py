"""Search spaces from churn.yml, the adaptive search, and a given train/test split.

Config tests plant each bad shape and check the error names the key. The
quality test plants a small high-signal table on which the big-table spaces
fall short of an untuned random forest and checks the default (adaptive)
search reaches it. The split tests plant a `split` column and check the
hold-out is exactly its `test` rows, and that any other value is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score

import ml.modeling.train as train_module
from benchmarks.quality import ECOMMERCE_CONTRACT, baseline_scores, ecommerce_table
from ml.config import ChurnConfig, ConfigError, load_config
from ml.features.contract import ContractError, Feature, FeatureContract, load_contract
from ml.features.mart import TrainingError
from ml.modeling.registry import champion_version, load_model
from ml.modeling.train import (
    fit_model,
    sample_configs,
    search_algorithm,
    search_space,
    split_training_data,
    train,
    validation_split,
)
from tests.conftest import REPO_ROOT, make_config, query
from tests.test_train import SYNTHETIC_CONTRACT, synthetic_mart, synthetic_warehouse


def write_changed(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load((REPO_ROOT / "churn.yml").read_text())
    change(raw["training"])
    path = tmp_path / "churn.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- configuration

def test_repo_config_keeps_todays_demo_spaces_and_orders_candidates_simplest_first() -> None:
    training = load_config(REPO_ROOT / "churn.yml").training
    assert list(training.search_spaces) == ["logistic_regression", "random_forest", "xgboost"]
    assert training.search_spaces["random_forest"]["min_samples_leaf"] == (10, 50)
    assert training.search_spaces["xgboost"]["max_depth"] == (2, 3, 4)
    assert training.search_strategy == "halving"


BAD_SPACES = [
    (lambda t: t.pop("search_spaces"), r"training.search_spaces must be a mapping of candidate"),
    (lambda t: t.update(search_spaces={}), r"training.search_spaces must be a mapping of candidate"),
    (lambda t: t["search_spaces"].update(svm={"C": [1.0]}),
     r"training.search_spaces: unknown candidate\(s\) svm; known: logistic_regression"),
    (lambda t: t["search_spaces"].update(random_forest=[100, 200]),
     r"training.search_spaces.random_forest must be a mapping of parameter to a list"),
    (lambda t: t["search_spaces"]["random_forest"].update(depth=[3]),
     r"training.search_spaces.random_forest.depth: not a searchable parameter of random_forest"),
    (lambda t: t["search_spaces"]["xgboost"].update(max_depth=3),
     r"training.search_spaces.xgboost.max_depth = 3: expected a non-empty list"),
    (lambda t: t["search_spaces"]["xgboost"].update(max_depth=[]),
     r"training.search_spaces.xgboost.max_depth = \[\]: expected a non-empty list"),
    (lambda t: t["search_spaces"]["xgboost"].update(learning_rate=[0.1, 0]),
     r"training.search_spaces.xgboost.learning_rate\[1\] = 0 is out of range; allowed: a number in \(0, 1\]"),
    (lambda t: t["search_spaces"]["logistic_regression"].update(C=["big"]),
     r"training.search_spaces.logistic_regression.C\[0\] = 'big' is out of range; allowed: a number > 0"),
    (lambda t: t["search_spaces"]["random_forest"].update(max_depth=[None, 0]),
     r"training.search_spaces.random_forest.max_depth\[1\] = 0 is out of range"),
    (lambda t: t["small_table_spaces"]["random_forest"].update(n_estimators=[True]),
     r"training.small_table_spaces.random_forest.n_estimators\[0\] = True is out of range"),
    (lambda t: t["search_spaces"].pop("xgboost"),
     r"training.small_table_spaces names xgboost, which training.search_spaces does not train"),
    (lambda t: t.update(search_strategy="grid"), r"training.search_strategy = 'grid'.*allowed: one of halving, random"),
    (lambda t: t.update(small_table_iterations=0), r"training.small_table_iterations = 0.*allowed: >= 1"),
    (lambda t: t.update(small_table_rows=-1), r"training.small_table_rows = -1.*allowed: >= 0"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SPACES, ids=[m.split(" ")[0][:60] + str(i)
                                                                for i, (_, m) in enumerate(BAD_SPACES)])
def test_bad_search_space_is_refused_naming_the_key(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_changed(tmp_path, change))


def test_a_candidate_left_out_is_not_trained_and_an_empty_space_tries_the_defaults(tmp_path: Path) -> None:
    def change(training: dict) -> None:
        training["search_spaces"] = {"xgboost": {}, "logistic_regression": {"C": [0.5]}}
        training["small_table_spaces"] = {}

    config = load_config(write_changed(tmp_path, change))
    assert list(config.training.search_spaces) == ["logistic_regression", "xgboost"]  # simplest first
    assert sample_configs(search_space(config, "xgboost", 10), 5, 0) == [{}]


# ---------------------------------------------------------------- adaptive search

def test_small_tables_widen_the_space_and_draw_more(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    small, large = config.training.small_table_rows, config.training.small_table_rows + 1
    assert search_space(config, "random_forest", small)["min_samples_leaf"] == [1, 2, 5]
    assert search_space(config, "random_forest", large)["min_samples_leaf"] == [10, 50]
    assert train_module.search_iterations(config, small) == config.training.small_table_iterations
    assert train_module.search_iterations(config, large) == config.training.search_iterations


def test_halving_fits_every_draw_once_and_only_the_best_third_on_later_folds(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"training": {"small_table_iterations": 9, "cv_folds": 3}})
    frame = synthetic_mart(customers=200, snapshots=2, unlabelled_last=False)
    frame["churned_within_30d"] = frame["churned_within_30d"].astype(int)
    X = frame[SYNTHETIC_CONTRACT.feature_names]
    y = frame["churned_within_30d"].to_numpy()
    folds = train_module.cv_folds(y, frame["customer_id"].to_numpy(), 3, 0)
    result = search_algorithm("logistic_regression", SYNTHETIC_CONTRACT, X, y, folds, config, 1.0)
    # logistic_regression's 6 values of C are all drawn (9 > 6): 6 fits, then 2, then 1
    assert [c["folds"] for c in result.all_configs].count(1) == 4
    assert sorted(c["folds"] for c in result.all_configs)[-2:] == [2, 3]
    assert len(result.fold_scores) == 3 and not np.isnan(result.oof_raw).any()


def without_boosting(config: ChurnConfig) -> ChurnConfig:
    training = config.training
    return dataclasses.replace(config, training=dataclasses.replace(
        training, search_spaces={k: v for k, v in training.search_spaces.items() if k != "xgboost"},
        small_table_spaces={k: v for k, v in training.small_table_spaces.items() if k != "xgboost"}))


def test_default_search_reaches_an_untuned_forest_on_a_small_high_signal_table(tmp_path: Path) -> None:
    # Planted: near-identical customer profiles sharing outcomes, which deep
    # trees memorise. The big-table spaces (min_samples_leaf >= 10) fall short
    # of RandomForestClassifier(n_estimators=100) here; the widened small-table
    # search must not. Boosting is left out only to keep the test short.
    frame = ecommerce_table(rows=2500, seed=3)
    default = without_boosting(make_config(tmp_path / "default", {"training": {"small_table_iterations": 4}}))
    big_table_only = without_boosting(make_config(tmp_path / "fixed", {"training": {"small_table_rows": 0}}))
    data = split_training_data(default, ECOMMERCE_CONTRACT, frame, [pd.Timestamp("2024-01-01")])
    y = data.eval_frame["churned"].to_numpy(int)
    forest = roc_auc_score(y, baseline_scores(data, RandomForestClassifier(n_estimators=100, random_state=0)))
    fixed = roc_auc_score(y, fit_model(big_table_only, "fixed", data).evaluation.p)
    adaptive = fit_model(default, "adaptive", data)
    assert fixed < forest - 0.01, (fixed, forest)  # the planted gap is real
    assert roc_auc_score(y, adaptive.evaluation.p) >= forest - 0.005, (adaptive.evaluation.metrics, forest)


# ---------------------------------------------------------------- given split

def with_split(frame: pd.DataFrame, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return frame.assign(split=np.where(rng.random(len(frame)) < 0.3, "test", "train"))


QUICK_SMALL = {"training": {"search_iterations": 1, "small_table_iterations": 1, "cv_folds": 3}}
SPLIT_CONTRACT = FeatureContract(**{**SYNTHETIC_CONTRACT.__dict__, "split": "split"})


def test_given_split_holds_out_exactly_the_test_rows() -> None:
    frame = with_split(synthetic_mart(snapshots=4, unlabelled_last=False))
    frame["churned_within_30d"] = frame["churned_within_30d"].astype(int)
    dates = sorted(frame["as_of_date"].unique())
    split = validation_split(frame, SPLIT_CONTRACT, [pd.Timestamp(d) for d in dates], 1, 42)
    assert split.strategy == "given_split"
    assert split.eval_index.tolist() == np.flatnonzero(frame["split"] == "test").tolist()
    assert split.train_index.tolist() == np.flatnonzero(frame["split"] == "train").tolist()


def test_training_honours_the_given_split_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mart = with_split(synthetic_mart(customers=200, snapshots=3))
    config = synthetic_warehouse(tmp_path, monkeypatch, mart, QUICK_SMALL)
    monkeypatch.setattr(train_module, "current_contract", lambda _config: SPLIT_CONTRACT)
    result = train(config, run_id="given")
    labelled = mart[mart["churned_within_30d"].notna()]
    test_rows = labelled[labelled["split"] == "test"]
    run = query(config, "select validation_strategy, train_rows, oot_rows from model_runs where run_id = 'given'")
    assert result.validation_strategy == "given_split"
    assert run["oot_rows"][0] == len(test_rows) == result.oot_metrics["rows"]
    assert run["train_rows"][0] == len(labelled) - len(test_rows)
    held = load_model(config, champion_version(config)).metadata.validation
    assert sorted(map(tuple, held["eval_keys"])) == sorted(
        (int(k), str(pd.Timestamp(a).date())) for k, a in zip(test_rows["customer_id"], test_rows["as_of_date"],
                                                              strict=True))


@pytest.mark.parametrize(("planted", "shown"), [("validation", "'validation': 7"), (None, "'NULL': 7")])
def test_a_split_value_other_than_train_or_test_is_refused_naming_column_and_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted, shown: str
) -> None:
    mart = with_split(synthetic_mart(customers=100, snapshots=2))
    mart["split"] = mart["split"].astype(object)
    labelled = np.flatnonzero(mart["churned_within_30d"].notna())
    mart.loc[labelled[:7], "split"] = planted
    config = synthetic_warehouse(tmp_path, monkeypatch, mart)
    monkeypatch.setattr(train_module, "current_contract", lambda _config: SPLIT_CONTRACT)
    with pytest.raises(TrainingError, match=rf"split column 'split' must be 'train' or 'test'; "
                                            rf"7 of {len(labelled)} labelled row\(s\) hold other values \({shown}\)"):
        train(config, run_id="bad-split")
    assert champion_version(config) is None
    assert query(config, "select status from model_runs where run_id = 'bad-split'")["status"][0] == "failed"


def test_contract_reads_the_split_role_and_refuses_two(tmp_path: Path) -> None:
    def manifest(roles: dict[str, str]) -> Path:
        columns = {name: {"name": name, "config": {"meta": {"role": role, **({"kind": "numeric"}
                                                                               if role == "feature" else {})}}}
                   for name, role in roles.items()}
        path = tmp_path / "manifest.json"
        path.write_text(json.dumps({"nodes": {"model.x.m": {"resource_type": "model", "name": "m",
                                                            "columns": columns}}}))
        return path

    base = {"id": "key", "day": "as_of", "y": "label", "f": "feature"}
    assert load_contract(manifest({**base, "fold": "split"}), "m").split == "fold"
    assert load_contract(manifest(base), "m").split is None
    with pytest.raises(ContractError, match="at most one column may have role 'split'"):
        load_contract(manifest({**base, "fold": "split", "fold2": "split"}), "m")
    contract = load_contract(manifest({**base, "fold": "split"}), "m")
    assert FeatureContract.from_dict(contract.to_dict()) == contract
    assert Feature("f", "numeric") in contract.features
