"""The table catalogue is complete, each table has one owner, and the README says the same.

Every table the ML layer writes is declared once, by the module that writes it
(`ml.warehouse.declare`). These tests import every module of `ml/` so all
declarations are made, then check three promises: no other module sends SQL
naming an owner's table (it calls the owner's read functions), the README's
Tables section lists exactly the declared tables with their owners' commands,
and a declared table is created with the declared column types.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pandas as pd
import pytest

import ml
from ml.warehouse import MEMORY, catalog, connect, declare

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
# A line that is SQL (a statement keyword) naming the table after from/join/into/update/table.
SQL_REFERENCE = (r"^(?=.*\b(?:select|insert|delete|update|create|drop|alter)\b).*"
                 r"\b(?:from|join|into|update|table|exists)\s+(?:main\.)?\"?{name}\b")


def all_specs():
    for module in pkgutil.walk_packages(ml.__path__, "ml."):
        importlib.import_module(module.name)
    return catalog()


def module_sources() -> dict[str, str]:
    sources = {}
    for path in sorted((REPO_ROOT / "ml").rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        sources[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return sources


def sql_references(name: str, sources: dict[str, str]) -> list[str]:
    pattern = re.compile(SQL_REFERENCE.format(name=re.escape(name)), re.IGNORECASE | re.MULTILINE)
    return [module for module, text in sources.items() if pattern.search(text)]


def readme_tables() -> dict[str, str]:
    """Table name -> the README's 'Written by' cell, from the Tables section."""
    text = README.read_text()
    section = text[text.index("## Tables"):]
    section = section[: section.index("\n## ", 4)]
    tables: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
            tables[name] = cells[2]
    return tables


def test_every_owner_declares_distinct_tables_with_typed_columns() -> None:
    specs = all_specs()
    assert len(specs) >= 18
    for spec in specs.values():
        assert spec.owner in module_sources(), f"{spec.name}: owner {spec.owner} is not a module of ml/"
        assert spec.columns, f"{spec.name} declares no columns"
        assert all(c.type for c in spec.columns), f"{spec.name} has an untyped column"


def test_no_module_but_the_owner_names_a_table_in_sql() -> None:
    sources = module_sources()
    problems = [
        f"{module} queries {name} (owned by {spec.owner}): call the owner's read function"
        for name, spec in all_specs().items()
        for module in sql_references(name, sources)
        if module != spec.owner
    ]
    assert not problems, "\n".join(problems)


def test_the_reference_check_would_see_a_planted_query() -> None:
    planted = {"ml.monitoring.x": 'rows = session.frame(\'select * from "model_runs" where run_id = ?\')'}
    assert sql_references("model_runs", planted) == ["ml.monitoring.x"]
    assert sql_references("model_runs", {"ml.x": "# written to model_runs by training"}) == []
    assert sql_references("churn_scores", {"ml.cli": '"score customers into churn_scores",'}) == []


def test_readme_tables_section_lists_the_catalogue() -> None:
    specs = all_specs()
    documented = readme_tables()
    missing = sorted(set(specs) - set(documented))
    assert not missing, f"README's Tables section lacks declared tables: {missing}"
    ml_written = {name for name, writer in documented.items() if "dbt" not in writer}
    undeclared = sorted(ml_written - set(specs))
    assert not undeclared, f"README lists tables no module declares: {undeclared}"
    for name, spec in specs.items():
        command = spec.owner.rsplit(".", 1)[-1]
        assert "churn" in documented[name], f"README: {name} should name the `churn` command that writes it"
        assert command in documented[name] or spec.owner in documented[name] or _command_of(spec.owner) in \
            documented[name], f"README: {name} is written by {spec.owner}, README says {documented[name]!r}"


def _command_of(owner: str) -> str:
    """The `churn` command whose stage owns a table, as the README names it."""
    return {
        "ml.modeling.train": "train", "ml.modeling.registry": "train", "ml.modeling.score": "score",
        "ml.monitoring.monitor": "monitor", "ml.quality.audit": "audit", "ml.pipeline": "nightly",
        "ml.serving.publish": "publish", "ml.reports.profile": "profile", "ml.modeling.operating_point": "threshold",
    }[owner]


def test_a_declared_table_gets_its_declared_types_even_from_all_null_values() -> None:
    spec = declare("catalog_probe", __name__, "one row per probe", "test table",
                   [("run_id", "VARCHAR"), ("as_of", "VARCHAR"), ("seconds", "DOUBLE")])
    with connect(MEMORY) as session:
        session.append(spec, pd.DataFrame({"run_id": ["r1"], "as_of": [None], "seconds": [None]}))
        assert session.columns(spec) == {"run_id": "VARCHAR", "as_of": "VARCHAR", "seconds": "DOUBLE"}
        with pytest.raises(Exception, match="nope"):
            session.append(spec, pd.DataFrame({"run_id": ["r2"], "nope": [1]}))
        assert session.row_count(spec) == 1, "a refused append leaves the table as it was"
