"""The reports after a nightly: an index leading to every page, each offline and with its charts drawn."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from ml.config import ChurnConfig
from ml.modeling.train import RunTables
from ml.reports.index_page import index_path
from ml.reports.model_report import held_out, render, report_root, roc_points

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
        "Threshold curve", "ROC and precision-recall curves", "Confusion matrix at the chosen threshold",
        "Candidates&#x27; cross-validation", "Feature importance",
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
