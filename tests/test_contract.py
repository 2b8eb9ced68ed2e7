"""The feature contract comes from the mart's YAML, so SQL + YAML alone add a feature.

These tests read the contract dbt wrote for the demo mart, then change a copy
of the dbt project (never the Python) and check the contract follows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.features.contract import ContractError, load_contract
from ml.features.dbt import run_dbt
from ml.features.mart import current_contract
from ml.warehouse import connect, quote

MART_SQL = "models/marts/customer_features.sql"
MART_YAML = "models/marts/_marts__models.yml"
EXPECTED_CATEGORICAL = {"plan", "contract_type", "region", "acquisition_channel", "age_band"}


def copy_project(config: ChurnConfig, root: Path) -> Path:
    project = root / "dbt_project"
    shutil.copytree(
        config.warehouse.dbt_project_dir, project, ignore=shutil.ignore_patterns("target", "logs")
    )
    return project


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name} no longer contains {old!r}"
    path.write_text(text.replace(old, new))


def test_contract_roles_and_kinds_from_the_manifest(built_warehouse: ChurnConfig) -> None:
    mart = built_warehouse.dataset.feature_mart
    contract = current_contract(built_warehouse)
    assert contract.key == built_warehouse.problem.entity_key
    assert contract.as_of == built_warehouse.problem.as_of_column
    assert contract.label == built_warehouse.problem.target
    assert set(contract.categorical) == EXPECTED_CATEGORICAL
    assert len(contract.numeric) >= 20
    assert all(f.description for f in contract.features)
    # the contract and the table agree column for column, nothing undocumented
    with connect(built_warehouse.warehouse.build_db, read_only=True) as con:
        columns = con.columns(mart)
    assert sorted(columns) == sorted(contract.columns)
    contract.check_columns(mart, columns)


def test_new_feature_needs_only_sql_and_yaml(private_warehouse: ChurnConfig, tmp_path: Path) -> None:
    project = copy_project(private_warehouse, tmp_path)
    edit(
        project / MART_SQL,
        "        mean_satisfaction_90d\n    from labelled",
        "        mean_satisfaction_90d,\n"
        "        usage_minutes_30d / greatest(login_days_30d, 1) as minutes_per_login_day\n"
        "    from labelled",
    )
    yaml_file = project / MART_YAML
    yaml_file.write_text(
        yaml_file.read_text()
        + "      - name: minutes_per_login_day\n"
        "        description: Minutes of use per active day in the last 30 days.\n"
        "        config:\n"
        "          meta: {role: feature, kind: numeric}\n"
    )
    mart = private_warehouse.dataset.feature_mart
    before = current_contract(private_warehouse)
    assert "minutes_per_login_day" not in before.feature_names

    # a changed definition rebuilds the mart's history (as churn build does when its fingerprint changes)
    result = run_dbt(private_warehouse, "build", "--full-refresh", select=mart, project_dir=project)

    after = load_contract(result.manifest_path, mart)
    assert after.numeric == [*before.numeric, "minutes_per_login_day"]
    assert after.categorical == before.categorical
    assert before.diff(after) == []
    with connect(private_warehouse.warehouse.build_db, read_only=True) as con:
        assert "minutes_per_login_day" in con.columns(mart)
        negative = con.scalar(f"select count(*) from {quote(mart)} where minutes_per_login_day < 0")
    assert negative == 0


def test_bad_role_and_kind_are_a_clear_contract_error(private_warehouse: ChurnConfig, tmp_path: Path) -> None:
    project = copy_project(private_warehouse, tmp_path)
    yaml_file = project / MART_YAML
    text = yaml_file.read_text()
    numeric = "meta: {role: feature, kind: numeric}\n"
    # first numeric feature (is_month_to_month) gets an unknown kind, the second an unknown role
    text = text.replace(numeric, "meta: {role: feature, kind: ordinal}\n", 1)
    text = text.replace(numeric, "meta: {role: target}\n", 1)
    yaml_file.write_text(text)
    mart = private_warehouse.dataset.feature_mart

    result = run_dbt(private_warehouse, "parse", project_dir=project)

    with pytest.raises(ContractError) as caught:
        load_contract(result.manifest_path, mart)
    message = str(caught.value)
    assert mart in message
    assert "feature 'is_month_to_month': kind 'ordinal'" in message
    assert "column 'monthly_spend': role 'target'" in message
