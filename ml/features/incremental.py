"""Deciding how much of the dbt build a night may keep: incremental or full refresh.

The snapshot models (macros/incremental_snapshots.sql) keep every stored
snapshot and build only the new as_of_dates. That is only right while the
stored rows were computed by today's definitions, on the same timeline. So
before dbt runs this module compares each incremental model's definition
fingerprint (its SQL, the SQL of every model upstream of it, the macros they
call and the vars that change results) with the one stored by the last
successful build, and the night's as_of with the latest one built:

- `--full-refresh` asked for, no stored state yet: rebuild everything;
- as_of earlier than a previous build's: rebuild everything (a night never
  mixes two timelines, e.g. the first night of a backfill replay);
- a changed definition: rebuild the models whose fingerprint changed, which
  includes everything downstream of the change, and say so loudly.

The state lives in the build database it describes (table
`dbt_incremental_state`), so a copied or sandboxed warehouse carries it along.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.config import ChurnConfig
from ml.logs import get_logger
from ml.warehouse import connect, declare

log = get_logger("build")

STATE = declare(
    "dbt_incremental_state",
    owner="ml.features.incremental",
    grain="one row per incremental dbt model",
    description="definition fingerprint and latest as_of of each incremental model's last build",
    columns=[
        ("model", "varchar", "dbt model name"),
        ("definition_checksum", "varchar", "sha256 of the model's SQL, its upstream models' SQL, macros and vars"),
        ("latest_as_of", "date", "the latest as_of a build of it started with"),
        ("built_at", "timestamp", "when the last successful build finished"),
    ],
    primary_key=("model",),
)

# dbt vars that change stored rows; as_of only selects which snapshots a night builds
DEFINING_VARS = ("horizon_days",)


@dataclass(frozen=True)
class BuildPlan:
    """What tonight's dbt build rebuilds from scratch, and why."""

    full_refresh: bool
    refresh_models: tuple[str, ...]
    reason: str


def _reachable(graph: dict[str, Any], start: list[str], kind: str) -> set[str]:
    """Ids in `graph` (a manifest's nodes or macros) reachable from `start` along its `kind` dependencies."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        current = todo.pop()
        if current in seen or current not in graph:
            continue
        seen.add(current)
        todo.extend(graph[current]["depends_on"][kind])
    return seen


def definition_checksums(manifest_path: Path, dbt_vars: dict[str, Any]) -> dict[str, str]:
    """Incremental model name -> fingerprint of everything that decides its stored rows.

    Upstream models are included so that changing a staging model's cleaning
    (or any feature's SQL) changes the fingerprint of every incremental model
    below it: the refresh reaches downstream without walking the graph twice.
    """
    manifest = json.loads(manifest_path.read_text())
    nodes = manifest["nodes"]
    checksums: dict[str, str] = {}
    for node_id, node in nodes.items():
        if node["resource_type"] != "model" or node["config"].get("materialized") != "incremental":
            continue
        digest = hashlib.sha256()
        upstream = sorted(_reachable(nodes, [node_id], "nodes"))
        macros: set[str] = set()
        for upstream_id in upstream:
            digest.update(f"{upstream_id}\n{nodes[upstream_id].get('raw_code', '')}\n".encode())
            macros |= _reachable(manifest["macros"], nodes[upstream_id]["depends_on"]["macros"], "macros")
        for macro_id in sorted(macros):
            digest.update(f"{macro_id}\n{manifest['macros'][macro_id]['macro_sql']}\n".encode())
        digest.update(json.dumps({k: dbt_vars.get(k) for k in DEFINING_VARS}, sort_keys=True).encode())
        checksums[node["name"]] = digest.hexdigest()
    return checksums


def stored_state(config: ChurnConfig) -> dict[str, tuple[str, dt.date | None]]:
    """model -> (definition_checksum, latest_as_of) as the last builds left them; empty when none."""
    if not config.warehouse.build_db.exists():
        return {}
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        if not session.exists(STATE):
            return {}
        rows = session.rows("select model, definition_checksum, latest_as_of from dbt_incremental_state")
    return {model: (checksum, latest) for model, checksum, latest in rows}


def plan_build(config: ChurnConfig, as_of: dt.date, checksums: dict[str, str], requested: bool) -> BuildPlan:
    """Full refresh, a partial refresh of changed models, or a plain incremental night."""
    if not checksums:
        return BuildPlan(False, (), "no incremental models")
    if requested:
        return BuildPlan(True, (), "--full-refresh")
    state = stored_state(config)
    if not state or any(model not in state for model in checksums):
        return BuildPlan(True, (), "no incremental state stored yet (first build of this warehouse)")
    latest = max((latest for _, latest in state.values() if latest is not None), default=None)
    if latest is not None and as_of < latest:
        return BuildPlan(True, (), f"as_of {as_of} is earlier than the last build's {latest}: "
                                   "rebuilding from scratch instead of mixing two timelines")
    changed = tuple(sorted(m for m, checksum in checksums.items() if state[m][0] != checksum))
    if changed:
        return BuildPlan(False, changed, "definition changed since the last build")
    return BuildPlan(False, (), "incremental")


def tests_since(config: ChurnConfig, manifest_path: Path, plan: BuildPlan) -> dict[str, dict[str, str]]:
    """dbt var `tests_since`: per incremental model, the rows tonight's row-wise dbt tests read.

    Tonight's rows of a model are those from its stored high-water mark minus
    the lookback it re-writes (macros/tonight_tests.sql): a staged event table
    re-stages its late-arrival lag (`max_lag_days` of its landing table); a
    snapshot model rebuilds from its latest as_of_date and fills labels of
    snapshots up to a horizon (and the cutoff day) back. A full refresh, a
    refreshed model or a model not built yet gets no entry: all its rows are tested.
    """
    if plan.full_refresh or not config.warehouse.build_db.exists():
        return {}
    nodes = json.loads(manifest_path.read_text())["nodes"]
    lags = {t.table: t.max_lag_days for t in config.dataset.event_tables}
    wanted: dict[str, tuple[str, int]] = {}
    for node in nodes.values():
        column = (node["config"].get("meta") or {}).get("tonight_column")
        if node["resource_type"] != "model" or column is None or node["name"] in plan.refresh_models:
            continue
        sources = [d.rsplit(".", 1)[-1] for d in node["depends_on"]["nodes"] if d.startswith("source.")]
        staged = [lags[name] for name in sources if name in lags]
        wanted[node["name"]] = (column, max(staged) if staged else config.problem.horizon_days + 1)
    since: dict[str, dict[str, str]] = {}
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        for model, (column, lookback) in sorted(wanted.items()):
            if not session.exists(model):
                continue
            latest = session.scalar(f"select cast(max({column}) as date) from {model}")
            if latest is not None:
                since[model] = {"column": column, "since": (latest - dt.timedelta(days=lookback)).isoformat()}
    return since


def mark_started(config: ChurnConfig, as_of: dt.date) -> None:
    """Raise every stored latest_as_of to tonight's before dbt runs.

    A build killed after some models committed tonight's snapshots then makes
    a later rerun for an earlier night full-refresh, not trip over them.
    """
    if not stored_state(config):
        return
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        session.execute("update dbt_incremental_state set latest_as_of = greatest(latest_as_of, ?)", [as_of])


def record_build(config: ChurnConfig, as_of: dt.date, checksums: dict[str, str]) -> None:
    """Store the fingerprints of a successful build (the tables now hold nothing later than as_of)."""
    built_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session, session.transaction():
        session.create(STATE)
        session.execute("delete from dbt_incremental_state")
        for model, checksum in sorted(checksums.items()):
            session.execute("insert into dbt_incremental_state values (?, ?, ?, ?)",
                            [model, checksum, as_of, built_at])
