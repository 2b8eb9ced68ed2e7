"""The mart's contract checked against its compiled SQL, before anything is built.

A YAML feature that the SQL does not select used to build fine and fail much
later (training, or the mart audit) with a message far from its cause; a new
SQL column without a YAML entry was silently ignored. The cheapest reliable
check found: `dbt compile` of the mart and its parents against an in-memory
DuckDB (no build database touched, so a nightly holding it is no obstacle),
each compiled model created there as a view in dependency order, then
`describe` of the mart's view. DuckDB only binds the views (sources read the
landing files' schemas, which the landing checks have just validated); no row
is computed, and the column names are the engine's own, `select *` included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.config import ChurnConfig
from ml.features.contract import ContractError, load_contract
from ml.features.dbt import dbt_target_path, model_lineage, run_dbt
from ml.logs import get_logger, timed
from ml.warehouse import MEMORY, EngineError, connect

log = get_logger("sql_check")

COMPILE_DATABASE = ":memory:"  # relations compile as "memory"."main"."<model>", a fresh connection's catalog


@dataclass(frozen=True)
class SqlCheck:
    """What the mart's compiled SQL selects, against what its YAML declares."""

    model: str
    yaml_file: str
    sql_columns: tuple[str, ...]
    undocumented: tuple[str, ...]  # selected by the SQL, no YAML entry: a warning
    missing: tuple[str, ...]  # in the YAML contract (roles), not selected by the SQL: an error
    # the compile's manifest: tonight's definitions, which the build fingerprints without a second parse
    manifest_path: Path


def mart_sql_columns(manifest: dict[str, Any], mart_id: str) -> list[str]:
    """The mart's output columns as DuckDB binds its compiled SQL (views over the landing files)."""
    nodes = manifest["nodes"]
    with connect(MEMORY) as session:
        for node_id in model_lineage(nodes, mart_id):
            node = nodes[node_id]
            try:
                session.execute(f"create view {node['relation_name']} as {node['compiled_code']}")
            except EngineError as exc:
                raise ContractError(
                    f"model {node['name']!r} ({node.get('original_file_path')}): its compiled SQL does not bind: "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
        return [r[0] for r in session.rows(f"describe select * from {nodes[mart_id]['relation_name']}")]


def check_mart_sql(config: ChurnConfig, as_of: str) -> SqlCheck:
    """Compile the mart, compare its columns with the YAML; raise ContractError on a contract column missing."""
    mart = config.dataset.feature_mart
    # Its own target folder beside the build's: the nightly's manifest is untouched, and dbt's
    # partial parse is reused from one night to the next.
    target = dbt_target_path(config).with_name(f"{config.dataset.name}__sql_check")
    with timed(f"contract vs SQL of {mart}", log):
        run_dbt(config, "compile", as_of=as_of, target_path=target, database=COMPILE_DATABASE)
        manifest = json.loads((target / "manifest.json").read_text())
        mart_id = next((k for k, n in manifest["nodes"].items()
                        if n["resource_type"] == "model" and n["name"] == mart), None)
        if mart_id is None:
            raise ContractError(f"dbt project {config.warehouse.dbt_project_dir} has no model {mart!r} "
                                f"(datasets.{config.dataset.name}.feature_mart)")
        contract = load_contract(target / "manifest.json", mart)  # roles and kinds: named errors first
        columns = mart_sql_columns(manifest, mart_id)
    node = manifest["nodes"][mart_id]
    documented = set(node.get("columns") or {})
    check = SqlCheck(
        model=mart,
        yaml_file=str(node.get("patch_path") or "").split("://")[-1] or "(no YAML)",
        sql_columns=tuple(columns),
        undocumented=tuple(c for c in columns if c not in documented),
        missing=tuple(c for c in contract.columns if c not in columns),
        manifest_path=target / "manifest.json",
    )
    if check.undocumented:
        log.warning("model %r (%s): column(s) %s are selected by the SQL but have no YAML entry, so they are no "
                    "feature; add them to the YAML with a role (or drop them from the SQL)",
                    mart, check.yaml_file, ", ".join(check.undocumented))
    if check.missing:
        raise ContractError(
            f"model {mart!r}: column(s) {', '.join(check.missing)} are in the contract ({check.yaml_file}) but "
            f"the compiled SQL does not select them (it selects {len(columns)}: {', '.join(columns)}); "
            "add them to the SQL or remove them from the YAML"
        )
    return check

