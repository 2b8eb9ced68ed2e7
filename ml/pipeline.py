"""`churn nightly`: the whole refresh, step by step, each step recorded.

Every step's start, end, status and message go to `pipeline_runs` in the build
database, so a failed night can be diagnosed from the warehouse itself.

This is also where monitoring meets training: monitoring measures and decides
(`ml.monitoring.monitor`), and only this top layer trains a challenger when the
decision fires (`apply_policy`), for the nightly and for `churn monitor --retrain`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd

from ml.config import ChurnConfig
from ml.data.landing import validate_landing
from ml.features.build import build_warehouse
from ml.logs import get_logger, timed
from ml.modeling.score import score
from ml.modeling.train import train
from ml.monitoring import monitor
from ml.monitoring.monitor import MonitorResult
from ml.monitoring.policy import OUTCOME_FAILED, OUTCOME_PROMOTED, OUTCOME_REJECTED, PolicyOutcome
from ml.quality.audit import audit
from ml.reports.index_page import write_reports
from ml.reports.profile import profile
from ml.reports.summary import score_summary
from ml.serving.publish import pause_point, publish
from ml.warehouse import connect, declare

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


@dataclass(frozen=True)
class PipelineRun:
    """One nightly run: its id and a recorder of step outcomes."""

    config: ChurnConfig
    run_id: str = field(default_factory=lambda: dt.datetime.now().strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6])
    as_of: str | None = None

    def record(self, step: str, started: dt.datetime, status: str, message: str = "") -> None:
        row = pd.DataFrame(
            [{
                "run_id": self.run_id,
                "step": step,
                "as_of": self.as_of,
                "started_at": started,
                "ended_at": dt.datetime.now(),
                "status": status,
                "message": message[:4000],
            }]
        )
        with connect(self.config.warehouse.build_db) as session:
            session.append(PIPELINE_RUNS_SPEC, row)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = dt.datetime.now()
        try:
            with timed(f"[{self.run_id}] {name}", log):
                pause_point(f"step:{name}")  # crash-safety tests stop (and kill) the run here
                yield
        except BaseException as exc:
            self.record(name, started, "failed", f"{type(exc).__name__}: {exc}")
            raise
        self.record(name, started, "success")


def ensure_landing(config: ChurnConfig) -> None:
    """Generate the demo data when the dataset allows it and its landing folder is empty."""
    landing = config.dataset.landing_dir
    present = sorted(landing.glob(f"*.{config.dataset.landing_format}")) if landing.exists() else []
    if present:
        log.info("landing folder %s holds %d file(s)", landing, len(present))
        return
    if not config.dataset.generate_if_empty:
        raise LandingError(f"landing folder {landing} has no .{config.dataset.landing_format} files")
    from ml.data.generate import GenerateOptions, generate

    generate(GenerateOptions.from_config(config))


def nightly(config: ChurnConfig, as_of: str | None = None, force_train: bool = False) -> PipelineRun:
    """Run every stage in order; any failure stops the run before publishing."""
    run = PipelineRun(config, as_of=as_of)
    log.info("nightly run %s on dataset %r%s", run.run_id, config.dataset.name, f" as of {as_of}" if as_of else "")
    start = time.perf_counter()
    with run.step("land"):
        ensure_landing(config)
    with run.step("validate_landing"):
        validate_landing(config)
        audit(config, "landing", run.run_id, as_of=as_of)
    with run.step("build"):
        build_warehouse(config, as_of=as_of)
    with run.step("audit_mart"):
        audit(config, "mart", run.run_id, as_of=as_of)
    with run.step("profile"):
        profile(config, run_id=run.run_id)
    with run.step("train"):
        # trains only when the dataset has no champion yet, or when forced
        train(config, force=force_train, run_id=run.run_id)
    with run.step("score"):
        score(config, run_id=run.run_id)
    with run.step("audit_scores"):
        audit(config, "scores", run.run_id, as_of=as_of)
    with run.step("monitor"):
        watched = monitor.measure(config, run_id=run.run_id)
    with run.step("retrain_policy"):
        # a triggered retrain trains a challenger; the registry decides if it replaces the champion
        outcome = apply_policy(config, watched, monitor.today_for(as_of))
    if outcome.outcome == OUTCOME_PROMOTED:
        with run.step("rescore"):
            score(config, run_id=run.run_id)
            audit(config, "scores", run.run_id, as_of=as_of)
            monitor.measure(config, run_id=run.run_id)
    with run.step("publish"):
        published = publish(config, run_id=run.run_id)
    with run.step("reports"):
        index = write_reports(config)
    print(f"\nnightly {run.run_id} ({config.dataset.name}) finished in {time.perf_counter() - start:.0f}s")
    print(f"  published to {published.path} (what BI reads):")
    for table, rows in published.tables.items():
        print(f"  {table:38s} {rows:>12,d} rows")
    print("\n".join(score_summary(config)))
    print(f"  reports: {index}")
    return run


def apply_policy(config: ChurnConfig, result: MonitorResult, today: dt.date, retrain: bool = True) -> PolicyOutcome:
    """Decide; when triggered (and `retrain`), train a challenger that the registry may promote.

    The decision row is written whatever happens, including when training fails
    (outcome 'failed', then the error propagates and stops the nightly).
    """
    decision = monitor.decide_retrain(config, result, today)
    if not decision.triggered or not retrain:
        outcome = PolicyOutcome.without_training(decision)
        monitor.record_decision(config, result, today, outcome)
        log.info("retrain policy: %s", outcome.outcome)
        return outcome
    log.info("retrain policy fired (%s): training a challenger", ", ".join(decision.rules))
    try:
        trained = train(config, force=True, run_id=f"{result.run_id}-retrain")
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
    return 0


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    nightly(config, as_of=args.as_of, force_train=args.force_train)
    return 0
