"""The prediction log survives a kill and is ingested and joined in monitoring; a new publish is served live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ml.config import ChurnConfig
from ml.monitoring import monitor
from ml.serving.api import ScoringService, asgi_app
from ml.serving.predictions import PredictionLog, ingest_predictions, log_dir, logged_predictions
from ml.serving.publish import publish
from ml.warehouse import connect
from tests.conftest import REPO_ROOT, copy_warehouse, query


@pytest.fixture(scope="module")
def private(published_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    return copy_warehouse(published_warehouse, tmp_path_factory.mktemp("api-private"))


@pytest.fixture(scope="module")
def service(private: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> ScoringService:
    svc = ScoringService(private, workdir=tmp_path_factory.mktemp("serve"))
    yield svc
    svc.close()


def _record(i: int, customer: str = "C1", as_of: str = "2025-01-01", version: str = "v1") -> dict:
    return {"request_id": f"r{i}", "logged_at": "2026-01-01T00:00:00", "route": "published", "customer_id": customer,
            "as_of": as_of, "model_version": version, "churn_probability": 0.5, "will_churn": True,
            "latency_ms": 1.0, "features_sha256": "x"}


def test_answers_are_logged_and_ingested_and_published(service: ScoringService, private: ChurnConfig) -> None:
    customer = next(iter(service.state.answers))
    with TestClient(asgi_app(service)) as client:
        for _ in range(3):
            assert client.get(f"/customers/{customer}/score").status_code == 200
    result = ingest_predictions(private)
    assert result.rows >= 3
    ingest_predictions(private)  # the live segment is read again: replaced by request id, not duplicated
    logged = query(private, "select * from prediction_log where customer_id = ? and route = 'published'", [customer])
    assert len(logged) == 3
    assert logged["churn_probability"].iloc[0] == pytest.approx(service.state.answers[customer]["churn_probability"])
    publish(private, run_id="with-log")
    with connect(private.warehouse.published_db, read_only=True) as session:
        assert session.row_count("prediction_log") >= 3


def test_a_torn_segment_never_breaks_the_ingest(private: ChurnConfig, tmp_path: Path) -> None:
    folder = log_dir(private)
    folder.mkdir(parents=True, exist_ok=True)
    dead = folder / "predictions-20260101T000000000000-999999999.open.jsonl"  # no such pid: its writer died
    dead.write_text(json.dumps(_record(9001)) + "\n" + "{not json}\n" + json.dumps(_record(9002)) + "\n"
                    + json.dumps(_record(9003))[:25])
    result = ingest_predictions(private)
    assert result.torn_lines == 2
    ids = set(query(private, "select request_id from prediction_log")["request_id"])
    assert {"r9001", "r9002"} <= ids and "r9003" not in ids
    assert not dead.exists(), "a dead writer's segment is removed once ingested"


def test_a_killed_writer_loses_at_most_the_line_in_flight(tmp_path: Path) -> None:
    """SIGKILL a process appending as fast as it can: every complete line it wrote is readable."""
    folder = tmp_path / "log"
    script = (
        "import sys, itertools; from pathlib import Path; from ml.serving.predictions import PredictionLog\n"
        "log = PredictionLog(Path(sys.argv[1]), 10**9)\n"
        "for i in itertools.count():\n"
        "    log.write([{'request_id': f'k{i}', 'logged_at': '2026-01-01T00:00:00', 'route': 'published',"
        " 'customer_id': 'C1', 'as_of': '2025-01-01', 'model_version': 'v', 'churn_probability': 0.1,"
        " 'will_churn': False, 'latency_ms': 0.1, 'features_sha256': 'x' * 64}])\n"
        "    if i == 200: print('ready', flush=True)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(folder)], cwd=REPO_ROOT, stdout=subprocess.PIPE)
    assert writer.stdout is not None and writer.stdout.readline().strip() == b"ready"
    time.sleep(0.3)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    from ml.serving.predictions import read_segment

    [segment] = list(folder.glob("*.jsonl"))
    records, torn = read_segment(segment)
    assert len(records) > 200 and torn <= 1
    assert [r["request_id"] for r in records] == [f"k{i}" for i in range(len(records))], "no line lost or mixed"


def test_logged_predictions_are_joined_to_labels_in_monitoring(private: ChurnConfig) -> None:
    """Planted log rows for a labelled snapshot give a `realized_online` row in model_performance."""
    labelled = query(private, "select as_of_date, customer_id, churned_within_30d from customer_features "
                              "where churned_within_30d is not null order by as_of_date, customer_id")
    as_of = labelled["as_of_date"].iloc[0]
    rows = labelled[labelled["as_of_date"] == as_of]
    version = query(private, "select model_version from model_registry where status = 'champion'").iloc[0, 0]
    log = PredictionLog(log_dir(private), 10**9)
    log.write([{**_record(20_000 + i, str(c), str(as_of)[:10], version),
                "churn_probability": 0.9 if y else 0.1, "will_churn": bool(y)}
               for i, (c, y) in enumerate(zip(rows["customer_id"], rows["churned_within_30d"], strict=True))])
    log.close()
    ingest_predictions(private)
    monitor.measure(private, run_id="online-check", logged=logged_predictions)
    online = query(private, "select * from model_performance where kind = 'realized_online' and run_id = ?",
                   ["online-check"])
    assert len(online) == 1 and online["n_rows"].iloc[0] == len(rows)
    assert online["recall"].iloc[0] == pytest.approx(1.0) and online["precision"].iloc[0] == pytest.approx(1.0)


def test_a_new_publish_is_served_without_restart(service: ScoringService, private: ChurnConfig) -> None:
    customer = next(iter(service.state.answers))
    old = service.state
    with connect(private.warehouse.build_db) as session:
        session.execute("update churn_scores set churn_probability = 0.123456789 where customer_id = ?", [customer])
    publish(private, run_id="second-publish")
    service.holder.start()
    try:
        deadline = time.monotonic() + 60
        while service.state is old and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        service.holder.stop()
    assert service.state is not old, "the watcher did not pick up the new publish"
    assert service.state.info.run_id == "second-publish"
    with TestClient(asgi_app(service)) as client:
        answer = client.get(f"/customers/{customer}/score").json()
    assert answer["churn_probability"] == pytest.approx(0.123456789, abs=1e-12)
    assert old.answers[customer]["churn_probability"] != pytest.approx(0.123456789), "a held old state is unchanged"
