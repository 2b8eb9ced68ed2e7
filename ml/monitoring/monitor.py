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
a half-written night.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from ml.monitoring import drift
from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.logs import get_logger, timed
from ml.modeling.model import ChurnModel
from ml.monitoring.performance import ESTIMATED, METRICS, REALIZED, estimated_metrics, realized_metrics
from ml.monitoring.policy import (
    OUTCOME_FAILED,
    OUTCOME_NO_NEW_LABELS,
    OUTCOME_NOT_TRIGGERED,
    OUTCOME_PROMOTED,
    OUTCOME_REJECTED,
    PolicyInputs,
    RetrainDecision,
    decide,
)
from ml.warehouse import connect, table_columns, table_exists

log = get_logger("monitor")

DRIFT_TABLE = "drift_stats"
PERFORMANCE_TABLE = "model_performance"
DECISIONS_TABLE = "retrain_decisions"
SCORES_TABLE = "churn_scores"
HISTORY_TABLE = "churn_scores_history"
IMPORTANCE_TABLE = "feature_importance"
REGISTRY_TABLE = "model_registry"
# Scoring's output columns this stage reads (see ml/score.py).
PROBABILITY_COLUMN = "churn_probability"
DECISION_COLUMN = "will_churn"
# Importance used to rank "top features": permutation (model-agnostic, on the
# evaluation rows) when the trainer recorded it, else the model's native one.
IMPORTANCE_PREFERENCE = ("permutation", "gain", "abs_coef")

TABLE_DDL = {
    DRIFT_TABLE: """
        create table if not exists drift_stats (
            run_id varchar not null,
            as_of_date date not null,
            model_version varchar not null,
            feature varchar not null,
            kind varchar not null,
            statistic varchar not null,
            value double,
            p_value double,
            threshold double,
            drifted boolean,
            reference_summary varchar,
            current_summary varchar,
            computed_at timestamp not null
        )""",
    PERFORMANCE_TABLE: """
        create table if not exists model_performance (
            run_id varchar not null,
            as_of_date date not null,
            model_version varchar not null,
            kind varchar not null,
            n_rows bigint not null,
            positives double,
            roc_auc double,
            pr_auc double,
            recall double,
            precision double,
            brier double,
            flagged_share double,
            threshold double,
            computed_at timestamp not null
        )""",
    DECISIONS_TABLE: """
        create table if not exists retrain_decisions (
            run_id varchar not null,
            as_of_date date not null,
            decision_date date not null,
            model_version varchar,
            triggered boolean not null,
            rules varchar not null,
            rule_values varchar not null,
            outcome varchar not null,
            challenger_version varchar,
            message varchar,
            decided_at timestamp not null
        )""",
}


class MonitorError(RuntimeError):
    """Monitoring cannot run: no champion, no reference, no mart or no scores for tonight."""


@dataclass
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
    decision: RetrainDecision | None = None
    outcome: str | None = None
    challenger_version: str | None = None


def new_run_id() -> str:
    return dt.datetime.now().strftime("monitor-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


def _date(value: Any) -> dt.date:
    return pd.Timestamp(value).date()


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    for ddl in TABLE_DDL.values():
        con.execute(ddl)


def _replace(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame, clause: str, params: list) -> None:
    """Delete the rows `clause` matches, then insert `frame` (caller holds the transaction)."""
    con.execute(f'delete from "{table}" where {clause}', params)
    if frame.empty:
        return
    con.register("_monitor_rows", frame)
    try:
        con.execute(f'insert into "{table}" by name select * from _monitor_rows')
    finally:
        con.unregister("_monitor_rows")


# ---------------------------------------------------------------- reading

def load_reference(model: ChurnModel) -> dict[str, Any]:
    reference = model.metadata.get("reference")
    if not reference:
        raise MonitorError(
            f"champion {model.version} has no reference statistics in its metadata "
            "(trained before monitoring existed); retrain it with churn train --force"
        )
    return reference


def current_snapshot(
    con: duckdb.DuckDBPyConnection, mart: str, contract: FeatureContract
) -> tuple[dt.date, pd.DataFrame]:
    """The mart's latest as_of_date and its rows (key, as_of and the champion's features)."""
    if not table_exists(con, mart):
        raise MonitorError(f"feature mart {mart!r} not found; run churn build")
    contract.check_columns(mart, table_columns(con, mart))
    latest = con.execute(f'select max("{contract.as_of}") from "{mart}"').fetchone()[0]
    if latest is None:
        raise MonitorError(f"feature mart {mart!r} has no rows")
    columns = ", ".join(f'"{c}"' for c in [contract.key, contract.as_of, *contract.feature_names])
    frame = con.execute(f'select {columns} from "{mart}" where "{contract.as_of}" = ?', [latest]).df()
    return _date(latest), frame


def current_scores(
    con: duckdb.DuckDBPyConnection, contract: FeatureContract, as_of_date: dt.date, version: str
) -> pd.DataFrame:
    """Tonight's scores of the champion; refuses stale or other-model scores."""
    if not table_exists(con, SCORES_TABLE):
        raise MonitorError(f"table {SCORES_TABLE!r} not found; run churn score first")
    frame = con.execute(
        f'select "{PROBABILITY_COLUMN}", "{DECISION_COLUMN}" from "{SCORES_TABLE}" '
        f'where "{contract.as_of}" = ? and model_version = ?',
        [as_of_date, version],
    ).df()
    if frame.empty:
        found = con.execute(
            f'select min("{contract.as_of}"), min(model_version), count(*) from "{SCORES_TABLE}"'
        ).fetchone()
        raise MonitorError(
            f"{SCORES_TABLE} holds no rows for as_of_date {as_of_date} and champion {version} "
            f"(it holds {found[2]} rows as of {found[0]} from {found[1]}); run churn score first"
        )
    return frame


def top_features(con: duckdb.DuckDBPyConnection, version: str, limit: int) -> list[str]:
    """The champion's most important contract features, by the preferred importance type."""
    if not table_exists(con, IMPORTANCE_TABLE):
        return []
    frame = con.execute(
        f'select feature, importance_type, "rank" from "{IMPORTANCE_TABLE}" where model_version = ?',
        [version],
    ).df()
    for kind in IMPORTANCE_PREFERENCE:
        chosen = frame[frame["importance_type"] == kind]
        if not chosen.empty:
            return chosen.sort_values("rank")["feature"].head(limit).tolist()
    return frame.sort_values("rank")["feature"].drop_duplicates().head(limit).tolist()


def model_thresholds(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    if not table_exists(con, REGISTRY_TABLE):
        return {}
    rows = con.execute(f'select model_version, threshold from "{REGISTRY_TABLE}"').fetchall()
    return {version: float(threshold) for version, threshold in rows if threshold is not None}


def realized_performance(
    con: duckdb.DuckDBPyConnection, mart: str, contract: FeatureContract, before: dt.date, run_id: str,
) -> pd.DataFrame:
    """Realized metrics for each earlier (as_of_date, model_version) whose labels are now all known.

    A snapshot counts once every scored customer has a label in the mart: the
    horizon has passed and the snapshot is on the mart's as_of grid. Pairs
    already measured are skipped (labels of a closed horizon do not change).
    """
    if not table_exists(con, HISTORY_TABLE):
        return pd.DataFrame()
    k, a, y = contract.key, contract.as_of, contract.label
    done = (
        f'and not exists (select 1 from "{PERFORMANCE_TABLE}" p where p.kind = \'{REALIZED}\' '
        f'and p.as_of_date = h."{a}" and p.model_version = h.model_version)'
    )
    rows = con.execute(
        f"""
        with scored as (
            select h."{a}" as as_of_date, h.model_version, h."{PROBABILITY_COLUMN}" as probability,
                   h."{DECISION_COLUMN}" as flagged, m."{y}" as label
            from "{HISTORY_TABLE}" h
            left join "{mart}" m on m."{k}" = h."{k}" and m."{a}" = h."{a}"
            where h."{a}" < ? {done}
        ),
        complete as (
            select as_of_date, model_version from scored
            group by all having count(*) filter (where label is null) = 0
        )
        select s.* from scored s join complete using (as_of_date, model_version)
        """,
        [before],
    ).df()
    if rows.empty:
        return pd.DataFrame()
    thresholds = model_thresholds(con)
    out = []
    for (as_of_date, version), group in rows.groupby(["as_of_date", "model_version"], sort=True):
        metrics = realized_metrics(group["label"].to_numpy(dtype=int), group["probability"].to_numpy(dtype=float),
                                   group["flagged"].to_numpy(dtype=bool))
        out.append({"run_id": run_id, "as_of_date": _date(as_of_date), "model_version": version, "kind": REALIZED,
                    **metrics, "threshold": thresholds.get(version)})
    return pd.DataFrame(out)


# ---------------------------------------------------------------- the stage

def measure(config: ChurnConfig, run_id: str | None = None) -> MonitorResult:
    """Compute and write tonight's drift and performance rows for the champion."""
    from ml.modeling.registry import load_champion

    started = time.perf_counter()
    run_id = run_id or new_run_id()
    model = load_champion(config)
    if model is None:
        raise MonitorError("no champion model to monitor; run churn train")
    reference = load_reference(model)
    contract = model.contract
    version = str(model.version)
    mart = config.dataset.feature_mart
    with connect(config.warehouse.build_db) as con:
        ensure_tables(con)
        as_of_date, frame = current_snapshot(con, mart, contract)
        scores = current_scores(con, contract, as_of_date, version)
        top = top_features(con, version, config.monitoring.top_features)
        with timed(f"drift of {len(frame):,d} rows as of {as_of_date} vs {version}", log):
            kinds = {f.name: f.kind for f in contract.features}
            rows = drift.feature_drift(reference, frame, kinds, config.monitoring)
            rows += drift.score_drift(reference, scores[PROBABILITY_COLUMN].to_numpy(dtype=float),
                                      model.threshold, config.monitoring)
            dataset_rows = drift.dataset_drift(rows, top, config.monitoring)
            rows += dataset_rows
        probability = scores[PROBABILITY_COLUMN].to_numpy(dtype=float)
        estimated = estimated_metrics(probability, scores[DECISION_COLUMN].to_numpy(dtype=bool))
        with timed("realized performance of earlier snapshots", log):
            realized = realized_performance(con, mart, contract, as_of_date, run_id)
        now = pd.Timestamp(dt.datetime.now())
        drift_frame = pd.DataFrame([r.to_dict() for r in rows])
        drift_frame.insert(0, "run_id", run_id)
        drift_frame.insert(1, "as_of_date", as_of_date)
        drift_frame.insert(2, "model_version", version)
        drift_frame["drifted"] = drift_frame["drifted"].astype("boolean")
        drift_frame["computed_at"] = now
        estimate_frame = pd.DataFrame([{"run_id": run_id, "as_of_date": as_of_date, "model_version": version,
                                        "kind": ESTIMATED, **estimated, "threshold": model.threshold}])
        con.execute("begin transaction")
        try:
            _replace(con, DRIFT_TABLE, drift_frame, "run_id = ? and model_version = ?", [run_id, version])
            _replace(con, PERFORMANCE_TABLE, estimate_frame.assign(computed_at=now),
                     "run_id = ? and model_version = ? and kind = ?", [run_id, version, ESTIMATED])
            for record in realized.to_dict("records"):
                _replace(con, PERFORMANCE_TABLE, pd.DataFrame([{**record, "computed_at": now}]),
                         "kind = ? and as_of_date = ? and model_version = ?",
                         [REALIZED, record["as_of_date"], record["model_version"]])
            con.execute("commit")
        except Exception:
            con.execute("rollback")
            raise
    share_row, top_row = dataset_rows
    result = MonitorResult(
        run_id=run_id,
        as_of_date=as_of_date,
        model_version=version,
        drift_rows=rows,
        drifted_features=drift.drifted_features(rows),
        drifted_share=float(share_row.value or 0.0),
        top_features_drifted=json.loads(top_row.current_summary)["drifted"],
        estimated=estimated,
        realized=realized,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "monitor %s as of %s (%s): %d/%d features drifted (%.0f%%)%s; estimated recall %.3f; "
        "%d realized snapshot(s) added in %.1fs",
        run_id, as_of_date, version, len(result.drifted_features), len(contract.features),
        100 * result.drifted_share,
        f", top features drifted: {', '.join(result.top_features_drifted)}" if result.top_features_drifted else "",
        estimated["recall"], len(realized), result.seconds,
    )
    return result


# ---------------------------------------------------------------- retraining

def champion_since(con: duckdb.DuckDBPyConnection, version: str, today: dt.date) -> dt.date:
    """The first decision date on which `version` served as champion (today if never).

    Read from retrain_decisions rather than the registry's wall-clock timestamps,
    so a backfill (`--as-of`) ages the champion in replayed days.
    """
    if not table_exists(con, DECISIONS_TABLE):
        return today
    row = con.execute(
        f"""select min(decision_date) from "{DECISIONS_TABLE}"
            where model_version = ? or (challenger_version = ? and outcome = ?)""",
        [version, version, OUTCOME_PROMOTED],
    ).fetchone()
    return _date(row[0]) if row and row[0] is not None else today


def latest_realized_recall(con: duckdb.DuckDBPyConnection, version: str) -> tuple[float | None, dt.date | None]:
    if not table_exists(con, PERFORMANCE_TABLE):
        return None, None
    row = con.execute(
        f"""select recall, as_of_date from "{PERFORMANCE_TABLE}" where kind = ? and model_version = ?
            order by as_of_date desc limit 1""",
        [REALIZED, version],
    ).fetchone()
    return (float(row[0]), _date(row[1])) if row else (None, None)


def new_labelled_snapshots(
    con: duckdb.DuckDBPyConnection, mart: str, contract: FeatureContract, trained_up_to: str | None
) -> int | None:
    """Fully labelled as_of_dates in the mart after the champion's last training snapshot."""
    if trained_up_to is None or not table_exists(con, mart):
        return None
    a, y = contract.as_of, contract.label
    row = con.execute(
        f'select count(*) from (select "{a}" from "{mart}" where "{a}" > ? group by 1 '
        f'having count("{y}") = count(*))',
        [dt.date.fromisoformat(str(trained_up_to))],
    ).fetchone()
    return int(row[0])


def newest_trained_snapshot(con: duckdb.DuckDBPyConnection, dataset: str) -> dt.date | None:
    """The newest snapshot any successful training run of `dataset` has seen.

    A rejected challenger has already learned from it too: retraining on the same
    snapshots would only reject the same challenger again, night after night.
    """
    if not table_exists(con, "model_runs"):
        return None
    row = con.execute(
        "select max(snapshot_max) from model_runs where dataset = ? and status = 'success'", [dataset]
    ).fetchone()
    return _date(row[0]) if row and row[0] is not None else None


def policy_inputs(config: ChurnConfig, result: MonitorResult, today: dt.date) -> PolicyInputs:
    from ml.modeling.registry import load_model

    model = load_model(config, result.model_version)
    champion_up_to = (model.metadata.get("snapshot_range") or [None, None])[1]
    with connect(config.warehouse.build_db, read_only=True) as con:
        since = champion_since(con, result.model_version, today)
        realized, realized_as_of = latest_realized_recall(con, result.model_version)
        known = [d for d in (_date(champion_up_to) if champion_up_to else None,
                             newest_trained_snapshot(con, config.dataset.name)) if d is not None]
        trained_up_to = max(known).isoformat() if known else None
        fresh = new_labelled_snapshots(con, config.dataset.feature_mart, model.contract, trained_up_to)
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


def record_decision(
    config: ChurnConfig, result: MonitorResult, today: dt.date, decision: RetrainDecision,
    outcome: str, challenger: str | None = None, message: str = "",
) -> None:
    row = pd.DataFrame([{
        "run_id": result.run_id,
        "as_of_date": result.as_of_date,
        "decision_date": today,
        "model_version": result.model_version,
        "triggered": decision.triggered,
        "rules": ",".join(decision.rules),
        "rule_values": decision.values_json(),
        "outcome": outcome,
        "challenger_version": challenger,
        "message": message[:4000],
        "decided_at": pd.Timestamp(dt.datetime.now()),
    }])
    with connect(config.warehouse.build_db) as con:
        ensure_tables(con)
        con.execute("begin transaction")
        try:
            _replace(con, DECISIONS_TABLE, row, "run_id = ?", [result.run_id])
            con.execute("commit")
        except Exception:
            con.execute("rollback")
            raise


def apply_policy(config: ChurnConfig, result: MonitorResult, today: dt.date, retrain: bool = True) -> MonitorResult:
    """Decide; when triggered (and `retrain`), train a challenger that the registry may promote.

    The decision row is written whatever happens, including when training fails
    (outcome 'failed', then the error propagates and stops the nightly).
    """
    from ml.modeling.train import train

    decision = decide(config, policy_inputs(config, result, today))
    result.decision = decision
    if not decision.triggered or not retrain:
        result.outcome = (
            OUTCOME_NO_NEW_LABELS if decision.blocked
            else OUTCOME_NOT_TRIGGERED if not decision.triggered
            else "triggered (retraining disabled)"
        )
        record_decision(config, result, today, decision, result.outcome)
        log.info("retrain policy: %s", result.outcome)
        return result
    log.info("retrain policy fired (%s): training a challenger", ", ".join(decision.rules))
    try:
        trained = train(config, force=True, run_id=f"{result.run_id}-retrain")
    except Exception as exc:
        record_decision(config, result, today, decision, OUTCOME_FAILED, message=f"{type(exc).__name__}: {exc}")
        raise
    result.outcome = OUTCOME_PROMOTED if trained.promoted else OUTCOME_REJECTED
    result.challenger_version = trained.version
    record_decision(config, result, today, decision, result.outcome, trained.version, trained.message)
    log.info("retrain policy: challenger %s %s", trained.version, result.outcome)
    return result


def today_for(as_of: str | dt.date | None) -> dt.date:
    """'Today' for the calendar rule: the replayed date under --as-of, else the real one."""
    if as_of is None:
        return dt.date.today()
    return as_of if isinstance(as_of, dt.date) else dt.date.fromisoformat(str(as_of))


def monitor(
    config: ChurnConfig, run_id: str | None = None, as_of: str | dt.date | None = None, retrain: bool = False,
) -> MonitorResult:
    """Measure, then apply the retraining policy (training only when `retrain`)."""
    result = measure(config, run_id)
    return apply_policy(config, result, today_for(as_of), retrain=retrain)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", help="'today' for the retrain calendar rule (YYYY-MM-DD; default: today)")
    parser.add_argument("--retrain", action="store_true",
                        help="train a challenger when the policy fires (the nightly does; plain monitor only decides)")


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    result = monitor(config, as_of=args.as_of, retrain=args.retrain)
    print(f"monitor {result.run_id}: as of {result.as_of_date}, champion {result.model_version}")
    print(f"  drifted features: {len(result.drifted_features)} ({result.drifted_share:.0%})"
          + (f": {', '.join(result.drifted_features)}" if result.drifted_features else ""))
    if result.top_features_drifted:
        print(f"  top features drifted: {', '.join(result.top_features_drifted)}")
    est = result.estimated
    print("  estimated: " + ", ".join(f"{m} {est[m]:.3f}" for m in METRICS if not np.isnan(est[m])))
    for row in result.realized.to_dict("records"):
        print(f"  realized {row['as_of_date']} ({row['model_version']}): recall {row['recall']:.3f}, "
              f"precision {row['precision']:.3f}, roc_auc {row['roc_auc']:.3f} on {row['n_rows']:,d} rows")
    decision = result.decision
    if decision is not None:
        print(f"  retrain: {'triggered by ' + ', '.join(decision.rules) if decision.triggered else 'not triggered'}"
              f" -> {result.outcome}")
    return 0
