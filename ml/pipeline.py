"""`churn nightly`: the whole refresh, step by step, each step recorded.

Every step's start, end, status and message go to `pipeline_runs` in the build
database, so a failed night can be diagnosed from the warehouse itself.

Only one run writes a warehouse at a time (`ml.warehouse.runlock`): a second
nightly is refused naming the holder, and a run found dead at the next start
(killed, or failed where it could not write) is recorded as failed in the step
it died in. SIGTERM is turned into an interrupt like Ctrl-C, so a stopped run
ends its dbt child, records its step as failed and releases the lock.

This is also where monitoring meets training: monitoring measures and decides
(`ml.monitoring.monitor`), and only this top layer trains a challenger when the
decision fires (`apply_policy`), for the nightly and for `churn monitor --retrain`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from ml.config import ChurnConfig
from ml.data.landing import LandingChanges, expected_files_message, landing_changes, record_partitions, validate_landing
from ml.features.build import build_warehouse
from ml.logs import get_logger, timed
from ml.modeling.definitions import check_definitions, current_definitions_sha256
from ml.modeling.registry import champion_record, load_champion, model_record, version_on_definitions
from ml.modeling.score import ScoreResult, score
from ml.modeling.train import train
from ml.monitoring import monitor
from ml.monitoring.gate import publish_gate
from ml.monitoring.monitor import MonitorResult
from ml.monitoring.policy import OUTCOME_FAILED, OUTCOME_PROMOTED, OUTCOME_REJECTED, PolicyOutcome
from ml.quality.audit import audit
from ml.quality.gates import check_gates
from ml.reports.index_page import write_reports
from ml.reports.profile import profile
from ml.reports.summary import score_summary
from ml.serving.predictions import ingest_predictions, logged_predictions
from ml.serving.publish import PublishResult, pause_point, publish
from ml.warehouse import LockHolder, Reader, RunLock, connect, dead_run_message, declare, partition_folders, quote

if TYPE_CHECKING:
    from ml.serving.spark_publish import SparkPublishResult
    from ml.warehouse.spark import SparkWarehouse

log = get_logger("pipeline")

PIPELINE_RUNS_SPEC = declare(
    name="pipeline_runs",
    owner=__name__,
    grain="one row per nightly run and step",
    description="each nightly step's start, end, status and error message",
    columns=[
        ("run_id", "VARCHAR"), ("step", "VARCHAR"),
        # VARCHAR even when every run so far had no --as-of (a frame of NULLs would type it "NULL").
        ("as_of", "VARCHAR"),
        ("started_at", "TIMESTAMP"), ("ended_at", "TIMESTAMP"), ("status", "VARCHAR"), ("message", "VARCHAR"),
    ],
)


class LandingError(RuntimeError):
    """The landing folder lacks tables the dataset needs."""


class DriftGateError(RuntimeError):
    """Tonight's drift crossed monitoring.publish_gate and nothing resolved it; nothing was published."""


@dataclass(frozen=True)
class PipelineRun:
    """One nightly run: its id, a recorder of step outcomes, and the run lock it holds."""

    config: ChurnConfig
    run_id: str = field(default_factory=lambda: dt.datetime.now().strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6])
    as_of: str | None = None
    lock: RunLock | None = field(default=None, repr=False, compare=False)

    def record(self, step: str, started: dt.datetime, status: str, message: str = "") -> None:
        _append_run_row(self.config, self.run_id, step, self.as_of, started, status, message)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = dt.datetime.now()
        if self.lock is not None:
            self.lock.at_step(name)
        try:
            with timed(f"[{self.run_id}] {name}", log):
                pause_point(f"step:{name}")  # crash-safety tests stop (and kill) the run here
                yield
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}"
            try:
                self.record(name, started, "failed", message)
            except Exception as unrecorded:
                # e.g. another process holds the database: the next start records it from the lock file
                log.error("could not record step %s as failed (%s); the next run will", name, unrecorded)
                if self.lock is not None:
                    self.lock.leave_for_next_start(name, message)
            raise
        self.record(name, started, "success")


def _append_run_row(config: ChurnConfig, run_id: str, step: str, as_of: str | None, started: dt.datetime,
                    status: str, message: str) -> None:
    row = pd.DataFrame(
        [{
            "run_id": run_id,
            "step": step,
            "as_of": as_of,
            "started_at": started,
            "ended_at": dt.datetime.now(),
            "status": status,
            "message": message[:4000],
        }]
    )
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        session.append(PIPELINE_RUNS_SPEC, row)


@dataclass(frozen=True)
class StepRecord:
    """One recorded step of a run, as `pipeline_runs` keeps it."""

    step: str
    status: str
    seconds: float
    message: str


def run_steps(config: ChurnConfig, run_id: str | None = None) -> tuple[str | None, list[StepRecord]]:
    """The steps of one run (default: the newest), in the order they started, read-only.

    Where a night's time went is read from here (benchmarks, operators), not by
    querying the table by name.
    """
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        if not session.exists(PIPELINE_RUNS_SPEC):
            return None, []
        table = quote(PIPELINE_RUNS_SPEC.name)
        run_id = run_id or session.scalar(f"select run_id from {table} order by started_at desc limit 1")
        rows = session.rows(
            f"select step, status, epoch(ended_at) - epoch(started_at), coalesce(message, '') from {table} "
            "where run_id = ? order by started_at, ended_at", [run_id],
        )
    return run_id, [StepRecord(step, status, float(seconds), message) for step, status, seconds, message in rows]


def record_dead_run(config: ChurnConfig, dead: LockHolder, found_by: str) -> None:
    """The failed row a dead run could not write: in the step it died in, with why we know."""
    try:
        started = dt.datetime.fromisoformat(str(dead.step_started_at or dead.started_at))
    except ValueError:
        started = dt.datetime.now()  # an unreadable lock file: the time is unknown
    message = dead_run_message(dead, found_by)
    log.warning("%s", message)
    _append_run_row(config, dead.run_id, dead.step or "(between steps)", dead.as_of, started, "failed", message)


@contextmanager
def run_lock(config: ChurnConfig, run_id: str, as_of: str | None = None) -> Iterator[RunLock]:
    """Hold the warehouse's run lock for the block; record a dead predecessor first.

    Refused at once (RunLockedError naming the holder) while another run holds it.
    """
    lock, dead = RunLock.acquire(config.warehouse.build_db, run_id, as_of)
    try:
        if dead is not None:
            try:
                record_dead_run(config, dead, run_id)
            except Exception:
                lock.hand_back(dead)  # still unrecorded: keep it for the start after this one
                raise
        yield lock
    finally:
        lock.release()


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so cleanup runs (dbt child ended, step recorded, lock released)."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` (only the main thread can own signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ensure_landing(config: ChurnConfig) -> None:
    """Generate the demo data when the dataset allows it and its landing folder is empty."""
    landing = config.dataset.landing_dir
    present = sorted(landing.glob(f"*.{config.dataset.landing_format}")) if landing.exists() else []
    present += [landing / name for name in partition_folders(landing, config.dataset.landing_format)]
    if present:
        log.info("landing folder %s holds %d file(s)", landing, len(present))
        return
    if not config.dataset.generate_if_empty:
        raise LandingError(f"landing folder {landing} has no .{config.dataset.landing_format} files; "
                           f"{expected_files_message(config)}")
    from ml.data.generate import GenerateOptions, generate

    generate(GenerateOptions.from_config(config))


def nightly(config: ChurnConfig, as_of: str | None = None, force_train: bool = False,
            accept_drift: str | None = None, lock: RunLock | None = None) -> PipelineRun:
    """Run every stage in order; any failure stops the run before publishing.

    Tonight's cutoff is decided here (`--as-of`, else the dataset's clock) and
    passed explicitly to the gates, dbt and the audits: the data never chooses it.
    Takes the warehouse's run lock, unless the caller (a backfill) already holds it.
    """
    cutoff = config.decided_as_of(as_of)
    run = PipelineRun(config, as_of=cutoff.isoformat())
    log.info("nightly run %s on dataset %r as of %s (%s)", run.run_id, config.dataset.name, cutoff,
             "--as-of" if as_of else f"clock {config.dataset.clock}")
    replay = as_of is not None
    with terminate_as_interrupt():
        if lock is not None:
            lock.begin_run(run.run_id, run.as_of)
            return _nightly_steps(dataclasses.replace(run, lock=lock), cutoff, replay, force_train, accept_drift)
        with run_lock(config, run.run_id, run.as_of) as held:
            return _nightly_steps(dataclasses.replace(run, lock=held), cutoff, replay, force_train, accept_drift)


def _nightly_steps(run: PipelineRun, cutoff: dt.date, replay: bool, force_train: bool,
                   accept_drift: str | None) -> PipelineRun:
    config = run.config
    start = time.perf_counter()
    with run.step("land"):
        ensure_landing(config)
    with run.step("validate_landing"):
        # partitioned landings: only tonight's new and rewritten partitions are checked row by row
        changes = current_landing_changes(config)
        validate_landing(config, changes)
        audit(config, "landing", run.run_id, as_of=run.as_of, changes=changes)
    with run.step("gates"):
        check_gates(config, cutoff, replay=replay)
    with run.step("build"):
        if changes.history_changed:
            log.warning("landing history changed (%s): full-refresh build", changes.describe())
        build_warehouse(config, as_of=run.as_of, full_refresh=changes.history_changed)
    # after the build: dbt on Spark runs in a child process, which needs the Derby metastore to itself
    with data_plane(config) as data:
        with run.step("audit_mart"):
            audit(config, "mart", run.run_id, as_of=run.as_of, data=data)
        with run.step("profile"):
            profile(config, run_id=run.run_id, data=data)
        with run.step("train"):
            # trains when the dataset has no champion yet, when forced, or when the mart redefined its features
            definitions = train_if_needed(run, force_train, data)
            warn_if_champion_misses_target(config)
        with run.step("score"):
            score_on_engine(config, run.run_id, data)
        with run.step("audit_scores"):
            audit(config, "scores", run.run_id, as_of=run.as_of, data=data)
        with run.step("ingest_predictions"):
            # the API's prediction log files -> prediction_log, so monitoring and BI see online answers
            ingest_predictions(config)
        with run.step("monitor"):
            watched = monitor.measure(config, run_id=run.run_id, logged=logged_predictions, data=data)
        with run.step("retrain_policy"):
            # a triggered retrain trains a challenger; the registry decides if it replaces the champion
            # 'today' for the calendar rule is tonight's decided date, as for every other step
            outcome = apply_policy(config, watched, cutoff, data=data)
        if outcome.outcome == OUTCOME_PROMOTED:
            with run.step("rescore"):
                warn_if_champion_misses_target(config)  # tonight's promoted challenger is the champion now
                score_on_engine(config, run.run_id, data)
                audit(config, "scores", run.run_id, as_of=run.as_of, data=data)
                watched = monitor.measure(config, run_id=run.run_id, logged=logged_predictions, data=data)
        with run.step("drift_gate"):
            check_drift_gate(run, watched, outcome.outcome == OUTCOME_PROMOTED, accept_drift)
        with run.step("publish"):
            published = publish_on_engine(config, run.run_id, data)
            # only a run that published moves the landing manifest on: a failed night's partitions are re-audited
            remember_landing(config, changes, run.run_id, cutoff)
        with run.step("reports"):
            index = write_reports(config, data=data)
        summary = score_summary(config, data=data)
    print(f"\nnightly {run.run_id} ({config.dataset.name}) finished in {time.perf_counter() - start:.0f}s")
    print(f"  published to {published.path} (what BI reads):")
    for table, rows in published.tables.items():
        print(f"  {table:38s} {rows:>12,d} rows")
    if definitions:
        print(f"  feature definitions: {definitions}")
    print("\n".join(summary))
    print(f"  reports: {index}")
    return run


@contextmanager
def data_plane(config: ChurnConfig) -> Iterator[Reader | None]:
    """Where tonight's stages read the mart and scores: None on DuckDB (each stage opens the build
    database itself, as one writer at a time must), the run's one Spark session on Spark."""
    if config.engine != "spark":
        yield None
        return
    from ml.warehouse.spark import spark_folder, spark_session

    with timed(f"starting Spark ({config.spark.master}) on {spark_folder(config)}", log), \
            spark_session(spark_folder(config), config.spark) as warehouse:
        yield warehouse


def score_on_engine(config: ChurnConfig, run_id: str, data: Reader | None) -> ScoreResult:
    """`churn score` where the mart lives: in the build database, or distributed on Spark."""
    if data is None:
        return score(config, run_id=run_id)
    from ml.modeling.spark_score import score_on_spark

    return score_on_spark(config, spark_reader(data), run_id=run_id)


def publish_on_engine(config: ChurnConfig, run_id: str, data: Reader | None) -> PublishResult | SparkPublishResult:
    """Write-audit-publish: the DuckDB file swap, or a new Parquet version and one pointer switch on Spark."""
    if data is None:
        return publish(config, run_id=run_id)
    from ml.serving.spark_publish import publish_on_spark

    return publish_on_spark(config, spark_reader(data), run_id=run_id)


def spark_reader(data: Reader) -> SparkWarehouse:
    from ml.warehouse.spark import SparkWarehouse

    if not isinstance(data, SparkWarehouse):
        raise TypeError(f"expected the Spark data plane, got {type(data).__name__}")
    return data


def train_if_needed(run: PipelineRun, force: bool, data: Reader | None = None) -> str:
    """Train the first model, a forced one, or a challenger when the mart changed the champion's features.

    A changed definition (or a new feature) trains a challenger on the new mart
    once; the registry's promotion rule compares it with the champion on the
    champion's own definitions. Whatever it decides is recorded in
    pipeline_runs (step `feature_definitions`) and returned for the summary; a
    rejected challenger leaves a champion that scoring refuses to apply to
    redefined features (`ml.modeling.score.refuse_redefined`).
    """
    config = run.config
    champion = load_champion(config)
    if champion is None or force:
        train(config, force=force, run_id=run.run_id, data=data)
        return ""
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        check = check_definitions(data if data is not None else session, config, champion)
        already = (version_on_definitions(session, config.dataset.name, current_definitions_sha256(config))
                   if check.changed else None)
    if not check.changed:
        return ""
    started = dt.datetime.now()
    if already is not None:
        note = (f"{check.describe()}; model {already.model_version} was already trained on these definitions "
                f"({already.status}: {already.decision}); not retrained")
    else:
        log.info("%s: training a challenger on the new mart", check.describe())
        trained = train(config, force=True, run_id=f"{run.run_id}-definitions", data=data)
        with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
            record = model_record(session, str(trained.version))
        note = (f"{check.describe()}; challenger {trained.version} trained on the new mart was "
                f"{'PROMOTED' if trained.promoted else 'REJECTED'}: {record.decision if record else trained.message}")
    run.record("feature_definitions", started, "success", note)
    log.warning("feature definitions: %s", note)
    return note


def warn_if_champion_misses_target(config: ChurnConfig) -> None:
    """Scoring goes on with a champion below the success target, but never silently."""
    record = champion_record(config)
    if record is not None and record.misses_success_target:
        log.warning("%s", record.success_warning())


def current_landing_changes(config: ChurnConfig) -> LandingChanges:
    """Partitions new, rewritten or removed since the last successful run (its manifest is in the build database)."""
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        return landing_changes(config, session)


def remember_landing(config: ChurnConfig, changes: LandingChanges, run_id: str,
                     as_of: dt.date | None = None) -> None:
    """Record the partitions this run audited and built on (and the settled rows as of its night) as the next
    run's baseline."""
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        record_partitions(config, session, changes, run_id, as_of)


def check_drift_gate(run: PipelineRun, watched: MonitorResult, promoted: bool, accept_drift: str | None) -> None:
    """Stop publishing on unresolved drift; an accepted override is recorded in pipeline_runs with its reason."""
    decision = publish_gate(run.config.monitoring.publish_gate, watched.drifted_features, watched.drifted_share,
                            watched.top_features_drifted, promoted, accept_drift)
    if decision.blocked:
        raise DriftGateError(
            f"drift gate: tonight's snapshot {watched.as_of_date} against champion {watched.model_version}: "
            f"{decision.message()}; no retrain resolved it. Check the landing extract first (drift_stats); "
            'publish anyway with `churn nightly --accept-drift "reason"`'
        )
    if decision.resolution == "accepted":
        run.record("accept_drift", dt.datetime.now(), "override",
                   f"--accept-drift {accept_drift!r}: {decision.message()}")
        log.warning("drift gate overridden (%s): %s", accept_drift, decision.message())
    elif decision.resolution == "retrain":
        log.info("drift gate: resolved by tonight's promoted challenger (%s)", decision.message())


def apply_policy(config: ChurnConfig, result: MonitorResult, today: dt.date, retrain: bool = True,
                 data: Reader | None = None) -> PolicyOutcome:
    """Decide; when triggered (and `retrain`), train a challenger that the registry may promote.

    The decision row is written whatever happens, including when training fails
    (outcome 'failed', then the error propagates and stops the nightly).
    """
    decision = monitor.decide_retrain(config, result, today, data=data)
    if not decision.triggered or not retrain:
        outcome = PolicyOutcome.without_training(decision)
        monitor.record_decision(config, result, today, outcome)
        log.info("retrain policy: %s", outcome.outcome)
        return outcome
    log.info("retrain policy fired (%s): training a challenger", ", ".join(decision.rules))
    try:
        trained = train(config, force=True, run_id=f"{result.run_id}-retrain", data=data)
    except Exception as exc:
        failed = PolicyOutcome(decision, OUTCOME_FAILED, message=f"{type(exc).__name__}: {exc}")
        monitor.record_decision(config, result, today, failed)
        raise
    outcome = PolicyOutcome(decision, OUTCOME_PROMOTED if trained.promoted else OUTCOME_REJECTED,
                            trained.version, trained.message)
    monitor.record_decision(config, result, today, outcome)
    log.info("retrain policy: challenger %s %s", trained.version, outcome.outcome)
    return outcome


def monitor_and_decide(
    config: ChurnConfig, run_id: str | None = None, as_of: str | dt.date | None = None, retrain: bool = False,
) -> tuple[MonitorResult, PolicyOutcome]:
    """`churn monitor`: measure, then apply the retraining policy (training only when `retrain`)."""
    result = monitor.measure(config, run_id)
    return result, apply_policy(config, result, monitor.today_for(as_of), retrain=retrain)


def monitor_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    """Handler of `churn monitor` (its arguments: `ml.monitoring.monitor.add_arguments`)."""
    result, outcome = monitor_and_decide(config, as_of=args.as_of, retrain=args.retrain)
    print("\n".join(monitor.report_lines(result, outcome)))
    print(f"  reports: {write_reports(config)}")
    return 0


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    nightly(config, as_of=args.as_of, force_train=args.force_train, accept_drift=args.accept_drift)
    return 0
