"""The mart audit reads the night, not the history.

Row-wise checks read only the snapshots the builds since the last passed
audit rebuilt or relabelled (`mart_builds`); table-level checks read the whole
mart as SQL aggregates. A bad value planted in tonight's snapshot is caught and
named; one planted in an old snapshot is not read on an incremental night (so
the old snapshot was not loaded), and is caught again after a full refresh.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.features.night import MartBefore, record_mart_build
from ml.quality.audit import RESULTS, AuditError, audit
from ml.warehouse import connect

from .conftest import copy_warehouse, query

SUITE = {
    "name": "night_mart",
    "meta": {"stage": "mart", "table": "$feature_mart"},
    "expectations": [
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 1},
         "meta": {"severity": "critical"}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "login_days_30d", "min_value": 0},
         "meta": {"severity": "critical"}},
        {"type": "expect_column_mean_to_be_between",
         "kwargs": {"column": "$target", "min_value": 0.0, "max_value": 1.0}, "meta": {"severity": "critical"}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "$target", "mostly": 0.01},
         "meta": {"severity": "critical"}},  # a share of the table: tonight's labels are null by design
        {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["$entity_key", "$as_of_column"]},
         "meta": {"severity": "critical"}},
    ],
}


@pytest.fixture
def night(built_warehouse: ChurnConfig, tmp_path: Path) -> ChurnConfig:
    expectations = tmp_path / "expectations"
    config = copy_warehouse(built_warehouse, tmp_path / "wh", {"warehouse": {"expectations_dir": str(expectations)}})
    (expectations / config.dataset.name).mkdir(parents=True)
    (expectations / config.dataset.name / "night_mart.json").write_text(json.dumps(SUITE))
    return config


def stored(config: ChurnConfig, run_id: str) -> dict[str, tuple[int, str, bool]]:
    frame = query(config, f"select expectation_type, rows_checked, scope, success from {RESULTS.name} "
                          "where run_id = ?", [run_id])
    return {r.expectation_type: (int(r.rows_checked), r.scope, bool(r.success)) for r in frame.itertuples()}


def test_the_mart_audit_reads_tonight_and_names_a_bad_value_there(night: ChurnConfig) -> None:
    dates = query(night, "select as_of_date, count(*) as n from customer_features group by 1 order by 1")
    oldest, latest = dates["as_of_date"].iloc[0].date(), dates["as_of_date"].iloc[-1].date()
    tonight_rows, all_rows = int(dates["n"].iloc[-1]), int(dates["n"].sum())

    first = "first"  # no passed audit yet: everything is read
    audit(night, "mart", first)
    assert stored(night, first)["expect_column_values_to_be_between"] == (all_rows, "all", True)

    # tonight: an incremental build rebuilt the latest snapshot; bad login counts in it and in the oldest one
    record_mart_build(night, latest, MartBefore(True, latest, ()), full_refresh=False)
    with_bad = ("update customer_features set login_days_30d = -5 where as_of_date = ? and customer_id in "
                "(select customer_id from customer_features where as_of_date = ? order by customer_id limit ?)")
    with connect(night.warehouse.build_db) as session:
        session.execute(with_bad, [latest, latest, 3])
        session.execute(with_bad, [oldest, oldest, 2])
    with pytest.raises(AuditError, match=rf"table customer_features, column login_days_30d\): "
                                         rf"expect_column_values_to_be_between failed \[critical\]: "
                                         rf"3 of {tonight_rows:,d} of tonight's rows"):
        audit(night, "mart", "tonight")
    checks = stored(night, "tonight")
    assert checks["expect_column_values_to_be_between"] == (tonight_rows, "tonight", False)
    # table-level checks stay on the whole mart
    assert checks["expect_table_row_count_to_be_between"] == (all_rows, "all", True)
    assert checks["expect_column_mean_to_be_between"] == (all_rows, "all", True)
    assert checks["expect_compound_columns_to_be_unique"] == (all_rows, "all", True)
    assert checks["expect_column_values_to_not_be_null"] == (all_rows, "all", True)  # mostly < 1: whole mart

    # a full refresh: every snapshot is read again, the old bad rows too
    record_mart_build(night, latest, MartBefore(True, latest, ()), full_refresh=True)
    with pytest.raises(AuditError, match=rf"5 of {all_rows:,d} rows"):
        audit(night, "mart", "full")
    assert stored(night, "full")["expect_column_values_to_be_between"] == (all_rows, "all", False)


def test_a_failed_nights_snapshots_are_read_again_the_next_night(night: ChurnConfig) -> None:
    """Scope is everything built since the suite last passed, not since the last build."""
    dates = query(night, "select distinct as_of_date from customer_features order by 1")["as_of_date"]
    audit(night, "mart", "baseline")
    earlier, latest = dates.iloc[-2].date(), dates.iloc[-1].date()
    record_mart_build(night, earlier, MartBefore(True, earlier, ()), full_refresh=False)  # a night that failed
    record_mart_build(night, latest, MartBefore(True, latest, ()), full_refresh=False)
    audit(night, "mart", "next")
    rows = int(query(night, "select count(*) as n from customer_features where as_of_date >= ?", [earlier])["n"][0])
    assert stored(night, "next")["expect_column_values_to_be_between"] == (rows, "tonight", True)
    assert earlier < latest
