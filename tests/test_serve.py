"""The real-time API: both routes agree with churn_scores, bad requests get a 4xx fast, nothing compiles per request."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import uvicorn
from fastapi.testclient import TestClient

from ml.config import ChurnConfig
from ml.features.contract import Feature, FeatureContract
from ml.modeling.explain import top_reasons
from ml.serving import features as features_module
from ml.serving.api import ScoringService, asgi_app
from ml.serving.features import RequestError, read_landing_rows, replace_relations
from ml.serving.state import AnswerIndex, ReasonCache, load_state
from ml.warehouse import connect
from tests.conftest import query


@pytest.fixture(scope="module")
def batch_scores(published_warehouse: ChurnConfig) -> pd.DataFrame:
    with connect(published_warehouse.warehouse.published_db, read_only=True) as con:
        return con.frame("select * from churn_scores order by risk_rank")


@pytest.fixture(scope="module")
def server_port(service: ScoringService) -> Iterator[int]:
    """A real uvicorn server on a free loopback port (raw-socket tests need one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def _sample_ids(batch_scores: pd.DataFrame) -> list[str]:
    """Customers across the ranking: the riskiest, the middle and the safest."""
    n = len(batch_scores)
    return [batch_scores.iloc[i]["customer_id"] for i in (0, 1, n // 2, n - 2, n - 1)]


def test_published_route_matches_churn_scores(client: TestClient, batch_scores: pd.DataFrame,
                                              service: ScoringService, published_warehouse: ChurnConfig) -> None:
    batch = batch_scores.set_index("customer_id")
    samples = _sample_ids(batch_scores)
    assert not batch.loc[samples[-1], "will_churn"]  # the safest customer: published without reasons
    for customer_id in samples:
        response = client.get(f"/customers/{customer_id}/score")
        assert response.status_code == 200, response.text
        answer, expected = response.json(), batch.loc[customer_id]
        assert answer["churn_probability"] == pytest.approx(expected["churn_probability"], abs=1e-9)
        assert answer["will_churn"] == bool(expected["will_churn"])
        assert answer["risk_band"] == expected["risk_band"]
        assert answer["model_version"] == expected["model_version"]
        if expected["will_churn"]:
            assert answer["reasons"][0]["feature"] == expected["reason_1"]
        else:  # explained on demand, exactly as the nightly would with scoring.reasons_for = all
            assert pd.isna(expected["reason_1"])
            state = service.state
            mart = published_warehouse.dataset.feature_mart
            row = query(published_warehouse, f'select * from "{mart}" where customer_id = ? and as_of_date = ?',
                        [customer_id, state.tonight])
            want = top_reasons(state.model, row, published_warehouse.scoring.top_reasons).iloc[0]
            k = published_warehouse.scoring.top_reasons
            assert [r["feature"] for r in answer["reasons"]] == [want[f"reason_{i}"] for i in range(1, k + 1)]
            assert [r["contribution"] for r in answer["reasons"]] == pytest.approx(
                [want[f"reason_{i}_contribution"] for i in range(1, k + 1)], abs=1e-9)
        assert set(answer["features"]) == set(service.state.model.contract.feature_names)


def test_answer_index_answers_what_the_published_rows_hold() -> None:
    """Each answer is assembled from the columns when asked, with the values the rows hold, as plain JSON.

    Planted: a customer scored twice (the last row answers) and featured twice
    (the first row answers), one with no features, missing reasons and
    contributions, NaN, infinity and pd.NA among the features, dates and
    timestamps, integer and text columns.
    """
    contract = FeatureContract(model="m", key="customer_id", as_of="as_of_date", label="churned", features=(
        Feature("tenure", "numeric"), Feature("seats", "numeric"), Feature("plan", "categorical"),
        Feature("last_seen", "numeric"), Feature("signup", "categorical")))
    day = pd.Timestamp("2025-12-01")
    scores = pd.DataFrame({
        "customer_id": ["A", "B", "C", "A"],
        "as_of_date": [day] * 4,
        "churn_probability": [0.1, 0.9, 0.5, 0.25],
        "will_churn": [False, True, False, True],
        "risk_band": ["low", "high", "medium", "high"],
        "model_version": ["v1"] * 4,
        "reason_1": [None, "tenure", None, "plan"], "reason_1_contribution": [np.nan, 0.75, np.nan, 0.5],
        "reason_2": [None, "seats", None, None], "reason_2_contribution": [np.nan, np.nan, np.nan, np.nan],
    })
    features = pd.DataFrame({
        "customer_id": ["A", "B", "A"],
        "tenure": [3.5, np.nan, 99.0],
        "seats": pd.array([2, pd.NA, 7], dtype="Int64"),
        "plan": ["pro", None, "free"],
        "last_seen": [np.inf, 1.25, 0.0],
        "signup": [pd.Timestamp("2024-01-05 10:30"), pd.NaT, pd.Timestamp("2020-01-01")],
    })
    answers = AnswerIndex(scores, features.set_index("customer_id", drop=False), contract)
    assert len(answers) == 3 and list(answers) == ["A", "B", "C"] and "D" not in answers
    assert answers["A"] == {
        "customer_id": "A", "as_of": "2025-12-01", "churn_probability": 0.25, "will_churn": True,
        "risk_band": "high", "model_version": "v1", "reasons": [{"feature": "plan", "contribution": 0.5}],
        "features": {"tenure": 3.5, "seats": 2, "plan": "pro", "last_seen": None, "signup": "2024-01-05"},
    }
    assert answers["B"]["reasons"] == [{"feature": "tenure", "contribution": 0.75},
                                       {"feature": "seats", "contribution": None}]
    assert answers["B"]["features"] == {"tenure": None, "seats": None, "plan": None, "last_seen": 1.25,
                                        "signup": None}
    assert answers["C"]["features"] == {} and answers["C"]["reasons"] == []
    assert answers.get("D") is None
    assert answers.unreasoned() == []  # C has no reasons but no features to explain them from
    assert AnswerIndex(scores.iloc[:3], features, contract).unreasoned() == ["A"]
    bare = scores.drop(columns=[c for c in scores.columns if c.startswith("reason_")])
    assert AnswerIndex(bare, features, contract).unreasoned() == ["A", "B"]  # no reason columns: none has any
    for customer in answers:
        answer = answers[customer]
        assert json.loads(json.dumps(answer, allow_nan=False)) == answer  # plain JSON, no numpy or NaN


def test_a_reason_cache_answers_only_what_was_put_in_it_and_belongs_to_one_state() -> None:
    """What a batch adds is found whole; what no batch added is missing, in the order asked."""
    cache = ReasonCache()
    reasons = [{"feature": "tenure_months", "contribution": 0.2}]
    cache.update({"C1": reasons, "C3": []})
    assert cache.get("C1") == reasons and cache.get("C2") is None
    assert "C3" in cache and "C2" not in cache and len(cache) == 2
    assert cache.missing(["C4", "C1", "C2", "C3"]) == ["C4", "C2"]
    assert ReasonCache().get("C1") is None  # a new state's cache starts empty, shares nothing


def test_background_reasons_equal_the_on_demand_ones(service: ScoringService) -> None:
    """The reasons filled in batches after a state goes live are the single-row ones, for every customer."""
    state = dataclasses.replace(service.state, explained=ReasonCache())  # a fresh cache, not the shared service's
    waiting = state.unexplained()
    assert waiting, "the nightly explains flagged customers only, so some answers need reasons here"
    sample = waiting[:: max(1, len(waiting) // 7)]
    on_demand = {c: state.answer(c) for c in sample}
    assert state.explain_all(lambda: True, batch_rows=97) == len(waiting)  # odd batches: the edges too
    assert not state.unexplained()
    for customer in sample:
        cached = state.answer(customer)
        assert [r["feature"] for r in cached["reasons"]] == [r["feature"] for r in on_demand[customer]["reasons"]]
        assert [r["contribution"] for r in cached["reasons"]] == pytest.approx(
            [r["contribution"] for r in on_demand[customer]["reasons"]], abs=1e-12)
    stopped = dataclasses.replace(service.state, explained=ReasonCache())
    assert stopped.explain_all(lambda: False) == 0  # a newer publish or a stop ends the fill


def test_sql_route_matches_churn_scores(client: TestClient, service: ScoringService,
                                        batch_scores: pd.DataFrame) -> None:
    """The mart's SQL over one customer's raw rows gives churn_scores' probability and tonight's features."""
    batch = batch_scores.set_index("customer_id")
    for customer_id in _sample_ids(batch_scores):
        payload = {"as_of": service.state.tonight.isoformat(),
                   "tables": read_landing_rows(service.compiled, [customer_id])}
        response = client.post("/score", json=payload)
        assert response.status_code == 200, response.text
        [answer] = response.json()["scores"]
        assert answer["churn_probability"] == pytest.approx(batch.loc[customer_id, "churn_probability"], abs=1e-9)
        published = service.state.answers[customer_id]
        assert answer["features"] == pytest.approx(published["features"], abs=1e-9)


def test_openapi_schema_and_docs_are_served(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/score", "/customers/{customer_id}/score", "/health"} <= set(schema["paths"])
    assert "WhatIf" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_unknown_as_of_is_refused_fast_and_never_compiles(client: TestClient, service: ScoringService,
                                                          batch_scores: pd.DataFrame,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("dbt ran on the request path")

    monkeypatch.setattr(features_module, "run_dbt", no_compiling)
    customer_id = batch_scores.iloc[0]["customer_id"]
    for as_of in ("2025-01-01", "0001-01-01", "9999-12-31"):
        started = time.perf_counter()
        response = client.get(f"/customers/{customer_id}/score", params={"as_of": as_of})
        assert time.perf_counter() - started < 2
        assert response.status_code == 400, response.text
        assert "served dates" in response.json()["error"] and service.state.tonight.isoformat() in response.text
    for as_of in ("yesterday", "20250101", "2025-13-45"):
        response = client.get(f"/customers/{customer_id}/score", params={"as_of": as_of})
        assert response.status_code == 400 and "as_of" in response.json()["error"], response.text
    response = client.post("/score", json={"as_of": "2025-01-01", "tables": {}})
    assert response.status_code == 400 and "served dates" in response.json()["error"]


def test_unknown_customer_is_404(client: TestClient) -> None:
    response = client.get("/customers/NO-SUCH-CUSTOMER/score")
    assert response.status_code == 404 and "NO-SUCH-CUSTOMER" in response.json()["error"]


def test_post_reflects_new_events(client: TestClient, service: ScoringService, batch_scores: pd.DataFrame) -> None:
    """Fresh raw events change the features and the score: the what-if route is not a lookup.

    Customers are taken across the ranks: a calibrated forest answers one
    probability for a whole plateau (the safest customers all get 0.0), so a
    single customer's score may rightly not move while its features do.
    """
    tonight = pd.Timestamp(service.state.tonight)
    moved = []
    for position in range(0, len(batch_scores), max(1, len(batch_scores) // 8)):
        customer_id = batch_scores.iloc[position]["customer_id"]
        tables = read_landing_rows(service.compiled, [customer_id])
        if not tables["payments"]:
            continue
        before = service.state.answers[customer_id]
        template = tables["payments"][-1]
        for days in (5, 15, 25):
            tables["payments"].append({**template, "payment_id": f"X{days}", "status": "failed",
                                       "invoice_date": (tonight - pd.Timedelta(days=days)).date().isoformat()})
        response = client.post("/score", json={"tables": tables})
        assert response.status_code == 200, response.text
        after = response.json()["scores"][0]
        assert [f for f in after["features"] if after["features"][f] != before["features"][f]], customer_id
        moved.append(after["churn_probability"] != pytest.approx(before["churn_probability"], abs=1e-12))
    assert len(moved) >= 4 and any(moved), moved


def test_bad_values_are_refused_like_the_nightly(client: TestClient, service: ScoringService,
                                                 batch_scores: pd.DataFrame) -> None:
    """Each planted bad value gets a 400 naming the table, the column and the rows."""
    customer_id = batch_scores.iloc[0]["customer_id"]
    tables = read_landing_rows(service.compiled, [customer_id])
    n_payments = len(tables["payments"])

    def post(changed: dict) -> dict:
        response = client.post("/score", json={"tables": {**tables, **changed}})
        assert response.status_code == 400, response.text
        return response.json()["error"]

    error = post({"payments": [{**r, "amount": -5} for r in tables["payments"]]})
    assert "stg_saas__payments" in error and "amount" in error and f"{n_payments} row" in error
    error = post({"customers": [{**r, "region": "atlantis"} for r in tables["customers"]]})
    assert "region" in error and "accepted_values" in error
    error = post({"payments": [{**r, "invoice_date": "9999-01-01"} for r in tables["payments"]]})
    assert "payments" in error and "invoice_date" in error and f"{n_payments} of {n_payments}" in error
    # a year-1 date is refused before the mart's SQL stretches its day series back two millennia
    error = post({"usage_events": [{**r, "event_date": "0001-01-01"} for r in tables["usage_events"][:1]]
                  + tables["usage_events"][1:]})
    assert "usage_events" in error and "event_date" in error and "1 of" in error and "1990-01-01" in error
    error = post({"payments": [{**r, "amount": "lots"} for r in tables["payments"]]})
    assert "amount" in error and f"{n_payments} of {n_payments}" in error
    error = post({"payments": [{k: v for k, v in r.items() if k != "amount"} for r in tables["payments"]]})
    assert "amount" in error and "payments" in error
    error = post({"payments": [{**r, "extra": 1} for r in tables["payments"]]})
    assert "extra" in error
    response = client.post("/score", json={"tables": {k: v for k, v in tables.items() if k != "payments"}})
    assert response.status_code == 400 and "payments" in response.json()["error"]
    response = client.post("/score", json={"rows": []})
    assert response.status_code == 400 and "tables" in response.json()["error"]


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"null", b"42", b"{" * 5000 + b"}" * 5000, b"{not json",
                                  b'{"tables": {"customers": [{"customer_id": {"nested": 1}}]}}',
                                  b'{"as_of": 20250101, "tables": {}}', b'{"as_of": ["x"], "tables": {}}'])
def test_malformed_bodies_are_4xx(client: TestClient, body: bytes) -> None:
    response = client.post("/score", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]


def _raw_request(port: int, head: str, body: bytes = b"", timeout: float = 15) -> tuple[int, float]:
    """Send bytes as given (so the Content-Length may lie); the status and seconds to the answer."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = sock.recv(4096)
    return int(answer.split(b" ", 2)[1]), time.perf_counter() - started


def test_oversize_and_lying_bodies_are_refused_fast(server_port: int, service: ScoringService) -> None:
    limit = service.config.serving.max_body_bytes
    timeout = service.config.serving.body_timeout_seconds

    def head(length: str) -> str:
        return (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n")

    status, seconds = _raw_request(server_port, head(str(10**10)))
    assert status == 413 and seconds < 2
    status, seconds = _raw_request(server_port, head(str(limit + 1)), b"{" * 1000)
    assert status == 413 and seconds < 2
    status, seconds = _raw_request(server_port, head("-1"), b"{}")
    assert 400 <= status < 500 and seconds < 2
    status, seconds = _raw_request(server_port, head("1000"), b'{"tables": {}}')  # the body is shorter than said
    assert status == 408 and seconds < timeout + 3


def test_api_key_is_enforced_when_set(service: ScoringService, batch_scores: pd.DataFrame,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(service.config.serving.api_key_env, "s3cret")
    customer_id = batch_scores.iloc[0]["customer_id"]
    with TestClient(asgi_app(service)) as keyed:
        assert keyed.get(f"/customers/{customer_id}/score").status_code == 401
        assert keyed.get(f"/customers/{customer_id}/score", headers={"X-API-Key": "wrong"}).status_code == 401
        assert keyed.post("/score", json={"tables": {}}).status_code == 401
        assert keyed.get(f"/customers/{customer_id}/score", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert keyed.get("/health").status_code == 200


def test_missing_publication_is_a_clear_error(tmp_path: Path, service: ScoringService) -> None:
    from tests.conftest import make_config

    with pytest.raises(RequestError, match="nothing published yet"):
        load_state(make_config(tmp_path), service.compiled)


def test_served_dates_come_from_the_published_history(service: ScoringService) -> None:
    state = service.state
    assert state.tonight in state.served_dates
    assert all(isinstance(d, dt.date) for d in state.served_dates)


def test_only_real_relation_references_are_rewritten() -> None:
    """A column, a literal or a comment that spells a relation's name is not a reference to it."""
    source = "read_parquet('/landing/customers.parquet')"
    table = '"memory"."main"."customers"'
    sql = (
        f"select \"{source.replace(chr(34), chr(34) * 2)}\" as spelled_column, "
        f"'{source.replace(chr(39), chr(39) * 2)}' as spelled_literal, m.\"customers\", "
        f"'{table}' as table_literal -- from {source}\n"
        f"from {source} s join {table} m using (customer_id) join other.{table} o using (customer_id)"
    )
    rewritten = replace_relations(sql, {source: '"__raw_customers"', table: '"__raw_table"'})
    assert rewritten == (
        f"select \"{source.replace(chr(34), chr(34) * 2)}\" as spelled_column, "
        f"'{source.replace(chr(39), chr(39) * 2)}' as spelled_literal, m.\"customers\", "
        f"'{table}' as table_literal -- from {source}\n"
        f'from "__raw_customers" s join "__raw_table" m using (customer_id) join other.{table} o using (customer_id)'
    )


def test_readme_post_example_works_as_written(client: TestClient) -> None:
    """The README's curl body parses and scores (the old `[...]` example did not)."""
    import json
    import re

    from tests.conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    [body] = re.findall(r"curl -s -X POST localhost:8000/score -H 'Content-Type: application/json' -d '(.*)'", readme)
    response = client.post("/score", json=json.loads(body))
    assert response.status_code == 200, response.text
    [answer] = response.json()["scores"]
    assert answer["customer_id"] == "NEW1" and 0 <= answer["churn_probability"] <= 1


def test_what_if_runs_one_statement_not_one_per_model_and_test(client: TestClient, service: ScoringService,
                                                               batch_scores: pd.DataFrame,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks and the mart are one prepared statement (the views-and-tests path ran ~60 queries, then two)."""
    from ml.warehouse.connection import Session

    calls: list[str] = []
    for method in ("execute", "rows", "one", "scalar", "frame"):
        original = getattr(Session, method)

        def counted(self: Session, sql: str, params: object = None, _original=original) -> object:
            calls.append(sql[:40])
            return _original(self, sql, params)

        monkeypatch.setattr(Session, method, counted)
    tables = read_landing_rows(service.compiled, [batch_scores.iloc[0]["customer_id"]])
    calls.clear()
    response = client.post("/score", json={"tables": tables})
    assert response.status_code == 200, response.text
    queries = [c for c in calls if not c.startswith("set variable")]
    assert len(queries) == 1, calls


def _optimised_on_execute(session: object, execute: str, profile: Path) -> float:
    """Seconds DuckDB spent optimising on an `execute` of a prepared statement (0: the prepared plan ran)."""
    import json

    session.execute(execute)
    return float(json.loads(profile.read_text()).get("optimizer", {}).get("total_time", 0))


def test_prepared_request_statements_are_not_replanned(service: ScoringService, batch_scores: pd.DataFrame,
                                                       tmp_path: Path) -> None:
    """The request statement runs its plan from PREPARE time; a parameter read twice would re-plan each time."""
    tables = read_landing_rows(service.compiled, [batch_scores.iloc[0]["customer_id"]])
    profile = tmp_path / "profile.json"
    with service.pool.connection() as connection:
        session = connection.session
        connection.features(tables, service.state.tonight, dt.date.today())  # sets the request variable
        session.execute("pragma enable_profiling = 'json'")
        session.execute(f"pragma profiling_output = '{profile}'")
        try:
            sql = connection.sql
            assert _optimised_on_execute(session, sql.execute, profile) == 0
            # the planted failure: the same request read through a parameter twice is re-planned per execution
            twice = sql.statement.replace("select * from", "select *, $as_of::date is null as x from", 1)
            session.execute(f"prepare replanned as {twice}")
            replanned = sql.execute.replace(f"execute {features_module._STATEMENT}(", "execute replanned(", 1)
            assert _optimised_on_execute(session, replanned, profile) > 0
        finally:
            session.execute("pragma disable_profiling")
            session.execute("deallocate replanned")


def test_as_of_read_leaves_out_only_rows_the_snapshot_cannot_see(service: ScoringService,
                                                                  batch_scores: pd.DataFrame) -> None:
    """The ?as_of read skips event rows dated on or after as_of, and the features stay those of every row."""
    reads = {c: read_landing_rows(service.compiled, [c]) for c in batch_scores["customer_id"].iloc[:20]}
    customer_id = max(reads, key=lambda c: len(reads[c]["usage_events"]))
    everything = reads[customer_id]
    dated = {s.name: s.date_column for s in service.compiled.sources if s.date_column}
    assert {"usage_events", "payments"} <= set(dated)
    usage_day = dated["usage_events"]
    days = sorted({row[usage_day][:10] for row in everything["usage_events"]})
    day_before = days[len(days) // 2]  # mid-history: later rows exist
    as_of = dt.date.fromisoformat(day_before) + dt.timedelta(days=1)
    pruned = read_landing_rows(service.compiled, [customer_id], as_of=as_of)
    for name, rows in everything.items():
        column = dated.get(name)
        kept = [r for r in rows if column is None or r[column] is None or r[column][:10] < as_of.isoformat()]
        assert sorted(map(str, pruned[name])) == sorted(map(str, kept)), name
    assert len(pruned["usage_events"]) < len(everything["usage_events"])
    with service.pool.connection() as connection:
        full = connection.features(everything, as_of, dt.date.today())
        assert len(full) == 1
        pd.testing.assert_frame_equal(connection.features(pruned, as_of, dt.date.today()), full)
        # the planted failure: leaving out the day before as_of too (the snapshot sees it) changes the features
        cut = {**pruned, "usage_events": [r for r in pruned["usage_events"] if r[usage_day][:10] != day_before]}
        assert not connection.features(cut, as_of, dt.date.today()).equals(full)
