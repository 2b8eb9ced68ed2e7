"""Training on big tables: the search on a sample of whole customers, early stopping, capped importance.

Each test plants the failure it guards against: a sample that splits a customer
(or leaks held-out rows) would show up in the folds or the spied search frames;
a refit that ignored early stopping would carry the search's upper bound of
rounds; an uncapped permutation importance would re-score every held-out row.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ml.modeling.train as train_module
from ml.modeling.operating_point import oof_rows
from ml.modeling.registry import champion_version, load_model
from ml.modeling.train import customer_sample, cv_folds, fit_early_stopped, make_pipeline, stopping_split, train
from tests.conftest import query
from tests.test_train import SYNTHETIC_CONTRACT, synthetic_mart, synthetic_warehouse

# 700 customers x 3 training snapshots = 2100 training rows (one more snapshot is held out).
CUSTOMERS, TRAIN_SNAPSHOTS = 700, 3
SEARCH_ROWS = 1000


def test_customer_sample_keeps_whole_customers_within_the_cap_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 500, 3000)  # uneven snapshots per customer, shuffled rows
    rows = customer_sample(groups, 1000, 42)
    assert len(rows) <= 1000 and len(rows) > 900  # the cap is honoured and mostly used
    kept = set(groups[rows])
    assert set(np.flatnonzero(np.isin(groups, list(kept)))) == set(rows), "a sampled customer keeps every row"
    assert customer_sample(groups, 1000, 42).tolist() == rows.tolist()
    assert set(groups[customer_sample(groups, 1000, 7)]) != kept, "the seed picks the customers"
    # A customer's place does not depend on the others: without half the unsampled ones, all stay in.
    others = np.setdiff1d(np.unique(groups), sorted(kept))[::2]
    subset = groups[np.isin(groups, [*kept, *others])]
    assert kept <= set(subset[customer_sample(subset, 1000, 42)])
    assert customer_sample(groups, 5000, 42).tolist() == list(range(3000)), "under the cap: every row"


def test_stopping_rows_come_from_the_folds_training_customers_only() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(400), 3)
    y = (rng.random(len(groups)) < 0.2).astype(int)
    for fit_idx, val_idx in cv_folds(y, groups, 3, 0):
        split = stopping_split(fit_idx, y, groups, 0)
        assert split is not None
        boost_idx, stop_idx = split
        assert sorted(np.concatenate([boost_idx, stop_idx]).tolist()) == sorted(fit_idx.tolist())
        assert set(groups[stop_idx]).isdisjoint(groups[boost_idx]), "a watched customer is not fitted on"
        assert set(groups[stop_idx]).isdisjoint(groups[val_idx]), "early stopping never sees the scored fold"
        assert 0.15 < len(stop_idx) / len(fit_idx) < 0.25
    single = np.zeros(len(groups), dtype=int)
    assert stopping_split(np.arange(len(groups)), single, groups, 0) is None, "one class: nothing to stop on"


def _transformed_rows(pipeline) -> list[int]:
    """Spy on the preprocessing step: the row count of every `transform` call."""
    preprocess = pipeline.named_steps["preprocess"]
    original, seen = preprocess.transform, []

    def transform(frame, **kwargs):
        seen.append(len(frame))
        return original(frame, **kwargs)

    preprocess.transform = transform
    return seen


def test_early_stopping_transforms_the_fit_rows_once_into_the_same_model() -> None:
    mart = synthetic_mart(customers=300, snapshots=3, unlabelled_last=False)
    X = mart[list(SYNTHETIC_CONTRACT.feature_names)]
    y = mart[SYNTHETIC_CONTRACT.label].to_numpy(dtype=int)
    groups = mart["customer_id"].to_numpy()
    fit_idx, val_idx = cv_folds(y, groups, 3, 0)[0]
    split = stopping_split(fit_idx, y, groups, 0)
    assert split is not None
    boost_idx, stop_idx = split
    params = {"n_estimators": 200, "learning_rate": 0.3, "max_depth": 3}

    # Reference: the former sequence, fit then transform (the spy must see its second pass over the fit rows).
    reference = make_pipeline(SYNTHETIC_CONTRACT, "xgboost", params, 0, 1.0)
    reference_seen = _transformed_rows(reference)
    preprocess = reference.named_steps["preprocess"].fit(X.iloc[boost_idx])
    booster = reference.named_steps["model"].set_params(early_stopping_rounds=5, eval_metric="aucpr")
    booster.fit(preprocess.transform(X.iloc[boost_idx]), y[boost_idx],
                eval_set=[(preprocess.transform(X.iloc[stop_idx]), y[stop_idx])], verbose=False)
    assert reference_seen == [len(boost_idx), len(stop_idx)]

    pipeline = make_pipeline(SYNTHETIC_CONTRACT, "xgboost", params, 0, 1.0)
    seen = _transformed_rows(pipeline)
    rounds = fit_early_stopped(pipeline, X, y, boost_idx, stop_idx, 5, "pr_auc")
    assert seen == [len(stop_idx)], "the fit rows are transformed once, by fit_transform"
    assert rounds == booster.best_iteration + 1 < 200
    model = pipeline.named_steps["model"]
    assert model.get_booster().save_raw("json") == booster.get_booster().save_raw("json"), "the same trees"
    assert np.array_equal(pipeline.predict_proba(X.iloc[val_idx]), reference.predict_proba(X.iloc[val_idx]))


@pytest.fixture
def sampled_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """One training on 2100 rows with training.search_rows = 1000, spying on what the search receives."""
    mart = synthetic_mart(customers=CUSTOMERS, snapshots=TRAIN_SNAPSHOTS + 1)
    config = synthetic_warehouse(tmp_path, monkeypatch, mart, {"training": {
        "search_iterations": 1, "small_table_iterations": 1, "cv_folds": 3, "search_rows": SEARCH_ROWS,
        "importance_rows": 200}})
    seen: list[tuple[str, pd.DataFrame, list]] = []
    original = train_module.search_algorithm

    def spy(algorithm, contract, X, y, folds, *args, **kwargs):
        seen.append((algorithm, X.copy(), folds))
        return original(algorithm, contract, X, y, folds, *args, **kwargs)

    monkeypatch.setattr(train_module, "search_algorithm", spy)
    with caplog.at_level(logging.INFO, logger="churn"):
        result = train(config, run_id="sampled")
    return config, mart, result, seen, caplog.text


def test_search_runs_on_a_capped_sample_and_the_winner_is_refitted_on_every_row(sampled_run) -> None:
    config, mart, result, seen, logged = sampled_run
    train_rows = CUSTOMERS * TRAIN_SNAPSHOTS
    assert len(seen) == 3
    for _, X, folds in seen:
        assert len(X) <= SEARCH_ROWS, "the cap is honoured"
        assert sorted(X["snapshot_index"].unique()) == [0.0, 1.0, 2.0], "held-out rows never reach the search"
        assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(len(X)))
    searched = len(seen[0][1])
    assert f"search on {searched} of {train_rows} training rows" in logged, "both sizes are logged"
    assert f"on {train_rows} rows" in logged  # the refit's timed step names all the rows

    model = load_model(config, champion_version(config))
    assert model.metadata.training_rows == train_rows
    assert {c["search_rows"] for c in model.metadata.candidates.values()} == {searched}
    # The stored out-of-fold rows (the threshold is re-chosen on them) are exactly the searched rows,
    # whole customers each, and no customer sits on both sides of a fold.
    oof = oof_rows(config, str(model.version))
    assert len(oof) == searched
    per_customer = oof.groupby("key").size()
    assert (per_customer == TRAIN_SNAPSHOTS).all(), "a sampled customer keeps all its training snapshots"
    assert result.oot_metrics["rows"] == CUSTOMERS

    # Permutation importance re-scores a capped sample of the held-out rows, not all of them.
    assert f"permutation importance on 200 of {CUSTOMERS} held-out rows" in logged
    permutation = query(config, "select * from feature_importance where run_id = 'sampled' and "
                                "importance_type = 'permutation'")
    assert len(permutation) == 4 and permutation["value"].notna().all()


def test_search_sample_never_splits_a_customer_across_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mart = synthetic_mart(customers=CUSTOMERS, snapshots=TRAIN_SNAPSHOTS + 1)
    config = synthetic_warehouse(tmp_path, monkeypatch, mart, {"training": {"search_rows": SEARCH_ROWS}})
    data = train_module.load_training_data(config)
    matrix = train_module.training_matrix(config, data)
    keys = data.train_frame["customer_id"].to_numpy()[matrix.search.rows]
    assert len(keys) <= SEARCH_ROWS < len(matrix.y)
    for fit_idx, val_idx in matrix.search.folds:
        assert set(keys[fit_idx]).isdisjoint(keys[val_idx])
    for split, (fit_idx, val_idx) in zip(matrix.search.stopping, matrix.search.folds, strict=True):
        assert split is not None
        assert set(keys[split[1]]) <= set(keys[fit_idx]) and set(keys[split[1]]).isdisjoint(keys[val_idx])


def test_the_refit_uses_the_rounds_early_stopping_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Planted: a fast learning rate and a generous bound, so early stopping must cut the rounds
    # well below n_estimators; a refit with the search's parameters would keep all 400.
    mart = synthetic_mart(customers=400, snapshots=4)
    config = synthetic_warehouse(tmp_path, monkeypatch, mart, {"training": {"early_stopping_rounds": 5}})
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, small_table_spaces={},
        search_spaces={"xgboost": {"n_estimators": (400,), "learning_rate": (0.5,), "max_depth": (4,)}}))
    result = train(config, run_id="stopped")
    assert result.algorithm == "xgboost"
    model = load_model(config, result.version)
    candidate = model.metadata.candidates["xgboost"]
    rounds = candidate["fold_rounds"]
    assert len(rounds) == 3 and max(rounds) < 400
    expected = int(round(float(np.mean(rounds))))
    assert model.params["n_estimators"] == expected
    assert model.pipeline.named_steps["model"].get_booster().num_boosted_rounds() == expected
    assert candidate["params"]["n_estimators"] == 400  # what was searched stays on record

