"""Row-wise expectations counted by SQL give GX's own verdicts, and read no rows.

- Planted on one table: NaN and NULL in a float column, NULL in an integer
  and a text column, values exactly on the bounds, infinities, unknown levels.
  For every compiled expectation (not_null, between with and without strict
  bounds and `mostly`, in_set on text, on numbers and on booleans, bounds as suite
  parameters, uniqueness of one column and of compound keys, NULLs and NaNs
  among the repeated values, pairs of a boolean, number or float and a text
  column in a listed set, with nulls listed and every `ignore_row_if`) the
  audit's verdict, unexpected and element counts equal GX's own verdict on
  the whole table in one pandas batch.
- What has no exact SQL twin stays with GX: date bounds, bounds of the wrong
  type for the column, a boolean column, unknown kwargs (`row_condition`).
- A suite of compiled checks over 5,000 rows fetches at most the failing
  values' sample: no statement returns a row per table row.
- On Spark (marked), the same table read from Parquet (NaN and NULL kept
  apart) gets the same stored checks as on DuckDB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.quality.audit import Judge, load_suite, run_suite
from ml.quality.pushdown import SAMPLE_VALUES, compile_check
from ml.warehouse import MEMORY, Session, connect
from tests.conftest import CountingReader
from tests.test_quality import expectation, write_suite

PARAMS = {"low": 0.0, "high": 1.0, "bands": ["low", "medium", "high"], "today": pd.Timestamp("2030-01-01")}

COMPILED = [
    expectation("expect_column_values_to_not_be_null", column="score"),
    expectation("expect_column_values_to_not_be_null", "warning", column="score", mostly=0.8),
    expectation("expect_column_values_to_not_be_null", column="seats"),
    expectation("expect_column_values_to_not_be_null", column="band"),
    expectation("expect_column_values_to_be_between", column="score", min_value=0, max_value=1),
    expectation("expect_column_values_to_be_between", column="score",
                min_value={"$PARAMETER": "low"}, max_value={"$PARAMETER": "high"}, strict_min=True),
    expectation("expect_column_values_to_be_between", column="score", max_value=1, strict_max=True),
    expectation("expect_column_values_to_be_between", column="score", min_value=0.5, mostly=0.3),
    expectation("expect_column_values_to_be_between", column="seats", min_value=1, max_value=4),
    expectation("expect_column_values_to_be_in_set", column="band", value_set={"$PARAMETER": "bands"}),
    expectation("expect_column_values_to_be_in_set", column="seats", value_set=[1, 2, 5]),
    expectation("expect_column_values_to_be_in_set", column="flag", value_set=[True]),
    expectation("expect_column_values_to_be_unique", column="id"),
    expectation("expect_column_values_to_be_unique", column="score"),
    expectation("expect_column_values_to_be_unique", column="band", mostly=0.01),
    expectation("expect_compound_columns_to_be_unique", column_list=["band", "seats"]),
    expectation("expect_compound_columns_to_be_unique", column_list=["id", "score"]),
    expectation("expect_column_pair_values_to_be_in_set", column_A="flag", column_B="band",
                value_pairs_set=[[False, "low"], [True, "medium"], [True, "high"], [False, "weird"]]),
    expectation("expect_column_pair_values_to_be_in_set", column_A="seats", column_B="band",
                value_pairs_set=[[1, "low"], [2, "medium"], [5, "high"], [None, "weird"], [7, None]],
                ignore_row_if="neither"),
    expectation("expect_column_pair_values_to_be_in_set", column_A="seats", column_B="band",
                value_pairs_set=[[1, "low"], [2, "medium"], [5, "high"]], ignore_row_if="either_value_is_missing"),
    expectation("expect_column_pair_values_to_be_in_set", column_A="score", column_B="band",
                value_pairs_set=[[0.25, "low"], [None, None], [1.0, "high"]]),
    expectation("expect_column_pair_values_to_be_in_set", column_A="flag", column_B="band",
                value_pairs_set=[[True, "low"], [False, "low"], [True, "medium"], [False, "medium"], [True, "high"],
                                 [False, "high"], [True, "weird"], [False, "weird"]]),
    expectation("expect_column_pair_values_to_be_in_set", column_A="score", column_B="band",
                value_pairs_set=[[0.25, "low"], [1.0, "high"]], mostly=0.02),
    expectation("expect_column_pair_values_to_be_in_set", column_A="seats", column_B="band", mostly=0.1,
                value_pairs_set=[[1, "low"], [2, "medium"], [5, "high"]], ignore_row_if="either_value_is_missing"),
]
KEPT_WITH_GX = [
    expectation("expect_column_values_to_be_between", column="day", max_value={"$PARAMETER": "today"}),
    expectation("expect_column_values_to_be_between", column="band", min_value=0),
    expectation("expect_column_values_to_be_between", column="flag", min_value=0, max_value=1),
    expectation("expect_column_values_to_not_be_null", column="score", row_condition='seats > 1'),
    expectation("expect_column_pair_values_to_be_in_set", column_A="flag", column_B="band",
                value_pairs_set=[[1, "low"], [0, "medium"]]),  # numbers for a boolean: pandas' == is not SQL's
    expectation("expect_column_pair_values_to_be_in_set", column_A="seats", column_B="band",
                value_pairs_set=[["1", "low"]]),  # text for a number
    expectation("expect_column_values_to_be_in_set", column="flag", value_set=[1]),  # a number for a boolean
]


def _frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    score = rng.uniform(-0.2, 1.2, size=n)
    score[1:5] = [np.inf, -np.inf, 0.0, 1.0]
    score[6] = np.nan  # NULL in DuckDB
    score[7:9] = 0.25  # a repeated score
    seats = pd.array(rng.choice([1, 2, 5, 7], size=n), dtype="Int64")
    seats[3] = pd.NA
    band = pd.array(rng.choice(["low", "medium", "high", "weird"], size=n), dtype="string")
    band[[1, 8]] = pd.NA
    seats[8] = pd.NA  # a compound key whose columns are all NULL
    return pd.DataFrame({"id": [f"c{i}" for i in range(n)], "score": score, "seats": seats, "band": band,
                         "flag": rng.uniform(size=n) < 0.5,
                         "day": pd.Timestamp("2029-12-30") + pd.to_timedelta(rng.integers(0, 4, size=n), "D")})


def _create(con: Session, frame: pd.DataFrame) -> None:
    """Table t from `frame`, with real NaNs planted (pandas' NaN arrives in DuckDB as NULL)."""
    with con.registered(frame) as name:
        con.execute(f'create table t as select * from "{name}"')
    con.execute("update t set score = 'nan'::double where rowid % 20 in (0, 5)")


@pytest.fixture
def table() -> Session:
    with connect(MEMORY) as con:
        _create(con, _frame())
        assert con.rows("select count(*) filter (where isnan(score)), count(*) filter (where score is null) "
                        "from t") == [(4, 1)]
        yield con


def test_compiled_checks_give_gx_verdicts(tmp_path: Path, small_config: ChurnConfig, table: Session) -> None:
    suite = load_suite(write_suite(tmp_path, COMPILED), small_config)
    dtypes = dict(table.frame("select * from t limit 0").dtypes.items())
    for e in suite.expectations:
        assert compile_check(e, 0, dtypes, PARAMS) is not None, e.expectation_type
    checks, _ = run_suite(table, "t", suite, PARAMS, 1_000_000, Judge())
    whole = table.frame("select * from t")
    own = Judge().validate(whole, suite.expectations, PARAMS)
    assert len(checks) == len(own)
    for check, gx in zip(checks, own, strict=True):
        assert (check.success, check.unexpected_count, check.element_count) == \
            (gx.success, gx.result["unexpected_count"], gx.result["element_count"]), (check.expectation_type,
                                                                                     check.column_name)
        if "pair" in check.expectation_type:  # the share judged excludes the rows ignore_row_if skips
            assert check.observed_value == f"{gx.result['unexpected_percent']:.4g}% unexpected"
    assert not all(c.success for c in checks) and any(c.success for c in checks)
    assert "weird" in next(c.details for c in checks if c.column_name == "band" and not c.success
                           and "in_set" in c.expectation_type)


def test_what_has_no_exact_sql_twin_stays_with_gx(tmp_path: Path, small_config: ChurnConfig,
                                                  table: Session) -> None:
    suite = load_suite(write_suite(tmp_path, KEPT_WITH_GX), small_config)
    dtypes = dict(table.frame("select * from t limit 0").dtypes.items())
    for e in suite.expectations:
        assert compile_check(e, 0, dtypes, PARAMS) is None, e.configuration
    checks, _ = run_suite(table, "t", suite, PARAMS, 1_000_000, Judge())
    own = Judge().validate(table.frame("select * from t"), suite.expectations, PARAMS)
    assert [c.success for c in checks] == [bool(r.success) and not r.exception_info.get("raised_exception")
                                           for r in own]


def test_compiled_checks_fetch_no_row_per_table_row(tmp_path: Path, small_config: ChurnConfig) -> None:
    """Planted: streaming the column to GX returned every row (and needs `chunks`, which this reader lacks)."""
    suite = load_suite(write_suite(tmp_path, COMPILED), small_config)
    with connect(MEMORY) as con:
        _create(con, pd.concat([_frame()] * 125, ignore_index=True))
        reader = CountingReader(con)
        checks, _ = run_suite(reader, "t", suite, PARAMS, 1_000, Judge())
    assert all(c.element_count == 5_000 for c in checks)
    assert max(n for _, n in reader.returned) <= SAMPLE_VALUES


@pytest.mark.spark
def test_compiled_checks_on_spark_equal_duckdb(tmp_path: Path, small_config: ChurnConfig, table: Session,
                                               spark_warehouse) -> None:
    minmax = [expectation("expect_column_max_to_be_between", column="score", max_value=2),
              expectation("expect_column_min_to_be_between", column="seats", min_value=1)]
    suite = load_suite(write_suite(tmp_path, COMPILED + KEPT_WITH_GX[:1] + minmax), small_config)
    export = tmp_path / "t.parquet"
    table.execute(f"copy t to '{export}' (format parquet)")
    on_duckdb, _ = run_suite(table, "t", suite, PARAMS, 1_000_000, Judge())
    with spark_warehouse.temp_table("pushdown_t", f"select * from parquet.`{export}`") as name:
        assert spark_warehouse.rows(f"select count(*) from {name} where isnan(score)") == [(4,)]
        on_spark, _ = run_suite(spark_warehouse, name, suite, PARAMS, 1_000_000, Judge())

    def stored(checks):
        return [(c.expectation_type, c.column_name, c.success, c.unexpected_count, c.element_count,
                 str(c.observed_value)) for c in checks]

    assert stored(on_spark) == stored(on_duckdb)


def test_column_stdev_and_mean_from_sql_give_gx_verdicts(tmp_path: Path, small_config: ChurnConfig,
                                                         table: Session) -> None:
    """Planted NaNs: SQL's avg and stddev_samp would return NaN where pandas (GX's engine) skips them,
    and SQL's max would be the NaN itself."""
    suite = load_suite(write_suite(tmp_path, [
        expectation("expect_column_stdev_to_be_between", column="seats", min_value=0.001, max_value=2.5),
        expectation("expect_column_stdev_to_be_between", column="flag", min_value=0.6),
        expectation("expect_column_mean_to_be_between", column="seats", min_value=2, max_value=4),
    ]), small_config)
    # score holds infinities (its deviation is NaN to pandas and SQL alike); a finite float column with NaNs:
    table.execute("alter table t add column fraction double")
    table.execute("update t set fraction = case when rowid % 20 in (0, 5) then 'nan'::double "
                  "else rowid / 40.0 end")
    suite_nan = load_suite(write_suite(tmp_path / "nan", [
        expectation("expect_column_stdev_to_be_between", column="fraction", min_value=0.2, max_value=0.4),
        expectation("expect_column_mean_to_be_between", column="fraction", min_value=0.4, max_value=0.6),
        expectation("expect_column_max_to_be_between", column="fraction", max_value=1.0),
        expectation("expect_column_min_to_be_between", column="fraction", min_value=0.01),
        expectation("expect_column_max_to_be_between", column="day", max_value={"$PARAMETER": "today"}),
    ]), small_config)
    whole = table.frame("select * from t")
    for chosen in (suite, suite_nan):
        checks, _ = run_suite(table, "t", chosen, PARAMS, 1_000_000, Judge())
        own = Judge().validate(whole, chosen.expectations, PARAMS)
        for check, gx in zip(checks, own, strict=True):
            assert check.success == gx.success, (check.expectation_type, check.column_name)
            observed = gx.result["observed_value"]
            if isinstance(observed, float):
                assert float(check.observed_value) == pytest.approx(observed, rel=1e-12)
            else:
                assert str(check.observed_value).strip('"')[:10] == str(observed)[:10], (check.column_name, observed)
    reader = CountingReader(table)
    run_suite(reader, "t", suite_nan, PARAMS, 1_000_000, Judge())
    assert max(n for _, n in reader.returned) <= 2  # a mean, a deviation, or a minimum and a maximum
