"""One nightly at a time, dead runs recorded, a busy database explained, interrupts clean up.

Each test plants the situation an operator meets: a second nightly started while
one runs, a run SIGKILLed mid-step, a lock file left by a dead process, another
process holding build.duckdb open, a SIGTERM while dbt builds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.pipeline import PIPELINE_RUNS_SPEC, PipelineRun, run_lock
from ml.warehouse import DatabaseBusyError, RunLock, RunLockedError, connect
from ml.warehouse.runlock import lock_path

from .conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse, make_config, query
from .test_crash_safety import child_commands, digest, kill, start_nightly, wait_for


def runs(config: ChurnConfig):
    return query(config, f"select * from {PIPELINE_RUNS_SPEC.name} order by ended_at")


def dead_pid() -> int:
    """The pid of a process that has certainly exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    build_db = tmp_path / "build.duckdb"
    first, dead = RunLock.acquire(build_db, "run-one", as_of="2025-01-01")
    assert dead is None
    first.at_step("train")
    with pytest.raises(RunLockedError, match=rf"run run-one \(pid {os.getpid()}.*started .*in step 'train'"):
        RunLock.acquire(build_db, "run-two")
    first.release()
    second, dead = RunLock.acquire(build_db, "run-two")
    assert dead is None  # released cleanly: nothing to record
    second.release()


def test_stale_lock_of_a_dead_process_is_cleared_and_its_run_recorded(tmp_path: Path) -> None:
    config = make_config(tmp_path / "wh")
    pid = dead_pid()
    lock_path(config.warehouse.build_db).parent.mkdir(parents=True, exist_ok=True)
    lock_path(config.warehouse.build_db).write_text(json.dumps({
        "run_id": "killed-run", "pid": pid, "started_at": "2025-01-01T02:00:00", "as_of": None,
        "step": "score", "step_started_at": "2025-01-01T02:10:00"}))
    with run_lock(config, "next-run") as lock:
        assert lock.holder.run_id == "next-run" and lock.holder.pid == os.getpid()
    row = runs(config).iloc[-1]
    assert (row["run_id"], row["step"], row["status"]) == ("killed-run", "score", "failed")
    assert "found dead" in row["message"] and str(pid) in row["message"] and "next-run" in row["message"]
    assert lock_path(config.warehouse.build_db).read_text() == ""  # released cleanly this time
    with run_lock(config, "third-run"):
        pass
    assert len(runs(config)) == 1  # recorded once, not again


def _hold_open(path: Path) -> subprocess.Popen:
    """Another process with `path` open (read-only, like a BI tool pointed at the wrong file)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=True); "
         "print('open', flush=True); time.sleep(600)", str(path)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_a_reader_holding_the_build_db_gets_told_what_to_do_and_the_failure_is_recorded(tmp_path: Path) -> None:
    config = make_config(tmp_path / "wh")
    with connect(config.warehouse.build_db) as session:
        session.create(PIPELINE_RUNS_SPEC)
    reader = _hold_open(config.warehouse.build_db)
    try:
        with pytest.raises(DatabaseBusyError) as caught:
            with connect(config.warehouse.build_db):
                pass
        message = str(caught.value)
        assert f"process {reader.pid}" in message and "published" in message and "close" in message
        assert "read-only" not in message  # DuckDB's own hint is wrong for a writer
        with run_lock(config, "blocked-run") as lock:
            run = PipelineRun(config, run_id="blocked-run", lock=lock)
            with pytest.raises(DatabaseBusyError), run.step("build"):
                with connect(config.warehouse.build_db):
                    pass
    finally:
        reader.kill()
        reader.wait()
    with run_lock(config, "after-reader"):
        pass
    row = runs(config).iloc[-1]
    assert (row["run_id"], row["step"], row["status"]) == ("blocked-run", "build", "failed")
    assert "could not record it" in row["message"] and "published" in row["message"]


def test_two_nightlies_then_a_sigkill_then_as_of_on_a_plain_nightly_warehouse(
    published_warehouse: ChurnConfig, tmp_path: Path
) -> None:
    """The second nightly is refused and changes nothing; the first, SIGKILLed in `score`, is
    recorded as failed there by the next start, which is a `--as-of` run on a warehouse made by
    plain nightlies (pipeline_runs.as_of all NULL so far) and must complete."""
    config = copy_warehouse(published_warehouse, tmp_path / "wh", QUICK_TRAINING)
    log = tmp_path / "first.log"
    first = start_nightly(config, log, "step:score")
    wait_for(lambda: log.with_suffix(".paused").exists(), first, log)
    rows_before, published_before = len(runs(config)), digest(config.warehouse.published_db)
    first_run_id = json.loads(lock_path(config.warehouse.build_db).read_text())["run_id"]

    second = subprocess.run(
        [sys.executable, "-m", "ml.cli", "--config", str(config.source_file), "nightly"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    assert f"run {first_run_id} (pid {first.pid}" in second.stderr and "step 'score'" in second.stderr
    assert first.poll() is None, "the first nightly was disturbed"
    assert len(runs(config)) == rows_before and digest(config.warehouse.published_db) == published_before

    kill(first)
    as_of = str(query(config, "select max(as_of_date) as d from churn_scores")["d"].iloc[0])[:10]
    third = subprocess.run(
        [sys.executable, "-m", "ml.cli", "--config", str(config.source_file), "nightly", "--as-of", as_of],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    history = runs(config)
    dead = history[history["run_id"] == first_run_id]
    assert dead[dead["status"] == "failed"]["step"].tolist() == ["score"]
    assert "found dead" in dead["message"].iloc[-1]
    latest = history[(history["run_id"] == history["run_id"].iloc[-1]) & (history["step"] == "publish")].iloc[-1]
    assert latest["status"] == "success" and latest["as_of"] == as_of


def test_sigterm_ends_the_dbt_child_and_records_the_step(private_warehouse: ChurnConfig, tmp_path: Path) -> None:
    config = private_warehouse
    log = tmp_path / "term.log"
    proc = start_nightly(config, log, None)
    wait_for(lambda: any(" build " in c and "dbt" in c for c in child_commands(proc.pid)), proc, log)
    time.sleep(2)
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert children, "dbt finished before the signal"
    os.kill(proc.pid, signal.SIGTERM)  # the nightly only, not its process group
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    row = runs(config).iloc[-1]
    assert (row["step"], row["status"]) == ("build", "failed") and "SIGTERM" in row["message"]
    assert lock_path(config.warehouse.build_db).read_text() == ""  # the lock was released
    assert live_group_members(proc.pid) == []  # nothing of the run's process group is left running


def test_sigterm_stops_a_backfill_and_its_dbt_child(built_warehouse: ChurnConfig, tmp_path: Path) -> None:
    """`make backfill` stopped while dbt builds: no dbt left running, lock released, exit 130."""
    config = copy_warehouse(built_warehouse, tmp_path / "wh")
    log = tmp_path / "backfill.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ml.cli", "--config", str(config.source_file), "backfill", "--every", "1m"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    wait_for(lambda: any(" build " in c and "dbt" in c for c in child_commands(proc.pid)), proc, log)
    time.sleep(2)
    assert child_commands(proc.pid), "dbt finished before the signal"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert live_group_members(proc.pid) == []
    sandbox_db = config.warehouse.dir / "backfill" / config.warehouse.build_db.name
    assert lock_path(sandbox_db).read_text() == ""


def live_group_members(group: int) -> list[str]:
    """Command lines of the group's processes that still run (zombies awaiting a reaper excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(cmdline)
    return found
