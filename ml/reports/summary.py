"""The nightly run's closing summary: what was scored, and how good the model is.

Whoever reads the nightly log should see, without opening the warehouse, how
many customers were scored, how many were flagged, which model did it, and that
model's held-out recall, precision and ROC-AUC beside the naive baseline (the
number to beat). Everything is read back from the warehouse tables the stages
wrote, so the summary shows what BI will see, not what a stage meant to write.
"""

from __future__ import annotations

import pandas as pd

from ml.config import ChurnConfig
from ml.features.mart import current_contract
from ml.modeling.operating_point import history
from ml.modeling.registry import model_record
from ml.modeling.score import SCORES_TABLE, latest_scores_summary
from ml.modeling.train import held_out_metrics, validation_strategy
from ml.warehouse import Reader, connect

SUMMARY_METRICS = ("recall", "precision", "roc_auc", "pr_auc")


def _fmt(value: object) -> str:
    return "n/a" if value is None or value != value else f"{float(value):.3f}"


def score_summary(config: ChurnConfig, data: Reader | None = None) -> list[str]:
    """Lines describing today's churn_scores and the scoring model's held-out metrics
    (`data` reads churn_scores where it lives; None: the build database)."""
    as_of_column = current_contract(config).as_of  # churn_scores carries the mart's own snapshot name
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        scores = latest_scores_summary(data if data is not None else session, as_of_column)
        if scores is None:
            return [f"  no {SCORES_TABLE} table: nothing was scored"]
        rows, flagged, version = scores.rows, scores.flagged, scores.model_version
        lines = [
            f"  scored {rows:,d} customers as of {scores.last_as_of} with model {version}: "
            f"{flagged:,d} flagged ({flagged / rows if rows else 0:.1%})",
            *operating_point_lines(scores.rows, scores.flagged, scores.expected_churners_flagged,
                                   scores.expected_churners_missed),
        ]
        lines += threshold_choice_lines(history(session, version))
        record = model_record(session, version)
        metrics = held_out_metrics(session, version, SUMMARY_METRICS)
        if record is None and metrics.empty:
            return lines + ["  no model_metrics recorded for this model"]
        strategy = validation_strategy(session, record.run_id) if record is not None else None
    if metrics.empty or record is None:
        return lines + [f"  no held-out metrics recorded for model {version}"]
    model = metrics[metrics["split"] == "out_of_time"].iloc[0]
    baseline = metrics[metrics["split"] == "baseline"]
    baseline_row = baseline.iloc[0] if not baseline.empty else None
    baseline_name = baseline_row["candidate"] if baseline_row is not None else config.problem.baseline
    lines.append(
        f"  {record.algorithm} at threshold {record.threshold:.4f}; {strategy or 'held-out'} evaluation on "
        f"{int(model['rows']):,d} rows (target {config.problem.success_metric} >= {config.problem.success_target}):"
    )
    lines.append(f"    {'metric':12s} {'model':>8s} {baseline_name:>16s}")
    for metric in SUMMARY_METRICS:
        base = baseline_row[metric] if baseline_row is not None else None
        lines.append(f"    {metric:12s} {_fmt(model[metric]):>8s} {_fmt(base):>16s}")
    lines.append(success_line(config.problem.success_metric, model.get(config.problem.success_metric),
                              config.problem.success_target))
    return lines


def threshold_choice_lines(points: pd.DataFrame) -> list[str]:
    """How tonight's threshold was chosen (rule, pin, capacity), from the latest operating point."""
    if points.empty:
        return []
    latest = points.iloc[0]
    how = {"pinned": "pinned by hand", "unpinned": "unpinned by hand: the rule's",
           "trained": "the threshold chosen at training (no stored predictions)",
           "recall_target": f"the recall target {latest['success_target']:g} on the stored out-of-fold predictions",
           "expected_cost": "the expected cost on the stored out-of-fold predictions"}
    how = how.get(latest["rule"], latest["rule"])
    cap = (f", raised from {latest['rule_threshold']:.4f} to fit the capacity of {int(latest['capacity_rows']):,d}"
           if bool(latest["capacity_limited"]) else "")
    return [f"  threshold {latest['threshold']:.4f}: {how}{cap}"]


def success_line(metric: str, value: object, target: float) -> str:
    """The success criterion in words: met or missed, with both numbers."""
    if value is None or value != value:
        return f"  ? success criterion {metric} >= {target}: not measured"
    met = float(value) >= target
    verdict = "met" if met else "MISSED"
    return f"  {'✓' if met else '✗'} success criterion {metric} >= {target}: {verdict} ({float(value):.3f} held out)"


def operating_point_lines(rows: int, flagged: int, expected_caught: float, expected_missed: float) -> list[str]:
    """What the threshold means in people, from tonight's calibrated probabilities."""
    if not rows:
        return []
    precision = expected_caught / flagged if flagged else 0.0
    return [
        f"  operating point: contact {flagged:,d} of {rows:,d} active customers ({flagged / rows:.0%}); "
        f"about {expected_caught:,.0f} of them are expected to churn ({precision:.0%} precision), "
        f"and about {expected_missed:,.0f} expected churners are not flagged"
    ]
