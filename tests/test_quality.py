"""The Great Expectations audit: suites load, good data passes, bad data fails for the
right reason with the right counts, and an expectation that errors is a failure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest

from ml.config import ChurnConfig, load_config
from ml.quality.audit import (
    COUNTS_TABLE,
    RESULTS_TABLE,
    SEVERITIES,
    STAGES,
    AuditError,
    Judge,
    SuiteError,
    audit,
    load_suite,
    run_suite,
    suite_parameters,
    suite_run,
    write_docs,
)
from ml.warehouse import MEMORY, Session, connect

from .conftest import REPO_ROOT


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge()


def write_suite(folder: Path, expectations: list[dict], stage: str = "mart", table: str = "t") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "suite.json"
    path.write_text(json.dumps({"name": "test_suite", "meta": {"stage": stage, "table": table},
                                "expectations": expectations}))
    return path


def expectation(kind: str, severity: str = "critical", **kwargs) -> dict:
    return {"type": kind, "kwargs": kwargs, "meta": {"severity": severity}}


@pytest.fixture
def table() -> Session:
    """Ten rows: 3 dates in 2031, 2 null amounts, one duplicated id pair, one negative amount."""
    with connect(MEMORY) as con:
        con.execute("""
        create table t as select * from (values
            ('a', date '2024-01-01', 1.0), ('b', date '2024-01-02', 2.0), ('c', date '2031-01-01', 3.0),
            ('d', date '2024-01-04', null), ('e', date '2031-01-02', 5.0), ('f', date '2024-01-06', -6.0),
            ('g', date '2031-01-03', 7.0), ('h', date '2024-01-08', null), ('a', date '2024-01-09', 9.0),
            ('j', date '2024-01-10', 10.0)
        ) as v(id, day, amount)
    """)
        yield con


PARAMS = {"today": __import__("pandas").Timestamp("2030-01-01")}


@pytest.mark.parametrize("chunk_rows", [1_000_000, 3])
def test_bad_table_fails_for_the_right_reason_with_exact_counts(
    tmp_path: Path, small_config: ChurnConfig, table, judge: Judge, chunk_rows: int
) -> None:
    # chunk_rows=3 forces 4 streamed batches and 4 hash partitions: the totals must not change.
    suite = load_suite(write_suite(tmp_path, [
        expectation("expect_column_values_to_be_between", column="day", max_value={"$PARAMETER": "today"}),
        expectation("expect_column_values_to_not_be_null", column="amount"),
        expectation("expect_column_values_to_not_be_null", "warning", column="amount", mostly=0.8),
        expectation("expect_column_values_to_not_be_null", "warning", column="amount", mostly=0.9),
        expectation("expect_column_values_to_be_unique", column="id"),
        expectation("expect_column_values_to_be_between", column="amount", min_value=0),
        expectation("expect_column_max_to_be_between", column="amount", max_value=9),
        expectation("expect_table_row_count_to_be_between", min_value=11),
        expectation("expect_column_values_to_be_between", column="id", min_value=0, max_value=1),
    ]), small_config)
    checks, validation = run_suite(table, "t", suite, PARAMS, chunk_rows, judge)
    got = [(c.expectation_type, c.column_name, c.success, c.unexpected_count) for c in checks]
    assert got[:7] == [
        ("expect_column_values_to_be_between", "day", False, 3),
        ("expect_column_values_to_not_be_null", "amount", False, 2),
        ("expect_column_values_to_not_be_null", "amount", True, 2),  # 80% known >= mostly 0.8
        ("expect_column_values_to_not_be_null", "amount", False, 2),  # 80% known < mostly 0.9
        ("expect_column_values_to_be_unique", "id", False, 2),  # both rows of the duplicated id
        ("expect_column_values_to_be_between", "amount", False, 1),
        ("expect_column_max_to_be_between", "amount", False, None),
    ]
    assert checks[6].observed_value == "10.0"
    assert checks[7].success is False and checks[7].observed_value == "10"
    assert all(c.element_count == 10 for c in checks[:6])
    assert "2031-01-0" in checks[0].details
    # An expectation that raises inside GX (numbers vs text) is a failure carrying the exception.
    error = checks[8]
    assert error.success is False and error.unexpected_count is None
    assert error.details.startswith("expectation raised:") and len(error.details) > len("expectation raised: ")
    assert validation.success is False


def test_good_table_passes(tmp_path: Path, small_config: ChurnConfig, table, judge: Judge) -> None:
    table.execute("delete from t where day > date '2030-01-01' or amount is null or amount < 0 "
                  "or (id = 'a' and amount = 9)")
    suite = load_suite(write_suite(tmp_path, [
        expectation("expect_column_values_to_be_between", column="day", max_value={"$PARAMETER": "today"}),
        expectation("expect_column_values_to_not_be_null", column="amount"),
        expectation("expect_column_values_to_be_unique", column="id"),
        expectation("expect_column_values_to_be_between", column="amount", min_value=0),
    ]), small_config)
    checks, validation = run_suite(table, "t", suite, PARAMS, 2, judge)
    assert [c.success for c in checks] == [True] * 4
    assert [c.unexpected_count for c in checks] == [0] * 4
    assert validation.success is True


def test_missing_column_is_an_error_not_a_pass(tmp_path: Path, small_config: ChurnConfig, table, judge: Judge) -> None:
    suite = load_suite(write_suite(tmp_path, [
        expectation("expect_column_values_to_not_be_null", column="no_such_column"),
    ]), small_config)
    [check], validation = run_suite(table, "t", suite, PARAMS, 100, judge)
    assert check.success is False
    assert "no_such_column" in check.details and "expectation raised" in check.details
    # The Data Docs page still renders (the error shows there too).
    config = small_config.replace_paths(reports_dir=tmp_path / "reports")
    [page] = write_docs(config, "mart", "r", [suite_run(suite, [check], validation.meta["rows"], PARAMS)])
    assert "no_such_column" in page.read_text()


def test_data_docs_show_the_asset_run_and_a_planted_failure_on_the_index(
    tmp_path: Path, small_config: ChurnConfig, table, judge: Judge
) -> None:
    config = small_config.replace_paths(reports_dir=tmp_path / "reports")
    suite = load_suite(write_suite(tmp_path / "bad", [
        expectation("expect_column_values_to_be_unique", column="id"),  # planted: id 'a' twice
        expectation("expect_column_values_to_not_be_null", "warning", column="amount", mostly=0.5),
    ]), small_config)
    checks, _ = run_suite(table, "t", suite, PARAMS, 100, judge)
    [failed_page] = write_docs(config, "mart", "run-bad", [suite_run(suite, checks, 10, PARAMS)], as_of="2030-01-01")
    table.execute("delete from t where id = 'a' and amount = 9")
    good, _ = run_suite(table, "t", suite, PARAMS, 100, judge)
    [passed_page] = write_docs(config, "mart", "run-good", [suite_run(suite, good, 9, PARAMS)], as_of="2030-02-01")

    page = failed_page.read_text()
    assert "t (10 rows)" in page and "run-bad" in page and "2030-01-01" in page  # data asset, run name, as_of
    assert re.search(r"✗ failed</td><td>expect_column_values_to_be_unique</td><td>id</td>", page)
    assert re.search(r"✓ passed</td><td>expect_column_values_to_not_be_null</td>", page)
    assert "2 of 10" in page  # both rows of the duplicated id
    index = failed_page.parent / "index.html"
    rows = re.findall(r'<tr class="(\w+)"><td[^>]*>[^<]*</td><td><a href="([^"]+)">', index.read_text())
    assert rows == [("passed", passed_page.name), ("failed", failed_page.name)]  # newest first
    # Offline: no http(s) or protocol-relative reference; Home leads to the reports' index.
    for text in (page, index.read_text()):
        assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
        assert '<a href="../../index.html">' in text
    assert (failed_page.parent / "../../index.html").resolve() == (config.warehouse.reports_dir / "index.html")


def test_an_all_null_column_is_judged_not_crashed(tmp_path: Path, small_config: ChurnConfig, table,
                                                  judge: Judge) -> None:
    table.execute("update t set day = null")
    suite = load_suite(write_suite(tmp_path, [
        expectation("expect_column_values_to_be_between", column="day", max_value={"$PARAMETER": "today"}),
    ]), small_config)
    for chunk_rows in (100, 3):
        [check], _ = run_suite(table, "t", suite, PARAMS, chunk_rows, judge)
        assert (check.success, check.unexpected_count, check.element_count) == (True, 0, 10)


def test_malformed_suites_are_refused_with_the_file_named(tmp_path: Path, small_config: ChurnConfig) -> None:
    no_severity = write_suite(tmp_path / "a", [{"type": "expect_column_values_to_not_be_null",
                                                "kwargs": {"column": "x"}, "meta": {}}])
    with pytest.raises(SuiteError, match=r"suite.json: expectation #0 .*severity"):
        load_suite(no_severity, small_config)
    bad_kwargs = write_suite(tmp_path / "b",
                             [expectation("expect_column_max_to_be_between", column="x", max_value="soon")])
    with pytest.raises(SuiteError, match=r"expectation #0 \(expect_column_max_to_be_between\) is invalid"):
        load_suite(bad_kwargs, small_config)


def test_every_shipped_suite_is_valid_gx_with_severity() -> None:
    """Every dataset profile in churn.yml ships suites for every stage (the list follows the config)."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    datasets = set(load_config(REPO_ROOT / "churn.yml").datasets)
    files = sorted((REPO_ROOT / "expectations").glob("*/*.json"))
    assert {p.parent.name for p in files} == datasets
    stages = {(p.parent.name, json.loads(p.read_text())["meta"]["stage"]) for p in files}
    assert stages == {(d, s) for d in datasets for s in STAGES}
    for path in files:
        suite = json.loads(path.read_text())
        assert suite["meta"]["table"], path
        for spec in suite["expectations"]:
            assert spec["meta"]["severity"] in SEVERITIES, (path, spec)
            kwargs = {k: ("x" if v == "$each_feature" else v) for k, v in spec["kwargs"].items()}
            ExpectationConfiguration(type=spec["type"], kwargs=kwargs).to_domain_obj()


def test_generated_landing_and_mart_pass_and_are_recorded(private_warehouse: ChurnConfig) -> None:
    config = private_warehouse
    landing = audit(config, "landing", "run-1")
    mart = audit(config, "mart", "run-1")
    assert landing.critical_failures == [] and mart.critical_failures == []
    with connect(config.warehouse.build_db, read_only=True) as con:
        stored = con.rows(
            f"select stage, count(*), count(distinct suite), bool_and(element_count > 0) "
            f"from {RESULTS_TABLE} where run_id = 'run-1' group by stage order by stage")
        counts = con.scalar(f"select count(*) from {COUNTS_TABLE} where run_id = 'run-1'")
    assert stored == [("landing", len(landing.results), 5, True), ("mart", len(mart.results), 1, True)]
    assert counts == 6
    # One expectation per contract feature came from the `$each_feature` template.
    assert sum(r.column_name not in (None, config.problem.target, config.problem.as_of_column)
               for r in mart.results) >= 10
    assert all(p.exists() and "<html" in p.read_text()[:500].lower() for p in landing.docs + mart.docs)
    assert (config.warehouse.reports_dir / "data_docs" / "demo" / "index.html").exists()
    # Re-auditing the same run replaces its rows instead of duplicating them.
    audit(config, "mart", "run-1")
    with connect(config.warehouse.build_db, read_only=True) as con:
        again = con.rows(f"select count(*) from {RESULTS_TABLE} where run_id = 'run-1' and stage = 'mart'")
    assert again[0][0] == len(mart.results)


def test_row_count_band_and_label_share_band_stop_the_run(private_warehouse: ChurnConfig) -> None:
    config = private_warehouse
    mart, target = config.dataset.feature_mart, config.problem.target
    audit(config, "mart", "first")  # records the mart's row count
    with connect(config.warehouse.build_db) as con:
        total = con.scalar(f"select count(*) from {mart}")
        con.execute(f"delete from {mart} where hash(customer_id) % 10 < 7")  # ~70% of rows gone
        kept = con.scalar(f"select count(*) from {mart}")
        con.execute(f"update {mart} set {target} = 1 where {target} is not null")
    assert kept < total * (1 - config.quality.row_count_tolerance)
    with pytest.raises(AuditError) as caught:
        audit(config, "mart", "second")
    message = str(caught.value)
    assert f"expect_table_row_count_to_be_between failed [critical]: observed {kept}" in message
    assert f"column {target}): expect_column_mean_to_be_between failed [critical]: observed 1.0" in message
    failed = {(r.expectation_type, r.column_name) for r in caught.value.report.critical_failures}
    assert failed == {("expect_table_row_count_to_be_between", None), ("expect_column_mean_to_be_between", target)}
    # A failed audit does not move the row-count baseline.
    params = suite_parameters(config, load_suites_mart(config), None)
    assert params["min_rows"] == int(total * (1 - config.quality.row_count_tolerance))


def load_suites_mart(config: ChurnConfig):
    from ml.quality.audit import load_suites

    [suite] = load_suites(config, "mart")
    return suite


def test_warning_is_recorded_and_the_run_goes_on(private_warehouse: ChurnConfig) -> None:
    config = private_warehouse
    with connect(config.warehouse.build_db) as con:
        con.execute(f"update {config.dataset.feature_mart} set plan = null")  # features may be null: warning only
    report = audit(config, "mart", "warn")
    [warning] = report.warnings
    assert (warning.column_name, warning.severity, warning.success) == ("plan", "warning", False)
    assert warning.unexpected_count == warning.element_count > 0
    with connect(config.warehouse.build_db, read_only=True) as con:
        row = con.rows(f"select success, unexpected_count from {RESULTS_TABLE} "
                       "where run_id = 'warn' and column_name = 'plan'")
    assert row == [(False, warning.unexpected_count)]


@pytest.mark.parametrize("planted", ["2999-01-01", "0001-01-01"], ids=["after-today", "before-earliest"])
def test_landing_suite_finds_future_dates_in_the_file(private_warehouse: ChurnConfig, planted: str) -> None:
    config = private_warehouse
    path = config.dataset.landing_dir / "payments.parquet"
    with duckdb.connect() as con:
        con.execute(f"copy (select * replace (case when row_number() over () <= 4 then date '{planted}' "
                    f"else invoice_date end as invoice_date) from read_parquet('{path}')) "
                    f"to '{path}.new' (format parquet)")
    Path(f"{path}.new").replace(path)
    with pytest.raises(AuditError, match=r"demo_raw_payments \(table payments, column invoice_date\): "
                                         r"expect_column_values_to_be_between failed \[critical\]: 4 of [\d,]+ rows"):
        audit(config, "landing", "future")


def test_a_band_contradicting_the_decision_stops_the_run(trained_warehouse: ChurnConfig, tmp_path: Path) -> None:
    from ml.modeling.score import score
    from tests.conftest import QUICK_TRAINING, copy_warehouse

    config = copy_warehouse(trained_warehouse, tmp_path / "wh", QUICK_TRAINING)
    score(config)
    audit(config, "scores", "consistent")
    with connect(config.warehouse.build_db) as con:
        con.execute("update churn_scores set will_churn = true where rowid in "
                    "(select rowid from churn_scores where risk_band = 'low' limit 3)")
    with pytest.raises(AuditError) as caught:
        audit(config, "scores", "contradicting")
    [failed] = caught.value.report.critical_failures
    assert failed.expectation_type == "expect_column_pair_values_to_be_in_set"
    assert failed.unexpected_count == 3
