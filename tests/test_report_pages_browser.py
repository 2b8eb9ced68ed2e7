"""Every report page in a real browser: loads from file:// with no console error, no failed request
(so nothing is fetched from the network), and every chart drawn with something in it."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.reports.index_page import index_path
from ml.reports.model_report import report_root
from ml.reports.monitoring_report import report_path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
playwright = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser_page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM} (.ci/run installs Debian's chromium)")
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS, headless=True,
                                                       viewport={"width": 1280, "height": 900})
        yield context
        context.close()


def load(context, path: Path) -> tuple[object, list[str]]:
    problems: list[str] = []
    page = context.new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: problems.append(f"network request: {r.url}")
            if not r.url.startswith(("file:", "data:", "about:")) else None)
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, problems


def test_index_and_model_report_render_in_chromium(published_warehouse: ChurnConfig, browser_page) -> None:
    index = index_path(published_warehouse)
    page, problems = load(browser_page, index)
    links = page.eval_on_selector_all("a", "els => els.map(e => e.href)")
    assert len(links) >= 3
    page.close()
    assert problems == []
    for link in links:
        target, problems = load(browser_page, Path(link.removeprefix("file://")))
        assert problems == [], link
        target.close()
    report, problems = load(browser_page, report_root(published_warehouse) / "latest" / "index.html")
    charts = drawn_charts(report)
    assert len(charts) == 6 and "Reliability diagram" in charts
    assert problems == []
    report.close()


def test_monitoring_report_renders_in_chromium(published_warehouse: ChurnConfig, browser_page) -> None:
    page, problems = load(browser_page, report_path(published_warehouse))
    charts = page.eval_on_selector_all(
        "figure.chart", "els => els.map(e => { const s = e.querySelector('svg'); const r = s && "
        "s.getBoundingClientRect(); return [e.dataset.chart, Number(e.dataset.points), r ? r.width : 0, "
        "r ? r.height : 0, s ? s.querySelectorAll('path').length : 0]; })")
    assert [title for title, *_ in charts] == [
        "Drift heatmap", "Reference vs tonight", "Estimated vs realized performance",
        "Share flagged and mean score", "Retrain decisions", "Data quality per night"]
    for title, points, width, height, paths in charts:
        assert points > 0 and width > 100 and height > 100 and paths > 3, title
    assert problems == []
    page.close()


def drawn_charts(page) -> list[str]:
    """Titles of the page's charts, after checking each is drawn at a readable size with marks in it."""
    charts = page.eval_on_selector_all(
        "figure.chart", "els => els.map(e => { const s = e.querySelector('svg'); const r = s.getBoundingClientRect();"
        " return [e.dataset.chart, r.width, r.height, s.querySelectorAll('path').length]; })")
    for title, width, height, paths in charts:
        assert width > 100 and height > 100 and paths > 3, title
    return [title for title, *_ in charts]


def test_reliability_and_champion_vs_challenger_render_in_chromium(tmp_path: Path, browser_page) -> None:
    from ml.reports.model_report import render
    from tests.conftest import make_config
    from tests.test_reports import planted_run

    config = make_config(tmp_path / "wh")
    html_page, _, _ = render(config, *planted_run(config))
    path = tmp_path / "report.html"
    path.write_text(html_page)
    page, problems = load(browser_page, path)
    charts = drawn_charts(page)
    assert {"Reliability diagram", "Champion vs challenger"} <= set(charts)
    assert re.search(r"Expected calibration error \(ECE\): 0\.\d{4}",
                     page.inner_text('figure[data-chart="Reliability diagram"]'))
    assert "Decision: promoted to champion" in page.inner_text('figure[data-chart="Champion vs challenger"]')
    assert problems == []
    page.close()


def test_data_docs_pages_render_offline_with_status_and_home(published_warehouse: ChurnConfig,
                                                              browser_page) -> None:
    folder = published_warehouse.warehouse.reports_dir / "data_docs" / published_warehouse.dataset.name
    index, problems = load(browser_page, folder / "index.html")
    statuses = index.eval_on_selector_all("table.audits tr[class] td:first-child", "els => els.map(e => e.innerText)")
    links = index.eval_on_selector_all("table.audits a", "els => els.map(e => e.href)")
    assert statuses and all(s.split()[-1] in ("passed", "warning", "failed") for s in statuses)
    assert len(links) == len(statuses) >= 3  # landing, mart and scores suites of the nightly
    assert problems == []
    index.click("text=Home (all reports)")
    assert index.url == index_path(published_warehouse).resolve().as_uri()
    index.close()
    for link in links:
        page, problems = load(browser_page, Path(link.removeprefix("file://")))
        facts = page.inner_text("dl.facts")
        assert "None" not in facts and "__none__" not in facts, link
        assert page.eval_on_selector_all("table.expectations tr[class] td:first-child",
                                         "els => els.every(e => /(passed|failed|warning)$/.test(e.innerText))")
        assert problems == [], link
        page.close()
