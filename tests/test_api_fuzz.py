"""Property-based fuzz of every route (hypothesis, bounded budget): no 5xx, no hang."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml.serving.api import ScoringService
from ml.serving.features import read_landing_rows

# Each request must answer within this (the what-if route's target is 100 ms; this bounds a hang).
MAX_SECONDS = 10
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False),
                    st.text(max_size=20), st.sampled_from(["2025-01-01", "0001-01-01", "9999-12-31", "", " "]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)


@pytest.fixture(scope="module")
def real_rows(service: ScoringService) -> dict:
    return read_landing_rows(service.compiled, [next(iter(service.state.answers))])


def _check(response, started: float, json_answer: bool = True) -> None:
    assert response.status_code < 500, response.text
    assert time.perf_counter() - started < MAX_SECONDS
    if json_answer:  # /docs is a page; every other answer, error or not, is JSON
        assert response.headers["content-type"].startswith("application/json")


@FUZZ
@given(customer=st.text(min_size=1, max_size=40),
       as_of=st.one_of(st.none(), st.text(max_size=12), st.dates().map(str)))
def test_fuzz_customer_route(client: TestClient, customer: str, as_of: str | None) -> None:
    started = time.perf_counter()
    params = {} if as_of is None else {"as_of": as_of}
    _check(client.get(f"/customers/{quote(customer, safe='')}/score", params=params), started)


@FUZZ
@given(body=json_values)
def test_fuzz_what_if_any_json(client: TestClient, body: object) -> None:
    started = time.perf_counter()
    _check(client.post("/score", content=json.dumps(body), headers={"Content-Type": "application/json"}), started)


@FUZZ
@given(data=st.data())
def test_fuzz_what_if_mutated_rows(client: TestClient, real_rows: dict, data: st.DataObject) -> None:
    """Real rows with one value per table replaced by anything JSON allows."""
    tables = {name: [dict(r) for r in rows] for name, rows in real_rows.items()}
    for rows in tables.values():
        if rows and data.draw(st.booleans()):
            row = data.draw(st.sampled_from(rows))
            row[data.draw(st.sampled_from(sorted(row)))] = data.draw(scalars)
    as_of = data.draw(st.one_of(st.none(), st.dates().map(str), st.text(max_size=10)))
    started = time.perf_counter()
    _check(client.post("/score", json={"as_of": as_of, "tables": tables}), started)


@FUZZ
@given(path=st.text(max_size=30), method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
def test_fuzz_any_path(client: TestClient, path: str, method: str) -> None:
    started = time.perf_counter()
    _check(client.request(method, "/" + quote(path.lstrip("/"), safe="/")), started, json_answer=False)
