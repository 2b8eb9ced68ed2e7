"""`churn monitor`: drift, realized and estimated performance, retraining decision.

Reads tonight's scoring snapshot (the mart's latest as_of_date and the
champion's `churn_scores`), compares it with the reference statistics stored
in the champion's metadata at training time, and writes three warehouse tables
BI can chart directly:

- `drift_stats`: one row per feature x statistic (plus score, share flagged and
  dataset-level rows) per run;
- `model_performance`: `estimated` (CBPE) metrics for tonight's scores, and
  `realized` metrics for every earlier scored snapshot whose labels have since
  arrived in the mart;
- `retrain_decisions`: which retraining rules fired and what happened.

All rows of one run are written in one transaction, so a failure never leaves
a half-written night. This stage measures and decides (`measure`,
`decide_retrain`, `record_decision`); it never trains. Training a challenger
when the decision fires is the pipeline's step (`ml.pipeline.apply_policy`),
which also handles `churn monitor` (`ml.pipeline.monitor_command`).

Other owners' tables are read only through their readers: the mart through
`ml.features.mart`, scores through `ml.modeling.score`, importance and training
runs through `ml.modeling.train`, thresholds through `ml.modeling.registry`.

The big tables (the mart, churn_scores, churn_scores_history: the data plane)
are read through a `data` reader, an `ml.warehouse.Reader` that is the build
DuckDB by default or Spark's warehouse where the nightly built them there; the
small control-plane tables (importance, thresholds, this module's own three)
are read and written in the build DuckDB. The data-plane reads use the SQL
both engines share, so monitoring measures the same numbers on either.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.mart import (
    MartError,
    count_labelled_dates_after,
    labels_of,
    latest_snapshot_date,
    mart_columns,
    snapshot_select,
    snapshot_size,
)
from ml.logs import get_logger, timed
from ml.modeling import registry
from ml.modeling.model import ChurnModel
from ml.modeling.reference import DriftReference
from ml.modeling.score import (
    DECISION_COLUMN,
    PROBABILITY_COLUMN,
    SCORES_TABLE,
    latest_scores_summary,
    scored_rows,
    scored_snapshots,
    tonight_scores,
)
from ml.modeling.train import newest_trained_snapshot, top_features
from ml.monitoring import digest, drift
from ml.monitoring.digest import Digest
from ml.monitoring.performance import ESTIMATED, METRICS, REALIZED, estimated_metrics, realized_metrics
from ml.monitoring.policy import (
    OUTCOME_PROMOTED,
    PolicyInputs,
    PolicyOutcome,
    RetrainDecision,
    decide,
)
from ml.warehouse import Reader, Session, TableSpec, connect, declare, quote

# model_performance kind of the API's logged answers joined to labels (batch scores are REALIZED).
REALIZED_ONLINE = "realized_online"

log = get_logger("monitor")

DRIFT_SPEC = declare(
    name="drift_stats",
    owner=__name__,
    grain="one row per run, model version, feature and statistic",
    description="drift of tonight's snapshot against the champion's training reference "
                "(features, score, share flagged, dataset level)",
    columns=[
        ("run_id", "VARCHAR"), ("as_of_date", "DATE"), ("model_version", "VARCHAR"), ("feature", "VARCHAR"),
        ("kind", "VARCHAR"), ("statistic", "VARCHAR"), ("value", "DOUBLE"), ("p_value", "DOUBLE"),
        ("threshold", "DOUBLE"), ("drifted", "BOOLEAN"), ("reference_summary", "VARCHAR"),
        ("current_summary", "VARCHAR"), ("computed_at", "TIMESTAMP"),
    ],
)
PERFORMANCE_SPEC = declare(
    name="model_performance",
    owner=__name__,
    grain="one row per kind (estimated, realized), snapshot and model version",
    description="CBPE estimates for tonight's scores; realized metrics once a snapshot's labels are known "
                "(on the scored customers that have a label; missing_labels counts those absent from the mart)",
    columns=[
        ("run_id", "VARCHAR"), ("as_of_date", "DATE"), ("model_version", "VARCHAR"), ("kind", "VARCHAR"),
        ("n_rows", "BIGINT"), ("positives", "DOUBLE"), ("roc_auc", "DOUBLE"), ("pr_auc", "DOUBLE"),
        ("recall", "DOUBLE"), ("precision", "DOUBLE"), ("brier", "DOUBLE"), ("flagged_share", "DOUBLE"),
        ("threshold", "DOUBLE"), ("computed_at", "TIMESTAMP"), ("missing_labels", "BIGINT"),
    ],
)
DECISIONS_SPEC = declare(
    name="retrain_decisions",
    owner=__name__,
    grain="one row per monitoring run",
    description="which retraining rules fired, the values they saw, and what became of the decision",
    columns=[
        ("run_id", "VARCHAR"), ("as_of_date", "DATE"), ("decision_date", "DATE"), ("model_version", "VARCHAR"),
        ("triggered", "BOOLEAN"), ("rules", "VARCHAR"), ("rule_values", "VARCHAR"), ("outcome", "VARCHAR"),
        ("challenger_version", "VARCHAR"), ("message", "VARCHAR"), ("decided_at", "TIMESTAMP"),
    ],
)
DRIFT_TABLE = DRIFT_SPEC.name
PERFORMANCE_TABLE = PERFORMANCE_SPEC.name
DECISIONS_TABLE = DECISIONS_SPEC.name
MONITOR_SPECS: tuple[TableSpec, ...] = (DRIFT_SPEC, PERFORMANCE_SPEC, DECISIONS_SPEC)


class MonitorError(RuntimeError):
    """Monitoring cannot run: no champion, no reference, no mart or no scores for tonight."""


@dataclass(frozen=True)
class MonitorResult:
    """What one monitoring run found (also written to the tables)."""

    run_id: str
    as_of_date: dt.date
    model_version: str
    drift_rows: list[drift.DriftStat]
    drifted_features: list[str]
    drifted_share: float
    top_features_drifted: list[str]
    estimated: dict[str, float]
    realized: pd.DataFrame
    seconds: float = 0.0


@dataclass(frozen=True)
class Tonight:
    """Tonight's scoring snapshot as monitoring reads it: its size and per-feature digests (computed by
    SQL where the mart lives), the champion's scores, its top features."""

    as_of_date: dt.date
    rows: int
    digests: Mapping[str, Digest]
    scores: pd.DataFrame
    top_features: list[str]

    @property
    def probability(self) -> np.ndarray:
        return self.scores[PROBABILITY_COLUMN].to_numpy(dtype=float)

    @property
    def flagged(self) -> np.ndarray:
        return self.scores[DECISION_COLUMN].to_numpy(dtype=bool)


@dataclass(frozen=True)
class DriftFindings:
    """Every drift row of a run, and the two dataset-level rows the policy reads."""

    rows: list[drift.DriftStat]
    drifted_share: drift.DriftStat
    top_feature_drift: drift.DriftStat


def new_run_id() -> str:
    return dt.datetime.now().strftime("monitor-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


def _date(value: Any) -> dt.date:
    return pd.Timestamp(value).date()


def ensure_tables(session: Session) -> None:
    """Create the monitoring tables with their declared types (BI may chart them before the first night)."""
    for spec in MONITOR_SPECS:
        session.create(spec)
        # tables created before a column was declared (model_performance.missing_labels) gain it
        session.add_missing_columns(spec, {column.name: column.type for column in spec.columns})


# ---------------------------------------------------------------- reading

def load_reference(model: ChurnModel) -> DriftReference:
    reference = model.metadata.reference
    if not reference:
        raise MonitorError(
            f"champion {model.version} has no reference statistics in its metadata "
            "(trained before monitoring existed); retrain it with churn train --force"
        )
    return reference if isinstance(reference, DriftReference) else DriftReference.from_dict(reference)


def current_snapshot(data: Reader, config: ChurnConfig, contract: FeatureContract) -> dt.date:
    """The mart's latest as_of_date (tonight's scoring snapshot), after checking the contract's columns."""
    mart = config.dataset.feature_mart
    try:
        mart_columns(data, config, contract)
    except MartError as exc:
        raise MonitorError(str(exc)) from exc
    latest = latest_snapshot_date(data, config, contract)
    if latest is None:
        raise MonitorError(f"feature mart {mart!r} has no rows")
    return latest


def snapshot_digests(data: Reader, config: ChurnConfig, contract: FeatureContract, reference: DriftReference,
                     as_of_date: dt.date) -> tuple[int, dict[str, Digest]]:
    """Tonight's rows and the digest of each referenced feature (ml/monitoring/digest.py): on Spark
    two aggregate statements, so no feature row reaches the driver."""
    source = f"({snapshot_select(config, contract)}) as snapshot"
    chosen = {name: ref for name, ref in reference.features.items() if name in contract.feature_names}
    digests = digest.snapshot_digests(data, source, chosen, [as_of_date])
    rows = next(iter(digests.values())).n if digests else snapshot_size(data, config, contract, as_of_date)
    return rows, digests


def current_scores(data: Reader, contract: FeatureContract, as_of_date: dt.date, version: str) -> pd.DataFrame:
    """Tonight's scores of the champion (key, probability, decision); refuses stale or other-model scores."""
    frame = tonight_scores(data, contract, as_of_date, version)
    if frame is None:
        raise MonitorError(f"table {SCORES_TABLE!r} not found; run churn score first")
    if frame.empty:
        found = latest_scores_summary(data, contract.as_of)
        raise MonitorError(
            f"{SCORES_TABLE} holds no rows for as_of_date {as_of_date} and champion {version} "
            f"(it holds {found.rows} rows as of {found.first_as_of} from {found.model_version}); "
            "run churn score first"
        )
    return frame


def read_tonight(session: Session, config: ChurnConfig, model: ChurnModel, *, data: Reader | None = None) -> Tonight:
    """Tonight's snapshot digests and scores from `data` (None: `session`), the champion's top features
    from `session`."""
    data = session if data is None else data
    as_of_date = current_snapshot(data, config, model.contract)
    scores = current_scores(data, model.contract, as_of_date, str(model.version))
    with timed(f"drift digests of the snapshot as of {as_of_date} on {type(data).__name__}", log):
        rows, digests = snapshot_digests(data, config, model.contract, load_reference(model), as_of_date)
    top = top_features(session, str(model.version), config.monitoring.top_features)
    return Tonight(as_of_date, rows, digests, scores, top)


def _measured_realized(session: Session) -> set[tuple[dt.date, str]]:
    """(as_of_date, model_version) pairs that already have realized metrics."""
    if not session.exists(PERFORMANCE_SPEC):
        return set()
    rows = session.rows(
        f"select distinct as_of_date, model_version from {quote(PERFORMANCE_TABLE)} where kind = ?", [REALIZED]
    )
    return {(_date(as_of), version) for as_of, version in rows}


def _labelled_scores(
    data: Reader, config: ChurnConfig, contract: FeatureContract, as_of_date: dt.date, version: str,
) -> tuple[pd.DataFrame, int] | None:
    """One scored snapshot's labelled rows and the count of scored rows without a label,
    or None while no scored row has a label (the horizon has not passed)."""
    scored = scored_rows(data, contract, as_of_date, version)
    labels = labels_of(data, config, contract, [as_of_date])[[contract.key, contract.label]]
    joined = scored.merge(labels, on=contract.key, how="left")
    labelled = joined[joined[contract.label].notna()]
    if labelled.empty:
        return None
    return labelled.reset_index(drop=True), len(joined) - len(labelled)


def realized_performance(
    session: Session, config: ChurnConfig, contract: FeatureContract, before: dt.date, run_id: str,
    *, data: Reader | None = None,
) -> pd.DataFrame:
    """Realized metrics for each earlier (as_of_date, model_version) whose labels are now known.

    A snapshot counts once the mart holds its labels (the horizon has passed and
    the snapshot is on the mart's as_of grid). The metrics are computed on the
    scored customers that have a label; those absent from the later mart (a
    customer removed, a backfill on other data) are counted in `missing_labels`
    rather than holding the whole snapshot back forever. Pairs already measured
    are skipped (labels of a closed horizon do not change).

    The scored history and the labels are read from `data` (None: `session`);
    what was measured and the thresholds, from `session`.
    """
    data = session if data is None else data
    done = _measured_realized(session)
    pending = [pair for pair in scored_snapshots(data, contract.as_of, before) if pair not in done]
    thresholds = registry.model_thresholds(session) if pending else {}
    out = []
    for as_of_date, version in pending:
        labelled = _labelled_scores(data, config, contract, as_of_date, version)
        if labelled is None:
            continue
        rows, missing = labelled
        if missing:
            log.warning("realized metrics of %s scored on %s: %d of %d scored customers have no label in %s; "
                        "measured on the other %d", version, as_of_date, missing, missing + len(rows),
                        config.dataset.feature_mart, len(rows))
        metrics = realized_metrics(rows[contract.label].to_numpy(dtype=int),
                                   rows[PROBABILITY_COLUMN].to_numpy(dtype=float),
                                   rows[DECISION_COLUMN].to_numpy(dtype=bool))
        out.append({"run_id": run_id, "as_of_date": as_of_date, "model_version": version, "kind": REALIZED,
                    **metrics, "threshold": thresholds.get(version), "missing_labels": missing})
    return pd.DataFrame(out)


def realized_online_performance(
    session: Session, config: ChurnConfig, contract: FeatureContract, logged: pd.DataFrame, run_id: str,
    *, data: Reader | None = None,
) -> pd.DataFrame:
    """Realized metrics of the API's logged answers (kind `realized_online`), per snapshot and model version.

    `logged` holds the latest answer per customer, as_of and model version
    (customer_id, as_of, model_version, churn_probability, will_churn), read by
    the log's owner. A snapshot counts once every logged customer has a label,
    like the batch scores; it is re-measured each night as answers accumulate.
    The labels are read from `data` (None: `session`), the thresholds from `session`.
    """
    data = session if data is None else data
    out = []
    if logged.empty:
        return pd.DataFrame(out)
    logged = logged.rename(columns={"customer_id": contract.key})
    logged["as_of"] = pd.to_datetime(logged["as_of"]).dt.date
    thresholds = registry.model_thresholds(session)
    for (as_of_date, version), rows in logged.groupby(["as_of", "model_version"], sort=True):
        labels = labels_of(data, config, contract, [as_of_date])[[contract.key, contract.label]]
        labels[contract.key] = labels[contract.key].astype(str)
        joined = rows.assign(**{contract.key: rows[contract.key].astype(str)}).merge(labels, on=contract.key,
                                                                                      how="left")
        if joined[contract.label].isna().any():
            continue
        metrics = realized_metrics(joined[contract.label].to_numpy(dtype=int),
                                   joined[PROBABILITY_COLUMN].to_numpy(dtype=float),
                                   joined[DECISION_COLUMN].to_numpy(dtype=bool))
        out.append({"run_id": run_id, "as_of_date": as_of_date, "model_version": version, "kind": REALIZED_ONLINE,
                    **metrics, "threshold": thresholds.get(version)})
    return pd.DataFrame(out)


# ---------------------------------------------------------------- the stage

def champion_to_monitor(config: ChurnConfig) -> tuple[ChurnModel, DriftReference]:
    model = registry.load_champion(config)
    if model is None:
        raise MonitorError("no champion model to monitor; run churn train")
    return model, load_reference(model)


def compute_drift(model: ChurnModel, reference: DriftReference, tonight: Tonight, config: ChurnConfig) -> DriftFindings:
    """Feature, score and dataset-level drift of tonight's snapshot against the reference."""
    with timed(f"drift of {tonight.rows:,d} rows as of {tonight.as_of_date} vs {model.version}", log):
        kinds = {f.name: f.kind for f in model.contract.features}
        rows = drift.feature_drift(reference, tonight.digests, kinds, config.monitoring)
        rows += drift.score_drift(reference, tonight.probability, model.threshold, config.monitoring)
        share_row, top_row = drift.dataset_drift(rows, tonight.top_features, config.monitoring)
    return DriftFindings([*rows, share_row, top_row], share_row, top_row)


def _drift_frame(findings: DriftFindings, run_id: str, as_of_date: dt.date, version: str,
                 now: pd.Timestamp) -> pd.DataFrame:
    frame = pd.DataFrame([r.to_dict() for r in findings.rows])
    frame.insert(0, "run_id", run_id)
    frame.insert(1, "as_of_date", as_of_date)
    frame.insert(2, "model_version", version)
    frame["drifted"] = frame["drifted"].astype("boolean")
    frame["computed_at"] = now
    return frame


def write_measurements(
    session: Session, run_id: str, as_of_date: dt.date, version: str, threshold: float,
    findings: DriftFindings, estimated: dict[str, float], realized: pd.DataFrame,
) -> None:
    """All rows of one run in one transaction; a re-run replaces its own rows."""
    now = pd.Timestamp(dt.datetime.now())
    estimate = pd.DataFrame([{"run_id": run_id, "as_of_date": as_of_date, "model_version": version,
                              "kind": ESTIMATED, **estimated, "threshold": threshold, "computed_at": now}])
    with session.transaction():
        session.append(DRIFT_SPEC, _drift_frame(findings, run_id, as_of_date, version, now),
                       where="run_id = ? and model_version = ?", params=[run_id, version])
        session.append(PERFORMANCE_SPEC, estimate, where="run_id = ? and model_version = ? and kind = ?",
                       params=[run_id, version, ESTIMATED])
        for record in realized.to_dict("records"):
            session.append(PERFORMANCE_SPEC, pd.DataFrame([{**record, "computed_at": now}]),
                           where="kind = ? and as_of_date = ? and model_version = ?",
                           params=[record["kind"], record["as_of_date"], record["model_version"]])


def measure(config: ChurnConfig, run_id: str | None = None,
            logged: Callable[[Session], pd.DataFrame] | None = None, *, data: Reader | None = None) -> MonitorResult:
    """Compute and write tonight's drift and performance rows for the champion.

    `logged` reads the API's logged answers from the build database (passed in
    by the pipeline: the log's owner sits beside monitoring, not below it).
    `data` is where the mart and the scores are (None: the build database; a
    `SparkWarehouse` when the nightly built them on Spark); the rows this stage
    writes go to the build database either way.
    """
    started = time.perf_counter()
    run_id = run_id or new_run_id()
    model, reference = champion_to_monitor(config)
    version = str(model.version)
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        ensure_tables(session)
        tonight = read_tonight(session, config, model, data=data)
        findings = compute_drift(model, reference, tonight, config)
        estimated = estimated_metrics(tonight.probability, tonight.flagged)
        with timed("realized performance of earlier snapshots", log):
            realized = realized_performance(session, config, model.contract, tonight.as_of_date, run_id, data=data)
            if logged is not None:
                online = realized_online_performance(session, config, model.contract, logged(session), run_id,
                                                     data=data)
                realized = pd.concat([realized, online], ignore_index=True) if len(online) else realized
        write_measurements(session, run_id, tonight.as_of_date, version, model.threshold, findings,
                           estimated, realized)
    result = MonitorResult(
        run_id=run_id,
        as_of_date=tonight.as_of_date,
        model_version=version,
        drift_rows=findings.rows,
        drifted_features=drift.drifted_features(findings.rows),
        drifted_share=float(findings.drifted_share.value or 0.0),
        top_features_drifted=json.loads(findings.top_feature_drift.current_summary)["drifted"],
        estimated=estimated,
        realized=realized,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "monitor %s as of %s (%s): %d/%d features drifted (%.0f%%)%s; estimated recall %.3f; "
        "%d realized snapshot(s) added in %.1fs",
        run_id, result.as_of_date, version, len(result.drifted_features), len(model.contract.features),
        100 * result.drifted_share,
        f", top features drifted: {', '.join(result.top_features_drifted)}" if result.top_features_drifted else "",
        estimated["recall"], len(realized), result.seconds,
    )
    return result


# ---------------------------------------------------------------- retraining decision

def champion_since(session: Session, version: str, today: dt.date) -> dt.date:
    """The first decision date on which `version` served as champion (today if never).

    Read from retrain_decisions rather than the registry's wall-clock timestamps,
    so a backfill (`--as-of`) ages the champion in replayed days.
    """
    if not session.exists(DECISIONS_SPEC):
        return today
    value = session.scalar(
        f"""select min(decision_date) from {quote(DECISIONS_TABLE)}
            where model_version = ? or (challenger_version = ? and outcome = ?)""",
        [version, version, OUTCOME_PROMOTED],
    )
    return _date(value) if value is not None else today


def latest_realized_recall(session: Session, version: str) -> tuple[float | None, dt.date | None]:
    if not session.exists(PERFORMANCE_SPEC):
        return None, None
    row = session.one(
        f"""select recall, as_of_date from {quote(PERFORMANCE_TABLE)} where kind = ? and model_version = ?
            order by as_of_date desc limit 1""",
        [REALIZED, version],
    )
    return (float(row[0]), _date(row[1])) if row else (None, None)


def new_labelled_snapshots(
    data: Reader, config: ChurnConfig, contract: FeatureContract, trained_up_to: str | dt.date | None
) -> int | None:
    """Fully labelled as_of_dates in the mart after the champion's last training snapshot (None: unknown)."""
    if trained_up_to is None:
        return None
    return count_labelled_dates_after(data, config, contract, dt.date.fromisoformat(str(trained_up_to)))


def policy_inputs(config: ChurnConfig, result: MonitorResult, today: dt.date, *,
                  data: Reader | None = None) -> PolicyInputs:
    """What the policy needs, read through the owners of each fact (registry, training runs, mart).

    The mart's labelled dates are counted in `data` (None: the build database), the rest in the build database.
    """
    model = registry.load_model(config, result.model_version)
    champion_up_to = (model.metadata.snapshot_range or [None, None])[1]
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        since = champion_since(session, result.model_version, today)
        realized, realized_as_of = latest_realized_recall(session, result.model_version)
        known = [d for d in (_date(champion_up_to) if champion_up_to else None,
                             newest_trained_snapshot(session, config.dataset.name)) if d is not None]
        trained_up_to = max(known) if known else None
        fresh = new_labelled_snapshots(session if data is None else data, config, model.contract, trained_up_to)
    return PolicyInputs(
        today=today,
        champion_since=since,
        drifted_share=result.drifted_share,
        top_features_drifted=tuple(result.top_features_drifted),
        realized_recall=realized,
        realized_as_of=realized_as_of,
        estimated_recall=result.estimated.get("recall"),
        new_labelled_snapshots=fresh,
    )


def decide_retrain(config: ChurnConfig, result: MonitorResult, today: dt.date, *,
                   data: Reader | None = None) -> RetrainDecision:
    """Tonight's retraining decision (pure policy on the measured inputs); training is the pipeline's job.
    `data` is where the mart is (None: the build database)."""
    return decide(config, policy_inputs(config, result, today, data=data))


def record_decision(config: ChurnConfig, result: MonitorResult, today: dt.date, outcome: PolicyOutcome) -> None:
    """Write (or, on a re-run, replace) this run's retrain_decisions row."""
    decision = outcome.decision
    row = pd.DataFrame([{
        "run_id": result.run_id,
        "as_of_date": result.as_of_date,
        "decision_date": today,
        "model_version": result.model_version,
        "triggered": decision.triggered,
        "rules": ",".join(decision.rules),
        "rule_values": decision.values_json(),
        "outcome": outcome.outcome,
        "challenger_version": outcome.challenger_version,
        "message": outcome.message[:4000],
        "decided_at": pd.Timestamp(dt.datetime.now()),
    }])
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        ensure_tables(session)
        session.append(DECISIONS_SPEC, row, where="run_id = ?", params=[result.run_id])


def today_for(as_of: str | dt.date | None) -> dt.date:
    """'Today' for the calendar rule: the replayed date under --as-of, else the real one."""
    if as_of is None:
        return dt.date.today()
    return as_of if isinstance(as_of, dt.date) else dt.date.fromisoformat(str(as_of))


# ---------------------------------------------------------------- reads for the monitoring report

def _frame_or_empty(session: Session, spec: TableSpec, sql: str) -> pd.DataFrame:
    """The query's rows, or an empty frame with the declared columns before the first run made the table."""
    if not session.exists(spec):
        return pd.DataFrame(columns=spec.column_names)
    return session.frame(sql)


def drift_by_night(session: Session, model_versions: list[str]) -> pd.DataFrame:
    """drift_stats of `model_versions` (one dataset's models), oldest night first: per as_of_date only its
    latest measurement.

    A re-run, or the re-measure after a promoted challenger rescored the night,
    writes a newer set of rows; the latest set is what the drift gate judged.
    """
    if not session.exists(DRIFT_SPEC):
        return pd.DataFrame(columns=DRIFT_SPEC.column_names)
    return session.frame(f"""
        select as_of_date, run_id, model_version, feature, kind, statistic, value, p_value, threshold, drifted,
               reference_summary, current_summary, computed_at
        from {quote(DRIFT_TABLE)}
        where model_version in (select unnest(?::varchar[]))
        qualify computed_at = max(computed_at) over (partition by as_of_date)
        order by as_of_date, feature, statistic""", [list(model_versions)])


def performance_history(session: Session) -> pd.DataFrame:
    """model_performance rows (estimated, realized, realized_online), oldest snapshot first."""
    return _frame_or_empty(session, PERFORMANCE_SPEC,
                           f"select * from {quote(PERFORMANCE_TABLE)} order by as_of_date, kind, computed_at")


def decision_history(session: Session) -> pd.DataFrame:
    """retrain_decisions rows in the order they were decided."""
    return _frame_or_empty(session, DECISIONS_SPEC,
                           f"select * from {quote(DECISIONS_TABLE)} order by as_of_date, decided_at")


# ---------------------------------------------------------------- command line (handler: ml.pipeline.monitor_command)

def report_lines(result: MonitorResult, outcome: PolicyOutcome | None = None) -> list[str]:
    """What `churn monitor` prints: drift, estimated and realized performance, the decision."""
    lines = [f"monitor {result.run_id}: as of {result.as_of_date}, champion {result.model_version}",
             f"  drifted features: {len(result.drifted_features)} ({result.drifted_share:.0%})"
             + (f": {', '.join(result.drifted_features)}" if result.drifted_features else "")]
    if result.top_features_drifted:
        lines.append(f"  top features drifted: {', '.join(result.top_features_drifted)}")
    est = result.estimated
    lines.append("  estimated: " + ", ".join(f"{m} {est[m]:.3f}" for m in METRICS if not np.isnan(est[m])))
    for row in result.realized.to_dict("records"):
        lines.append(f"  realized {row['as_of_date']} ({row['model_version']}): recall {row['recall']:.3f}, "
                     f"precision {row['precision']:.3f}, roc_auc {row['roc_auc']:.3f} on {row['n_rows']:,d} rows")
    if outcome is not None:
        decision = outcome.decision
        lines.append("  retrain: "
                     f"{'triggered by ' + ', '.join(decision.rules) if decision.triggered else 'not triggered'}"
                     f" -> {outcome.outcome}")
    return lines
