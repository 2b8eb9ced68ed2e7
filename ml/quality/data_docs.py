"""Data Docs of the audits: one offline page per suite run, and an index with pass/fail per suite.

GX's own page renderer links Bootstrap, Font Awesome and Vega from CDNs, and
without a file-backed Data Context it shows `Data asset: None`, `Run Name
__none__`, an empty status column and a Home link to nowhere. The audit
already holds every verdict (CheckResult) and the table and run it judged, so
these pages are written from those: the data asset is the audited table, the
run is the audit's run_id and as_of, every expectation shows passed/failed
with its severity, observed value and bad-row counts. Plain HTML with inline
CSS: nothing is fetched, the pages open from the file system.

Each page has a JSON summary beside it (`<page>.json`); the index is rebuilt
from those summaries, so it lists every audit kept in the folder, newest first,
without reading the warehouse (the audit writes its docs before it stores).
"""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.logs import get_logger
from ml.quality.verdicts import CheckResult

log = get_logger("quality")

INDEX = "index.html"
# From reports/data_docs/<dataset>/ back to reports/index.html.
HOME = "../../index.html"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 4px 10px; border-bottom: 1px solid #ddd;
text-align: left; vertical-align: top; } td.json { font-family: monospace; font-size: 12px; max-width: 420px;
overflow-wrap: anywhere; } td:first-child { white-space: nowrap; }
:not(tr).passed { color: #1a7f37; } :not(tr).failed { color: #cf222e; } :not(tr).warning { color: #9a6700; }
nav a { margin-right: 1em; } dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; }
dl.facts dt { font-weight: bold; }
"""


@dataclass(frozen=True)
class SuiteRun:
    """One suite judged in one audit: what the page and its index row are written from."""

    suite: str
    suite_file: str
    table: str
    rows: int
    arguments: Sequence[dict[str, Any]]  # each expectation's kwargs, in suite order
    checks: Sequence[CheckResult]  # the verdicts, in the same order
    parameters: dict[str, Any]


def suite_status(checks: Sequence[CheckResult]) -> str:
    """`failed` when a critical expectation failed, `warning` when only warnings did, else `passed`."""
    if any(not c.success and c.severity == "critical" for c in checks):
        return "failed"
    return "warning" if any(not c.success for c in checks) else "passed"


def _check_status(check: CheckResult) -> str:
    if check.success:
        return "passed"
    return "failed" if check.severity == "critical" else "warning"


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def _page(dataset: str, stage: str, run_id: str, as_of: str | None, run: SuiteRun, written: dt.datetime) -> str:
    status = suite_status(run.checks)
    rows = []
    for arguments, check in zip(run.arguments, run.checks, strict=True):
        kwargs = {k: v for k, v in arguments.items() if k != "batch_id"}
        counts = ("" if check.unexpected_count is None or check.element_count is None
                  else f"{check.unexpected_count:,d} of {check.element_count:,d}")
        read = "" if check.rows_checked is None else f"{check.rows_checked:,d} ({check.scope})"
        mark = _check_status(check)
        rows.append(
            f'<tr class="{mark}"><td class="{mark}">{"✓" if check.success else "✗"} {mark}</td>'
            f"<td>{html.escape(check.expectation_type)}</td><td>{html.escape(check.column_name or '')}</td>"
            f"<td>{html.escape(check.severity)}</td><td class=json>{html.escape(_json(kwargs))}</td>"
            f"<td>{html.escape(check.observed_value or '')}</td><td>{counts}</td><td>{read}</td>"
            f"<td>{html.escape(check.details or '')}</td></tr>"
        )
    failed = sum(not c.success for c in run.checks)
    facts = {
        "status": status,
        "data asset": f"{run.table} ({run.rows:,d} rows)",
        "suite": f"{run.suite} ({run.suite_file})",
        "stage": stage,
        "run": run_id,
        "as_of": as_of or "not given (today)",
        "dataset": dataset,
        "expectations": f"{len(run.checks)} evaluated, {len(run.checks) - failed} passed, {failed} failed",
        "written": f"{written:%Y-%m-%d %H:%M:%S}",
    }
    facts_html = "".join(f"<dt>{html.escape(k)}</dt><dd{' class=' + status if k == 'status' else ''}>"
                         f"{html.escape(v)}</dd>" for k, v in facts.items())
    parameters = "".join(f"<tr><th>{html.escape(k)}</th><td class=json>{html.escape(_json(v))}</td></tr>"
                         for k, v in sorted(run.parameters.items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Data Docs: {html.escape(run.suite)} ({html.escape(run_id)})</title>
<style>{STYLE}</style></head><body>
<nav><a href="{HOME}">Home (all reports)</a><a href="{INDEX}">All audits of {html.escape(dataset)}</a></nav>
<h1>Suite <code>{html.escape(run.suite)}</code> on <code>{html.escape(run.table)}</code></h1>
<dl class=facts>{facts_html}</dl>
<table class=expectations><tr><th>status</th><th>expectation</th><th>column</th><th>severity</th><th>arguments</th>
<th>observed value</th><th>unexpected rows</th><th>rows checked (scope)</th><th>details</th></tr>
{''.join(rows)}
</table>
<h2>Suite parameters</h2>
<table class=parameters>{parameters}</table>
</body></html>
"""


def _summary(page: Path, stage: str, run_id: str, as_of: str | None, run: SuiteRun,
             written: dt.datetime) -> dict[str, Any]:
    return {
        "page": page.name, "run_id": run_id, "stage": stage, "as_of": as_of, "suite": run.suite,
        "table": run.table, "rows": run.rows, "status": suite_status(run.checks), "checks": len(run.checks),
        "critical_failures": sum(not c.success and c.severity == "critical" for c in run.checks),
        "warnings": sum(not c.success and c.severity != "critical" for c in run.checks),
        "written_at": written.isoformat(),  # microseconds: two audits in one second still sort
    }


def summaries(folder: Path) -> list[dict[str, Any]]:
    """Every kept page's summary whose page still exists, newest first; unreadable ones are skipped."""
    found = []
    for path in folder.glob("*.json"):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("data docs summary %s unreadable (%s); left out of the index", path, exc)
            continue
        if isinstance(summary, dict) and (folder / str(summary.get("page", ""))).is_file():
            found.append(summary)
    return sorted(found, key=lambda s: (str(s.get("written_at")), str(s.get("page"))), reverse=True)


def render_index(dataset: str, found: list[dict[str, Any]]) -> str:
    rows = []
    for s in found:
        status = str(s.get("status"))
        rows.append(
            f'<tr class="{html.escape(status)}"><td class="{html.escape(status)}">'
            f'{"✓" if status == "passed" else "✗"} {html.escape(status)}</td>'
            f'<td><a href="{html.escape(str(s["page"]))}">{html.escape(str(s.get("suite")))}</a></td>'
            f"<td>{html.escape(str(s.get('table')))}</td><td>{html.escape(str(s.get('stage')))}</td>"
            f"<td>{html.escape(str(s.get('run_id')))}</td><td>{html.escape(str(s.get('as_of') or ''))}</td>"
            f"<td>{s.get('checks')}</td><td>{s.get('critical_failures')}</td><td>{s.get('warnings')}</td>"
            f"<td>{html.escape(str(s.get('written_at'))[:19].replace('T', ' '))}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="10">no audits yet</td></tr>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Data quality: {html.escape(dataset)}</title>
<style>{STYLE}</style></head><body>
<nav><a href="{HOME}">Home (all reports)</a></nav>
<h1>Data quality audits ({html.escape(dataset)})</h1>
<p>One row per suite and audit, newest first. <span class=failed>failed</span>: a critical expectation failed
(the run stopped, nothing was published); <span class=warning>warning</span>: only warnings failed.</p>
<table class=audits><tr><th>status</th><th>suite</th><th>data asset</th><th>stage</th><th>run</th><th>as_of</th>
<th>checks</th><th>critical failures</th><th>warnings</th><th>written</th></tr>
{body}
</table></body></html>
"""


def write_data_docs(folder: Path, dataset: str, stage: str, run_id: str, as_of: str | None,
                    runs: list[SuiteRun]) -> list[Path]:
    """This audit's pages (one per suite, with their summaries), then the index of every audit kept."""
    folder.mkdir(parents=True, exist_ok=True)
    written = dt.datetime.now()
    pages = []
    for run in runs:
        page = folder / f"{run_id}__{stage}__{run.suite}.html"
        page.write_text(_page(dataset, stage, run_id, as_of, run, written))
        page.with_suffix(".json").write_text(json.dumps(_summary(page, stage, run_id, as_of, run, written),
                                                        indent=2, default=str))
        pages.append(page)
    (folder / INDEX).write_text(render_index(dataset, summaries(folder)))
    return pages
