"""The real-time API computes features with the mart's SQL, so it must agree with churn_scores."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.serving.api import RequestError, ScoringService, make_server, read_landing_rows
from ml.warehouse import connect


@pytest.fixture(scope="module")
def service(published_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> ScoringService:
    return ScoringService(published_warehouse, workdir=tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def batch_scores(published_warehouse: ChurnConfig) -> pd.DataFrame:
    with connect(published_warehouse.warehouse.published_db, read_only=True) as con:
        return con.frame("select * from churn_scores order by risk_rank")


@pytest.fixture(scope="module")
def base_url(service: ScoringService) -> Iterator[str]:
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _sample_ids(batch_scores: pd.DataFrame) -> list[str]:
    """Customers across the ranking: the riskiest, the middle and the safest."""
    n = len(batch_scores)
    return [batch_scores.iloc[i]["customer_id"] for i in (0, 1, n // 2, n - 2, n - 1)]


def _request(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_api_scores_match_the_nightly_batch(service: ScoringService, batch_scores: pd.DataFrame) -> None:
    batch = batch_scores.set_index("customer_id")
    for customer_id in _sample_ids(batch_scores):
        answer = service.score_customer(customer_id)
        expected = batch.loc[customer_id]
        assert answer["churn_probability"] == pytest.approx(expected["churn_probability"], abs=1e-9)
        assert answer["will_churn"] == bool(expected["will_churn"])
        assert answer["risk_band"] == expected["risk_band"]
        assert answer["model_version"] == expected["model_version"]
        assert answer["reasons"][0]["feature"] == expected["reason_1"]


def test_http_routes(base_url: str, batch_scores: pd.DataFrame, service: ScoringService) -> None:
    status, health = _request(f"{base_url}/health")
    assert status == 200 and health["model_version"] == service.model.version

    customer_id = batch_scores.iloc[0]["customer_id"]
    status, answer = _request(f"{base_url}/customers/{customer_id}/score")
    assert status == 200
    assert answer["churn_probability"] == pytest.approx(batch_scores.iloc[0]["churn_probability"], abs=1e-9)
    assert set(answer["features"]) == set(service.model.contract.feature_names)

    status, error = _request(f"{base_url}/customers/NO-SUCH-CUSTOMER/score")
    assert status == 404 and "NO-SUCH-CUSTOMER" in error["error"]
    status, error = _request(f"{base_url}/customers/{customer_id}/score?as_of=yesterday")
    assert status == 400 and "YYYY-MM-DD" in error["error"]


def _raw_payload(service: ScoringService, customer_id: str) -> dict[str, list[dict]]:
    compiled = service.compiled(service.default_as_of)
    tables = read_landing_rows(compiled, [customer_id])
    return {name: json.loads(frame.to_json(orient="records", date_format="iso")) for name, frame in tables.items()}


def test_post_raw_rows_scores_like_the_batch(base_url: str, service: ScoringService,
                                             batch_scores: pd.DataFrame) -> None:
    customer_id = batch_scores.iloc[len(batch_scores) // 2]["customer_id"]
    payload = {"as_of": service.default_as_of.isoformat(), "tables": _raw_payload(service, customer_id)}
    status, body = _request(f"{base_url}/score", payload)
    assert status == 200, body
    [answer] = body["scores"]
    expected = batch_scores.set_index("customer_id").loc[customer_id, "churn_probability"]
    assert answer["churn_probability"] == pytest.approx(expected, abs=1e-9)


def test_post_reflects_new_events(base_url: str, service: ScoringService, batch_scores: pd.DataFrame) -> None:
    """Fresh raw events change the features and the score: the API is not a lookup of churn_scores."""
    customer_id = batch_scores.iloc[len(batch_scores) - 1]["customer_id"]  # the safest customer
    tables = _raw_payload(service, customer_id)
    as_of = pd.Timestamp(service.default_as_of)
    before = service.score_tables({k: pd.DataFrame(v) for k, v in tables.items()})[0]
    # three failed invoices and a furious support ticket in the last weeks
    template = tables["payments"][-1] if tables["payments"] else None
    assert template is not None
    for days in (5, 15, 25):
        tables["payments"].append({**template, "payment_id": f"X{days}", "status": "failed",
                                   "invoice_date": (as_of - pd.Timedelta(days=days)).date().isoformat()})
    status, body = _request(f"{base_url}/score", {"tables": tables})
    assert status == 200, body
    after = body["scores"][0]
    changed = [f for f in after["features"] if after["features"][f] != before["features"][f]]
    assert changed, "new failed payments must change at least one feature"
    assert after["churn_probability"] != pytest.approx(before["churn_probability"], abs=1e-12)


def test_bad_payloads_are_named(base_url: str, service: ScoringService, batch_scores: pd.DataFrame) -> None:
    customer_id = batch_scores.iloc[0]["customer_id"]
    tables = _raw_payload(service, customer_id)

    missing_table = {k: v for k, v in tables.items() if k != "payments"}
    status, error = _request(f"{base_url}/score", {"tables": missing_table})
    assert status == 400 and "payments" in error["error"]

    no_column = {**tables, "payments": [{k: v for k, v in r.items() if k != "amount"} for r in tables["payments"]]}
    status, error = _request(f"{base_url}/score", {"tables": no_column})
    assert status == 400 and "amount" in error["error"] and "payments" in error["error"]

    text_amounts = {**tables, "payments": [{**r, "amount": "lots"} for r in tables["payments"]]}
    status, error = _request(f"{base_url}/score", {"tables": text_amounts})
    assert status == 400
    assert f"{len(tables['payments'])} of {len(tables['payments'])}" in error["error"] and "amount" in error["error"]

    status, error = _request(f"{base_url}/score", {"rows": []})
    assert status == 400 and "tables" in error["error"]


def test_missing_publication_is_a_clear_error(tmp_path: Path) -> None:
    from tests.conftest import make_config

    with pytest.raises(RequestError, match="nothing published yet"):
        ScoringService(make_config(tmp_path))


def test_only_real_relation_references_are_rewritten() -> None:
    """A column, a literal or a comment that spells a relation's name is not a reference to it."""
    from ml.serving.api import replace_relations

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
