"""Targets and the README table of a nightly benchmark's results (benchmarks/nightly.py).

Pure functions of the results document, so the pass/fail rules and the table
BI-minded readers see are tested without running anything large.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN = "<!-- nightly-results:begin -->"
END = "<!-- nightly-results:end -->"
RESULTS_GLOB = "nightly-*.json"

# issue 10's Benchmarks section
SECOND_NIGHTLY_MAX_S = 60.0
SECOND_NIGHTLY_MAX_MB = 4096.0  # 4 GiB for the whole process tree
FLATNESS_MAX = 0.15  # 24-month night within 15% of the 12-month night
BUILD_VS_SCAN_MAX = 3.0
RETRAIN_MAX_S = 600.0
FIRST_NIGHTLY_VS_PANDAS_MAX = 3.0

Results = dict[str, Any]


def _step(block: dict[str, Any], name: str) -> dict[str, Any] | None:
    step = block.get("steps", {}).get(name)
    return step if step and step.get("exit_code") == 0 else None


def _loaded(*steps: dict[str, Any] | None) -> bool:
    return any(s is not None and not s.get("load_ok", True) for s in steps)


def _target(name: str, value: float | None, limit: float, unit: str, passed: bool | None,
            *steps: dict[str, Any] | None) -> dict[str, Any]:
    return {"name": name, "value": value, "limit": limit, "unit": unit, "passed": passed,
            "loaded": _loaded(*steps)}


def build_step_seconds(history: dict[str, Any]) -> float | None:
    """The second nightly's `build` step (dbt parse, models and tests of the new night) from pipeline_runs."""
    stages = history.get("second_nightly_stages") or []
    seconds = [s["seconds"] for s in stages if s["step"] == "build"]
    return seconds[0] if seconds else None


def targets(results: Results) -> list[dict[str, Any]]:
    """Every target of issue 10 that the results can judge, with the measured value and pass/fail."""
    out: list[dict[str, Any]] = []
    by_months: dict[int, dict[str, Any]] = {}
    for history in results.get("histories", []):
        label = f"{history['customers']:,} x {history['months']} months"
        second = _step(history, "second_nightly")
        if second is not None:
            by_months[history["months"]] = second
            out.append(_target(f"second nightly wall, {label}", second["wall_s"], SECOND_NIGHTLY_MAX_S, "s",
                               second["wall_s"] <= SECOND_NIGHTLY_MAX_S, second))
            out.append(_target(f"second nightly peak RSS of the tree, {label}", second["peak_mb"],
                               SECOND_NIGHTLY_MAX_MB, "MB", second["peak_mb"] <= SECOND_NIGHTLY_MAX_MB, second))
        scan = _step(history, "scan_90d")
        build = build_step_seconds(history)
        if scan is not None and build is not None:
            ratio = round(build / scan["wall_s"], 2)
            out.append(_target(f"build step / 90-day scan, {label}", ratio, BUILD_VS_SCAN_MAX, "x",
                               ratio <= BUILD_VS_SCAN_MAX, second, scan))
            models = history.get("second_nightly_dbt", {}).get("models_s")
            if models is not None:
                ratio = round(models / scan["wall_s"], 2)
                out.append(_target(f"dbt models only / 90-day scan, {label}", ratio, BUILD_VS_SCAN_MAX, "x",
                                   ratio <= BUILD_VS_SCAN_MAX, second, scan))
        retrain = _step(history, "retrain")
        if retrain is not None:
            out.append(_target(f"full retrain with model selection, {label}", retrain["wall_s"], RETRAIN_MAX_S,
                               "s", retrain["wall_s"] <= RETRAIN_MAX_S, retrain))
    if len(by_months) >= 2:  # issue 10 asks 24 / 12 months; any longest / shortest pair is judged the same
        short, long = min(by_months), max(by_months)
        ratio = round(by_months[long]["wall_s"] / by_months[short]["wall_s"], 3)
        out.append(_target(f"flatness: second nightly {long} / {short} months", ratio, 1 + FLATNESS_MAX, "x",
                           abs(ratio - 1) <= FLATNESS_MAX, by_months[short], by_months[long]))
    pandas = results.get("pandas")
    if pandas:
        seed, first = _step(pandas, "seed_pandas"), _step(pandas, "first_nightly")
        label = f"{pandas['customers']:,} x {pandas['months']} months"
        if seed is not None and first is not None:
            ratio = round(first["wall_s"] / seed["wall_s"], 2)
            out.append(_target(f"first nightly / pandas seed, {label}", ratio, FIRST_NIGHTLY_VS_PANDAS_MAX, "x",
                               ratio <= FIRST_NIGHTLY_VS_PANDAS_MAX, first, seed))
        project_auc, seed_auc = pandas.get("project_auc"), (pandas.get("seed") or {}).get("roc_auc")
        if project_auc is not None and seed_auc is not None:
            out.append(_target(f"out-of-time ROC-AUC, project vs pandas ({seed_auc:.3f}), {label}",
                               round(project_auc, 4), seed_auc, "", project_auc >= seed_auc, first, seed))
        second = _step(pandas, "second_nightly")
        if seed is not None and second is not None:
            out.append(_target(f"second nightly faster than the pandas seed ({seed['wall_s']:.1f} s), {label}",
                               second["wall_s"], seed["wall_s"], "s", second["wall_s"] < seed["wall_s"],
                               second, seed))
    return out


def _load(step: dict[str, Any]) -> str:
    mark = "" if step.get("load_ok", True) else " (loaded)"
    return f"{step['load_before']['one']:.2f} -> {step['load_after']['one']:.2f}{mark}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


STEP_LABELS = {
    "generate": "generate (partitioned landing)",
    "first_nightly": "first nightly (trains the first model)",
    "full_refresh_build": "`churn build --full-refresh`",
    "append_day": "land one more day (`generate --append-day`)",
    "second_nightly": "second nightly, one new day, no retraining",
    "scan_90d": "one DuckDB scan-and-aggregate of the last 90 days",
    "retrain": "`churn train --force` (model selection)",
    "seed_pandas": "seed-style pandas pipeline",
}


def figure_rows(results: Results) -> list[list[str]]:
    """One row per measured step: what, wall s, CPU s, peak MB, load before -> after."""
    rows = []
    pandas = results.get("pandas")
    # a pandas comparison run inside a history has its steps in that history's rows already
    blocks = [*results.get("histories", []), *([pandas] if pandas and not pandas.get("reused_history") else [])]
    for block in blocks:
        size = f"{block['customers']:,} x {block['months']} mo"
        for name, step in block.get("steps", {}).items():
            label = STEP_LABELS.get(name, name)
            if step.get("exit_code") != 0:
                label += f" (FAILED, exit {step.get('exit_code')})"
            rows.append([size, label, _num(step["wall_s"]), _num(step.get("cpu_s")), _num(step.get("peak_mb"), 0),
                         _load(step)])
        stages = block.get("second_nightly_stages") or []
        if stages:
            parts = ", ".join(f"{s['step']} {s['seconds']:.1f}" for s in stages if s["seconds"] >= 0.05)
            rows.append([size, f"second nightly by step (s): {parts}", "", "", "", ""])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]


def readme_block(results: Results, source: str) -> str:
    """The marked README section: how the figures were made, every step, every target."""
    lines = [
        BEGIN,
        f"Latest figures: `{results.get('command', '?')}`, started {results.get('started', '?')}, "
        f"commit `{results.get('commit', '?')}`, {results.get('machine', {}).get('cpus', '?')} cores; "
        f"results file `{source}`. Load is the 1-minute average before -> after each step.",
        "",
        *_table(["size", "step", "wall s", "CPU s", "peak MB", "load"], figure_rows(results)),
        "",
    ]
    judged = [
        [t["name"], f"{_num(t['value'], 3 if t['unit'] in ('x', '') else 1)} {t['unit']}".strip(),
         f"{_num(t['limit'], 3 if t['unit'] in ('x', '') else 1)} {t['unit']}".strip(),
         ("pass" if t["passed"] else "FAIL") + (" (under load)" if t["loaded"] else "")]
        for t in results.get("targets") or targets(results)
    ]
    if judged:
        lines += [*_table(["target", "measured", "limit", "result"], judged), ""]
    lines.append(END)
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with the marked section replaced by `block` (which carries the markers)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {BEGIN} ... {END} section to replace")
    return text[:start] + block + text[end + len(END):]


def latest_results(folder: Path) -> Path:
    files = sorted(folder.glob(RESULTS_GLOB))
    if not files:
        raise FileNotFoundError(f"no {RESULTS_GLOB} in {folder}: run `python -m benchmarks.nightly` first")
    return files[-1]


def write_readme(results_file: Path, readme: Path) -> None:
    results = json.loads(results_file.read_text())
    readme.write_text(replace_block(readme.read_text(), readme_block(results, results_file.name)))
