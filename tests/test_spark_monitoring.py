"""Monitoring, the operating point and the definitions check read the data plane on Spark as on DuckDB.

On Spark the big tables (the mart, churn_scores, churn_scores_history) live on
the engine and the small control-plane tables stay in the build DuckDB, so
these stages read the former through a `data` reader (`ml.warehouse.Reader`)
and keep reading and writing the latter in DuckDB. A warehouse after one
complete DuckDB nightly, with an earlier labelled snapshot's scores added to
its history (and a few scored customers the mart no longer has), is exported
to Parquet and saved as Spark tables in 4 partitions (so Spark's row order is
not DuckDB's), and then, through the Spark reader against through DuckDB:
- `read_tonight` returns the same scores (sorted by key) and the same drift digests, computed by
  SQL on each engine (counts, bins, sketches and levels identical; moments to 1e-9);
- `measure` writes the same drift_stats (names and flags identical, values to
  1e-9: the same numbers summed in another order) and the same estimated and
  realized model_performance rows, missing labels counted alike, with the
  mart and scores dropped from its DuckDB (only the control plane left there);
- the labelled-date counts the retraining policy reads are the same;
- tonight's probabilities from Spark's churn_scores give the same operating
  point under a capacity;
- the feature-definitions check finds the same redefined feature, on the
  out-of-time rows and on held-out keys joined where the mart is;
- a Spark mart missing a contract column, and scores of another model, are
  refused with DuckDB's error and message.
The tests without the `spark` mark need no pyspark and run in `make test`:
every statement these reads send, recorded through a reader that offers only
the `Reader` vocabulary, passes the dialect lint (no DuckDB-only SQL), the
one-`?`-per-date filter selects what DuckDB's list parameter did, and the
threshold choice is pure on the probabilities, in any order.

The Spark tables are added to the process's one Spark session
(`spark_warehouse`, conftest), under the names the nightly gives them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.features.contract import ContractError, FeatureContract
from ml.features.dialect_lint import lint_text
from ml.features.mart import (
    count_labelled_dates_after,
    dates_in,
    fully_labelled_dates,
    load_evaluation_rows,
)
from ml.modeling import operating_point
from ml.modeling.definitions import SQL, VALUES, check_definitions
from ml.modeling.model import ChurnModel
from ml.modeling.registry import load_champion
from ml.modeling.score import HISTORY_TABLE, SCORES_TABLE, tonight_probabilities
from ml.monitoring import monitor as mon
from ml.monitoring.digest import NumericDigest
from ml.warehouse import Session, TableSpec, connect, quote
from tests.conftest import QUICK_TRAINING, copy_warehouse, query

# Scored customers of the past snapshot that the mart no longer has (realized metrics count them).
GHOSTS = 7
# Columns that name the run rather than what was measured.
RUN_COLUMNS = ["run_id", "computed_at"]
TOLERANCE = 1e-9


# ---------------------------------------------------------------- helpers


@dataclass
class RecordingReader:
    """Exactly the `Reader` vocabulary over a DuckDB session, recording every statement it is sent.

    A read that needed more than a Reader (DuckDB's chunks, a write) fails here
    with AttributeError; the recorded SQL is what Spark would be sent.
    """

    inner: Session
    statements: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.inner.path

    def frame(self, sql: str, params: Any = None) -> pd.DataFrame:
        self.statements.append(sql)
        return self.inner.frame(sql, params)

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        self.statements.append(sql)
        return self.inner.rows(sql, params)

    def one(self, sql: str, params: Any = None) -> tuple[Any, ...] | None:
        self.statements.append(sql)
        return self.inner.one(sql, params)

    def scalar(self, sql: str, params: Any = None) -> Any:
        self.statements.append(sql)
        return self.inner.scalar(sql, params)

    def chunks(self, sql: str, params: Any = None, chunk_rows: int = 200_000,
               always_one: bool = False) -> Iterator[pd.DataFrame]:
        self.statements.append(sql)
        return self.inner.chunks(sql, params, chunk_rows, always_one)

    def exists(self, table: str | TableSpec) -> bool:
        return self.inner.exists(table)

    def columns(self, table: str | TableSpec) -> dict[str, str]:
        return self.inner.columns(table)

    def registered(self, frame: pd.DataFrame) -> AbstractContextManager[str]:
        return self.inner.registered(frame)


def _duckdb(config: ChurnConfig) -> AbstractContextManager[Session]:
    return connect(config.warehouse.build_db, read_only=True)


def _sorted(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    return frame.sort_values(key, kind="mergesort", ignore_index=True)


def _same_numbers(left: Any, right: Any) -> bool:
    """Equal JSON values, numbers to TOLERANCE (summaries hold means summed in engine order)."""
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_same_numbers(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_same_numbers(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, float) or isinstance(right, float):
        return isinstance(left, int | float) and isinstance(right, int | float) and math.isclose(
            left, right, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
    return left == right


def assert_close_frames(left: pd.DataFrame, right: pd.DataFrame, exact: list[str]) -> None:
    """`exact` columns identical, every other column numerically equal to TOLERANCE (NULL = NULL)."""
    assert list(left.columns) == list(right.columns)
    assert len(left) == len(right) > 0
    for column in left.columns:
        if column in exact:
            pd.testing.assert_series_equal(left[column], right[column], check_dtype=False, obj=column)
        else:
            a = pd.to_numeric(left[column], errors="coerce").to_numpy(dtype=float)
            b = pd.to_numeric(right[column], errors="coerce").to_numpy(dtype=float)
            np.testing.assert_allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True, err_msg=column)


def _redefined_model(model: ChurnModel, feature: str) -> ChurnModel:
    """`model` as if trained on other mart SQL, with `feature`'s recorded values changed: the check must
    re-read the held-out rows, find every other feature unchanged and name `feature` redefined."""
    recorded = dict(model.metadata.feature_definitions or {})
    recorded[SQL] = "sql-of-an-older-mart"
    recorded[VALUES] = {**recorded[VALUES], feature: "values-of-an-older-definition"}
    return dataclasses.replace(model, metadata=dataclasses.replace(model.metadata, feature_definitions=recorded))


def _held_out_keys(config: ChurnConfig, contract: FeatureContract, rows: int) -> dict[str, Any]:
    """A held-out-keys validation (as stratified_holdout models store it) of `rows` labelled mart rows."""
    picked = query(config, f"select {quote(contract.key)} k, {quote(contract.as_of)} a "
                           f"from {quote(config.dataset.feature_mart)} where {quote(contract.label)} is not null "
                           f"order by md5(cast({quote(contract.key)} as varchar)), a limit {rows}")
    keys = [[k, str(pd.Timestamp(a).date())] for k, a in zip(picked["k"], picked["a"], strict=True)]
    return {"strategy": "stratified_holdout", "eval_as_of_dates": [], "eval_keys": keys}


def _add_past_history(config: ChurnConfig) -> None:
    """The latest fully labelled snapshot scored by the champion into churn_scores_history, as an
    earlier night would have, plus GHOSTS scored customers the mart no longer has."""
    model = load_champion(config)
    c = model.contract
    with connect(config.warehouse.build_db) as session:
        past = fully_labelled_dates(session, config, c)[-1].date()
        rows = session.frame(f"select * from {quote(config.dataset.feature_mart)} where {quote(c.as_of)} = ?",
                             [past])
        probability = model.predict_proba(rows)
        scored = pd.DataFrame({c.key: rows[c.key], c.as_of: rows[c.as_of], "churn_probability": probability,
                               "will_churn": probability >= model.threshold})
        ghosts = scored.head(GHOSTS).assign(**{c.key: [f"gone-{i}" for i in range(GHOSTS)]})
        history = pd.concat([scored, ghosts], ignore_index=True).assign(model_version=model.version,
                                                                        run_id="past-night")
        with session.registered(history) as incoming:
            session.execute(f"insert into {quote(HISTORY_TABLE)} by name select * from {incoming}")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def history_warehouse(published_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    """After one complete nightly, with an earlier labelled snapshot in the scored history. Read-only."""
    config = copy_warehouse(published_warehouse, tmp_path_factory.mktemp("history"), QUICK_TRAINING)
    _add_past_history(config)
    return config


@pytest.fixture(scope="module")
def champion(history_warehouse: ChurnConfig) -> ChurnModel:
    model = load_champion(history_warehouse)
    assert model is not None and model.metadata.feature_definitions
    return model


@pytest.fixture(scope="module")
def on_spark(history_warehouse: ChurnConfig, spark_warehouse, tmp_path_factory: pytest.TempPathFactory):
    """The process's Spark session holding the warehouse's data plane (mart and both score tables),
    each table the Parquet export of its DuckDB table, in 4 partitions."""
    from ml.warehouse.spark import SCHEMA

    folder = tmp_path_factory.mktemp("data_plane")
    tables = [history_warehouse.dataset.feature_mart, SCORES_TABLE, HISTORY_TABLE]
    with _duckdb(history_warehouse) as session:
        for table in tables:
            session.execute(f"copy {quote(table)} to '{folder / table}.parquet' (format parquet)")
    for table in tables:
        frame = spark_warehouse.spark.read.parquet(str(folder / f"{table}.parquet"))
        frame.repartition(4).write.mode("overwrite").saveAsTable(f"{SCHEMA}.{table}")
        spark_warehouse.rows(f"refresh table {SCHEMA}.{table}")  # an earlier module's reads may have cached it
    return spark_warehouse


def _without_data_plane(config: ChurnConfig) -> ChurnConfig:
    """The build DuckDB with only its control plane, as on a Spark nightly: whatever still reads the
    mart or the scores from it fails instead of passing unnoticed."""
    with connect(config.warehouse.build_db) as session:
        for table in (config.dataset.feature_mart, SCORES_TABLE, HISTORY_TABLE):
            session.execute(f"drop table {quote(table)}")
    return config


@pytest.fixture(scope="module")
def measured(history_warehouse: ChurnConfig, on_spark, tmp_path_factory: pytest.TempPathFactory):
    """`measure` on two copies of the warehouse: one reading the data plane from DuckDB, one from Spark
    (its DuckDB holding the control plane only)."""
    duck = copy_warehouse(history_warehouse, tmp_path_factory.mktemp("measured_duckdb"), QUICK_TRAINING)
    spark = _without_data_plane(
        copy_warehouse(history_warehouse, tmp_path_factory.mktemp("measured_spark"), QUICK_TRAINING))
    return duck, mon.measure(duck, run_id="on-duckdb"), spark, mon.measure(spark, run_id="on-spark", data=on_spark)


# ---------------------------------------------------------------- without pyspark


def test_dates_in_binds_one_parameter_per_date() -> None:
    """The engine-neutral date filter selects what DuckDB's list parameter selected, and nothing for no dates."""
    sql, params = dates_in("d", ["2024-01-31", dt.date(2024, 3, 31)])
    assert sql == 'cast("d" as date) in (?, ?)' and params == [dt.date(2024, 1, 31), dt.date(2024, 3, 31)]
    assert dates_in("d", []) == ("1 = 0", [])
    with connect(":memory:") as session:
        session.execute("create table t as select cast(d as date) d from "
                        "(values ('2024-01-31'), ('2024-02-29'), ('2024-03-31')) v(d)")
        listed = session.rows("select d from t where d in (select unnest(?::date[])) order by d",
                              [["2024-01-31", "2024-03-31"]])
        assert session.rows(f"select d from t where {sql} order by d", params) == listed
        assert session.rows(f"select d from t where {dates_in('d', [])[0]}") == []


def test_threshold_choice_is_pure_and_ignores_row_order(small_config: ChurnConfig) -> None:
    rng = np.random.default_rng(3)
    probability = rng.random(1000)
    capped = dataclasses.replace(small_config, operating_point=dataclasses.replace(
        small_config.operating_point, capacity_customers=None, capacity_share=0.05))
    rule = operating_point.RuleChoice("recall", 0.3, None)
    point = operating_point.choose(capped, rule, None, probability)
    assert point == operating_point.choose(capped, rule, None, rng.permutation(probability))
    assert point.capacity_limited and point.flagged <= point.capacity_rows == 50 and point.rule == "recall"
    pinned = operating_point.choose(capped, rule, 0.99, probability)
    assert pinned.rule == operating_point.RULE_PINNED and not pinned.capacity_limited


def test_data_plane_reads_use_only_the_reader_vocabulary_and_shared_sql(history_warehouse: ChurnConfig,
                                                                         champion: ChurnModel) -> None:
    """Every statement monitoring, the operating point and the definitions check send to the data
    plane passes the dialect lint that keeps the dbt project buildable on Spark."""
    config, c = history_warehouse, champion.contract
    with _duckdb(config) as session:
        data = RecordingReader(session)
        tonight = mon.read_tonight(session, config, champion, data=data)
        before = tonight.as_of_date + dt.timedelta(days=1)
        realized = mon.realized_performance(session, config, c, before, "check", data=data)
        with pytest.raises(mon.MonitorError, match="holds no rows"):
            mon.current_scores(data, c, tonight.as_of_date, "not-the-champion")
        count_labelled_dates_after(data, config, c, tonight.as_of_date - dt.timedelta(days=400))
        tonight_probabilities(data, c, tonight.as_of_date, str(champion.version))
        check = check_definitions(data, config, _redefined_model(champion, c.feature_names[0]))
        load_evaluation_rows(data, config, c, _held_out_keys(config, c, 50))
    assert len(realized) and check.redefined == (c.feature_names[0],)
    sent = "\n".join(data.statements)
    for table in (config.dataset.feature_mart, SCORES_TABLE, HISTORY_TABLE):
        assert quote(table) in sent
    findings = [f"{finding.message}: {sql}" for sql in data.statements for finding in lint_text(sql, Path("sql"))]
    assert not findings, "\n".join(findings)
    assert "?::" not in sent


# ---------------------------------------------------------------- on Spark local mode


@pytest.mark.spark
def test_tonight_reads_the_same_frames_on_spark(history_warehouse: ChurnConfig, champion: ChurnModel,
                                                on_spark) -> None:
    key = champion.contract.key
    with _duckdb(history_warehouse) as session:
        duck = mon.read_tonight(session, history_warehouse, champion)
        spark = mon.read_tonight(session, history_warehouse, champion, data=on_spark)
    assert spark.as_of_date == duck.as_of_date and spark.top_features == duck.top_features
    assert duck.rows == spark.rows == len(duck.scores) > 0
    assert not spark.scores[key].equals(duck.scores[key]), "Spark's row order must differ to prove anything"
    pd.testing.assert_frame_equal(_sorted(spark.scores, key), _sorted(duck.scores, key))
    # Digests: counts, bins, sketches and levels identical (percentile_approx is exact below its
    # accuracy's row count); moments the same sums in another order.
    assert spark.digests.keys() == duck.digests.keys() == set(champion.contract.feature_names)
    for name, ours in duck.digests.items():
        theirs = spark.digests[name]
        if isinstance(ours, NumericDigest):
            assert (theirs.n, theirs.nulls, theirs.bin_counts, theirs.sketch, theirs.median) == \
                (ours.n, ours.nulls, ours.bin_counts, ours.sketch, ours.median), name
            assert theirs.mean == pytest.approx(ours.mean, rel=1e-9, abs=1e-12), name
            assert theirs.std == pytest.approx(ours.std, rel=1e-9, abs=1e-12), name
        else:
            assert dict(theirs.counts) == dict(ours.counts), name


@pytest.mark.spark
def test_measure_writes_the_same_drift_from_spark(measured) -> None:
    duck_config, duck, spark_config, spark = measured
    assert (spark.as_of_date, spark.model_version) == (duck.as_of_date, duck.model_version)
    assert spark.drifted_features == duck.drifted_features
    assert spark.top_features_drifted == duck.top_features_drifted
    order = "order by feature, kind, statistic"
    left = query(spark_config, f"select * from drift_stats where run_id = 'on-spark' {order}").drop(columns=RUN_COLUMNS)
    right = query(duck_config, f"select * from drift_stats where run_id = 'on-duckdb' {order}").drop(
        columns=RUN_COLUMNS)
    assert len(right) == len(duck.drift_rows)
    assert_close_frames(left.drop(columns="current_summary"), right.drop(columns="current_summary"),
                        exact=["as_of_date", "model_version", "feature", "kind", "statistic", "drifted",
                               "reference_summary"])
    for a, b in zip(left["current_summary"], right["current_summary"], strict=True):
        assert _same_numbers(json.loads(a), json.loads(b)), (a, b)


@pytest.mark.spark
def test_measure_writes_the_same_performance_from_spark(measured) -> None:
    """Estimated metrics of tonight's scores, and realized ones of the earlier snapshot joined to its labels."""
    duck_config, duck, spark_config, spark = measured
    assert spark.estimated == pytest.approx(duck.estimated, rel=TOLERANCE, abs=TOLERANCE)
    assert len(duck.realized) == 1 and duck.realized["missing_labels"].tolist() == [GHOSTS]
    assert_close_frames(spark.realized.drop(columns="run_id"), duck.realized.drop(columns="run_id"),
                        exact=["as_of_date", "model_version", "kind", "n_rows", "missing_labels"])
    order = "order by kind, as_of_date"
    left = query(spark_config, f"select * from model_performance where run_id = 'on-spark' {order}")
    right = query(duck_config, f"select * from model_performance where run_id = 'on-duckdb' {order}")
    assert_close_frames(left.drop(columns=RUN_COLUMNS), right.drop(columns=RUN_COLUMNS),
                        exact=["as_of_date", "model_version", "kind", "n_rows", "missing_labels"])


@pytest.mark.spark
def test_labelled_dates_for_the_policy_are_counted_alike(history_warehouse: ChurnConfig, champion: ChurnModel,
                                                         measured, on_spark) -> None:
    duck_config, duck, spark_config, spark = measured
    first = fully_labelled_dates(on_spark, history_warehouse, champion.contract)[0].date()
    with _duckdb(history_warehouse) as session:
        assert fully_labelled_dates(on_spark, history_warehouse, champion.contract) == \
            fully_labelled_dates(session, history_warehouse, champion.contract)
        counted = count_labelled_dates_after(session, history_warehouse, champion.contract, first)
    assert counted > 0
    assert count_labelled_dates_after(on_spark, history_warehouse, champion.contract, first) == counted
    today = duck.as_of_date
    assert (mon.policy_inputs(spark_config, spark, today, data=on_spark).new_labelled_snapshots
            == mon.policy_inputs(duck_config, duck, today).new_labelled_snapshots)


@pytest.mark.spark
def test_operating_point_from_spark_scores_equals_duckdb(history_warehouse: ChurnConfig, champion: ChurnModel,
                                                         on_spark) -> None:
    c, version = champion.contract, str(champion.version)
    capped = dataclasses.replace(history_warehouse, operating_point=dataclasses.replace(
        history_warehouse.operating_point, capacity_customers=None, capacity_share=0.02))
    rule = operating_point.rule_choice(capped, champion)
    with _duckdb(history_warehouse) as session:
        as_of_date = mon.current_snapshot(session, history_warehouse, c)
        duck = tonight_probabilities(session, c, as_of_date, version)
        pin = operating_point.current_pin(session, version)
    spark = tonight_probabilities(on_spark, c, as_of_date, version)
    assert np.array_equal(np.sort(spark), np.sort(duck)) and len(duck) > 0
    point = operating_point.choose(capped, rule, pin, spark)
    assert point == operating_point.choose(capped, rule, pin, duck)
    assert point.capacity_limited and point.flagged <= point.capacity_rows


@pytest.mark.spark
def test_definitions_check_finds_the_same_redefinition_on_spark(history_warehouse: ChurnConfig,
                                                                champion: ChurnModel, on_spark) -> None:
    c = champion.contract
    assert champion.metadata.validation["strategy"] == "out_of_time"
    tampered = _redefined_model(champion, c.feature_names[-1])
    with _duckdb(history_warehouse) as session:
        duck = check_definitions(session, history_warehouse, tampered)
        unchanged = check_definitions(session, history_warehouse, champion)
    assert duck.sql_changed and duck.redefined == (c.feature_names[-1],) and not duck.notes
    assert check_definitions(on_spark, history_warehouse, tampered) == duck
    assert check_definitions(on_spark, history_warehouse, champion) == unchanged


@pytest.mark.spark
def test_held_out_keys_are_joined_on_spark(history_warehouse: ChurnConfig, champion: ChurnModel, on_spark) -> None:
    """A held-out-keys model's evaluation rows: the keys registered as a temporary view beside the Spark mart."""
    c = champion.contract
    validation = _held_out_keys(history_warehouse, c, 200)
    with _duckdb(history_warehouse) as session:
        duck = load_evaluation_rows(session, history_warehouse, c, validation)
    spark = load_evaluation_rows(on_spark, history_warehouse, c, validation)
    assert len(duck) == 200
    by = [c.key, c.as_of]
    pd.testing.assert_frame_equal(spark.sort_values(by, ignore_index=True), duck.sort_values(by, ignore_index=True))
    assert not [row for row in on_spark.rows("show views") if str(row[1]).startswith("_frame_")]


def _refusal(read: Callable[[], object]) -> str:
    """The message of the ContractError `read` raises."""
    with pytest.raises(ContractError) as caught:
        read()
    return str(caught.value)


@pytest.mark.spark
def test_a_spark_mart_without_a_contract_column_is_refused_as_on_duckdb(
    history_warehouse: ChurnConfig, champion: ChurnModel, on_spark, tmp_path: Path,
) -> None:
    from ml.warehouse.spark import SCHEMA

    dropped = champion.contract.feature_names[0]
    broken = f"{history_warehouse.dataset.feature_mart}_monitored_without_{dropped}"
    on_spark.table(history_warehouse.dataset.feature_mart).drop(dropped).write.mode("overwrite") \
        .saveAsTable(f"{SCHEMA}.{broken}")
    config = copy_warehouse(history_warehouse, tmp_path / "broken", QUICK_TRAINING)
    with connect(config.warehouse.build_db) as session:
        session.execute(f"create table {quote(broken)} as select * exclude ({quote(dropped)}) "
                        f"from {quote(config.dataset.feature_mart)}")
    config = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, feature_mart=broken))
    with _duckdb(config) as session:
        on_duckdb = _refusal(lambda: mon.read_tonight(session, config, champion))
        on_engine = _refusal(lambda: mon.read_tonight(session, config, champion, data=on_spark))
    assert on_engine == on_duckdb
    assert broken in on_duckdb and f"missing column(s) {dropped}" in on_duckdb


@pytest.mark.spark
def test_scores_of_another_model_are_refused_as_on_duckdb(history_warehouse: ChurnConfig, champion: ChurnModel,
                                                          on_spark) -> None:
    c = champion.contract
    with _duckdb(history_warehouse) as session:
        as_of_date = mon.current_snapshot(session, history_warehouse, c)
        with pytest.raises(mon.MonitorError) as on_duckdb:
            mon.current_scores(session, c, as_of_date, "not-the-champion")
    with pytest.raises(mon.MonitorError) as on_engine:
        mon.current_scores(on_spark, c, as_of_date, "not-the-champion")
    assert str(on_engine.value) == str(on_duckdb.value)
    assert f"from {champion.version}" in str(on_duckdb.value)
