"""The monitoring report: one night after the first nightly, and several nights with a planted drift.

The several-night warehouse is the published one plus three earlier nights
written through monitoring's own functions (drift, estimates, decisions) and a
fourth, tonight, re-measured after shifting one top feature in the mart: the
page must draw every chart with data, and the shifted feature must be flagged
in the heatmap, shown in the distributions and fail the page's verdict.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml import pipeline
from ml.config import ChurnConfig
from ml.features.mart import fully_labelled_dates, snapshot_rows
from ml.modeling.registry import load_champion
from ml.modeling.score import DECISION_COLUMN, PROBABILITY_COLUMN
from ml.modeling.train import top_features
from ml.monitoring import monitor as mon
from ml.monitoring.performance import estimated_metrics
from ml.quality.audit import audit
from ml.reports.index_page import index_path, write_reports
from ml.reports.monitoring_report import audit_nights, heatmap_matrix, read_history, report_path, run_nights
from ml.reports.screenshots import pages
from ml.warehouse import connect
from tests.conftest import QUICK_TRAINING, copy_warehouse

FIGURE = re.compile(r'<figure class="chart" data-chart="([^"]+)" data-points="(\d+)">(.*?)</figure>', re.DOTALL)
TITLES = ["Drift heatmap", "Reference vs tonight", "Estimated vs realized performance",
          "Share flagged and mean score", "Retrain decisions", "Data quality per night"]


def figures(page: str) -> dict[str, tuple[int, str]]:
    return {title: (int(points), body) for title, points, body in FIGURE.findall(page)}


def test_first_night_draws_every_chart_and_says_no_labels_yet(published_warehouse: ChurnConfig) -> None:
    path = report_path(published_warehouse)
    page = path.read_text()
    found = figures(page)
    assert list(found) == TITLES
    for title, (points, body) in found.items():
        assert points > 0 and "<svg" in body, title
    assert "No realized labels yet" in found["Estimated vs realized performance"][1]
    history = read_history(published_warehouse)
    _, nights, _, _ = heatmap_matrix(history.drift)
    assert len(nights) == 1
    index = index_path(published_warehouse).read_text()
    assert 'href="monitoring/' in index and f"as of {history.as_of_date}" in index
    # make report-screenshots shoots every page the index links, so the monitoring page too
    shots = pages(published_warehouse)
    assert shots[f"monitoring_{published_warehouse.dataset.name}"] == report_path(published_warehouse)


def add_night(config: ChurnConfig, model, as_of_date: dt.date, run_id: str) -> None:
    """One earlier night as the nightly would have left it: scores in the history, drift, estimate, decision."""
    contract, version = model.contract, str(model.version)
    with connect(config.warehouse.build_db) as session:
        rows = snapshot_rows(session, config, contract, as_of_date)
        probability = model.predict_proba(rows)
        scores = pd.DataFrame({PROBABILITY_COLUMN: probability, DECISION_COLUMN: probability >= model.threshold})
        history = rows[[contract.key, contract.as_of]].assign(**scores, model_version=version, run_id=run_id)
        with session.registered(history) as frame:
            session.execute(f"insert into churn_scores_history by name select * from {frame}")
        size, digests = mon.snapshot_digests(session, config, contract, mon.load_reference(model), as_of_date)
        tonight = mon.Tonight(as_of_date, size, digests, scores,
                              top_features(session, version, config.monitoring.top_features))
        findings = mon.compute_drift(model, mon.load_reference(model), tonight, config)
        estimated = estimated_metrics(tonight.probability, tonight.flagged)
        mon.write_measurements(session, run_id, as_of_date, version, model.threshold, findings, estimated,
                               pd.DataFrame())
    result = mon.MonitorResult(run_id, as_of_date, version, findings.rows, [], 0.0, [], estimated, pd.DataFrame())
    pipeline.apply_policy(config, result, as_of_date, retrain=False)


@pytest.fixture(scope="module")
def several_nights(published_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory):
    config = copy_warehouse(published_warehouse, tmp_path_factory.mktemp("monitoring"), QUICK_TRAINING)
    model = load_champion(config)
    contract = model.contract
    with connect(config.warehouse.build_db, read_only=True) as session:
        earlier = [d.date() for d in fully_labelled_dates(session, config, contract)[-3:]]
        top = top_features(session, str(model.version), config.monitoring.top_features)
    for i, night in enumerate(earlier):
        add_night(config, model, night, f"night-{i}")
    audit(config, "scores", "night-1")
    # Plant tonight's drift: a top numeric feature moved by three reference standard deviations.
    shifted = next(name for name in top if name in contract.numeric)
    spread = model.metadata.reference["features"][shifted]["spread"]
    mart, a = config.dataset.feature_mart, contract.as_of
    with connect(config.warehouse.build_db) as session:
        latest = session.scalar(f'select max("{a}") from "{mart}"')
        session.execute(f'update "{mart}" set "{shifted}" = "{shifted}" + ? where "{a}" = ?', [3 * spread, latest])
    result, _ = pipeline.monitor_and_decide(config, run_id="planted-night", as_of=pd.Timestamp(latest).date())
    write_reports(config)
    return config, shifted, earlier, result


def test_several_nights_draw_every_chart_with_data(several_nights) -> None:
    config, _, earlier, _ = several_nights
    found = figures(report_path(config).read_text())
    assert list(found) == TITLES
    for title, (points, body) in found.items():
        assert points > 0 and "<svg" in body, title
    assert "No realized labels yet" not in found["Estimated vs realized performance"][1]
    history = read_history(config)
    _, nights, values, _ = heatmap_matrix(history.drift)
    assert len(nights) == len(earlier) + 1 and np.isfinite(values).all()
    realized = history.performance[history.performance["kind"] == "realized"]
    assert sorted(pd.to_datetime(realized["as_of_date"]).dt.date) == earlier
    assert len(history.scores) == len(earlier) + 1
    assert len(history.decisions) == len(earlier) + 2  # the published night's, three earlier, tonight's
    # The DQ bars are labelled by the night each audited run monitored (the published nightly's run too,
    # though tonight's re-measure superseded its drift rows).
    labels = audit_nights(history.audits, run_nights(history))
    assert len(labels) == 2 and set(labels) == {str(earlier[1]), str(history.as_of_date)}


def test_the_planted_drift_is_in_the_heatmap_the_distributions_and_the_verdict(several_nights) -> None:
    config, shifted, _, result = several_nights
    assert shifted in result.drifted_features
    history = read_history(config)
    rows, nights, values, hits = heatmap_matrix(history.drift)
    assert rows[0] == shifted or shifted in rows[: len(history.drifted_tonight)]
    assert hits[rows.index(shifted), nights.index(history.as_of_date)]
    assert not hits[rows.index(shifted), :-1].any()  # the earlier, unshifted nights stayed quiet
    assert shifted in [d.feature for d in history.distributions]
    shown = next(d for d in history.distributions if d.feature == shifted)
    # Tonight's values sit in the reference's top bins after a +3 std shift.
    assert sum(shown.tonight[-3:-1]) > sum(shown.reference[-3:-1]) + 0.3
    page = report_path(config).read_text()
    assert 'class="fail"' in page and "drift gate crossed" in page and shifted in page
    index = index_path(config).read_text()
    assert re.search(r'<tr class="fail"><td><a href="monitoring/[^"]+">Monitoring report', index)


def test_no_monitoring_run_means_no_page(trained_warehouse: ChurnConfig, tmp_path: Path) -> None:
    from ml.reports.monitoring_report import write_monitoring_report

    config = copy_warehouse(trained_warehouse, tmp_path / "wh", QUICK_TRAINING)
    assert write_monitoring_report(config) is None
    assert not report_path(config).exists()


def test_another_datasets_page_leaves_these_rows_out(several_nights) -> None:
    """The monitoring tables carry no dataset column: rows are kept by the dataset's registered models."""
    config = several_nights[0]
    other = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, name="another"))
    assert read_history(other) is None
