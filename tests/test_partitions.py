"""Partitioned landing and partitioned publishing: a night costs the night, never less than the truth.

Landing: a table may land as a folder of date partitions; dbt reads it into the
same mart as the single file, the checks read only tonight's partitions, and a
rewritten or removed partition (history changed) makes the nightly ask dbt for a
full refresh. Publishing: history tables are views over immutable Parquet parts;
they must hold exactly the build database's rows, a night writes only its own
parts, a SIGKILL mid-publish leaves the published state complete, and a reader
polling meanwhile always sees one whole state.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

import ml.pipeline as pipeline_module
from ml.config import ChurnConfig
from ml.data.generate import GenerateOptions, _split_by_day, append_day, generate
from ml.data.landing import landing_changes, landing_tables, record_partitions, validate_landing
from ml.features.build import build_warehouse
from ml.quality.audit import RESULTS, audit
from ml.serving.publish import (
    HISTORY_PARTITIONS,
    KEYWORD_RENAMES,
    PAUSE_ENV,
    PAUSE_FILE_ENV,
    PUBLISHED_PARTS,
    parts_folder,
    publish,
)
from ml.warehouse import connect

from .conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse, make_config

TINY = {"generator": {"customers": 250, "months": 6, "start_date": "2024-01-01", "seed": 3, "partitioned": True}}


@pytest.fixture
def tiny(tmp_path: Path) -> ChurnConfig:
    """A few hundred customers whose usage_events landed as daily partitions (no build)."""
    config = make_config(tmp_path / "tiny", TINY)
    generate(GenerateOptions.from_config(config))
    return config


def usage(config: ChurnConfig):
    return next(t for t in landing_tables(config) if t.name == "usage_events")


# --- landing ---------------------------------------------------------------------


def test_partitioned_landing_builds_the_same_mart(built_warehouse: ChurnConfig, tmp_path: Path) -> None:
    config = copy_warehouse(built_warehouse, tmp_path / "wh")
    landing = config.dataset.landing_dir
    _split_by_day(landing / "usage_events.parquet", landing / "usage_events", "event_date")
    assert usage(config).partitioned and len(usage(config).files()) > 300
    config.warehouse.build_db.unlink()  # nothing of the single-file build may survive into this one
    build_warehouse(config)
    mart = config.dataset.feature_mart
    with duckdb.connect(str(config.warehouse.build_db), read_only=True) as con:
        con.execute(f"attach '{built_warehouse.warehouse.build_db}' as single (read_only)")
        rows = con.execute(f"select count(*) from {mart}").fetchall()[0][0]
        # sums of doubles depend on the order rows are read in: equal to 1e-6, every other column exactly
        columns = ", ".join(f"round({c}, 6) as {c}" if t == "DOUBLE" else c
                            for c, t, *_ in con.execute(f"describe {mart}").fetchall())
        mine, single = f"select {columns} from main.{mart}", f"select {columns} from single.main.{mart}"
        differ = con.execute(f"select count(*) from (({mine} except all {single}) "
                             f"union all ({single} except all {mine}))").fetchall()[0][0]
    assert rows > 0 and differ == 0


def test_changes_tell_new_rewritten_touched_and_removed_partitions(tiny: ChurnConfig) -> None:
    table = usage(tiny)
    files = table.files()
    with connect(tiny.warehouse.build_db) as session:
        first = landing_changes(tiny, session)
        assert len([p for p in first.new if p.table == table.name]) == len(files)
        assert first.history_changed  # no manifest yet: nothing proves what earlier builds read
        record_partitions(tiny, session, first, "run-1")
        assert not landing_changes(tiny, session).new
        # touched, same bytes: not a rewrite
        os.utime(files[0], ns=(time.time_ns(), time.time_ns()))
        assert not landing_changes(tiny, session).history_changed
        # rewritten with one row fewer, and one day removed
        with duckdb.connect() as con:
            con.execute(f"copy (select * from read_parquet('{files[1]}') limit 1 offset 1) "
                        f"to '{files[1]}.new' (format parquet)")
        Path(f"{files[1]}.new").replace(files[1])
        files[2].unlink()
        changes = landing_changes(tiny, session)
    assert [p.path for p in changes.changed] == [files[1].relative_to(table.folder).as_posix()]
    assert [p.path for p in changes.removed] == [files[2].relative_to(table.folder).as_posix()]
    assert changes.history_changed and not changes.new


def test_a_rewritten_single_file_counts_as_changed_history(tiny: ChurnConfig) -> None:
    """Without a settled-history signature one file cannot tell an append from a rewrite of rows already
    built on (e.g. past customers re-extracted): a changed single file makes the build refresh in full
    instead of keeping stale snapshots (tests/test_night_checks.py covers the signature)."""
    customers = tiny.dataset.landing_dir / "customers.parquet"
    assert customers.is_file()
    with connect(tiny.warehouse.build_db) as session:
        record_partitions(tiny, session, landing_changes(tiny, session), "run-1")
        assert not landing_changes(tiny, session).history_changed
        with duckdb.connect() as con:
            con.execute(f"copy (select * replace (upper(region) as region) from read_parquet('{customers}')) "
                        f"to '{customers}.new' (format parquet)")
        Path(f"{customers}.new").replace(customers)
        changes = landing_changes(tiny, session)
    assert [(p.table, p.path) for p in changes.changed] == [("customers", "customers.parquet")]
    assert changes.history_changed


def test_a_rewritten_partition_makes_the_nightly_build_a_full_refresh(
    tiny: ChurnConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[bool] = []

    class Stop(Exception):
        pass

    def fake_build(config: ChurnConfig, as_of: str | None = None, *, full_refresh: bool = False) -> None:
        asked.append(full_refresh)
        raise Stop

    monkeypatch.setattr(pipeline_module, "build_warehouse", fake_build)
    remember = pipeline_module.current_landing_changes(tiny)
    pipeline_module.remember_landing(tiny, remember, "earlier-run")  # as a successful night would
    with pytest.raises(Stop):
        pipeline_module.nightly(tiny)
    day = usage(tiny).files()[5]
    with duckdb.connect() as con:  # an upstream re-extract of one old day
        con.execute(f"copy (select * from read_parquet('{day}') where minutes > 0) to '{day}.new' (format parquet)")
    Path(f"{day}.new").replace(day)
    with pytest.raises(Stop):
        pipeline_module.nightly(tiny)
    assert asked == [False, True]


def test_the_landing_audit_reads_only_new_partitions(tiny: ChurnConfig) -> None:
    table = usage(tiny)
    with connect(tiny.warehouse.build_db) as session:
        record_partitions(tiny, session, landing_changes(tiny, session), "run-1")
    added = append_day(tiny.dataset.landing_dir)
    with connect(tiny.warehouse.build_db) as session:
        changes = landing_changes(tiny, session)
    assert [table.folder / p.path for p in changes.new] == [added.path] and not changes.history_changed
    with duckdb.connect() as con:
        whole = con.execute(f"select count(*) from {table.relation()}").fetchall()[0][0]
    read = validate_landing(tiny, changes)
    assert read["usage_events"] == added.rows < whole
    assert read["customers"] > 0  # single-file tables are read whole, as before
    audit(tiny, "landing", "run-2", changes=changes)
    with connect(tiny.warehouse.build_db, read_only=True) as session:
        checks = dict(session.rows(
            f"select expectation_type, element_count from {RESULTS.name} "
            "where run_id = 'run-2' and table_name = 'usage_events'"))
    assert checks["expect_column_values_to_be_between"] == added.rows  # row-wise: tonight only
    assert checks["expect_table_row_count_to_be_between"] == whole  # table-level: the whole table


def test_a_partition_that_breaks_the_contract_is_named(tiny: ChurnConfig) -> None:
    added = append_day(tiny.dataset.landing_dir)
    with duckdb.connect() as con:
        con.execute(f"copy (select customer_id, event_date, 'many' as sessions, minutes "
                    f"from read_parquet('{added.path}')) to '{added.path}.new' (format parquet)")
    Path(f"{added.path}.new").replace(added.path)
    with connect(tiny.warehouse.build_db) as session:
        changes = landing_changes(tiny, session)
    with pytest.raises(Exception, match=rf"usage_events/date={added.day}/part-0.parquet: column sessions: "
                                        rf"{added.rows:,d} of {added.rows:,d} rows are not integer"):
        validate_landing(tiny, changes)


def test_a_full_check_reads_every_partition_at_once_and_still_names_each_bad_one(tiny: ChurnConfig) -> None:
    """A first night checks a year of partitions in a few statements; planted faults are still named by file."""
    table = usage(tiny)
    files = table.files()
    with duckdb.connect() as con:
        whole = con.execute(f"select count(*) from {table.relation()}").fetchall()[0][0]
    assert validate_landing(tiny)["usage_events"] == whole  # all partitions, one schema group
    empty, retyped, corrupt = files[3], files[10], files[20]
    with duckdb.connect() as con:
        for path, select in ((empty, "select * from read_parquet('{p}') limit 0"),
                             (retyped, "select customer_id, event_date, 'many' as sessions, minutes "
                                       "from read_parquet('{p}')")):
            con.execute(f"copy ({select.format(p=path)}) to '{path}.new' (format parquet)")
            Path(f"{path}.new").replace(path)
        corrupt_rows = con.execute(f"select count(*) from read_parquet('{corrupt}')").fetchall()[0][0]
    data = bytearray(corrupt.read_bytes())  # garble the first data page, keep the footer readable
    data[4:64] = b"\xff" * 60
    corrupt.write_bytes(bytes(data))
    with pytest.raises(Exception) as raised:
        validate_landing(tiny)
    message = str(raised.value)
    name = lambda path: f"usage_events/{path.relative_to(table.folder)}"  # noqa: E731
    assert f"{name(empty)}: empty (0 rows)" in message
    assert re.search(rf"{re.escape(name(retyped))}: column sessions: [\d,]+ of [\d,]+ rows are not integer", message)
    assert f"{name(corrupt)}: not readable as parquet" in message
    assert corrupt_rows > 0 and message.count("usage_events/") == 3  # the good partitions are not blamed


# --- publishing ------------------------------------------------------------------


@pytest.fixture
def published(published_warehouse: ChurnConfig, tmp_path: Path) -> ChurnConfig:
    config = copy_warehouse(published_warehouse, tmp_path / "wh", QUICK_TRAINING)
    # twice: the copied state's superseded parts (its run log grew after it published) are gone after two
    publish(config, run_id="baseline")
    publish(config, run_id="baseline")
    return config


def part_files(config: ChurnConfig) -> dict[str, int]:
    folder = parts_folder(config.warehouse.published_db)
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.glob("*/*.parquet")}


def history_differences(config: ChurnConfig) -> dict[str, int]:
    """Per published history view: rows differing from the build table (keyword renames applied) and types."""
    found = {}
    with duckdb.connect(str(config.warehouse.published_db), read_only=True) as con:
        con.execute(f"attach '{config.warehouse.build_db}' as build (read_only)")
        for table in HISTORY_PARTITIONS:
            if not con.execute("select count(*) from duckdb_tables() where database_name = 'build' "
                               "and table_name = ?", [table]).fetchall()[0][0]:
                continue
            renames = KEYWORD_RENAMES.get(table, {})
            cols = [r[0] for r in con.execute(f"describe build.main.{table}").fetchall()]
            clause = ", ".join(f'"{c}" as "{renames.get(c, c)}"' for c in cols)
            build = f"select {clause} from build.main.{table}"
            found[table] = con.execute(
                f"select count(*) from (({build} except all select * from main.{table}) "
                f"union all (select * from main.{table} except all {build}))").fetchall()[0][0]
            types = [(renames.get(c, c), t) for c, t, *_ in con.execute(f"describe build.main.{table}").fetchall()]
            assert [tuple(r[:2]) for r in con.execute(f"describe main.{table}").fetchall()] == types, table
    return found


def test_history_views_hold_exactly_the_build_tables(published: ChurnConfig) -> None:
    differences = history_differences(published)
    assert set(differences) >= {"churn_scores_history", "pipeline_runs", "data_quality_results", "drift_stats"}
    assert all(n == 0 for n in differences.values()), differences
    with duckdb.connect(str(published.warehouse.published_db), read_only=True) as con:
        kinds = dict(con.execute("select table_name, table_type from information_schema.tables "
                                 "where table_schema = 'main'").fetchall())
        listed = con.execute(f"select count(*) from {PUBLISHED_PARTS.name}").fetchall()[0][0]
    assert kinds["churn_scores_history"] == "VIEW" and kinds["churn_scores"] == "BASE TABLE"
    assert listed == len(part_files(published))


def test_a_night_writes_only_its_own_parts_and_a_rerun_replaces_its_part(published: ChurnConfig) -> None:
    before = part_files(published)
    again = publish(published, run_id="same-build")
    assert again.parts_written == 0 and part_files(published) == before  # nothing changed: nothing written
    with connect(published.warehouse.build_db) as con:  # tonight: a new run's rows in two history tables
        con.execute("insert into pipeline_runs select 'tonight', step, as_of, started_at, ended_at, status, message "
                    "from pipeline_runs limit 3")
        con.execute("insert into churn_scores_history select * replace ('tonight' as run_id) "
                    "from churn_scores_history where run_id = (select max(run_id) from churn_scores_history)")
    tonight = publish(published, run_id="tonight")
    after = part_files(published)
    new = sorted(set(after) - set(before))
    assert tonight.parts_written == 2 and len(new) == 2 and all("tonight__" in name for name in new)
    assert all(after[name] == mtime for name, mtime in before.items())  # old parts untouched
    # a re-run of the same night: its rows replaced, its part superseded, nothing counted twice
    with connect(published.warehouse.build_db) as con:
        con.execute("delete from pipeline_runs where run_id = 'tonight' and step = (select min(step) "
                    "from pipeline_runs where run_id = 'tonight')")
        build_rows = con.scalar("select count(*) from pipeline_runs")
    publish(published, run_id="tonight")
    with duckdb.connect(str(published.warehouse.published_db), read_only=True) as con:
        assert con.execute("select count(*) from pipeline_runs").fetchall()[0][0] == build_rows
    assert all(n == 0 for n in history_differences(published).values())
    superseded = [n for n in new if n.startswith("pipeline_runs/")]
    assert superseded[0] in part_files(published)  # kept one publish for readers of the previous state
    publish(published, run_id="next")
    assert superseded[0] not in part_files(published)


def test_a_night_hashes_only_its_own_rows_not_the_history(published: ChurnConfig) -> None:
    """Signatures of past parts come from the manifest: the publish reads whole rows of tonight's keys only."""
    again = publish(published, run_id="same-build")
    assert again.rows_hashed == 0  # nothing new, nothing resized: no row is hashed
    with connect(published.warehouse.build_db) as con:
        con.execute("insert into pipeline_runs select 'tonight', step, as_of, started_at, ended_at, status, message "
                    "from pipeline_runs limit 3")
        con.execute("insert into churn_scores_history select * replace ('tonight' as run_id) "
                    "from churn_scores_history where run_id = (select max(run_id) from churn_scores_history)")
        tonight_rows = con.scalar("select (select count(*) from pipeline_runs where run_id = 'tonight') "
                                  "+ (select count(*) from churn_scores_history where run_id = 'tonight')")
        # a past run's part loses rows (a re-scored snapshot leaves its old run): its count moved, it is re-hashed
        old_run = con.scalar("select min(run_id) from pipeline_runs")
        con.execute("delete from pipeline_runs where run_id = ? and step = (select min(step) from pipeline_runs "
                    "where run_id = ?)", [old_run, old_run])
        resized = con.scalar("select count(*) from pipeline_runs where run_id = ?", [old_run])
        history = con.scalar("select (select count(*) from pipeline_runs) "
                             "+ (select count(*) from churn_scores_history)")
    tonight = publish(published, run_id="tonight")
    assert tonight.rows_hashed == tonight_rows + resized < history
    assert all(n == 0 for n in history_differences(published).values())


def history_rows(config: ChurnConfig) -> int:
    with connect(config.warehouse.build_db, read_only=True) as con:
        return sum(con.row_count(t) for t in HISTORY_PARTITIONS if con.exists(t))


def test_a_night_counts_only_the_keys_from_the_newest_published_on(published: ChurnConfig) -> None:
    """Older keys' counts come from the manifest while the table's total agrees; any other change is recounted."""
    copy = ("insert into churn_scores_history select * replace (? as run_id) from churn_scores_history "
            "where run_id = (select min(run_id) from churn_scores_history)")
    with connect(published.warehouse.build_db) as con:
        con.execute(copy, ["night-1"])  # sorts after every timestamped run id, as tomorrow's would
    publish(published, run_id="night-1")
    with connect(published.warehouse.build_db) as con:
        con.execute(copy, ["night-2"])
        older = con.scalar("select count(*) from churn_scores_history where run_id < 'night-1'")
    second = publish(published, run_id="night-2")
    # the older scores' key column was not read
    assert second.rows_counted <= history_rows(published) - older < history_rows(published)
    assert all(n == 0 for n in history_differences(published).values())

    # planted: rows removed from an old key, rows added under a key sorting before the newest
    with connect(published.warehouse.build_db) as con:
        con.execute("delete from churn_scores_history where run_id = (select min(run_id) from churn_scores_history) "
                    "and customer_id = (select min(customer_id) from churn_scores_history)")
    assert publish(published, run_id="night-3").rows_counted == history_rows(published)
    assert all(n == 0 for n in history_differences(published).values())
    with connect(published.warehouse.build_db) as con:
        con.execute("insert into pipeline_runs select '0-early', step, as_of, started_at, ended_at, status, message "
                    "from pipeline_runs limit 2")
    publish(published, run_id="night-4")
    assert all(n == 0 for n in history_differences(published).values())
    assert publish(published, run_id="0-early").rows_counted > second.rows_counted  # sorts first: all counted


def test_readme_bi_queries_run_on_the_published_file(published: ChurnConfig) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("<!-- bi -->", 1)[1].split("\n## ", 1)[0]
    queries = re.findall(r"```sql\n(.*?)```", section, flags=re.S)
    queries.append("select table_name, column_name, comment from duckdb_columns()")
    queries.append("select rank from legacy.churn_scores")
    assert len(queries) >= 3
    with duckdb.connect(str(published.warehouse.published_db), read_only=True) as con:
        for sql in queries:
            con.execute(sql).fetchall()
        undocumented = con.execute(
            "select table_name, column_name from duckdb_columns() where schema_name = 'main' and database_name = "
            "current_database() and coalesce(comment, '') = ''").fetchall()
        views = con.execute("select view_name from duckdb_views() where not internal and schema_name = 'main' "
                            "and coalesce(comment, '') = ''").fetchall()
    assert undocumented == [] and views == []


def run_publish(config: ChurnConfig, log: Path, pause_at: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop(PAUSE_ENV, None)
    if pause_at:
        env[PAUSE_ENV] = pause_at
        env[PAUSE_FILE_ENV] = str(log.with_suffix(".paused"))
    return subprocess.Popen(
        [sys.executable, "-m", "ml.cli", "--config", str(config.source_file), "publish", "--run-id", "killed"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
    )


def published_counts(config: ChurnConfig) -> dict[str, int]:
    with duckdb.connect(str(config.warehouse.published_db), read_only=True) as con:
        return {t: con.execute(f"select count(*) from {t}").fetchall()[0][0] for t in HISTORY_PARTITIONS
                if con.execute("select count(*) from information_schema.tables where table_name = ?",
                               [t]).fetchall()[0][0]}


def test_a_publish_killed_after_writing_parts_leaves_the_published_state_whole(
    published: ChurnConfig, tmp_path: Path
) -> None:
    before = published_counts(published)
    with connect(published.warehouse.build_db) as con:
        con.execute("insert into pipeline_runs select 'killed', step, as_of, started_at, ended_at, status, message "
                    "from pipeline_runs limit 2")
    log = tmp_path / "publish.log"
    proc = run_publish(published, log, "publish:drift_stats")  # after pipeline_runs' new part is written
    deadline = time.monotonic() + 300
    while not log.with_suffix(".paused").exists():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    assert any("killed__" in name for name in part_files(published))  # a part of the dying publish landed
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert published_counts(published) == before  # the old state, whole, still reads
    result = publish(published, run_id="repair")
    assert result.tables["pipeline_runs"] == before["pipeline_runs"] + 2
    assert all(n == 0 for n in history_differences(published).values())
    folder = parts_folder(published.warehouse.published_db)
    assert not [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]
    assert not [p for p in published.warehouse.published_db.parent.iterdir() if ".tmp-" in p.name]


READER = r"""
import json, os, sys, time, duckdb
path, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
with open(out, "w") as log:
    while not os.path.exists(stop):
        try:
            con = duckdb.connect(path, read_only=True)
            try:
                run_id = con.execute("select run_id from publish_info").fetchall()[0][0]
                listed = con.execute("select sum(row_count) from published_parts "
                                     "where table_name = 'pipeline_runs'").fetchall()[0][0]
                rows = con.execute("select count(*) from pipeline_runs").fetchall()[0][0]
            finally:
                con.close()
            log.write(json.dumps({"run_id": run_id, "listed": listed, "rows": rows}) + "\n")
        except Exception as exc:
            log.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        log.flush()
        time.sleep(0.02)
"""


def test_a_reader_always_sees_one_whole_published_state(published: ChurnConfig, tmp_path: Path) -> None:
    stop, out = tmp_path / "stop", tmp_path / "reads.jsonl"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(published.warehouse.published_db), str(stop),
                               str(out)])
    expected = {}
    try:
        with connect(published.warehouse.published_db, read_only=True) as con:
            expected["baseline"] = con.scalar("select count(*) from pipeline_runs")
        for night in range(3):
            with connect(published.warehouse.build_db) as con:
                con.execute(f"insert into pipeline_runs select 'night-{night}', step, as_of, started_at, ended_at, "
                            "status, message from pipeline_runs where run_id not like 'night-%' limit 4")
                expected[f"night-{night}"] = con.scalar("select count(*) from pipeline_runs")
            publish(published, run_id=f"night-{night}")
            time.sleep(0.5)
    finally:
        stop.touch()
        reader.wait(timeout=60)
    reads = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r for r in reads if "error" in r]
    assert not errors, errors[:3]
    assert {r["run_id"] for r in reads} >= {"night-0", "night-2"}
    assert all(r["rows"] == r["listed"] == expected[r["run_id"]] for r in reads)
