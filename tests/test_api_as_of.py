"""GET /customers/{id}/score?as_of=<an earlier published night> answers what that night's nightly scored."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterator

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from ml.config import ChurnConfig
from ml.modeling.score import score
from ml.serving.api import ScoringService, asgi_app
from ml.serving.features import LandingIndex, read_landing_rows
from ml.serving.publish import publish
from ml.serving.state import answer_value
from ml.warehouse import Session, connect, quote
from tests.conftest import QUICK_TRAINING, copy_warehouse


@pytest.fixture(scope="module")
def with_history(published_warehouse: ChurnConfig,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[ChurnConfig, dt.date]:
    """A published warehouse whose history also holds the night before tonight.

    That night is scored as its nightly scored it: the mart's newer snapshots
    are set aside so it is the newest (its rows only read events before it;
    tests/test_leakage.py holds the mart to that), then tonight is scored again
    and the whole is published.
    """
    config = copy_warehouse(published_warehouse, tmp_path_factory.mktemp("history"), QUICK_TRAINING)
    mart, as_of = quote(config.dataset.feature_mart), quote(config.problem.as_of_column)
    with connect(config.warehouse.build_db) as session:
        dates = [pd.Timestamp(d).date() for (d,) in session.rows(f"select distinct {as_of} from {mart} order by 1")]
        past = dates[-2]
        session.execute(f"create table later_snapshots as select * from {mart} where {as_of} > ?", [past])
        session.execute(f"delete from {mart} where {as_of} > ?", [past])
    score(config, run_id="the-night-before")
    with connect(config.warehouse.build_db) as session:
        session.execute(f"insert into {mart} select * from later_snapshots")
        session.execute("drop table later_snapshots")
    score(config, run_id="tonight")
    publish(config, run_id="with-history")
    return config, past


@pytest.fixture(scope="module")
def history_service(with_history: tuple[ChurnConfig, dt.date],
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScoringService]:
    svc = ScoringService(with_history[0], workdir=tmp_path_factory.mktemp("serve-history"))
    yield svc
    svc.close()


def test_past_night_matches_its_scored_rows(with_history: tuple[ChurnConfig, dt.date],
                                            history_service: ScoringService) -> None:
    config, past = with_history
    state = history_service.state
    assert past in state.served_dates and past != state.tonight
    a = quote(config.problem.as_of_column)
    with connect(config.warehouse.published_db, read_only=True) as session:
        night = session.frame(f"select * from churn_scores_history where {a} = ? order by churn_probability desc",
                              [past]).set_index("customer_id")
    with connect(config.warehouse.build_db, read_only=True) as session:
        features = session.frame(f"select * from {quote(config.dataset.feature_mart)} where {a} = ?",
                                 [past]).set_index("customer_id")
    names = state.model.contract.feature_names
    n = len(night)
    sample = [night.index[i] for i in (0, 1, n // 2, n - 1)]
    changed = 0
    with TestClient(asgi_app(history_service)) as client:
        for customer_id in sample:
            response = client.get(f"/customers/{customer_id}/score", params={"as_of": past.isoformat()})
            assert response.status_code == 200, response.text
            answer, expected = response.json(), night.loc[customer_id]
            assert answer["as_of"] == past.isoformat()
            assert answer["churn_probability"] == pytest.approx(expected["churn_probability"], abs=1e-9)
            assert answer["will_churn"] == bool(expected["will_churn"])
            assert answer["risk_band"] == expected["risk_band"]
            assert answer["model_version"] == expected["model_version"]
            if expected["will_churn"]:  # the nightly explains flagged customers (scoring.reasons_for)
                assert answer["reasons"][0]["feature"] == expected["reason_1"]
            else:
                assert pd.isna(expected["reason_1"]) and answer["reasons"]
            assert answer["features"] == pytest.approx(
                {f: answer_value(features.loc[customer_id, f]) for f in names}, abs=1e-9)
            tonight = state.answers.get(customer_id)
            changed += tonight is None or tonight["churn_probability"] != answer["churn_probability"]
    assert changed, "the past night's answers equal tonight's: the as_of route served tonight's state"


def test_the_by_customer_copy_holds_what_the_files_hold_before_the_served_nights(
        with_history: tuple[ChurnConfig, dt.date], history_service: ScoringService) -> None:
    """GET ?as_of= reads a sorted copy of the landing rows: the files' rows, none a served night cannot see."""
    config, past = with_history
    state = history_service.state
    assert state.landing is not None, "an earlier served night and a small landing: the copy should be built"
    compiled = history_service.compiled
    customers = sorted(state.answers)[:5]
    for as_of in (past, past - dt.timedelta(days=40)):
        from_files = read_landing_rows(compiled, customers, as_of=as_of)
        from_copy = state.landing.rows(customers, as_of)
        for source in compiled.sources:
            def key(row: dict) -> tuple:
                return tuple(str(v) for v in row.values())
            assert sorted(from_copy[source.name], key=key) == sorted(from_files[source.name], key=key), source.name
    # the copy leaves out the rows dated on or after the newest night before tonight: none of them can see those
    dated = next(s for s in compiled.sources if s.date_column is not None)
    with state.landing.session.cursor() as cursor:
        newest = cursor.scalar(f"select max({quote(dated.date_column)}) from {state.landing.relations[dated.name]}")
    assert pd.Timestamp(newest).date() < past


def test_a_landing_too_big_to_copy_is_read_from_the_files(with_history: tuple[ChurnConfig, dt.date],
                                                            history_service: ScoringService,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    config, past = with_history
    small = dataclasses.replace(config, serving=dataclasses.replace(config.serving, landing_index_max_rows=10))
    service = ScoringService(small, workdir=tmp_path_factory.mktemp("serve-no-index"))
    try:
        assert service.state.landing is None
        a = quote(config.problem.as_of_column)
        with connect(config.warehouse.published_db, read_only=True) as session:
            customer = session.scalar(f"select min(customer_id) from churn_scores_history where {a} = ?", [past])
        from_files = service.score_customer(customer, past)
        assert from_files == history_service.score_customer(customer, past)
    finally:
        service.close()


def copied_rows(index: LandingIndex) -> int:
    """The rows the sorted copy holds, over all sources."""
    with index.session.cursor() as cursor:
        return sum(int(cursor.scalar(f"select count(*) from {relation}")) for relation in index.relations.values())


def test_the_copy_reads_each_landing_file_once_and_a_cap_one_row_short_turns_it_off(
        with_history: tuple[ChurnConfig, dt.date], history_service: ScoringService,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Planted: a cap of exactly the copy's rows builds it, one row fewer leaves the route on the files.

    Every statement the build runs is recorded: counting the rows first and then
    copying them read each landing file twice; the copy alone reads it once.
    """
    config, _ = with_history
    state, compiled = history_service.state, history_service.compiled
    total = copied_rows(state.landing)
    statements: list[str] = []
    execute, one = Session.execute, Session.one
    monkeypatch.setattr(Session, "execute", lambda self, sql, params=None: (statements.append(sql),
                                                                             execute(self, sql, params))[1])
    monkeypatch.setattr(Session, "one", lambda self, sql, params=None: (statements.append(sql),
                                                                         one(self, sql, params))[1])

    def reads() -> dict[str, int]:
        return {s.name: sum(s.relation in sql for sql in statements) for s in compiled.sources}

    exact = LandingIndex.build(compiled, state.served_dates, state.tonight, config.warehouse.engine, total)
    assert exact is not None, f"a cap of the copy's own {total} rows refused it"
    try:
        assert copied_rows(exact) == total
        assert reads() == {s.name: 1 for s in compiled.sources}
    finally:
        exact.close()
    statements.clear()
    with caplog.at_level(logging.INFO, logger="churn"):
        short = LandingIndex.build(compiled, state.served_dates, state.tonight, config.warehouse.engine, total - 1)
    assert short is None
    assert f"reads the landing files: they hold more than serving.landing_index_max_rows ({total - 1:,d})" \
        in caplog.text
    assert max(reads().values()) == 1
