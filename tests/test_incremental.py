"""Incremental nights build exactly what a full refresh builds.

The snapshot models keep their stored snapshots and add each night's (macros/
incremental_snapshots.sql), carrying all-history totals forward. These tests
replay a few nights on small generated data, with one planted customer who
cancels and returns, and check every snapshot table row for row and value for
value (floats to 1e-9) against a full refresh of the last night; that a label
left null while its horizon was open is filled in on a later night; that a
changed feature definition rebuilds its history; that an earlier night
full-refreshes instead of mixing; and that a build SIGKILLed mid-dbt is
repaired by the next run.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.features import night as night_module
from ml.features.build import build_warehouse
from ml.features.dbt import dbt_target_path
from ml.features.night import MartBefore, mart_before_build, record_mart_build
from ml.warehouse import connect

from .conftest import REPO_ROOT, make_config, query, rewrite

# partitioned: usage, payments and tickets land as daily folders, staged incrementally
TINY = {"generator": {"customers": 600, "months": 12, "start_date": "2024-01-01", "seed": 7, "partitioned": True}}
SNAPSHOT_TABLES = (
    "stg_saas__usage_events", "stg_saas__payments", "stg_saas__support_tickets", "int_customer_snapshots_spined",
    "int_usage_windowed", "int_payments_windowed", "int_tickets_windowed", "int_subscriptions_windowed",
    "customer_features",
)
# first night full, then a month start, a mid-month night and the night the 2024-11-01 label matures
NIGHTS = ("2024-10-20", "2024-11-01", "2024-11-16", "2024-12-02")
RETURNED_ON = "2024-10-05"


def snapshot_tables(config: ChurnConfig) -> dict[str, pd.DataFrame]:
    return {t: query(config, f"select * from {t} order by all") for t in SNAPSHOT_TABLES}


def assert_same_tables(actual: dict[str, pd.DataFrame], expected: dict[str, pd.DataFrame]) -> None:
    for table in SNAPSHOT_TABLES:
        pd.testing.assert_frame_equal(actual[table], expected[table], check_exact=False, rtol=0, atol=1e-9,
                                      obj=table)


def plant_returning_customer(config: ChurnConfig) -> str:
    """A customer whose only cancellation falls in August 2024 comes back on RETURNED_ON."""
    path = config.dataset.landing_dir / "subscriptions.parquet"
    with duckdb.connect() as con:
        customer = con.execute(
            f"select customer_id from read_parquet('{path}') group by customer_id "
            "having max(cancellation_date) between date '2024-08-05' and date '2024-08-25' "
            "and max(start_date) < date '2024-08-01' order by customer_id limit 1").fetchone()[0]
    rewrite(config, "subscriptions",
            "select * from t union all "
            f"select 'S_RETURN', customer_id, plan, contract_type, monthly_price, date '{RETURNED_ON}', "
            "null, null, null from t "
            f"where customer_id = '{customer}' and cancellation_date is not null")
    return customer


def config_with_landing(source: ChurnConfig, root: Path, overrides: dict | None = None) -> ChurnConfig:
    config = make_config(root, {**TINY, **(overrides or {})})
    shutil.copytree(source.dataset.landing_dir, config.dataset.landing_dir, dirs_exist_ok=True)
    return config


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChurnConfig, str]:
    from ml.data.generate import GenerateOptions, generate

    config = make_config(tmp_path_factory.mktemp("incremental-landing"), TINY)
    generate(GenerateOptions.from_config(config))
    return config, plant_returning_customer(config)


def dbt_logs(config: ChurnConfig) -> dict[str, Path]:
    """The dbt.log of each dbt target a build uses: the SQL check's compile and the build itself."""
    build = dbt_target_path(config)
    return {"compile": build.with_name(f"{build.name}__sql_check") / "logs" / "dbt.log",
            "build": build / "logs" / "dbt.log"}


def parse_kind(log_text: str) -> str:
    """How a dbt run parsed the project, from its debug log: skipped, partial or full."""
    if "Unable to do partial parsing" in log_text or "Partial parsing enabled" not in log_text:
        return "full"
    return "skipped" if "no changes found, skipping parsing" in log_text else "partial"


@pytest.fixture(scope="module")
def replayed(landing, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """NIGHTS built one after another, with the 2024-11-01 labels seen on the 2024-11-16 night."""
    config = config_with_landing(landing[0], tmp_path_factory.mktemp("incremental-replay"))
    pending = None
    parses: dict[str, dict[str, str]] = {}
    for night in NIGHTS:
        for log_file in dbt_logs(config).values():
            log_file.unlink(missing_ok=True)  # each night's own log: dbt appends (and rotates)
        build_warehouse(config, as_of=night)
        parses[night] = {step: parse_kind(log_file.read_text(errors="replace"))
                         for step, log_file in dbt_logs(config).items()}
        if night == "2024-11-16":
            pending = query(config, "select churned_within_30d from customer_features "
                                    "where as_of_date = date '2024-11-01'")
    return {"config": config, "pending": pending, "parses": parses}


@pytest.fixture(scope="module")
def full_refresh(landing, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    config = config_with_landing(landing[0], tmp_path_factory.mktemp("incremental-full"))
    build_warehouse(config, as_of=NIGHTS[-1], full_refresh=True)
    return snapshot_tables(config)


def test_replayed_nights_equal_a_full_refresh_row_for_row(replayed, full_refresh) -> None:
    assert_same_tables(snapshot_tables(replayed["config"]), full_refresh)
    mart = full_refresh["customer_features"]
    assert sorted(mart["as_of_date"].dt.strftime("%Y-%m-%d").unique())[-2:] == ["2024-12-01", "2024-12-02"]


def test_later_nights_reuse_dbts_parse(replayed) -> None:
    """The night's values reach dbt outside --vars (macros/night_values.sql), so a new as_of,
    tests_since or full_refresh_models does not make dbt parse the whole project again."""
    first, *later = NIGHTS
    assert replayed["parses"][first] == {"compile": "full", "build": "full"}  # nothing stored yet
    assert {night: replayed["parses"][night] for night in later} == {
        night: {"compile": "skipped", "build": "skipped"} for night in later}


def test_a_changed_var_is_seen_as_a_full_parse(replayed, tmp_path: Path, monkeypatch) -> None:
    """The planted failure: a value of the night put back into --vars costs a full parse (the same vars do not)."""
    from ml.features import dbt

    config, plain = replayed["config"], dbt.dbt_vars
    kinds = []
    for name, vars_of in (("same", plain), ("planted", lambda c: {**plain(c), "as_of": "2024-12-03"})):
        target = tmp_path / name  # the last night's parse state, in a folder of its own
        shutil.copytree(dbt_target_path(config), target, ignore=shutil.ignore_patterns("logs"))
        monkeypatch.setattr(dbt, "dbt_vars", vars_of)
        dbt.run_dbt(config, "parse", as_of="2024-12-03", target_path=target)
        kinds.append(parse_kind((target / "logs" / "dbt.log").read_text(errors="replace")))
    assert kinds == ["skipped", "full"]


def test_a_label_left_open_is_filled_in_when_its_horizon_matures(replayed) -> None:
    assert len(replayed["pending"]) > 100 and replayed["pending"]["churned_within_30d"].isna().all()
    matured = query(replayed["config"], "select churned_within_30d from customer_features "
                                        "where as_of_date = date '2024-11-01'")["churned_within_30d"]
    assert len(matured) == len(replayed["pending"]) and matured.notna().all() and matured.sum() > 0


def test_each_night_records_the_snapshots_it_changed(replayed) -> None:
    """mart_builds: what the night's audits and profile read (ml.features.night)."""
    builds = query(replayed["config"], "select full_refresh, rebuilt_from, matured from mart_builds order by built_at")
    assert builds["full_refresh"].tolist() == [True, False, False, False]
    last = builds.iloc[-1]  # 2024-12-02: rebuilt from the previous night, the 2024-11-01 labels matured
    assert str(last["rebuilt_from"].date()) == "2024-11-16" and last["matured"] == "2024-11-01"


def mart_truth(config: ChurnConfig) -> MartBefore:
    """What the mart holds, read from it (what mart_before_build must answer)."""
    dates = query(config, "select as_of_date, count(churned_within_30d) < count(*) as open "
                          "from customer_features group by 1 order by 1")
    return MartBefore(True, dates["as_of_date"].max().date(),
                      tuple(d.date() for d in dates.loc[dates["open"], "as_of_date"]))


def test_the_mart_before_a_build_comes_from_the_stored_state(replayed, monkeypatch) -> None:
    """After a finished build the next build's starting point is read from mart_builds, not the mart."""
    config = replayed["config"]
    truth = mart_truth(config)
    assert truth.latest == dt.date(2024, 12, 2)
    assert truth.unlabelled == (dt.date(2024, 12, 1), dt.date(2024, 12, 2))  # horizon not observed yet
    monkeypatch.setattr(night_module, "_read_before", lambda *a: pytest.fail("the mart was read"))
    assert mart_before_build(config) == truth


def test_stored_state_the_mart_disagrees_with_is_not_trusted(replayed, tmp_path: Path) -> None:
    """A build that did not finish, or a mart changed outside a build: the mart itself is read."""
    killed = copy_build(replayed["config"], tmp_path / "killed")
    stale = mart_before_build(killed)
    # a build killed after its mart committed: the unfinished row, and labels the build filled
    record_mart_build(killed, dt.date(2024, 12, 3), stale, full_refresh=True, finished=False)
    with connect(killed.warehouse.build_db) as session:
        session.execute("update customer_features set churned_within_30d = 0 where as_of_date = '2024-12-01'")
    assert mart_before_build(killed) == mart_truth(killed) != stale
    assert mart_before_build(killed).unlabelled == (dt.date(2024, 12, 2),)

    edited = copy_build(replayed["config"], tmp_path / "edited")
    with connect(edited.warehouse.build_db) as session:  # by hand: tonight's snapshot deleted
        session.execute("delete from customer_features where as_of_date = '2024-12-02'")
    assert mart_before_build(edited) == mart_truth(edited)
    assert mart_before_build(edited).latest == dt.date(2024, 12, 1)


def test_a_customer_who_cancels_and_returns(landing, replayed) -> None:
    customer = landing[1]
    rows = query(replayed["config"], "select as_of_date, churned_within_30d from customer_features "
                                     "where customer_id = ? order by as_of_date", [customer])
    dates = set(rows["as_of_date"].dt.strftime("%Y-%m-%d"))
    # active before the cancellation (and labelled a churner), absent while away, back after the return
    assert {"2024-08-01", "2024-11-01", "2024-12-01"} <= dates
    assert not {"2024-09-01", "2024-10-01"} & dates
    august = rows[rows["as_of_date"] == pd.Timestamp("2024-08-01")]["churned_within_30d"]
    assert august.tolist() == [1]


def test_an_earlier_night_full_refreshes_instead_of_mixing(replayed, tmp_path: Path, caplog) -> None:
    config = copy_build(replayed["config"], tmp_path)
    build_warehouse(config, as_of="2024-11-16")
    assert "earlier than the last build's 2024-12-02" in caplog.text
    dates = query(config, "select distinct as_of_date from customer_features")["as_of_date"]
    assert dates.max() == pd.Timestamp("2024-11-16")


def copy_build(source: ChurnConfig, root: Path, overrides: dict | None = None) -> ChurnConfig:
    """A private copy of a replayed warehouse: landing, build database and dbt target."""
    config = config_with_landing(source, root, overrides)
    shutil.copy2(source.warehouse.build_db, config.warehouse.build_db)
    shutil.copytree(dbt_target_path(source), dbt_target_path(config), dirs_exist_ok=True)
    return config


def test_a_changed_feature_definition_rebuilds_its_history(replayed, tmp_path: Path, caplog) -> None:
    project = tmp_path / "dbt_project"
    shutil.copytree(REPO_ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs"))
    mart_sql = project / "models" / "marts" / "customer_features.sql"
    old = "tenure_days / cast(30.4375 as double) as months_as_customer"
    assert old in mart_sql.read_text()
    mart_sql.write_text(mart_sql.read_text().replace(old, "tenure_days / 7.0 as months_as_customer"))
    config = copy_build(replayed["config"], tmp_path / "wh", {"warehouse": {"dbt_project_dir": str(project)}})

    build_warehouse(config, as_of="2024-12-03")
    assert "FULL REFRESH of customer_features" in caplog.text
    assert "int_usage_windowed" not in caplog.text.split("FULL REFRESH of", 1)[1].splitlines()[0]
    rows = query(config, "select f.months_as_customer, f.as_of_date - c.signup_date as tenure_days "
                         "from customer_features f join stg_saas__customers c using (customer_id) "
                         "where f.as_of_date = date '2024-08-01'")
    assert len(rows) > 100
    assert (rows["months_as_customer"] - rows["tenure_days"] / 7.0).abs().max() < 1e-9


def test_a_build_killed_mid_dbt_is_repaired_by_the_next_run(replayed, full_refresh, tmp_path: Path) -> None:
    config = copy_build(replayed["config"], tmp_path / "killed")
    dbt_log = dbt_target_path(config) / "logs" / "dbt.log"
    dbt_log.unlink(missing_ok=True)
    # a re-run of the last night: it deletes and rebuilds that night's snapshots
    proc = subprocess.Popen(
        [sys.executable, "-m", "ml.cli", "--config", str(config.source_file), "build", "--as-of", NIGHTS[-1]],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # kill inside an incremental model's transaction: its pre-hook has deleted the snapshots it rebuilds
    marker = 'delete from "build"."main"."int_payments_windowed"'
    deadline = time.monotonic() + 300
    while not (dbt_log.exists() and marker in dbt_log.read_text(errors="replace")):
        assert proc.poll() is None, "the build ended before the kill point"
        assert time.monotonic() < deadline, "the build never reached the kill point"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    build_warehouse(config, as_of=NIGHTS[-1])
    assert_same_tables(snapshot_tables(config), full_refresh)
    # the repair read the mart (the killed build left no state to trust) and stored it again
    assert mart_before_build(config) == mart_truth(config)
