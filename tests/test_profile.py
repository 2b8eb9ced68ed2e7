"""`churn profile` on the small demo warehouse: statistics checked against direct SQL.

Every expected value is recomputed here from the mart itself, independently of
ml/profile.py's queries, so a wrong filter, join or quantile shows up as a
mismatch rather than passing by construction.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd
import pytest

import ml.reports.profile as profile_module
from ml.config import ChurnConfig
from ml.features.contract import FeatureContract, load_contract
from ml.features.dbt import dbt_target_path
from ml.features.mart import sample_cut
from ml.features.night import MartBefore, record_mart_build
from ml.reports.profile import (
    ORDER_STATISTICS_SAMPLE,
    PLOTS,
    PROFILE_SNAPSHOTS,
    TABLES,
    ProfileError,
    correlations,
    numeric_summary,
    order_statistics_source,
    profile,
    stored_snapshot_stats,
)
from ml.warehouse import Session, connect
from tests.conftest import REPO_ROOT, copy_warehouse


def _contract(config: ChurnConfig) -> FeatureContract:
    return load_contract(dbt_target_path(config) / "manifest.json", config.dataset.feature_mart)


@pytest.fixture(scope="module")
def profiled(built_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory):
    """One profiled copy of the demo warehouse, shared by the read-only checks."""
    config = copy_warehouse(built_warehouse, tmp_path_factory.mktemp("profiled"))
    return config, profile(config)


def test_tables_hold_one_row_per_contract_column(profiled) -> None:
    config, result = profiled
    contract = _contract(config)
    with connect(config.warehouse.build_db, read_only=True) as con:
        for table in TABLES:
            assert con.exists(table), table
        names = [r[0] for r in con.rows(
            "select column_name from profile_columns where feature_mart = ? order by column_name",
            [contract.model])]
        roles = dict(con.rows(
            "select column_name, role from profile_columns where feature_mart = ?", [contract.model]))
    assert names == sorted(contract.columns)
    assert result.columns == len(contract.columns)
    assert roles[contract.key] == "key" and roles[contract.label] == "label" and roles[contract.as_of] == "as_of"
    assert {roles[f] for f in contract.feature_names} == {"feature"}


def test_missing_shares_match_a_direct_count(profiled) -> None:
    config, _ = profiled
    contract = _contract(config)
    mart = contract.model
    with connect(config.warehouse.build_db, read_only=True) as con:
        profiled_missing = {
            name: (count, share) for name, count, share in con.rows(
                "select column_name, missing_count, missing_share from profile_columns where feature_mart = ?",
                [mart])
        }
        total = con.scalar(f'select count(*) from "{mart}"')
        for column in contract.columns:
            direct = con.scalar(f'select count(*) from "{mart}" where "{column}" is null')
            assert profiled_missing[column][0] == direct, column
            assert profiled_missing[column][1] == pytest.approx(direct / total), column
    # The demo mart's label is NULL where the horizon is not yet observed: a real check, not all zeros.
    assert profiled_missing[contract.label][0] > 0


def test_class_balance_matches_the_label_mean(profiled) -> None:
    config, _ = profiled
    contract = _contract(config)
    mart, label, as_of = contract.model, contract.label, contract.as_of
    with connect(config.warehouse.build_db, read_only=True) as con:
        overall = con.one(
            "select rows, labelled_rows, positives, positive_rate from profile_class_balance "
            "where feature_mart = ? and scope = 'overall'", [mart])
        direct = con.one(
            f'select count(*), count("{label}"), sum("{label}"), avg("{label}") from "{mart}"')
        per_date = dict(con.rows(
            "select snapshot_date, positive_rate from profile_class_balance "
            "where feature_mart = ? and scope = 'snapshot'", [mart]))
        direct_dates = dict(con.rows(
            f'select cast("{as_of}" as date), avg("{label}") from "{mart}" group by 1'))
    assert overall[:3] == tuple(direct[:3])
    assert overall[3] == pytest.approx(direct[3])
    assert len(per_date) == len(direct_dates) > 1
    for date, rate in direct_dates.items():
        if rate is None:
            assert per_date[date] is None or np.isnan(per_date[date])
        else:
            assert per_date[date] == pytest.approx(rate)


def test_outliers_follow_the_iqr_rule_on_the_full_mart(profiled) -> None:
    config, _ = profiled
    contract = _contract(config)
    mart = contract.model
    with connect(config.warehouse.build_db, read_only=True) as con:
        checked = 0
        for feature in contract.numeric:
            values = np.array([r[0] for r in con.rows(
                f'select cast("{feature}" as double) from "{mart}" where "{feature}" is not null')])
            p25, p75 = np.quantile(values, [0.25, 0.75])  # linear interpolation, like quantile_cont
            low, high = p25 - 1.5 * (p75 - p25), p75 + 1.5 * (p75 - p25)
            row = con.one(
                "select p25, p75, outliers_low, outliers_high, min_value, max_value from profile_columns "
                "where feature_mart = ? and column_name = ?", [mart, feature])
            assert row[0] == pytest.approx(p25) and row[1] == pytest.approx(p75), feature
            assert row[2] == int((values < low).sum()) and row[3] == int((values > high).sum()), feature
            assert (row[4], row[5]) == (pytest.approx(values.min()), pytest.approx(values.max())), feature
            checked += row[2] + row[3] > 0
    assert checked > 0, "no numeric feature of the demo mart has outliers: the check would be vacuous"


def test_a_long_history_reads_quantiles_from_a_seeded_sample_and_counts_from_every_row(profiled) -> None:
    """Past the bound, quantiles come from the same sample on every run; counts and means stay exact."""
    config, _ = profiled
    contract = _contract(config)
    mart = contract.model
    feature = contract.numeric[0]
    with connect(config.warehouse.build_db, read_only=True) as con:
        total = con.scalar(f'select count(*) from "{mart}"')
        with order_statistics_source(con, mart, contract, seed=7, rows=total // 10) as (ordered, rows):
            assert ordered != f'"{mart}"' and 0.7 * total // 10 < rows < 1.3 * total // 10
            sampled = np.array([r[0] for r in con.rows(
                f'select cast("{feature}" as double) from {ordered} where "{feature}" is not null')])
            summary = numeric_summary(con, mart, contract, ordered).set_index("column_name").loc[feature]
        with order_statistics_source(con, mart, contract, seed=7, rows=total // 10) as again:
            assert again == (ordered, rows) and np.array_equal(sampled, [r[0] for r in con.rows(
                f'select cast("{feature}" as double) from {ordered} where "{feature}" is not null')])
        with order_statistics_source(con, mart, contract, seed=7, rows=total) as whole:
            assert whole == (f'"{mart}"', total)
        every = np.array([r[0] for r in con.rows(
            f'select cast("{feature}" as double) from "{mart}" where "{feature}" is not null')])
    assert summary["p25"] == pytest.approx(np.quantile(sampled, 0.25))
    assert summary["p99"] == pytest.approx(np.quantile(sampled, 0.99))
    assert summary["mean"] == pytest.approx(every.mean()) and summary["max_value"] == pytest.approx(every.max())
    fences = (summary["low_fence"], summary["high_fence"])
    assert summary["outliers_high"] == int((every > fences[1]).sum())  # outliers counted on every row


def test_a_sampled_profile_builds_its_sample_once_with_the_subquerys_figures(
        private_warehouse: ChurnConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: a sample left as a subquery re-runs its seeded filter over the mart in every statement reading it."""
    config = private_warehouse
    contract = _contract(config)
    mart = contract.model
    with connect(config.warehouse.build_db, read_only=True) as con:
        total = con.row_count(mart)
    bound = total // 10
    monkeypatch.setattr(profile_module, "order_statistics_source",
                        functools.partial(order_statistics_source, rows=bound))
    statements: list[str] = []

    def spying(original):
        def spy(self, sql, params=None):
            statements.append(sql)
            return original(self, sql, params)
        return spy

    for name in ("execute", "rows", "one", "frame"):  # scalar and row_count go through one
        monkeypatch.setattr(Session, name, spying(getattr(Session, name)))
    profile(config, run_id="sampled", sample_rows=500)
    monkeypatch.undo()

    filtered = [s for s in statements if f"< '{sample_cut(bound / total)}'" in s]  # the md5 predicate
    assert len(filtered) == 1 and filtered[0].startswith(f"create or replace temp table {ORDER_STATISTICS_SAMPLE}")
    reading = [s for s in statements if ORDER_STATISTICS_SAMPLE in s]
    assert len(reading) >= 4, "count, quantiles and correlations read the temp table"
    assert reading[-1] == f"drop table {ORDER_STATISTICS_SAMPLE}", "and it is dropped after them"
    # The figures are those of the former subquery over the same seeded filter.
    subquery = f'(select * from "{mart}" where {filtered[0].split(" where ", 1)[1]})'
    no_categories = pd.DataFrame(columns=["column_name", "cramers_v"])
    with connect(config.warehouse.build_db, read_only=True) as con:
        expected = numeric_summary(con, mart, contract, subquery).set_index("column_name")
        expected_corr = correlations(con, mart, contract, no_categories, subquery)
        stored = con.frame("select * from profile_columns where feature_mart = ?", [mart]).set_index("column_name")
        stored_corr = con.frame("select column_a, column_b, correlation from profile_correlations "
                                "where feature_mart = ? and method = 'pearson'", [mart])
    order = [c for c in expected.columns if c.startswith("p") or c.startswith("median")]
    assert len(order) > 3
    pd.testing.assert_frame_equal(stored.loc[expected.index, order], expected[order], check_exact=True)
    merged = expected_corr.merge(stored_corr, on=["column_a", "column_b"], suffixes=("", "_stored"))
    assert len(merged) == len(expected_corr) > 0
    assert np.allclose(merged["correlation"], merged["correlation_stored"], rtol=1e-12, atol=1e-15, equal_nan=True)


def test_distributions_by_label_and_correlations(profiled) -> None:
    config, _ = profiled
    contract = _contract(config)
    mart, label = contract.model, contract.label
    with connect(config.warehouse.build_db, read_only=True) as con:
        feature = contract.numeric[0]
        means = con.one(
            "select mean_label_0, mean_label_1 from profile_columns where feature_mart = ? and column_name = ?",
            [mart, feature])
        direct = con.one(
            f'select avg("{feature}") filter (where "{label}" = 0), avg("{feature}") filter (where "{label}" = 1) '
            f'from "{mart}"')
        assert means == (pytest.approx(direct[0]), pytest.approx(direct[1]))

        category = contract.categorical[0]
        rates = dict(con.rows(
            "select category, churn_rate from profile_categories where feature_mart = ? and column_name = ?",
            [mart, category]))
        direct_rates = dict(con.rows(
            f'select coalesce(cast("{category}" as varchar), \'(missing)\'), avg("{label}") '
            f'from "{mart}" group by 1'))
        assert rates.keys() == direct_rates.keys()
        for value, rate in direct_rates.items():
            assert rates[value] == pytest.approx(rate), value

        frame = con.frame(
            f'select {", ".join(f"{chr(34)}{c}{chr(34)}" for c in contract.numeric)}, "{label}" from "{mart}"')
        matrix = con.rows(
            "select column_a, column_b, correlation from profile_correlations "
            "where feature_mart = ? and scope = 'feature_pair'", [mart])
        with_label = dict(con.rows(
            "select column_a, correlation from profile_correlations "
            "where feature_mart = ? and scope = 'feature_label'", [mart]))
    pairs = {(a, b): v for a, b, v in matrix}
    assert len(pairs) == len(contract.numeric) ** 2
    a, b = contract.numeric[0], contract.numeric[1]
    both = frame[[a, b]].dropna().astype(float)
    assert pairs[(a, b)] == pytest.approx(np.corrcoef(both[a], both[b])[0, 1], abs=1e-9)
    assert pairs[(a, b)] == pairs[(b, a)] and pairs[(a, a)] == 1.0
    labelled = frame[[a, label]].dropna().astype(float)
    assert with_label[a] == pytest.approx(np.corrcoef(labelled[a], labelled[label])[0, 1], abs=1e-9)
    assert set(with_label) == set(contract.feature_names)
    assert all(0 <= with_label[c] <= 1 for c in contract.categorical)


def test_plots_and_report_are_written(profiled) -> None:
    config, result = profiled
    folder = result.report_path.parent
    assert folder == config.warehouse.reports_dir / "profile" / config.dataset.name
    page = result.report_path.read_text()
    for name in PLOTS:
        path = folder / name
        assert path.stat().st_size > 5_000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'src="{name}"' in page
    assert config.dataset.feature_mart in page
    # Nothing but the report is left behind (staging folders are swapped in, not copied).
    assert [p.name for p in folder.parent.iterdir()] == [config.dataset.name]


def test_rerun_replaces_rows_instead_of_appending(private_warehouse: ChurnConfig) -> None:
    config = private_warehouse
    first = profile(config, sample_rows=500)
    with connect(config.warehouse.build_db) as con:  # another dataset's profile in the same warehouse
        con.execute("insert into profile_columns by name select * replace ('other_mart' as feature_mart) "
                    "from profile_columns")
    second = profile(config, sample_rows=500)
    with connect(config.warehouse.build_db, read_only=True) as con:
        for table in TABLES:
            runs = con.scalar(f"select list(distinct run_id) from {table} where feature_mart = ?",
                               [first.feature_mart])
            assert runs == [second.run_id], table
        kept = con.one("select count(*), list(distinct run_id) from profile_columns "
                           "where feature_mart = 'other_mart'")
    assert second.run_id != first.run_id
    assert kept == (first.columns, [first.run_id])


def test_an_incremental_nights_aggregates_equal_a_full_recompute(private_warehouse: ChurnConfig) -> None:
    """The per-snapshot aggregates kept across runs: a night recomputes only what its build changed."""
    config, mart = private_warehouse, private_warehouse.dataset.feature_mart
    profile(config, run_id="first", sample_rows=500)
    with connect(config.warehouse.build_db) as con:
        dates = [d for d, in con.rows("select distinct as_of_date from customer_features order by 1")]
        latest, matured = dates[-1], dates[-3]
        # tonight's build: the latest snapshot rebuilt (rows gone, values moved), an older one's labels filled
        con.execute("delete from customer_features where as_of_date = ? and customer_id in (select customer_id "
                    "from customer_features where as_of_date = ? order by customer_id limit 5)", [latest, latest])
        con.execute("update customer_features set usage_minutes_30d = usage_minutes_30d + 1.5 "
                    "where as_of_date = ?", [latest])
        con.execute("update customer_features set churned_within_30d = 1 - churned_within_30d "
                    "where as_of_date = ? and hash(customer_id) % 7 = 0", [matured])
    record_mart_build(config, latest, MartBefore(True, latest, (matured,)), full_refresh=False)
    profile(config, run_id="incremental", sample_rows=500)
    with connect(config.warehouse.build_db) as con:
        incremental = stored_snapshot_stats(con, mart)
        runs = dict(con.rows(f"select snapshot_date, list(distinct run_id) from {PROFILE_SNAPSHOTS.name} "
                             "group by 1"))
        balance_incremental = con.frame("select * exclude (run_id, profiled_at) from profile_class_balance "
                                        "order by scope, snapshot_date")
        con.execute(f"delete from {PROFILE_SNAPSHOTS.name}")  # nothing stored: the next run computes every snapshot
    assert runs[latest] == ["incremental"] and runs[matured] == ["incremental"] and runs[dates[0]] == ["first"]
    profile(config, run_id="full", sample_rows=500)
    with connect(config.warehouse.build_db, read_only=True) as con:
        full = stored_snapshot_stats(con, mart)
        balance_full = con.frame("select * exclude (run_id, profiled_at) from profile_class_balance "
                                 "order by scope, snapshot_date")
    pd.testing.assert_frame_equal(incremental, full, rtol=1e-9, atol=0)
    pd.testing.assert_frame_equal(balance_incremental, balance_full, rtol=1e-9, atol=0)


def test_missing_mart_is_a_clear_error(private_warehouse: ChurnConfig) -> None:
    config = private_warehouse
    mart = config.dataset.feature_mart
    with connect(config.warehouse.build_db) as con:
        con.execute(f'drop table "{mart}"')
    with pytest.raises(ProfileError, match=re.escape(mart)):
        profile(config)
    with connect(config.warehouse.build_db, read_only=True) as con:
        assert not con.exists("profile_columns")
    assert not (config.warehouse.reports_dir / "profile").exists()


def test_contract_numeric_column_with_text_type_is_named(private_warehouse: ChurnConfig) -> None:
    config = private_warehouse
    contract = _contract(config)
    mart, feature = contract.model, contract.numeric[0]
    with connect(config.warehouse.build_db) as con:
        con.execute(f'alter table "{mart}" alter "{feature}" type varchar')
    with pytest.raises(ProfileError, match=re.escape(feature)):
        profile(config)


def test_profile_code_names_no_feature_column(built_warehouse: ChurnConfig) -> None:
    names = set(_contract(built_warehouse).feature_names)
    telco_yaml = REPO_ROOT / "dbt_project" / "models" / "marts" / "_telco_marts__models.yml"
    names |= set(re.findall(r"- name: (\w+)", telco_yaml.read_text())) - {"telco_customer_features"}
    source = (REPO_ROOT / "ml" / "reports" / "profile.py").read_text()
    found = sorted(n for n in names if re.search(rf"\b{re.escape(n)}\b", source))
    assert not found, f"ml/profile.py names feature columns: {found}"
