"""Measure one command as a process tree: wall, CPU and peak memory, with the machine's load beside.

The machine has 2 cores shared with whoever else runs there, so a figure taken
while the load is high says little: each measurement first waits for the
1-minute load average to settle below a limit and refuses (or, when allowed,
warns loudly and marks the figure) if it does not. CPU seconds (user + sys of
the whole tree, from wait4's rusage, which counts every descendant its parent
waited for, such as dbt) are kept beside wall time everywhere, since wall time
alone cannot tell a slow step from a starved one.

Peak memory is taken two ways: wait4's ru_maxrss is the largest single process
of the tree, and a sampler sums the resident sets of the tree's processes alive
at the same moment (a nightly holds DuckDB in Python while dbt runs beside it).
`peak_mb` is the larger of the two.

CPU seconds are taken two ways too. wait4's rusage misses a descendant its
parent never waited for: Spark's local-mode JVM is one (the demo nightly on
Spark showed a load of 2.7 beside 58 CPU-s of rusage). The same sampler reads
each tree process's own user + system ticks from /proc/<pid>/stat and keeps
the last value seen per pid. That misses processes shorter than one sampling
period, which rusage counts, so `cpu_s` is the larger of the two: a lower bound
either way, never a double count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.5  # tree RSS sampling period: a few samples per short step, little CPU taken


class LoadTooHighError(RuntimeError):
    """The machine stayed busier than the limit, so a measurement would not mean much."""


@dataclass(frozen=True)
class Load:
    """Load averages (1, 5, 15 minutes) and the `uptime` line they came with."""

    one: float
    five: float
    fifteen: float
    uptime: str

    @classmethod
    def now(cls) -> Load:
        one, five, fifteen = os.getloadavg()
        try:
            line = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
        except OSError:  # no uptime binary: the numbers are what matters
            line = ""
        return cls(round(one, 2), round(five, 2), round(fifteen, 2), line)


@dataclass(frozen=True)
class Measurement:
    """One measured command: what ran, how it ended, and what it cost."""

    name: str
    command: list[str]
    exit_code: int
    wall_s: float
    user_s: float
    sys_s: float
    max_process_rss_mb: float  # wait4 ru_maxrss: the largest single process of the tree
    tree_rss_mb: float  # sampled: the most the tree's processes held at one moment
    load_before: Load
    load_after: Load
    load_ok: bool  # the 1-minute load was within the limit when the measurement started
    log: str
    details: dict[str, object] = field(default_factory=dict)
    sampled_cpu_s: float = 0.0  # user + sys of every tree process seen alive, reaped or not

    @property
    def cpu_s(self) -> float:
        return max(self.user_s + self.sys_s, self.sampled_cpu_s)

    @property
    def peak_mb(self) -> float:
        return max(self.max_process_rss_mb, self.tree_rss_mb)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["cpu_s"] = round(self.cpu_s, 1)
        out["peak_mb"] = round(self.peak_mb)
        return out


def wait_for_quiet(max_load: float, settle_seconds: float, allow_load: bool, what: str,
                   poll_seconds: float = 5.0) -> tuple[Load, bool]:
    """Wait until the 1-minute load is at most `max_load`; refuse after `settle_seconds` unless allowed.

    Our own previous step leaves its load in the 1-minute average for a while,
    so a short wait is normal; a machine that stays busy is not.
    """
    load = Load.now()
    deadline = time.monotonic() + settle_seconds
    while load.one > max_load and not allow_load and time.monotonic() < deadline:
        time.sleep(poll_seconds)
        load = Load.now()
    if load.one <= max_load:
        return load, True
    message = (f"1-minute load average {load.one} is above {max_load} before {what} "
               f"({load.uptime or 'no uptime output'}); this machine has {os.cpu_count()} cores")
    if not allow_load:
        raise LoadTooHighError(f"{message}; waited {settle_seconds:.0f}s. Stop other work, "
                               "or pass --allow-load to measure anyway (figures marked as loaded)")
    print(f"\n!!! WARNING: {message}; measuring anyway (--allow-load), figure marked as loaded !!!\n",
          file=sys.stderr, flush=True)
    return load, False


def _process_table() -> tuple[dict[int, list[int]], dict[int, float]]:
    """Every process's children, and its own user + system CPU seconds so far (/proc/<pid>/stat)."""
    tree: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended while we looked
            continue
        # the command name may hold spaces and parentheses: the fields start after the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        tree.setdefault(int(fields[1]), []).append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: stat fields 14, 15
    return tree, cpu


def _tree_pids(root: int, tree: dict[int, list[int]]) -> list[int]:
    pids, pending = [], [root]
    while pending:
        pid = pending.pop()
        pids.append(pid)
        pending.extend(tree.get(pid, []))
    return pids


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
        except (OSError, IndexError, ValueError):
            pass
    return total / 2**20


def tree_rss_mb(root: int) -> float:
    """Resident memory summed over `root` and its descendants alive now (MiB)."""
    return _rss_mb(_tree_pids(root, _process_table()[0]))


class _Sampler(threading.Thread):
    """Samples the tree until stopped: the most RSS held at once, and each process's last CPU seconds."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak = root, 0.0
        self.cpu_by_pid: dict[int, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            tree, cpu = _process_table()
            pids = _tree_pids(self.root, tree)
            self.peak = max(self.peak, _rss_mb(pids))
            self.cpu_by_pid.update({pid: cpu[pid] for pid in pids if pid in cpu})
            self.stopped.wait(SAMPLE_SECONDS)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu_by_pid.values())


def measure(name: str, command: list[str], log_file: Path, *, cwd: Path, max_load: float,
            settle_seconds: float, allow_load: bool, env: dict[str, str] | None = None) -> Measurement:
    """Run `command` (output to `log_file`) once the machine is quiet; return what it cost."""
    before, ok = wait_for_quiet(max_load, settle_seconds, allow_load, name)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
        sampler = _Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.stopped.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(
        name=name, command=command, exit_code=proc.returncode, wall_s=round(wall, 2),
        user_s=round(usage.ru_utime, 2), sys_s=round(usage.ru_stime, 2),
        # Linux reports ru_maxrss in KiB
        max_process_rss_mb=round(usage.ru_maxrss / 1024, 1), tree_rss_mb=round(sampler.peak, 1),
        load_before=before, load_after=Load.now(), load_ok=ok, log=str(log_file),
        sampled_cpu_s=round(sampler.cpu_s, 2),
    )
