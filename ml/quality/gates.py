"""The landing gates: what tonight's cutoff makes of the raw files, judged before dbt runs.

Three quiet failures pass every row-level test and still publish wrong scores:
rows dated after the cutoff, a source that stopped delivering, and a partial
extract. Each is judged here on the landing files (read through
`ml.data.landing`, judged by the pure `freshness` and `completeness` modules),
and a failure names the table, the column, the days and the rows, so the
operator meets the cause, not a mart row count three steps later.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ml.config import FUTURE_ROWS_FAIL, ChurnConfig
from ml.data.landing import DatedTableFacts, dated_table_facts, rows_before_signup
from ml.logs import get_logger
from ml.quality import completeness
from ml.quality.freshness import Freshness

log = get_logger("gates")


class GateError(RuntimeError):
    """A landing gate refused tonight's data; the message lists every finding."""


@dataclass(frozen=True)
class GateReport:
    """Everything the gates found: failures stop the run, held-back rows are warnings."""

    cutoff: dt.date
    failures: tuple[str, ...]
    warnings: tuple[str, ...]


def late_rows_finding(facts: DatedTableFacts, cutoff: dt.date, policy: str, max_share: float) -> tuple[str, bool]:
    """The late rows of one table in words, and whether they fail the run."""
    share = facts.late_rows / facts.rows if facts.rows else 0.0
    fails = policy == FUTURE_ROWS_FAIL or share > max_share
    verdict = "fail the run" if fails else "held back (invisible to dbt at this as_of)"
    text = (f"{facts.table} (column {facts.column}): {facts.late_rows:,d} of {facts.rows:,d} rows ({share:.3%}) "
            f"dated on or after the cutoff {cutoff}, from {facts.late_first} to {facts.late_last}: {verdict}"
            + (f" (allowed share {max_share:.3%}, policy {policy})" if fails else ""))
    return text, fails


def reference_start(config: ChurnConfig, cutoff: dt.date) -> dt.date:
    """The oldest day any completeness reference can reach (periods of a month at most, before the window)."""
    gates = config.gates
    return cutoff - dt.timedelta(days=gates.completeness_window_days + 31 * (gates.completeness_reference_periods + 1))


def judge(config: ChurnConfig, cutoff: dt.date, facts: list[DatedTableFacts], replay: bool = False) -> GateReport:
    """Every finding on the facts read (pure: the tests feed it planted facts too).

    Under a replay (`--as-of`, backfill) later rows are the point of time travel:
    they are reported in the log, never a failure.
    """
    gates = config.gates
    failures: list[str] = []
    warnings: list[str] = []
    events = {e.table: e for e in config.dataset.event_tables}
    for fact in facts:
        event = events[fact.table]
        if fact.late_rows and replay:
            log.info("replay at %s: %s rows of %s dated on or after the cutoff stay invisible",
                     cutoff, f"{fact.late_rows:,d}", fact.table)
        elif fact.late_rows:
            text, fails = late_rows_finding(fact, cutoff, gates.future_rows, gates.max_future_share)
            (failures if fails else warnings).append(text)
        fresh = Freshness(fact.table, fact.column, fact.newest_visible, cutoff, event.max_lag_days)
        if fresh.stale:
            failures.append(f"stale source: {fresh.describe()}")
        verdicts = completeness.judge_days(
            fact.daily, cutoff, gates.completeness_window_days, event.seasonality,
            gates.completeness_reference_periods, gates.completeness_mad_factor, gates.completeness_min_rows,
            first_day=fact.first_day,
        )
        alarms = [v for v in verdicts if v.outside]
        if alarms:
            failures.append(f"incomplete extract: {completeness.describe(fact.table, fact.column, alarms)}")
    return GateReport(cutoff, tuple(failures), tuple(warnings))


def check_gates(config: ChurnConfig, cutoff: dt.date, replay: bool = False) -> GateReport:
    """Read the landing files at tonight's cutoff and judge them; raise GateError on any failure.

    `replay`: the cutoff was chosen by `--as-of` (time travel), so later rows are expected.
    """
    if not config.dataset.event_tables:
        return GateReport(cutoff, (), ())
    report = judge(config, cutoff, dated_table_facts(config, cutoff, reference_start(config, cutoff)), replay)
    impossible = [
        f"{b.table} (column {b.column}): {b.rows:,d} row(s) of {b.customers:,d} customer(s) dated before "
        f"the customer's signup_date, from {b.first} to {b.last}"
        for b in rows_before_signup(config)
    ]
    report = GateReport(cutoff, report.failures + tuple(impossible), report.warnings)
    for warning in report.warnings:
        log.warning("gate: %s", warning)
    if report.failures:
        raise GateError(
            f"landing gates refused the data for cutoff {cutoff} ({len(report.failures)} finding(s)):\n  "
            + "\n  ".join(report.failures)
        )
    log.info("landing gates passed at cutoff %s (%d warning(s))", cutoff, len(report.warnings))
    return report
