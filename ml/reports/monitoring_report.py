"""The monitoring report: is tonight's population still the one the champion learned, and is it still good?

`drift_stats`, `model_performance`, `churn_scores_history`, `retrain_decisions`
and `data_quality_results` answer that night by night, but only to someone who
charts them. This page draws them, each read through its owner's typed reader,
inline as SVG (the model report's helpers in `ml.reports.charts`), so it opens
offline from `warehouse/reports/monitoring/<dataset>/index.html`.

One night is enough: the heatmap has one column, and until a snapshot's labels
arrive (`problem.horizon_days` later) the performance chart shows the CBPE
estimates and says realized labels are not in yet. The page's verdict fails
when tonight's drift crossed the publish gate or tonight's audits failed.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ml.config import ChurnConfig
from ml.features.mart import current_contract, snapshot_rows
from ml.logs import get_logger
from ml.modeling.reference import CategoricalReference, DriftReference, NumericReference, bin_shares, level_counts
from ml.modeling.registry import load_model, registry_frame
from ml.modeling.score import history_by_snapshot
from ml.monitoring.drift import (
    DATASET_KIND,
    DRIFTED_SHARE,
    FLAGGED_FEATURE,
    PSI,
    SCORE_FEATURE,
    SCORE_KIND,
    TOP_FEATURE_DRIFT,
)
from ml.monitoring.gate import GateDecision, publish_gate
from ml.monitoring.monitor import (
    REALIZED_ONLINE,
    decision_history,
    drift_by_night,
    load_reference,
    performance_history,
)
from ml.monitoring.performance import ESTIMATED, REALIZED
from ml.monitoring.policy import OUTCOME_PROMOTED
from ml.quality.audit import AuditOutcome, audit_history
from ml.reports.charts import figure_html, svg
from ml.warehouse import Reader, connect

log = get_logger("monitoring_report")

# Distributions drawn per night: the most-moved drifted features (the heatmap shows them all).
MAX_DISTRIBUTIONS = 9
# Categorical levels per distribution; the rest are summed into one bar.
MAX_LEVELS = 10
# Heatmap colour saturates at this many times the PSI threshold.
PSI_SATURATION = 3.0
PERFORMANCE_METRICS = ("recall", "precision", "roc_auc")


@dataclass(frozen=True)
class MonitoringReport:
    """Where the page went, which night it shows, and its verdict (the index shows both)."""

    path: Path
    as_of_date: dt.date
    model_version: str
    charts: tuple[str, ...]
    passed: bool
    verdict: str


@dataclass(frozen=True)
class Distribution:
    """One feature's shares per bin (numeric: the PSI bins, null last) or per level, reference vs tonight."""

    feature: str
    labels: tuple[str, ...]
    reference: tuple[float, ...]
    tonight: tuple[float, ...]
    psi: float | None


@dataclass(frozen=True)
class History:
    """Everything the page draws, as read from the owners' tables."""

    drift: pd.DataFrame
    performance: pd.DataFrame
    scores: pd.DataFrame
    decisions: pd.DataFrame
    audits: list[AuditOutcome]
    distributions: list[Distribution]
    drifted_tonight: list[str]

    @property
    def tonight(self) -> pd.DataFrame:
        return self.drift[self.drift["as_of_date"] == self.drift["as_of_date"].max()]

    @property
    def as_of_date(self) -> dt.date:
        return pd.Timestamp(self.drift["as_of_date"].max()).date()

    @property
    def run_id(self) -> str:
        return str(self.tonight["run_id"].iloc[0])

    @property
    def model_version(self) -> str:
        return str(self.tonight["model_version"].iloc[0])


def report_path(config: ChurnConfig) -> Path:
    return config.warehouse.reports_dir / "monitoring" / config.dataset.name / "index.html"


# ---------------------------------------------------------------- reading

def _features_only(drift: pd.DataFrame) -> pd.DataFrame:
    return drift[~drift["kind"].isin([SCORE_KIND, DATASET_KIND])]


def drifted_features(tonight: pd.DataFrame) -> list[str]:
    """Tonight's features with a drift flag that fired, most-moved (PSI) first."""
    features = _features_only(tonight)
    flagged = features.groupby("feature")["drifted"].apply(lambda s: bool(s.fillna(False).any()))
    psi = features[features["statistic"] == PSI].set_index("feature")["value"]
    names = [name for name, hit in flagged.items() if hit]
    return sorted(names, key=lambda name: -float(psi.get(name, 0.0) or 0.0))


def numeric_distribution(name: str, ref: NumericReference, values: pd.Series, psi: float | None) -> Distribution:
    """Reference and tonight's shares in the reference's own PSI bins (what the PSI compared)."""
    edges = list(ref.bin_edges)
    tonight = bin_shares(pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan), edges)
    bounds = [f"{e:.4g}" for e in edges]
    if bounds:
        labels = [f"≤ {bounds[0]}", *(f"{lo} – {hi}" for lo, hi in zip(bounds, bounds[1:], strict=False)),
                  f"> {bounds[-1]}"]
    else:
        labels = ["all values"]
    return Distribution(name, (*labels, "null"), tuple(ref.bin_shares), tuple(tonight), psi)


def categorical_distribution(name: str, ref: CategoricalReference, values: pd.Series,
                             psi: float | None) -> Distribution:
    """Shares of the levels most common on either side; the rest summed as 'other levels'."""
    counts = level_counts(values)
    tonight = (counts / counts.sum()).to_dict() if counts.sum() else {}
    reference = dict(ref.shares)
    levels = sorted(set(reference) | set(tonight), key=lambda lvl: -max(reference.get(lvl, 0.0), tonight.get(lvl, 0.0)))
    kept, rest = levels[:MAX_LEVELS], levels[MAX_LEVELS:]
    ref_shares = [reference.get(lvl, 0.0) for lvl in kept]
    cur_shares = [tonight.get(lvl, 0.0) for lvl in kept]
    if rest:
        kept = [*kept, f"{len(rest)} other levels"]
        ref_shares.append(sum(reference.get(lvl, 0.0) for lvl in rest))
        cur_shares.append(sum(tonight.get(lvl, 0.0) for lvl in rest))
    return Distribution(name, tuple(kept), tuple(ref_shares), tuple(cur_shares), psi)


def distributions(reference: DriftReference, snapshot: pd.DataFrame, names: list[str],
                  psi: pd.Series) -> list[Distribution]:
    out = []
    for name in names:
        ref = reference.features.get(name)
        if ref is None or name not in snapshot.columns:
            continue
        value = psi.get(name)
        value = None if value is None or pd.isna(value) else float(value)
        make = numeric_distribution if isinstance(ref, NumericReference) else categorical_distribution
        out.append(make(name, ref, snapshot[name], value))
    return out


def read_history(config: ChurnConfig, data: Reader | None = None) -> History | None:
    """The page's data, read through each table's owner; None before the first monitoring run.

    `data` reads the mart and the scores history where they live (None: the build database)."""
    settings = config.warehouse.engine
    # The monitoring tables hold every dataset sharing the build database: keep this dataset's models' rows.
    registered = registry_frame(config)
    versions = sorted(registered["model_version"]) if "model_version" in registered else []
    with connect(config.warehouse.build_db, read_only=True, settings=settings) as session:
        drift = drift_by_night(session, versions)
    if drift.empty:
        return None
    drift["as_of_date"] = pd.to_datetime(drift["as_of_date"]).dt.date
    tonight = drift[drift["as_of_date"] == drift["as_of_date"].max()]
    flagged = drifted_features(tonight)
    features = _features_only(tonight)
    psi = features[features["statistic"] == PSI].set_index("feature")["value"]
    # With nothing drifted, the most-moved features still show how close tonight is to the reference.
    shown = (flagged or list(psi.sort_values(ascending=False).index[:3]))[:MAX_DISTRIBUTIONS]
    # The model (and its reference) first: the registry opens its own connection.
    model = load_model(config, str(tonight["model_version"].iloc[0]))
    reference = load_reference(model)
    with connect(config.warehouse.build_db, read_only=True, settings=settings) as session:
        reads = data if data is not None else session
        snapshot = snapshot_rows(reads, config, model.contract, tonight["as_of_date"].iloc[0], features=shown)
        performance = performance_history(session)
        scores = history_by_snapshot(reads, current_contract(config).as_of)  # the dataset's own name
        decisions = decision_history(session)
        audits = audit_history(session, config.dataset.name)
    ours = [frame[frame["model_version"].isin(versions)] for frame in (performance, scores, decisions)]
    return History(drift, *ours, audits,
                   distributions(reference, snapshot, shown, psi), flagged)


# ---------------------------------------------------------------- charts

def _night_ticks(ax: object, nights: list[dt.date], axis: str = "x") -> None:
    """Every night's date when few, else about 20 of them, so labels never overlap."""
    step = max(1, int(np.ceil(len(nights) / 20)))
    positions = list(range(0, len(nights), step))
    labels = [nights[i].isoformat() for i in positions]
    if axis == "x":
        ax.set_xticks(positions, labels, rotation=90, fontsize=8)
    else:
        ax.set_yticks(positions, labels, fontsize=8)


def _date_span(ax: object, dates: pd.Series) -> None:
    """A fortnight either side of a single night, instead of matplotlib's default span of years."""
    unique = pd.to_datetime(dates).dropna().unique()
    if len(unique) == 1:
        day = pd.Timestamp(unique[0])
        ax.set_xlim(day - pd.Timedelta(days=15), day + pd.Timedelta(days=15))


def heatmap_matrix(drift: pd.DataFrame) -> tuple[list[str], list[dt.date], np.ndarray, np.ndarray]:
    """(rows, nights, PSI per row x night, drift flag per row x night); the score's rows last."""
    rows = drift[drift["kind"] != DATASET_KIND]
    psi = rows[rows["statistic"] == PSI].pivot_table(index="feature", columns="as_of_date", values="value",
                                                     aggfunc="max")
    flags = rows.assign(drifted=rows["drifted"].fillna(False).astype(bool)).pivot_table(
        index="feature", columns="as_of_date", values="drifted", aggfunc="max").reindex_like(psi)
    nights = sorted(psi.columns)
    features = [f for f in psi.index if f not in (SCORE_FEATURE, FLAGGED_FEATURE)]
    order = sorted(features, key=lambda f: (-float(flags.loc[f].fillna(False).astype(bool).sum()),
                                            -float(psi.loc[f].fillna(0).max())))
    order += [f for f in (SCORE_FEATURE, FLAGGED_FEATURE) if f in psi.index]
    values = psi.reindex(index=order, columns=nights).to_numpy(dtype=float)
    hits = flags.reindex(index=order, columns=nights).fillna(False).to_numpy(dtype=bool)
    return order, nights, values, hits


def chart_heatmap(drift: pd.DataFrame, psi_threshold: float) -> tuple[str, int]:
    rows, nights, values, hits = heatmap_matrix(drift)
    labels = [{SCORE_FEATURE: "(score)", FLAGGED_FEATURE: "(share flagged)"}.get(r, r) for r in rows]
    fig = Figure(figsize=(min(3 + 0.35 * len(nights), 14), 1.5 + 0.22 * len(rows)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.nan_to_num(values), aspect="auto", cmap="YlOrRd", vmin=0,
                      vmax=PSI_SATURATION * psi_threshold, interpolation="nearest")
    ys, xs = np.nonzero(hits)
    # white-edged black crosses read on the palest and the darkest cell alike
    ax.scatter(xs, ys, marker="X", color="k", edgecolors="white", s=45, linewidths=0.8,
               label="drift flagged (any statistic)")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    _night_ticks(ax, nights)
    ax.set_xlabel("night (snapshot as_of_date)")
    fig.colorbar(image, ax=ax, label=f"PSI vs the training reference (threshold {psi_threshold})", shrink=0.6)
    if len(xs):
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12 - 0.02 * len(nights) ** 0.5), fontsize=8, frameon=False)
    return svg(fig), int(np.isfinite(values).sum())


def chart_distributions(found: list[Distribution]) -> tuple[str, int]:
    columns = min(3, len(found))
    grid = int(np.ceil(len(found) / columns))
    fig = Figure(figsize=(4.2 * columns, 3.2 * grid), layout="constrained")
    axes = fig.subplots(grid, columns, squeeze=False)
    for ax, dist in zip(axes.flat, found, strict=False):
        y = np.arange(len(dist.labels))
        ax.barh(y - 0.2, dist.reference, height=0.4, color="#9aa7b8", label="training reference")
        ax.barh(y + 0.2, dist.tonight, height=0.4, color="#c44e52", label="tonight")
        ax.set_yticks(y, dist.labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("share of rows", fontsize=8)
        psi = f" (PSI {dist.psi:.2f})" if dist.psi is not None else ""
        ax.set_title(f"{dist.feature}{psi}", fontsize=9)
    for ax in list(axes.flat)[len(found):]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize=7)
    return svg(fig), sum(len(d.labels) for d in found)


def _latest_per_snapshot(performance: pd.DataFrame, kind: str) -> pd.DataFrame:
    rows = performance[performance["kind"] == kind].sort_values("computed_at")
    return rows.groupby("as_of_date", as_index=False).last().sort_values("as_of_date")


def chart_performance(performance: pd.DataFrame, target: float, floor: float, metric: str) -> tuple[str, int]:
    performance = performance.assign(as_of_date=pd.to_datetime(performance["as_of_date"]))
    fig = Figure(figsize=(9, 2.4 * len(PERFORMANCE_METRICS)), layout="constrained")
    axes = fig.subplots(len(PERFORMANCE_METRICS), 1, sharex=True, squeeze=False)[:, 0]
    points = 0
    styles = {ESTIMATED: ("--", "o", "estimated (CBPE, before labels)"),
              REALIZED: ("-", "s", "realized (labels known)"),
              REALIZED_ONLINE: ("", "^", "realized, API answers")}
    for ax, name in zip(axes, PERFORMANCE_METRICS, strict=True):
        for kind, (line, marker, label) in styles.items():
            rows = _latest_per_snapshot(performance, kind)
            if rows.empty:
                continue
            ax.plot(rows["as_of_date"], rows[name], linestyle=line, marker=marker, label=label)
            points += int(rows[name].notna().sum())
        if name == metric:
            ax.axhline(target, color="g", linestyle=":", label=f"success target {target}")
            ax.axhline(floor, color="r", linestyle=":", label=f"retrain below {floor:.2f}")
        ax.set_ylabel(name)
        # precision sits near the prevalence: on a 0-1 axis its changes would be invisible
        ax.set_ylim(0, None if name == "precision" else 1.02)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[-1].set_xlabel("snapshot scored (as_of_date)")
    _date_span(axes[-1], performance["as_of_date"])
    fig.autofmt_xdate()
    return svg(fig), points


def chart_scores(scores: pd.DataFrame) -> tuple[str, int]:
    scores = scores.assign(as_of_date=pd.to_datetime(scores["as_of_date"]))
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    share, mean = fig.subplots(2, 1, sharex=True)
    for version, rows in scores.groupby("model_version", sort=False):
        share.plot(rows["as_of_date"], rows["flagged_share"], marker="o", label=str(version))
        mean.plot(rows["as_of_date"], rows["mean_probability"], marker="o", label=str(version))
    share.set_ylabel("share flagged")
    mean.set_ylabel("mean churn probability")
    share.set_ylim(bottom=0)
    mean.set_ylim(bottom=0)
    share.legend(title="model version", fontsize=7, title_fontsize=7)
    mean.set_xlabel("snapshot scored (as_of_date)")
    _date_span(mean, scores["as_of_date"])
    fig.autofmt_xdate()
    return svg(fig), 2 * len(scores)


def chart_decisions(decisions: pd.DataFrame) -> tuple[str, int]:
    decisions = decisions.assign(as_of_date=pd.to_datetime(decisions["as_of_date"]))
    outcomes = list(dict.fromkeys(decisions["outcome"].astype(str)))
    fig = Figure(figsize=(9, 1.4 + 0.45 * len(outcomes)), layout="constrained")
    ax = fig.subplots()
    y = decisions["outcome"].astype(str).map({o: i for i, o in enumerate(outcomes)})
    triggered = decisions["triggered"].fillna(False).astype(bool)
    ax.scatter(decisions["as_of_date"][~triggered], y[~triggered], color="#9aa7b8", label="not triggered")
    ax.scatter(decisions["as_of_date"][triggered], y[triggered], color="#c44e52", marker="D", label="triggered")
    for when, level, rules in zip(decisions["as_of_date"][triggered], y[triggered],
                                  decisions["rules"][triggered], strict=True):
        ax.annotate(str(rules or ""), (when, level), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_yticks(range(len(outcomes)), outcomes, fontsize=8)
    ax.set_ylim(-0.6, len(outcomes) - 0.4)
    ax.set_xlabel("night (snapshot as_of_date)")
    _date_span(ax, decisions["as_of_date"])
    ax.legend(fontsize=7, loc="upper left")
    fig.autofmt_xdate()
    return svg(fig), len(decisions)


def run_nights(history: History) -> dict[str, dt.date]:
    """run_id -> the night (snapshot as_of_date) it monitored; every run decides once, even a superseded one."""
    pairs = pd.concat([history.decisions[["run_id", "as_of_date"]], history.drift[["run_id", "as_of_date"]]])
    return {str(run): pd.Timestamp(day).date() for run, day in pairs.drop_duplicates("run_id").itertuples(index=False)}


def audit_nights(audits: list[AuditOutcome], nights: dict[str, dt.date]) -> list[str]:
    """A label per audited run: the night its nightly monitored, else the day it was checked."""
    return [str(nights.get(a.run_id) or (a.checked_at.date() if a.checked_at else a.run_id)) for a in audits]


def chart_quality(audits: list[AuditOutcome], nights: dict[str, dt.date]) -> tuple[str, int]:
    labels = audit_nights(audits, nights)
    passed = np.array([a.checks - a.critical_failures - a.warnings for a in audits], dtype=float)
    warned = np.array([a.warnings for a in audits], dtype=float)
    failed = np.array([a.critical_failures for a in audits], dtype=float)
    fig = Figure(figsize=(min(3 + 0.35 * len(audits), 14), 3.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(audits))
    ax.bar(x, passed, color="#55a868", label="passed")
    ax.bar(x, warned, bottom=passed, color="#dd8452", label="warnings")
    ax.bar(x, failed, bottom=passed + warned, color="#c44e52", label="critical failures")
    for i, (w, f) in enumerate(zip(warned, failed, strict=True)):
        if w or f:
            ax.annotate(f"{int(f)} critical, {int(w)} warn", (i, passed[i] + w + f), ha="center",
                        xytext=(0, 3), textcoords="offset points", fontsize=7)
    step = max(1, int(np.ceil(len(labels) / 20)))
    ax.set_xticks(x[::step], labels[::step], rotation=90, fontsize=8)
    ax.set_ylabel("expectations checked")
    ax.set_xlabel("nightly run (night's as_of_date)")
    ax.legend(fontsize=7, loc="lower left")
    return svg(fig), len(audits)


# ---------------------------------------------------------------- verdict and page

def tonight_gate(config: ChurnConfig, history: History) -> GateDecision:
    """The drift gate's decision on tonight's rows (a challenger promoted tonight resolves it)."""
    dataset = history.tonight[history.tonight["kind"] == DATASET_KIND].set_index("statistic")
    share = float(dataset["value"].get(DRIFTED_SHARE, 0.0) or 0.0)
    top = json.loads(dataset["current_summary"].get(TOP_FEATURE_DRIFT, "{}") or "{}").get("drifted", [])
    decisions = history.decisions[history.decisions["run_id"] == history.run_id]
    promoted = bool((decisions["outcome"] == OUTCOME_PROMOTED).any())
    return publish_gate(config.monitoring.publish_gate, history.drifted_tonight, share, top, promoted, None)


def tonight_audit(history: History) -> AuditOutcome | None:
    """The latest audited run of tonight's night (a re-run of `churn monitor` has no audits of its own),
    else the latest audited run."""
    nights = run_nights(history)
    same = [a for a in history.audits if nights.get(a.run_id) == history.as_of_date]
    return same[-1] if same else (history.audits[-1] if history.audits else None)


def verdict(config: ChurnConfig, history: History) -> tuple[bool, str]:
    gate = tonight_gate(config, history)
    audit = tonight_audit(history)
    parts = [f"as of {history.as_of_date}"]
    if gate.crossed:
        resolved = {"retrain": " (resolved by tonight's promoted challenger)"}.get(gate.resolution, "")
        parts.append(f"drift gate crossed: {gate.message()}{resolved}")
    else:
        parts.append(f"drift gate not crossed ({len(history.drifted_tonight)} features drifted)")
    if audit is None:
        parts.append("no data-quality audit recorded")
    else:
        parts.append(f"data quality: {audit.checks} checks, {audit.critical_failures} critical failures, "
                     f"{audit.warnings} warnings")
    passed = not gate.crossed and (audit is None or audit.passed)
    return passed, "; ".join(parts)


def _note(text: str) -> str:
    return f"<p class=note>{html.escape(text)}</p>"


def charts(config: ChurnConfig, history: History) -> list[tuple[str, str, str, int]]:
    """(title, question, body, data points) of every chart; a chart with no data says why instead."""
    problem, monitoring = config.problem, config.monitoring
    heatmap, heat_points = chart_heatmap(history.drift, monitoring.psi_threshold)
    out = [("Drift heatmap", "Which features moved away from the champion's training data, on which nights?",
            heatmap, heat_points)]
    body, points = chart_distributions(history.distributions) if history.distributions else ("", 0)
    lead = ("" if history.drifted_tonight else
            _note("No feature drifted tonight; the three that moved most are shown."))
    out.append(("Reference vs tonight", "Where did tonight's drifted features move, compared with the data "
                "the champion was trained on?", lead + body, points))
    realized = history.performance[history.performance["kind"].isin([REALIZED, REALIZED_ONLINE])]
    body, points = chart_performance(history.performance, problem.success_target,
                                     problem.success_target - monitoring.recall_margin, problem.success_metric)
    lead = ("" if len(realized) else _note(
        f"No realized labels yet: a snapshot's labels arrive {problem.horizon_days} days after it, so until "
        "then only the estimates (CBPE, from the calibrated probabilities) are shown."))
    out.append(("Estimated vs realized performance", "Is the model still meeting its target, first as "
                "estimated from its probabilities, then as measured once the labels arrived?", lead + body, points))
    if history.scores.empty:
        out.append(("Share flagged and mean score", "Is the model flagging more or fewer customers than before?",
                    _note("No scores in churn_scores_history yet."), 0))
    else:
        out.append(("Share flagged and mean score", "Is the model flagging more or fewer customers than before, "
                    "and is the average risk moving?", *chart_scores(history.scores)))
    if history.decisions.empty:
        out.append(("Retrain decisions", "When did the retraining policy fire, and what became of it?",
                    _note("No retraining decision recorded yet."), 0))
    else:
        out.append(("Retrain decisions", "When did the retraining policy fire, which rules fired, and was the "
                    "challenger promoted?", *chart_decisions(history.decisions)))
    if not history.audits:
        out.append(("Data quality per night", "Did each night's data pass its expectations?",
                    _note("No data-quality audit recorded yet."), 0))
    else:
        out.append(("Data quality per night", "Did each night's landing files, mart and scores pass their "
                    "expectations, and how many warnings were let through?",
                    *chart_quality(history.audits, run_nights(history))))
    return out


def render(config: ChurnConfig, history: History) -> tuple[str, tuple[str, ...], bool, str]:
    """The page's HTML, its chart titles, and its verdict (passed, in words)."""
    found = charts(config, history)
    passed, text = verdict(config, history)
    nights = history.drift["as_of_date"].nunique()
    facts = {
        "dataset": config.dataset.name,
        "tonight": f"{history.as_of_date} (run {history.run_id})",
        "champion": history.model_version,
        "nights monitored": f"{nights}, {history.drift['as_of_date'].min()} .. {history.as_of_date}",
        "drifted tonight": ", ".join(history.drifted_tonight) or "none",
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Monitoring report: {html.escape(config.dataset.name)} as of {history.as_of_date}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table.facts th {{ text-align: left; padding-right: 1em; }} figure.chart {{ margin: 2em 0; }}
p.q {{ color: #555; font-style: italic; }} p.note {{ color: #8a6d00; }}
.pass {{ color: #1a7f37; }} .fail {{ color: #cf222e; }} svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<p><a href="../../index.html">All reports</a></p>
<h1>Monitoring report: <code>{html.escape(config.dataset.name)}</code></h1>
<p class="{"pass" if passed else "fail"}">{"✓" if passed else "✗"} {html.escape(text)}</p>
<table class=facts>{rows}</table>
{''.join(figure_html(*chart) for chart in found)}
</body></html>
"""
    return page, tuple(title for title, *_ in found), passed, text


def write_monitoring_report(config: ChurnConfig, data: Reader | None = None) -> MonitoringReport | None:
    """Write tonight's monitoring page; None before the first monitoring run."""
    if not config.warehouse.build_db.exists():
        return None
    history = read_history(config, data)
    if history is None:
        return None
    page, titles, passed, text = render(config, history)
    path = report_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    log.info("monitoring report as of %s: %s", history.as_of_date, path)
    return MonitoringReport(path, history.as_of_date, history.model_version, titles, passed, text)
