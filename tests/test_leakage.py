"""The leakage test must catch a feature that reads its own as_of_date's events.

A point-in-time check that never fails proves nothing, so we plant two leaks in
a copy of the dbt project and require the singular test to fail on each: one
that the audit columns see (the window join reading events on as_of_date), and one
they cannot see (events shifted a day earlier), which only the independent
recomputation catches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.features.dbt import DbtError, dbt_target_path, run_dbt

LEAKAGE_TEST = "assert_features_use_only_past_events"

# (file in the project, text as shipped, leaking replacement, models to rebuild)
LEAKS = {
    "asof_reads_as_of_date": (
        "macros/trailing_windows.sql",
        "and events.event_date < grid.as_of_date",
        "and events.event_date <= grid.as_of_date",
        "int_usage_windowed+",
    ),
    "usage_dated_one_day_early": (
        "models/intermediate/int_usage_windowed.sql",
        "usage_date as event_date,",
        "usage_date - 1 as event_date,",
        "int_usage_windowed+",
    ),
}


def copy_project(config: ChurnConfig, root: Path) -> Path:
    project = root / "dbt_project"
    shutil.copytree(
        config.warehouse.dbt_project_dir, project, ignore=shutil.ignore_patterns("target", "logs")
    )
    return project


def test_unmodified_project_passes_the_leakage_test(built_warehouse: ChurnConfig) -> None:
    results = json.loads((dbt_target_path(built_warehouse) / "run_results.json").read_text())["results"]
    leakage = [r for r in results if r["unique_id"] == f"test.churn.{LEAKAGE_TEST}"]
    assert len(leakage) == 1
    assert leakage[0]["status"] == "pass" and leakage[0]["failures"] == 0


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_planted_leak_fails_the_build(private_warehouse: ChurnConfig, tmp_path: Path, leak: str) -> None:
    path, shipped, leaking, select = LEAKS[leak]
    project = copy_project(private_warehouse, tmp_path)
    sql_file = project / path
    text = sql_file.read_text()
    assert text.count(shipped) == 1, f"{path} no longer contains the line this test edits"
    sql_file.write_text(text.replace(shipped, leaking))

    with pytest.raises(DbtError) as caught:
        # a changed definition is rebuilt from scratch (the pipeline decides so from its fingerprint);
        # incremental nights equal a full refresh row for row (tests/test_incremental.py)
        run_dbt(private_warehouse, "build", "--full-refresh", select=select, project_dir=project)

    assert LEAKAGE_TEST in str(caught.value)
    results = json.loads((dbt_target_path(private_warehouse) / "run_results.json").read_text())["results"]
    leakage = next(r for r in results if r["unique_id"] == f"test.churn.{LEAKAGE_TEST}")
    assert leakage["status"] == "fail" and leakage["failures"] > 0
