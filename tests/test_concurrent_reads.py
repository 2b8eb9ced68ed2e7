"""BI keeps reading while nightlies publish: no errors, never a partial table.

A reader process queries `churn_scores` from the published file in a loop
(read-only, as BI does) while two nightly runs go: the first on the same inputs
as the published baseline, the second after a tenth of the customers left the
landing data. Every read must succeed and see one published state whole: its
row count is that run's number of active customers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np

from ml.config import ChurnConfig
from ml.serving.publish import INFO_TABLE

from .conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse

READER = r"""
import json, sys, time, duckdb
path, stop, out, deadline = sys.argv[1], sys.argv[2], sys.argv[3], time.monotonic() + float(sys.argv[4])
import os
with open(out, "w") as log:
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            con = duckdb.connect(path, read_only=True)
            try:
                run_id = con.execute("select run_id from publish_info").fetchall()[0][0]
                rows, customers = con.execute(
                    "select count(*), count(distinct customer_id) from churn_scores").fetchall()[0]
            finally:
                con.close()
            log.write(json.dumps({"run_id": run_id, "rows": rows, "customers": customers}) + "\n")
        except Exception as exc:
            log.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        log.flush()
        time.sleep(0.05)
"""


def active_customers(config: ChurnConfig) -> int:
    """Customers on the mart's latest snapshot, read from the build database between runs."""
    mart, as_of = config.dataset.feature_mart, config.problem.as_of_column
    with duckdb.connect(str(config.warehouse.build_db), read_only=True) as con:
        return con.execute(
            f"select count(*) from {mart} where {as_of} = (select max({as_of}) from {mart})").fetchall()[0][0]


def published_run(config: ChurnConfig) -> str:
    with duckdb.connect(str(config.warehouse.published_db), read_only=True) as con:
        return con.execute(f"select run_id from {INFO_TABLE}").fetchall()[0][0]


def nightly(config: ChurnConfig, log: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ml.cli", "--config", str(config.source_file), "nightly"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, log.read_text()[-3000:]


def published_scores(config: ChurnConfig) -> tuple[list[tuple], int, int]:
    """Tonight's scores (what BI reads) and the history's row and distinct-key counts."""
    key, as_of = config.problem.entity_key, config.problem.as_of_column
    with duckdb.connect(str(config.warehouse.published_db), read_only=True) as con:
        scores = con.execute(f"select {key}, {as_of}, churn_probability, risk_band, model_version "
                             "from churn_scores order by all").fetchall()
        rows, keys = con.execute(f"select count(*), count(distinct ({key}, {as_of}, model_version)) "
                                 "from churn_scores_history").fetchall()[0]
    return scores, rows, keys


def assert_same_scores(actual: tuple[list[tuple], int, int], expected: tuple[list[tuple], int, int]) -> None:
    """Same customers, snapshot, bands, model and history counts; probabilities equal up
    to the order in which DuckDB's parallel aggregates add doubles (~1e-14 apart)."""
    (actual_rows, *actual_counts), (expected_rows, *expected_counts) = actual, expected
    assert actual_counts == expected_counts
    assert [r[:2] + r[3:] for r in actual_rows] == [r[:2] + r[3:] for r in expected_rows]
    assert np.allclose([r[2] for r in actual_rows], [r[2] for r in expected_rows], rtol=0, atol=1e-9)


def drop_a_tenth_of_customers(config: ChurnConfig) -> None:
    for path in sorted(config.dataset.landing_dir.glob("*.parquet")):
        new = path.with_suffix(".new")
        with duckdb.connect() as con:
            con.execute(f"copy (select * from read_parquet('{path}') where hash(customer_id) % 10 <> 0) "
                        f"to '{new}' (format parquet)")
        new.replace(path)


def test_readers_see_whole_published_states_while_nightlies_run(
    published_warehouse: ChurnConfig, tmp_path: Path
) -> None:
    config = copy_warehouse(published_warehouse, tmp_path / "wh", QUICK_TRAINING)
    expected = {published_run(config): active_customers(config)}
    baseline_scores = published_scores(config)
    stop, out = tmp_path / "stop", tmp_path / "reads.jsonl"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(config.warehouse.published_db),
                               str(stop), str(out), "1200"])
    try:
        time.sleep(1)
        nightly(config, tmp_path / "run1.log")
        expected[published_run(config)] = active_customers(config)
        # Re-running on the same inputs publishes the same scores and duplicates no history row.
        assert_same_scores(published_scores(config), baseline_scores)
        assert baseline_scores[1] == baseline_scores[2]
        drop_a_tenth_of_customers(config)
        nightly(config, tmp_path / "run2.log")
        expected[published_run(config)] = active_customers(config)
        time.sleep(1)
    finally:
        stop.touch()
        reader.wait(timeout=60)
    reads = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r["error"] for r in reads if "error" in r]
    assert errors == []
    assert len(reads) > 20
    seen = {r["run_id"] for r in reads}
    assert len(expected) == 3 and seen == set(expected), (seen, expected)  # old, run 1 and run 2 all read
    # Same inputs, same customers; a tenth fewer after they left the landing data.
    counts = list(expected.values())
    assert counts[0] == counts[1] > counts[2] > 0
    for r in reads:
        assert r["rows"] == r["customers"] == expected[r["run_id"]], r
