"""The reports after a nightly: an index leading to every page, each offline and with its charts drawn."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.modeling.evaluate import (
    calibration_error_of_bins,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    threshold_curve,
)
from ml.modeling.registry import ModelRecord
from ml.modeling.train import RunTables
from ml.reports.index_page import index_path
from ml.reports.model_report import comparison_frame, held_out, render, report_root, roc_points

from .conftest import make_config

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def external_references(page: str) -> list[str]:
    """src/href attributes that would fetch from the network."""
    return EXTERNAL.findall(page)


def linked_pages(index: Path) -> list[Path]:
    return [index.parent / href for href in re.findall(r'href="([^"]+)"', index.read_text())]


def test_index_leads_to_every_report_offline(published_warehouse: ChurnConfig) -> None:
    index = index_path(published_warehouse)
    assert index.is_file()
    pages = linked_pages(index)
    names = {p.relative_to(index.parent).parts[0] for p in pages}
    assert {"profile", "model", "data_docs"} <= names
    for page in [index, *pages]:
        assert page.is_file(), page
    for page in [index, report_root(published_warehouse) / "latest" / "index.html"]:
        assert external_references(page.read_text()) == [], page


def test_model_report_draws_every_chart(published_warehouse: ChurnConfig) -> None:
    page = (report_root(published_warehouse) / "latest" / "index.html").read_text()
    figures = re.findall(r'<figure class="chart" data-chart="([^"]+)">(.*?)</figure>', page, re.DOTALL)
    assert [title for title, _ in figures] == [
        "Threshold curve", "ROC and precision-recall curves", "Reliability diagram",
        "Confusion matrix at the chosen threshold", "Candidates&#x27; cross-validation", "Feature importance",
    ]
    for title, body in figures:
        assert "<svg" in body and body.count("<path") > 3, title
    assert "success criterion recall" in page


def test_the_offline_check_catches_a_cdn_link() -> None:
    planted = '<link href="https://cdn.example.com/bootstrap.css"><script src="//cdn.example.com/x.js"></script>'
    assert len(external_references(planted)) == 2
    assert external_references('<a href="model/demo/latest/index.html">') == []


def test_roc_from_the_threshold_curve_matches_the_counts() -> None:
    # 100 rows, 10 churners; at the threshold 8 flagged of whom 4 churned: TPR 0.4, FPR 4/90.
    curve = pd.DataFrame({"threshold": [0.5], "recall": [0.4], "precision": [0.5], "share_flagged": [0.08]})
    points = roc_points(curve, prevalence=0.1)
    middle = points[(points["fpr"] > 0) & (points["fpr"] < 1)].iloc[0]
    assert middle["tpr"] == pytest.approx(0.4) and middle["fpr"] == pytest.approx(4 / 90)


def test_a_run_without_a_held_out_row_is_refused_by_name(published_warehouse: ChurnConfig) -> None:
    empty = pd.DataFrame({"split": ["cv_mean"], "chosen": [False]})
    tables = RunTables({"model_version": "m-planted"}, empty, pd.DataFrame(), pd.DataFrame())
    assert held_out(tables) is None
    with pytest.raises(ValueError, match="m-planted"):
        render(published_warehouse, tables, None)


def test_ece_of_a_planted_miscalibrated_set() -> None:
    # 200 rows predicted 0.25 of which half churn (gap 0.25), 40 predicted 0.75 of which 30 churn (gap 0):
    # ECE = (200 * 0.25 + 40 * 0) / 240.
    p = np.r_[np.full(200, 0.25), np.full(40, 0.75)]
    y = np.r_[np.ones(100), np.zeros(100), np.ones(30), np.zeros(10)]
    bins = reliability_bins(y, p)
    assert bins["n_rows"].tolist() == [0, 0, 200, 0, 0, 0, 0, 40, 0, 0]
    assert bins.loc[[2, 7], "observed_rate"].tolist() == pytest.approx([0.5, 0.75])
    assert calibration_error_of_bins(bins) == pytest.approx(50 / 240)
    assert expected_calibration_error(y, p) == pytest.approx(50 / 240)
    # Perfectly calibrated: ECE 0 (the empty bins carry no weight).
    assert expected_calibration_error(np.r_[np.ones(25), np.zeros(75)], np.full(100, 0.25)) == pytest.approx(0)


def planted_run(config: ChurnConfig) -> tuple[RunTables, ModelRecord]:
    """A trained-looking run and a registry record judged against a champion, without training anything."""
    rng = np.random.default_rng(3)
    p = rng.beta(1, 6, 2_000)
    y = (rng.random(2_000) < np.clip(p * 1.4, 0, 1)).astype(int)  # under-predicts churn: ECE well above 0
    chosen = classification_metrics(y, p, 0.2)
    base = {"run_id": "r", "model_version": "m-planted", "params": "{}"}
    metrics = pd.DataFrame([
        {**base, **chosen, "candidate": "xgboost", "chosen": True, "split": "out_of_time"},
        *[{**base, **chosen, "candidate": c, "chosen": c == "xgboost", "split": split}
          for c in ("logistic_regression", "xgboost") for split in ("cv_mean", "cv_std")],
    ])
    importance = pd.DataFrame([
        {"feature": f"f{i}", "importance_type": kind, "value": 1 / (i + 1), "rank": i + 1}
        for kind in ("gain", "permutation") for i in range(6)
    ])
    run = {"model_version": "m-planted", "chosen_algorithm": "xgboost", "train_rows": 5_000, "oot_rows": 2_000,
           "snapshot_min": "2024-01-01", "snapshot_max": "2024-06-01", "validation_strategy": "out_of_time"}
    tables = RunTables(run, metrics, importance, threshold_curve(y, p), reliability_bins(y, p))
    champion = classification_metrics(y, np.clip(p + rng.normal(0, 0.1, len(p)), 0, 1), 0.2)
    record = ModelRecord("m-planted", config.dataset.name, "xgboost", "champion", 0.2, "r",
                         decision=f"pr_auc on 2000 shared evaluation rows: challenger {chosen['pr_auc']:.4f} vs "
                                  f"champion {champion['pr_auc']:.4f}",
                         compared_with="m-old", selection_metric="pr_auc", comparison_rows=2_000,
                         comparison_metrics={"challenger": chosen, "champion": champion})
    return tables, record


def test_report_draws_reliability_and_champion_vs_challenger(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    tables, record = planted_run(config)
    page, charts, _ = render(config, tables, record)
    assert charts[-1] == "Champion vs challenger" and "Reliability diagram" in charts
    ece = calibration_error_of_bins(tables.calibration)
    assert ece > 0.02 and f"ECE {ece:.4f}" in page
    assert "Decision: promoted to champion" in page and "m-old" in page and "shared evaluation rows" in page
    frame = comparison_frame(record.comparison_metrics).set_index("metric")
    assert frame.loc["pr_auc", "better"] == ("challenger" if frame.loc["pr_auc", "challenger"] >
                                             frame.loc["pr_auc", "champion"] else "champion")
    # Lower is better for the Brier score: the smaller value wins.
    brier = frame.loc["brier"]
    assert brier["better"] == ("challenger" if brier["challenger"] < brier["champion"] else "champion")
    # A first model (no champion) and a run from before calibration_curve draw neither chart.
    first = ModelRecord("m-planted", config.dataset.name, "xgboost", "champion", 0.2, "r", "first model")
    old_run = RunTables(tables.run, tables.metrics, tables.importance, tables.threshold_curve)
    _, charts, _ = render(config, old_run, first)
    assert "Champion vs challenger" not in charts and "Reliability diagram" not in charts


def test_every_training_run_gets_a_page_and_latest_stays_the_champions(published_warehouse: ChurnConfig,
                                                                        tmp_path: Path) -> None:
    """Plant a second registered model that is not the champion: it gets its own page (where its comparison
    with the champion is shown), and latest/ keeps showing the champion."""
    from ml.modeling.registry import champion_version
    from ml.modeling.train import train
    from ml.reports.index_page import write_reports

    from .conftest import QUICK_TRAINING, copy_warehouse

    config = copy_warehouse(published_warehouse, tmp_path / "wh", QUICK_TRAINING)
    before = champion_version(config)
    result = train(config, force=True, run_id="second-run")
    write_reports(config)
    champion = champion_version(config)
    other = before if champion != before else result.version
    assert other != champion
    page = report_root(config) / other / "index.html"
    assert page.is_file()
    latest = (report_root(config) / "latest" / "index.html").read_text()
    # the champion's own page (which may name the model it replaced in its promotion comparison)
    assert f"Model report: {champion}" in latest and f"Model report: {other}" not in latest
