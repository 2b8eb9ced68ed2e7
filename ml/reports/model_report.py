"""The model report: how good tonight's champion is, in pictures, on one offline page.

An analyst should not have to chart `threshold_curve` or `model_metrics`
in BI to see whether the model is any good. Every chart is drawn from the
tables the training run wrote (read through the trainer's own read function)
and inlined as SVG, so the page opens from the file system with no network
and no side files: `warehouse/reports/model/<dataset>/<model_version>/index.html`,
copied to `latest/`.

The ROC curve is derived from the threshold curve: with prevalence pi, at
each threshold TPR = recall and FPR = share_flagged * (1 - precision) / (1 - pi).
The reliability diagram comes from the run's calibration_curve bins, and its
ECE from the same bins, so it is the calibration_error model_metrics records.
The champion-vs-challenger chart comes from the registry's record of both
models scored on the challenger's held-out rows (each at its own threshold).
"""

from __future__ import annotations

import html
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ml.config import ChurnConfig
from ml.logs import get_logger
from ml.modeling.evaluate import calibration_error_of_bins
from ml.modeling.registry import champion_version, model_record, registry_frame
from ml.modeling.train import RunTables, run_tables_of
from ml.reports.charts import figure_html, svg
from ml.warehouse import connect

log = get_logger("model_report")

TOP_FEATURES = 15
# Metrics compared side by side for champion vs challenger (all in [0, 1]; log loss is not).
COMPARED_METRICS = ("roc_auc", "pr_auc", "recall", "precision", "f1", "accuracy", "brier", "calibration_error")
LOWER_IS_BETTER = frozenset({"brier", "calibration_error", "log_loss"})


@dataclass(frozen=True)
class ModelReport:
    """Where the page went and what it concluded (the index shows both)."""

    path: Path
    latest: Path
    model_version: str
    charts: tuple[str, ...]
    target_met: bool | None


def report_root(config: ChurnConfig) -> Path:
    return config.warehouse.reports_dir / "model" / config.dataset.name


def held_out(tables: RunTables) -> pd.Series | None:
    """The chosen model's held-out row of model_metrics."""
    rows = tables.metrics[(tables.metrics["split"] == "out_of_time") & tables.metrics["chosen"].astype(bool)]
    return rows.iloc[0] if not rows.empty else None


def roc_points(curve: pd.DataFrame, prevalence: float) -> pd.DataFrame:
    """(fpr, tpr) per threshold of the threshold curve, plus the (0,0) and (1,1) ends, sorted by fpr."""
    fpr = curve["share_flagged"] * (1 - curve["precision"].fillna(0)) / max(1 - prevalence, 1e-12)
    points = pd.DataFrame({"fpr": fpr.clip(0, 1), "tpr": curve["recall"]})
    ends = pd.DataFrame({"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]})
    return pd.concat([points, ends], ignore_index=True).sort_values(["fpr", "tpr"])


def chart_threshold(curve: pd.DataFrame, threshold: float, target: float, metric: str) -> str:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(curve["threshold"], curve["recall"], label="recall")
    ax.plot(curve["threshold"], curve["precision"], label="precision")
    ax.plot(curve["threshold"], curve["share_flagged"], label="share flagged")
    ax.axvline(threshold, color="k", linestyle="--", label=f"chosen threshold {threshold:.3f}")
    ax.axhline(target, color="r", linestyle=":", label=f"target {metric} {target}")
    ax.set_xscale("log")
    ax.set_xlabel("threshold on the calibrated probability (log scale)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return svg(fig)


def chart_roc_pr(curve: pd.DataFrame, prevalence: float, chosen: pd.Series) -> str:
    fig = Figure(figsize=(9, 4), layout="constrained")
    (roc, pr) = fig.subplots(1, 2)
    points = roc_points(curve, prevalence)
    roc.plot(points["fpr"], points["tpr"], label=f"model (ROC-AUC {chosen['roc_auc']:.3f})")
    roc.plot([0, 1], [0, 1], "k:", label="baseline (0.5)")
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate (recall)")
    roc.legend(fontsize=8)
    pr.plot(curve["recall"], curve["precision"], label=f"model (PR-AUC {chosen['pr_auc']:.3f})")
    pr.axhline(prevalence, color="k", linestyle=":", label=f"baseline = prevalence {prevalence:.3f}")
    pr.scatter([chosen["recall"]], [chosen["precision"]], color="r", zorder=3, label="chosen threshold")
    pr.set_xlabel("recall")
    pr.set_ylabel("precision")
    pr.legend(fontsize=8)
    return svg(fig)


def chart_confusion(chosen: pd.Series) -> str:
    matrix = np.array([[chosen["tn"], chosen["fp"]], [chosen["fn"], chosen["tp"]]], dtype=float)
    fig = Figure(figsize=(4.5, 4), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        dark = value > matrix.max() / 2
        ax.text(j, i, f"{value:,.0f}", ha="center", va="center", color="white" if dark else "black", fontsize=12)
    ax.set_xticks([0, 1], ["not flagged", "flagged"])
    ax.set_yticks([0, 1], ["stayed", "churned"])
    ax.set_xlabel("decision at the threshold")
    ax.set_ylabel("outcome")
    return svg(fig)


def chart_reliability(bins: pd.DataFrame) -> str:
    """Observed churn rate against mean predicted probability per bin, the diagonal, rows per bin and the ECE."""
    bins = bins.sort_values("bin")
    filled = bins[bins["n_rows"] > 0]
    ece = calibration_error_of_bins(bins)
    fig = Figure(figsize=(6, 6), layout="constrained")
    curve, counts = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    curve.plot(filled["mean_predicted"], filled["observed_rate"], "o-", color="#4c72b0",
               label=f"model (ECE {ece:.4f}, {len(bins)} bins)")
    for row in filled.itertuples():
        curve.annotate(f"{row.n_rows:,}", (row.mean_predicted, row.observed_rate), textcoords="offset points",
                       xytext=(4, -10), fontsize=7, color="#555")
    curve.set_xlim(0, 1)
    curve.set_ylim(0, 1.02)
    curve.set_ylabel("observed churn rate in the bin")
    curve.set_title(f"expected calibration error {ece:.4f} (row-weighted |predicted - observed|)", fontsize=9)
    curve.legend(fontsize=8, loc="upper left")
    width = 1 / max(len(bins), 1)
    counts.bar(bins["bin_lower"] + width / 2, bins["n_rows"], width=width * 0.9, color="#8172b2")
    counts.set_yscale("symlog")
    counts.set_xlabel("predicted churn probability (calibrated)")
    counts.set_ylabel("held-out rows")
    return svg(fig)


def _reliability_body(bins: pd.DataFrame) -> str:
    """The diagram and its ECE as page text (the SVG draws its text as paths, which nobody can select)."""
    ece = calibration_error_of_bins(bins)
    return (chart_reliability(bins) + f"<p class=ece>Expected calibration error (ECE): <strong>{ece:.4f}</strong> "
            f"over {int(bins['n_rows'].sum()):,} held-out rows in {len(bins)} equal-width bins.</p>")


def comparison_frame(metrics: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per compared metric: champion's and challenger's value on the same rows, and which is better."""
    champion, challenger = metrics["champion"], metrics["challenger"]
    rows = []
    for name in COMPARED_METRICS:
        if name not in champion or name not in challenger:
            continue
        theirs, mine = champion[name], challenger[name]
        better = None
        if theirs is not None and mine is not None and mine != theirs:
            better = "challenger" if (mine < theirs) == (name in LOWER_IS_BETTER) else "champion"
        rows.append({"metric": name, "champion": theirs, "challenger": mine, "better": better})
    # object dtype: a column of nothing but ties must stay None, not become NaN
    return pd.DataFrame(rows).astype({"better": object}) if rows else pd.DataFrame(rows)


def chart_comparison(frame: pd.DataFrame, selection_metric: str) -> str:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    labels = [f"{m}{' (lower is better)' if m in LOWER_IS_BETTER else ''}{' *' if m == selection_metric else ''}"
              for m in frame["metric"]]
    y = np.arange(len(frame))
    ax.barh(y - 0.2, frame["champion"].astype(float).fillna(0), height=0.4, color="#c44e52", label="champion")
    ax.barh(y + 0.2, frame["challenger"].astype(float).fillna(0), height=0.4, color="#4c72b0", label="challenger")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"value on the same held-out rows (* {selection_metric} decides)")
    ax.legend(fontsize=8, loc="lower right")
    return svg(fig)


def _comparison_table(frame: pd.DataFrame, record: object) -> str:
    def cell(value: object) -> str:
        return "n/a" if value is None or pd.isna(value) else f"{float(value):.4f}"

    rows = "".join(
        f"<tr><th>{html.escape(r.metric)}</th><td>{cell(r.champion)}</td><td>{cell(r.challenger)}</td>"
        f"<td>{html.escape(r.better if isinstance(r.better, str) else 'tie')}</td></tr>" for r in frame.itertuples()
    )
    status = getattr(record, "status", None)
    verdict = "promoted to champion" if status in ("champion", "retired") else "kept as challenger"
    return (f'<p class=decision><strong>Decision: {html.escape(verdict)}</strong> against '
            f"<code>{html.escape(str(getattr(record, 'compared_with', '')))}</code>: "
            f"{html.escape(str(getattr(record, 'decision', '')))}</p>"
            f"<table class=compare><tr><th>metric</th><th>champion</th><th>challenger (this model)</th>"
            f"<th>better</th></tr>{rows}</table>")


def chart_candidates(metrics: pd.DataFrame, selection_metric: str) -> str:
    mean = metrics[metrics["split"] == "cv_mean"].set_index("candidate")[selection_metric]
    std = metrics[metrics["split"] == "cv_std"].set_index("candidate")[selection_metric].reindex(mean.index)
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.subplots()
    ax.barh(mean.index, mean.to_numpy(), xerr=std.fillna(0).to_numpy(), color="#4c72b0", capsize=4)
    ax.set_xlabel(f"cross-validated {selection_metric} (mean ± std over folds)")
    return svg(fig)


def chart_importance(importance: pd.DataFrame) -> str:
    kinds = list(dict.fromkeys(importance["importance_type"]))
    fig = Figure(figsize=(5 * len(kinds), 5), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        top = importance[importance["importance_type"] == kind].sort_values("rank").head(TOP_FEATURES)
        ax.barh(top["feature"][::-1], top["value"][::-1], color="#55a868")
        ax.set_title(kind)
        ax.tick_params(axis="y", labelsize=8)
    return svg(fig)


def _comparison_chart(record: object, selection_metric: str) -> tuple[str, str, str] | None:
    """The champion-vs-challenger figure, when this model was judged against a champion that could score."""
    metrics = getattr(record, "comparison_metrics", None)
    if not metrics or "champion" not in metrics or "challenger" not in metrics:
        return None
    frame = comparison_frame(metrics)
    rows = getattr(record, "comparison_rows", None)
    return ("Champion vs challenger", f"Did this model beat the champion it was judged against, on the same "
            f"{rows or 0:,} held-out rows, and by how much on each metric?",
            chart_comparison(frame, selection_metric) + _comparison_table(frame, record))


def _facts(run: dict, record: object, chosen: pd.Series, config: ChurnConfig) -> str:
    facts = {
        "model version": run.get("model_version"),
        "algorithm": run.get("chosen_algorithm"),
        "threshold": f"{getattr(record, 'threshold', float('nan')):.4f}",
        "trained on": f"{run.get('train_rows'):,} rows, snapshots "
                      f"{run.get('snapshot_min')} .. {run.get('snapshot_max')}",
        "judged on": f"{run.get('oot_rows'):,} held-out rows ({run.get('validation_strategy')})",
        "training data sha256": run.get("training_data_hash"),
        "expected calibration error (10 bins)": f"{chosen['calibration_error']:.4f}",
        "registry decision": getattr(record, "decision", None) or run.get("message"),
        "dataset": config.dataset.name,
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    return f"<table class=facts>{rows}</table>"


def render(config: ChurnConfig, tables: RunTables, record: object) -> tuple[str, tuple[str, ...], bool | None]:
    """The page's HTML, its chart titles and whether the success target was met."""
    chosen = held_out(tables)
    if chosen is None:
        raise ValueError(f"model_metrics has no chosen out_of_time row for {tables.run.get('model_version')}")
    problem = config.problem
    value = float(chosen[problem.success_metric])
    met = value >= problem.success_target
    curve = tables.threshold_curve.sort_values("threshold")
    threshold = float(getattr(record, "threshold", chosen["threshold"]))
    prevalence = float(chosen["prevalence"])
    charts = [
        ("Threshold curve", "Which threshold meets the recall target, and what it costs in precision and in "
         "customers flagged?", chart_threshold(curve, threshold, problem.success_target, problem.success_metric)),
        ("ROC and precision-recall curves", "How much better than the baseline does the model rank churners?",
         chart_roc_pr(curve, prevalence, chosen)),
        *([("Reliability diagram", "When the model says 30%, do 30% of those customers churn (predicted against "
             "observed per probability bin, rows per bin, expected calibration error)?",
             _reliability_body(tables.calibration))] if not tables.calibration.empty else []),
        ("Confusion matrix at the chosen threshold", "How many churners are caught and missed, and how many "
         "customers are contacted needlessly?", chart_confusion(chosen)),
        ("Candidates' cross-validation", f"Which algorithm won on {problem.selection_metric}, and by more than "
         "the fold-to-fold noise?", chart_candidates(tables.metrics, problem.selection_metric)),
        ("Feature importance", "Which features does the model rely on (its own importance, and permutation on "
         "held-out rows)?", chart_importance(tables.importance)),
    ]
    comparison = _comparison_chart(record, problem.selection_metric)
    if comparison is not None:
        charts.append(comparison)
    verdict = (f'<p class="{"pass" if met else "fail"}">{"✓" if met else "✗"} success criterion '
               f"{problem.success_metric} &gt;= {problem.success_target}: {'met' if met else 'missed'} "
               f"({value:.3f} on the held-out rows)</p>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Model report: {html.escape(str(tables.run.get('model_version')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1000px; }}
table.facts th {{ text-align: left; padding-right: 1em; }} figure.chart {{ margin: 2em 0; }}
p.q {{ color: #555; font-style: italic; }} .pass {{ color: #1a7f37; }} .fail {{ color: #cf222e; }}
svg {{ max-width: 100%; height: auto; }}
table.compare td, table.compare th {{ padding: 2px 10px; text-align: left; }}
</style></head><body>
<p><a href="../../../index.html">All reports</a></p>
<h1>Model report: <code>{html.escape(str(tables.run.get('model_version')))}</code></h1>
{verdict}
{_facts(tables.run, record, chosen, config)}
{''.join(figure_html(*chart) for chart in charts)}
</body></html>
"""
    return page, tuple(title for title, _, _ in charts), met


def write_challenger_reports(config: ChurnConfig) -> list[Path]:
    """A page for every registered model of the dataset that has none yet: a rejected challenger's run
    is a training run too, and its page is where the comparison that kept the champion is shown."""
    written: list[Path] = []
    champion = champion_version(config)
    for version in registry_frame(config).get("model_version", []):
        if version != champion and not (report_root(config) / version / "index.html").is_file():
            report = write_model_report(config, version, refresh_latest=False)
            if report is not None:
                written.append(report.path)
    return written


def write_model_report(config: ChurnConfig, version: str | None = None,
                       refresh_latest: bool = True) -> ModelReport | None:
    """Write the champion's (or `version`'s) report and refresh latest/ (the champion's page); None before
    the first model."""
    version = version or champion_version(config)
    if version is None:
        return None
    with connect(config.warehouse.build_db, read_only=True) as session:
        tables = run_tables_of(session, version)
        record = model_record(session, version)
    if tables is None:
        return None
    page, charts, met = render(config, tables, record)
    folder = report_root(config) / version
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "index.html"
    path.write_text(page)
    latest = report_root(config) / "latest"
    if refresh_latest:
        latest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, latest / "index.html")
    log.info("model report of %s: %s", version, path)
    return ModelReport(path, latest / "index.html", version, charts, met)
