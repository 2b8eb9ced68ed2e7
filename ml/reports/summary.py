"""The nightly run's closing summary: what was scored, and how good the model is.

Whoever reads the nightly log should see, without opening the warehouse, how
many customers were scored, how many were flagged, which model did it, and that
model's held-out recall, precision and ROC-AUC beside the naive baseline (the
number to beat). Everything is read back from the warehouse tables the stages
wrote, so the summary shows what BI will see, not what a stage meant to write.
"""

from __future__ import annotations

from ml.config import ChurnConfig
from ml.modeling.score import SCORES_TABLE
from ml.warehouse import connect, table_exists

SUMMARY_METRICS = ("recall", "precision", "roc_auc", "pr_auc")


def _fmt(value: object) -> str:
    return "n/a" if value is None or value != value else f"{float(value):.3f}"


def score_summary(config: ChurnConfig) -> list[str]:
    """Lines describing today's churn_scores and the scoring model's held-out metrics."""
    with connect(config.warehouse.build_db, read_only=True) as con:
        if not table_exists(con, SCORES_TABLE):
            return [f"  no {SCORES_TABLE} table: nothing was scored"]
        as_of = config.problem.as_of_column
        rows, flagged, version, as_of_date = con.execute(
            f'select count(*), count(*) filter (where will_churn), any_value(model_version), '
            f'max("{as_of}") from {SCORES_TABLE}'
        ).fetchone()
        lines = [
            f"  scored {rows:,d} customers as of {as_of_date} with model {version}: "
            f"{flagged:,d} flagged ({flagged / rows if rows else 0:.1%})"
        ]
        if not table_exists(con, "model_metrics") or not table_exists(con, "model_registry"):
            return lines + ["  no model_metrics recorded for this model"]
        registry = con.execute(
            "select algorithm, threshold, run_id from model_registry where model_version = ?", [version]
        ).fetchone()
        metrics = con.execute(
            "select split, candidate, " + ", ".join(SUMMARY_METRICS) + ", rows from model_metrics "
            "where model_version = ? and split in ('out_of_time', 'baseline')",
            [version],
        ).df()
        strategy = None
        if registry and table_exists(con, "model_runs"):
            found = con.execute(
                "select any_value(validation_strategy) from model_runs where run_id = ?", [registry[2]]
            ).fetchone()
            strategy = found[0] if found else None
    if metrics.empty or registry is None:
        return lines + [f"  no held-out metrics recorded for model {version}"]
    model = metrics[metrics["split"] == "out_of_time"].iloc[0]
    baseline = metrics[metrics["split"] == "baseline"]
    baseline_row = baseline.iloc[0] if not baseline.empty else None
    baseline_name = baseline_row["candidate"] if baseline_row is not None else config.problem.baseline
    lines.append(
        f"  {registry[0]} at threshold {registry[1]:.4f}; {strategy or 'held-out'} evaluation on "
        f"{int(model['rows']):,d} rows (target {config.problem.success_metric} >= {config.problem.success_target}):"
    )
    lines.append(f"    {'metric':12s} {'model':>8s} {baseline_name:>16s}")
    for metric in SUMMARY_METRICS:
        base = baseline_row[metric] if baseline_row is not None else None
        lines.append(f"    {metric:12s} {_fmt(model[metric]):>8s} {_fmt(base):>16s}")
    return lines
