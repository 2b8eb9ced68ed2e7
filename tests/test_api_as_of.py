"""GET /customers/{id}/score?as_of=<an earlier published night> answers what that night's nightly scored."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from ml.config import ChurnConfig
from ml.modeling.score import score
from ml.serving.api import ScoringService, asgi_app
from ml.serving.publish import publish
from ml.serving.state import answer_value
from ml.warehouse import connect, quote
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
