"""Every report page in a real browser: loads from file:// with no console error, no failed request
(so nothing is fetched from the network), and every chart drawn with something in it."""

from __future__ import annotations

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
    charts = report.eval_on_selector_all(
        "figure.chart svg", "els => els.map(e => [e.getBoundingClientRect().width, "
        "e.getBoundingClientRect().height, e.querySelectorAll('path').length])")
    assert len(charts) == 5
    for width, height, paths in charts:
        assert width > 100 and height > 100 and paths > 3
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
