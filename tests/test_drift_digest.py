"""Drift digests: SQL on the engine gives what the values in memory give, and drift needs nothing more.

- The SQL digest of a column on DuckDB equals its in-memory digest (the route
  the in-process DuckDB session takes: columns read, digested in Python): counts,
  PSI bin counts (values lying exactly on a bin edge planted), sketch and
  median identical, moments to 1e-12; categorical level counts keyed alike
  for text, booleans and integers, nulls as their own level.
- Drift rows from SQL digests equal drift rows from the values.
- Sketch against sketch stays close to the all-rows statistics: KS within
  2/SKETCH_SIZE of scipy's exact two-sample figure, Wasserstein within a small
  fraction of a standard deviation.
- Monitoring on the trained warehouse, through a reader that is not the
  in-process DuckDB session (as Spark is not), fetches no feature row: every
  statement it sends to the mart returns at most a level count's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ml.config import ChurnConfig, load_config
from ml.modeling.reference import DriftReference, categorical_reference, numeric_reference
from ml.modeling.registry import load_champion
from ml.modeling.score import score
from ml.monitoring import digest, drift
from ml.monitoring import monitor as mon
from ml.monitoring.digest import SKETCH_SIZE, CategoricalDigest, NumericDigest
from ml.warehouse import MEMORY, Session, connect, quote
from tests.conftest import QUICK_TRAINING, REPO_ROOT, CountingReader, copy_warehouse


@pytest.fixture(scope="module")
def monitoring():
    return load_config(REPO_ROOT / "churn.yml").monitoring


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3, size=n).astype(float)  # ties on every edge
    counts[rng.uniform(size=n) < 0.1] = np.nan
    return pd.DataFrame({
        "amount": rng.lognormal(3, 1, size=n),
        "sessions": counts,
        "flag": rng.uniform(size=n) < 0.3,
        "plan": pd.array(rng.choice(["basic", "pro", None], p=[0.6, 0.3, 0.1], size=n), dtype="string"),
        "seats": rng.choice([1, 2, 5], size=n),
        "paperless": pd.array(rng.choice([True, False, None], size=n), dtype="boolean"),
    })


NUMERIC = ["amount", "sessions", "flag"]
CATEGORICAL = ["plan", "seats", "paperless"]


def _sql_digests(session: Session, frame: pd.DataFrame, references: dict[str, Any]) -> dict[str, Any]:
    numeric, categorical = digest.reference_kinds(references)
    with session.registered(frame) as name:
        return {**digest.numeric_digests(session, quote(name), numeric),
                **digest.categorical_digests(session, quote(name), categorical)}


def _references(train: pd.DataFrame, monitoring) -> dict[str, Any]:
    refs: dict[str, Any] = {name: numeric_reference(train[name], monitoring) for name in NUMERIC}
    refs.update({name: categorical_reference(train[name]) for name in CATEGORICAL})
    return refs


def test_sql_digest_equals_the_in_memory_digest(monitoring) -> None:
    train, tonight = _frame(5_000, 0), _frame(3_000, 1)
    references = _references(train, monitoring)
    on_edge = references["sessions"].bin_edges[0]
    assert (tonight["sessions"] == on_edge).sum() > 100, "values on a bin edge must be planted"
    with connect(MEMORY) as session:
        from_sql = _sql_digests(session, tonight, references)
        with session.registered(tonight) as name:  # the in-process route: columns read, digested here
            fetched = digest.snapshot_digests(session, quote(name), references)
    for name in NUMERIC:
        ours, memory = from_sql[name], fetched[name]
        assert memory == NumericDigest.of_values(tonight[name], references[name])
        assert (ours.n, ours.nulls, ours.bin_counts, ours.sketch, ours.median) == \
            (memory.n, memory.nulls, memory.bin_counts, memory.sketch, memory.median), name
        assert ours.mean == pytest.approx(memory.mean, rel=1e-12) and ours.std == pytest.approx(memory.std, rel=1e-12)
        assert len(ours.sketch) == SKETCH_SIZE and sum(ours.bin_counts) == ours.present
    for name in CATEGORICAL:
        assert dict(from_sql[name].counts) == dict(fetched[name].counts) == \
            dict(CategoricalDigest.of_values(tonight[name]).counts), name
    assert set(from_sql["paperless"].counts) == {"True", "False", "__null__"}
    assert set(from_sql["seats"].counts) == {"1", "2", "5"}


def test_drift_rows_from_sql_digests_equal_drift_rows_from_values(monitoring) -> None:
    train, tonight = _frame(5_000, 2), _frame(3_000, 3)
    tonight["amount"] *= 1.5  # something to flag
    references = _references(train, monitoring)
    reference = DriftReference(features=references, score=numeric_reference(train["amount"], monitoring),
                                     n_rows=len(train), psi_bins=monitoring.psi_bins)
    kinds = {**{n: "numeric" for n in NUMERIC}, **{n: "categorical" for n in CATEGORICAL}}
    with connect(MEMORY) as session:
        from_sql = drift.feature_drift(reference, _sql_digests(session, tonight, references), kinds, monitoring)
    from_values = drift.feature_drift(reference, tonight, kinds, monitoring)
    assert [(r.feature, r.statistic, r.drifted) for r in from_sql] == \
        [(r.feature, r.statistic, r.drifted) for r in from_values]
    for ours, theirs in zip(from_sql, from_values, strict=True):
        assert ours.value == pytest.approx(theirs.value, rel=1e-9, abs=1e-12), (ours.feature, ours.statistic)
    assert "amount" in drift.drifted_features(from_sql)


def test_sketch_against_sketch_stays_close_to_all_rows(monitoring) -> None:
    rng = np.random.default_rng(4)
    train, tonight = rng.normal(size=200_000), rng.normal(loc=0.1, scale=1.2, size=100_000)
    reference = numeric_reference(train, monitoring)
    rows = drift.numeric_drift("x", reference, NumericDigest.of_values(tonight, reference), monitoring)
    ks = next(r for r in rows if r.statistic == drift.KS).value
    distance = next(r for r in rows if r.statistic == drift.WASSERSTEIN).value
    exact_ks = stats.ks_2samp(train, tonight).statistic
    exact_distance = stats.wasserstein_distance(train, tonight) / reference.spread
    assert abs(ks - exact_ks) <= 2 / SKETCH_SIZE + 1 / len(reference.sketch)
    assert abs(distance - exact_distance) <= 0.01


def test_monitoring_fetches_no_feature_rows(trained_warehouse: ChurnConfig, tmp_path: Path) -> None:
    """Planted: the old read pulled tonight's whole snapshot (one row per customer) to the driver."""
    config = copy_warehouse(trained_warehouse, tmp_path / "wh", QUICK_TRAINING)
    score(config)
    model = load_champion(config)
    mart = quote(config.dataset.feature_mart)
    with connect(config.warehouse.build_db) as session:
        reader = CountingReader(session)
        tonight = mon.read_tonight(session, config, model, data=reader)
    assert tonight.rows > 100 and set(tonight.digests) == set(model.contract.feature_names)
    from_mart = [(sql, n) for sql, n in reader.returned if mart in sql]
    assert from_mart, "monitoring must read the mart through the data reader"
    levels = sum(len(d.counts) for d in tonight.digests.values() if isinstance(d, CategoricalDigest))
    assert all(n <= max(levels, 1) for _, n in from_mart), [(sql[:80], n) for sql, n in from_mart]
