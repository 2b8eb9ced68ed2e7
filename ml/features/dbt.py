"""Running dbt for the pipeline, and reading what it produced.

dbt runs as a subprocess of the venv's own `dbt`, pointed at the build database
and given churn.yml's values as --vars, so the SQL never repeats a setting and
parallel runs (tests, backfills) never share a target folder. The values that
change every night (as_of, and the build's full_refresh_models / tests_since)
go in the environment instead (NIGHT_ENV, read by macros/night_values.sql):
dbt re-parses the whole project whenever --vars change, so with them in
--vars every night paid two full parses (the SQL check's compile and the
build); with fixed --vars both reuse their partial parse.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.config import ChurnConfig
from ml.logs import get_logger, timed
from ml.warehouse import partition_folders

log = get_logger("dbt")


# Terminal colour and cursor codes: dbt prints them even into a pipe, and they would be stored
# in pipeline_runs' message and shown raw by every tool that reads it.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


class DbtError(RuntimeError):
    """A dbt command failed; the message carries dbt's own summary of what failed."""


@dataclass(frozen=True)
class DbtResult:
    command: list[str]
    target_path: Path
    results: list[dict[str, Any]]

    @property
    def manifest_path(self) -> Path:
        return self.target_path / "manifest.json"


def model_lineage(nodes: dict[str, Any], target: str) -> list[str]:
    """Model ids of a manifest upstream of (and including) `target`, parents before children.

    The order compiled SQL can be created in: each model's relations exist before a child reads them.
    """
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for parent in nodes[node_id]["depends_on"]["nodes"]:
            if parent in nodes and nodes[parent]["resource_type"] == "model":
                visit(parent)
        ordered.append(node_id)

    visit(target)
    return ordered


def dbt_target_path(config: ChurnConfig) -> Path:
    """dbt's artifacts live beside the build database they describe."""
    return config.warehouse.build_db.parent / "dbt_target" / config.dataset.name


# JSON of the night's values, read by macros/night_values.sql only while dbt executes (never at parse time)
NIGHT_ENV = "CHURN_DBT_NIGHT"


def dbt_vars(config: ChurnConfig) -> dict[str, Any]:
    """churn.yml's values for dbt: the same every night, so dbt's partial parse stays valid."""
    return {
        "landing_dir": str(config.dataset.landing_dir),
        # tables landed as date-partition folders: the sources read <table>/**/*.<format> for these
        "landing_folders": partition_folders(config.dataset.landing_dir, config.dataset.landing_format),
        "horizon_days": config.problem.horizon_days,
        # the lookback of the incremental staging watermark (macros/incremental_staging.sql)
        "event_lag_days": {table.table: table.max_lag_days for table in config.dataset.event_tables},
    }


def night_env(as_of: str | None, night: dict[str, Any] | None = None) -> dict[str, str]:
    """The night's values for dbt (as_of and e.g. `tests_since`), as the environment variable NIGHT_ENV."""
    return {NIGHT_ENV: json.dumps({"as_of": as_of, **(night or {})}, sort_keys=True)}


def engine_env(config: ChurnConfig) -> dict[str, str]:
    """DuckDB settings for dbt's connection (profiles.yml reads them under `settings:`)."""
    engine = config.warehouse.engine
    return {
        "CHURN_DUCKDB_MEMORY_LIMIT": engine.memory_limit,
        "CHURN_DUCKDB_THREADS": str(engine.threads or os.cpu_count() or 1),
        "CHURN_DUCKDB_TEMP_DIRECTORY": str(engine.temp_directory or f"{config.warehouse.build_db}.tmp"),
    }


def spark_target_env(config: ChurnConfig) -> dict[str, str]:
    """What profiles.yml's spark target reads: the dataset's Spark folder and churn.yml's spark section."""
    from ml.warehouse.spark import dbt_env, spark_folder

    return dbt_env(spark_folder(config), config.spark)


def dbt_executable() -> str:
    candidate = Path(sys.executable).with_name("dbt")
    return str(candidate) if candidate.exists() else "dbt"


def run_dbt(
    config: ChurnConfig,
    command: str,
    *extra: str,
    as_of: str | None = None,
    select: str | None = None,
    project_dir: Path | None = None,
    target_path: Path | None = None,
    database: str | None = None,
    night: dict[str, Any] | None = None,
    target: str | None = None,
) -> DbtResult:
    """Run `dbt <command>` against the build database; raise DbtError on failure.

    `select` defaults to the dataset's feature mart and everything upstream of it,
    so building one dataset never needs another's landing files. `target_path` and
    `database` let a reader compile SQL (e.g. against ":memory:") without touching
    the build database, which a nightly may hold locked, or the nightly's manifest.
    `night` adds the build's own values of the night (e.g. `full_refresh_models`)
    to `as_of`; both reach dbt through NIGHT_ENV, not --vars (see the module docstring).
    `target` "spark" builds on Spark (profiles.yml's spark target, in the dataset's Spark folder).
    """
    project = project_dir or config.warehouse.dbt_project_dir
    target_path = target_path or dbt_target_path(config)
    target_path.mkdir(parents=True, exist_ok=True)
    config.warehouse.build_db.parent.mkdir(parents=True, exist_ok=True)
    args = [
        dbt_executable(),
        command,
        "--project-dir", str(project),
        "--profiles-dir", str(project),
        "--target-path", str(target_path),
        "--vars", json.dumps(dbt_vars(config), sort_keys=True),
    ]
    if command in ("build", "run", "test", "compile", "ls", "list"):
        args += ["--select", select or f"+{config.dataset.feature_mart}"]
    if target is not None:
        args += ["--target", target]
    args += list(extra)
    env = {
        **os.environ,
        "CHURN_BUILD_DB": database or str(config.warehouse.build_db),
        "DBT_LOG_PATH": str(target_path / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_USE_COLORS": "false",
        "NO_COLOR": "1",
        "DO_NOT_TRACK": "1",
        **engine_env(config),
        **(spark_target_env(config) if target == "spark" else {}),
        **night_env(as_of, night),
    }
    results_file = target_path / "run_results.json"
    results_file.unlink(missing_ok=True)  # never report a previous run's results
    with timed(f"dbt {command} ({config.dataset.name})", log):
        # check=False: a failure is raised below as DbtError, with dbt's own summary of what failed.
        proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    results = json.loads(results_file.read_text())["results"] if results_file.exists() else []
    if proc.returncode != 0:
        failures = [
            f"{r['unique_id']}: {r['status']} {(r.get('message') or '').strip()} "
            f"(failures: {r.get('failures')})"
            for r in results
            if r.get("status") in ("error", "fail")
        ]
        detail = strip_ansi("\n  ".join(failures) if failures else (proc.stdout[-3000:] + proc.stderr[-2000:]))
        raise DbtError(f"dbt {command} failed for dataset {config.dataset.name!r}:\n  {detail}")
    log.debug(strip_ansi(proc.stdout))
    return DbtResult(command=args, target_path=target_path, results=results)
