"""One writer run at a time on a build database: a file lock beside it that says who holds it.

Two nightlies on one warehouse would interleave their writes until one of them
hit DuckDB's own file lock at some unpredictable step. So a run first takes an
exclusive `flock` on `<build_db>.run.lock` and writes its run id, pid, start
time and current step into that file. A second run is refused at once with
the holder named.

`flock` is released by the kernel when its holder dies, however it dies
(SIGKILL, OOM, power loss of the process), so a lock file that still holds a
holder's details while nobody holds the lock is a run that died: the next run
takes the lock, hands the dead holder (with the step it was in) back to the
caller to record as failed, and overwrites the details. A run that ends
normally empties the file, unless it failed in a way it could not record
itself (e.g. the database was held by another process) - then the details,
with its error, stay for the next start to record.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ml.warehouse.connection import WarehouseError

LOCK_SUFFIX = ".run.lock"


class RunLockedError(WarehouseError):
    """Another run holds the build database's run lock."""


@dataclass(frozen=True)
class LockHolder:
    """What the lock file says about the run holding (or last holding) the lock."""

    run_id: str
    pid: int
    started_at: str
    host: str = ""
    as_of: str | None = None
    step: str | None = None
    step_started_at: str | None = None
    error: str | None = None

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder in a lock file's text; None for an empty (cleanly released) file."""
        if not text.strip():
            return None
        try:
            values = json.loads(text)
            return cls(**{k: values.get(k) for k in cls.__dataclass_fields__ if k in values})
        except (ValueError, TypeError):
            return cls(run_id="(unreadable lock file)", pid=0, started_at="?")

    def describe(self) -> str:
        step = f", in step {self.step!r} since {self.step_started_at}" if self.step else ""
        host = f" on {self.host}" if self.host else ""
        return f"run {self.run_id} (pid {self.pid}{host}, started {self.started_at}{step})"


def lock_path(build_db: Path) -> Path:
    """The lock file beside the build database it guards."""
    return build_db.with_name(build_db.name + LOCK_SUFFIX)


def refusal_message(path: Path, holder: LockHolder | None) -> str:
    who = holder.describe() if holder else "a run whose details are not written yet"
    return (f"another run holds the run lock {path}: {who}. Only one nightly (or backfill) may write this "
            "warehouse at a time; wait for it to finish, or stop that process if it is stuck.")


def dead_run_message(holder: LockHolder, found_by: str) -> str:
    """pipeline_runs' message for a run found dead (the lock free, its details still written)."""
    step = holder.step or "(between steps)"
    if holder.error:
        return (f"found dead at the start of run {found_by}: run {holder.run_id} failed in step {step} "
                f"and could not record it itself: {holder.error}")
    return (f"found dead at the start of run {found_by}: process {holder.pid} no longer held the run lock, "
            f"so run {holder.run_id} stopped during step {step} without recording an end "
            "(killed, or the machine stopped)")


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


class RunLock:
    """A held run lock; `acquire` returns it together with the dead holder it found, if any."""

    def __init__(self, path: Path, descriptor: int, holder: LockHolder) -> None:
        self.path = path
        self._fd = descriptor
        self.holder = holder
        self._keep = False  # leave the details in the file at release, for the next start to record
        self._write()

    @classmethod
    def acquire(cls, build_db: Path, run_id: str, as_of: str | None = None) -> tuple[RunLock, LockHolder | None]:
        """Take the lock without waiting; raise RunLockedError naming the holder if it is taken."""
        path = lock_path(build_db)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = LockHolder.parse(path.read_text())
            os.close(descriptor)
            raise RunLockedError(refusal_message(path, holder)) from None
        dead = LockHolder.parse(path.read_text())
        me = LockHolder(run_id=run_id, pid=os.getpid(), started_at=_now(), host=socket.gethostname(), as_of=as_of)
        return cls(path, descriptor, me), dead

    def _write(self) -> None:
        data = json.dumps(asdict(self.holder)).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def begin_run(self, run_id: str, as_of: str | None) -> None:
        """A new run under a lock already held (a backfill's nights)."""
        self.holder = replace(self.holder, run_id=run_id, as_of=as_of, started_at=_now(), step=None,
                              step_started_at=None, error=None)
        self._write()

    def at_step(self, step: str) -> None:
        """Record the step now running, so a run killed in it is recorded with it."""
        self.holder = replace(self.holder, step=step, step_started_at=_now())
        self._write()

    def leave_for_next_start(self, step: str, error: str) -> None:
        """A failure this run could not record: keep its details for the next start to record."""
        self.holder = replace(self.holder, step=step, error=error[:2000])
        self._keep = True
        self._write()

    def hand_back(self, dead: LockHolder) -> None:
        """Put a dead holder's details back (its failure could not be recorded now either)."""
        self.holder = dead
        self._keep = True
        self._write()

    def release(self) -> None:
        """Empty the file (unless details are left for the next start) and unlock."""
        if not self._keep:
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
