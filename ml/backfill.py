"""`churn backfill`: replay the nightly over past dates to build monitoring history.

Each replayed night is a real `churn nightly --as-of DATE`: dbt rebuilds the
mart as if the data ended the day before DATE, so training, scoring, drift,
performance and the retraining policy see exactly what they would have seen
that night. Replaying a few months is how a new deployment gets a drift
heatmap, estimated-vs-realized recall and a retraining timeline on day one,
and how the monitoring itself is tested against data with known drift.

Time travel must not see the future, including through the model registry: a
champion trained on later data would make every replayed night look perfect.
So by default the replay runs in a sandbox warehouse (`<warehouse>/backfill`,
recreated each time) that reads the same landing data; `--in-place` writes to
the configured warehouse instead and is refused when its champion was trained
on data after the first replayed date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ml.config import ChurnConfig
from ml.logs import get_logger, timed
from ml.warehouse import connect

log = get_logger("backfill")

SANDBOX_DIR = "backfill"
SANDBOX_MARKER = ".churn-backfill-sandbox"
EVERY_PATTERN = re.compile(r"^\s*(\d+)\s*([dwm])\s*$")


class BackfillError(RuntimeError):
    """The replay cannot run as asked (bad dates, or it would see the future)."""


@dataclass(frozen=True)
class BackfillResult:
    config: ChurnConfig
    dates: list[dt.date]
    run_ids: list[str]
    seconds: float


def parse_every(text: str) -> tuple[int, str]:
    """'7d', '2w' or '1m' -> (count, unit)."""
    match = EVERY_PATTERN.match(text)
    if not match or int(match.group(1)) < 1:
        raise BackfillError(f"--every {text!r}: expected a positive count and a unit d, w or m (e.g. 7d)")
    return int(match.group(1)), match.group(2)


def _add_months(day: dt.date, months: int) -> dt.date:
    month = day.month - 1 + months
    year = day.year + month // 12
    month = month % 12 + 1
    days_in_month = (dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)).day
    return dt.date(year, month, min(day.day, days_in_month))


def schedule(start: dt.date, end: dt.date, every: str, month_starts: bool = True) -> list[dt.date]:
    """Replay dates: every `every` from `start`, plus each month start, through `end`.

    Month starts are included (unless `month_starts` is False) because the
    mart's snapshots are monthly: only a night that scored a month-start
    snapshot can later be joined to that snapshot's labels, so these are the
    nights that give realized performance.
    """
    if start > end:
        raise BackfillError(f"backfill start {start} is after its end {end}")
    count, unit = parse_every(every)
    dates: set[dt.date] = set()
    day, step = start, 0
    while day <= end:
        dates.add(day)
        step += 1
        day = (
            start + dt.timedelta(days=count * step) if unit == "d"
            else start + dt.timedelta(weeks=count * step) if unit == "w"
            else _add_months(start, count * step)
        )
    month_start = dt.date(start.year, start.month, 1)
    while month_starts and month_start <= end:
        if month_start >= start:
            dates.add(month_start)
        month_start = _add_months(month_start, 1)
    dates.add(end)
    return sorted(dates)


def sandbox_config(config: ChurnConfig, folder: Path | None = None) -> ChurnConfig:
    """The same config with every warehouse output moved into `folder` (landing unchanged)."""
    folder = (folder or config.warehouse.dir / SANDBOX_DIR).resolve()
    wh = config.warehouse
    return config.replace_paths(
        dir=folder,
        build_db=folder / wh.build_db.name,
        published_db=folder / wh.published_db.name,
        models_dir=folder / wh.models_dir.name,
        reports_dir=folder / wh.reports_dir.name,
    )


def check_sandbox(config: ChurnConfig, keep: Path | None = None) -> None:
    """Refuse a folder that exists and is not a backfill sandbox (it is about to be emptied);
    `keep` (the run lock this replay just created there) does not count."""
    folder = config.warehouse.dir
    contents = [child for child in folder.iterdir() if child != keep] if folder.exists() else []
    if contents and not (folder / SANDBOX_MARKER).exists():
        raise BackfillError(f"{folder} exists and is not a backfill sandbox; choose another --into folder")


def reset_sandbox(config: ChurnConfig, keep: Path | None = None) -> None:
    """Empty a previous replay's sandbox (only a folder this module created), except `keep` (the run lock)."""
    check_sandbox(config, keep)
    folder = config.warehouse.dir
    folder.mkdir(parents=True, exist_ok=True)
    for child in folder.iterdir():
        if keep is not None and child == keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / SANDBOX_MARKER).write_text("created by churn backfill; removed by the next backfill\n")


def data_end(config: ChurnConfig) -> dt.date:
    """The latest as_of_date the data supports (last observed day + 1), from a full build."""
    from ml.features.build import build_warehouse
    from ml.features.mart import current_contract, latest_snapshot_date
    from ml.pipeline import ensure_landing

    ensure_landing(config)
    build_warehouse(config)
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        latest = latest_snapshot_date(session, config, current_contract(config))
    if latest is None:
        raise BackfillError(f"feature mart {config.dataset.feature_mart!r} is empty; nothing to replay")
    return latest


def check_no_future_champion(config: ChurnConfig, start: dt.date) -> None:
    """Refuse an in-place replay whose champion was trained on data from after `start`."""
    from ml.modeling.registry import champion_in, load_champion

    if not config.warehouse.build_db.exists():
        return
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        if champion_in(session, config.dataset.name) is None:
            return
    model = load_champion(config)
    if model is None:
        return
    last = (model.metadata.snapshot_range or [None, None])[1]
    if last is None or dt.date.fromisoformat(str(last)) >= start:
        raise BackfillError(
            f"champion {model.version} in {config.warehouse.build_db} was trained on snapshots up to {last}, "
            f"not before the first replayed date {start}: the replay would see the future. "
            "Run without --in-place (a sandbox warehouse) or start after that date."
        )


def backfill(
    config: ChurnConfig,
    start: dt.date | None = None,
    end: dt.date | None = None,
    every: str | None = None,
    in_place: bool = False,
    into: Path | None = None,
    month_starts: bool = True,
) -> BackfillResult:
    """Replay `churn nightly --as-of` for each scheduled date; returns the config it wrote to.

    The whole replay holds the target warehouse's run lock (so no nightly or other
    backfill writes it meanwhile), and SIGTERM stops it like Ctrl-C: the running
    dbt child is ended and the night's step recorded as failed.
    """
    from ml.pipeline import nightly, run_lock, terminate_as_interrupt

    every = every or config.monitoring.backfill_every
    parse_every(every)
    target = config if in_place else sandbox_config(config, into)
    if not in_place:
        check_sandbox(target)
    replay_id = dt.datetime.now().strftime("backfill-%Y%m%dT%H%M%S")
    with terminate_as_interrupt(), run_lock(target, replay_id) as lock:
        if not in_place:
            reset_sandbox(target, keep=lock.path)
        end = end or data_end(target)
        start = start or _add_months(end, -config.monitoring.backfill_months)
        dates = schedule(start, end, every, month_starts)
        if in_place:
            check_no_future_champion(target, dates[0])
        log.info("backfill of %d nights from %s to %s (every %s) into %s", len(dates), dates[0], dates[-1],
                 every, target.warehouse.dir)
        started = time.perf_counter()
        run_ids: list[str] = []
        for i, day in enumerate(dates, 1):
            with timed(f"backfill night {i}/{len(dates)} as of {day}", log):
                # A replay builds monitoring history, drift included: the drift publish gate is
                # overridden on purpose, and the override is recorded per night in pipeline_runs.
                run_ids.append(nightly(target, as_of=day.isoformat(), lock=lock,
                                       accept_drift=f"backfill replay of {day}").run_id)
    return BackfillResult(target, dates, run_ids, time.perf_counter() - started)


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    result = backfill(config, args.start, args.end, args.every, in_place=args.in_place, into=args.into,
                      month_starts=args.month_starts)
    print(f"backfill: {len(result.dates)} nights from {result.dates[0]} to {result.dates[-1]} "
          f"in {result.seconds:.0f}s ({result.seconds / len(result.dates):.0f}s per night)")
    print(f"  monitoring tables in {result.config.warehouse.build_db}")
    return 0

