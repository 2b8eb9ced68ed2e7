"""A nightly killed at any step leaves the published file as it was, and the next one recovers.

The nightly runs as a `churn nightly` subprocess in its own process group (so dbt
dies with it). It is SIGKILLed while dbt builds (seen in its log), and at named
pause points (`CHURN_PAUSE_AT`, see ml.serving.publish.pause_point): the start of the
mart audit, of training, of scoring, and in the middle of writing the new
published file. After each kill the published file must open read-only and be
byte-identical to the last good state; the next run must start cleanly (it gets
further each time), and a final run completes and publishes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from ml.config import ChurnConfig
from ml.serving.publish import INFO_TABLE, PAUSE_ENV, PAUSE_FILE_ENV

from .conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published_state(config: ChurnConfig) -> tuple[str, int]:
    with duckdb.connect(str(config.warehouse.published_db), read_only=True) as con:
        run_id = con.execute(f"select run_id from {INFO_TABLE}").fetchall()[0][0]
        rows = con.execute("select count(*) from churn_scores").fetchall()[0][0]
    return run_id, rows


def start_nightly(config: ChurnConfig, log: Path, pause_at: str | None, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop(PAUSE_ENV, None)
    if pause_at:
        env[PAUSE_ENV] = pause_at
        env[PAUSE_FILE_ENV] = str(log.with_suffix(".paused"))
    return subprocess.Popen(
        [sys.executable, "-m", "ml.cli", "--config", str(config.source_file), "nightly", *extra],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
    )


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"nightly ended (rc {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"kill point not reached in {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def child_commands(pid: int) -> list[str]:
    """Command lines of a process's descendants (dbt runs as a child of the nightly)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass
            todo.append(child)
    return found


# (kill point, extra nightly arguments); the step must have started when the process dies.
KILL_POINTS = [
    ("dbt build", ()),
    ("step:audit_mart", ()),
    ("step:train", ("--force-train",)),
    ("step:score", ()),
    ("publish:churn_scores", ()),  # the new file is half written
]


def test_killed_nightlies_never_touch_the_published_state(
    published_warehouse: ChurnConfig, tmp_path: Path
) -> None:
    config = copy_warehouse(published_warehouse, tmp_path / "wh", QUICK_TRAINING)
    published = config.warehouse.published_db
    good_digest, good_state = digest(published), published_state(config)

    for i, (point, extra) in enumerate(KILL_POINTS):
        log = tmp_path / f"kill{i}.log"
        if point == "dbt build":
            proc = start_nightly(config, log, None, *extra)
            wait_for(lambda proc=proc: any(" build " in c and "dbt" in c for c in child_commands(proc.pid)), proc, log)
            time.sleep(3)  # well inside dbt's run
            assert any("dbt" in c for c in child_commands(proc.pid)), "dbt finished before the kill"
        else:
            proc = start_nightly(config, log, point, *extra)
            wait_for(lambda log=log: log.with_suffix(".paused").exists(), proc, log)
        kill(proc)
        assert digest(published) == good_digest, f"published file changed by a run killed at {point}"
        assert published_state(config) == good_state

    temps = [p.name for p in published.parent.iterdir() if ".tmp-" in p.name]
    assert temps, "the publish kill should have left its half-written temp file"

    log = tmp_path / "final.log"
    proc = start_nightly(config, log, None)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    run_id, rows = published_state(config)
    assert run_id != good_state[0] and rows == good_state[1]  # same inputs, same customers scored
    assert [p.name for p in published.parent.iterdir() if ".tmp-" in p.name] == []
    with open(published.parent / f".{published.name}.lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises if a dead run still held it
