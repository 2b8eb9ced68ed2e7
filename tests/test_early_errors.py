"""Mistakes an analyst makes when bringing a dataset are named before anything is built.

The telco sample is shipped, so these run on its real landing file with a
private copy of the dbt project (planted mistakes never touch the repo's).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.data.landing import LandingValidationError, validate_landing
from ml.features.contract import ContractError
from ml.features.sql_check import check_mart_sql
from tests.conftest import REPO_ROOT, make_config

TELCO_SQL = "models/marts/telco_customer_features.sql"
TELCO_YAML = "models/marts/_telco_marts__models.yml"


def telco_config(root: Path, landing: Path | None = None) -> ChurnConfig:
    project = root / "dbt_project"
    shutil.copytree(REPO_ROOT / "dbt_project", project, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    overrides: dict = {"warehouse": {"dbt_project_dir": str(project)}}
    if landing is not None:
        overrides["datasets"] = {"telco": {"landing_dir": str(landing)}}
    return make_config(root / "warehouse", overrides).with_dataset("telco")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name} no longer contains {old!r}"
    path.write_text(text.replace(old, new))


def test_contract_columns_missing_from_the_sql_fail_before_the_build(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = telco_config(tmp_path)
    assert check_mart_sql(config, "2018-01-01").missing == (), "the shipped mart matches its YAML"
    project = config.warehouse.dbt_project_dir
    # a YAML feature the SQL never selects, and a SQL column the YAML does not describe
    edit(project / TELCO_YAML, "      - name: has_partner\n",
         "      - name: months_since_upgrade\n        description: planted.\n"
         "        config:\n          meta: {role: feature, kind: numeric}\n      - name: has_partner\n")
    edit(project / TELCO_SQL, "        has_dependents,\n        tenure_months,\n",
         "        has_dependents,\n        42 as forgotten_in_yaml,\n        tenure_months,\n")
    with caplog.at_level(logging.WARNING), pytest.raises(
            ContractError, match=r"model 'telco_customer_features': column\(s\) months_since_upgrade are in the "
                                 r"contract \(models/marts/_telco_marts__models.yml\) but the compiled SQL does not"):
        check_mart_sql(config, "2018-01-01")
    assert "forgotten_in_yaml are selected by the SQL but have no YAML entry" in caplog.text
    assert not config.warehouse.build_db.exists(), "nothing was built"


def test_an_empty_landing_folder_lists_the_expected_file_names(tmp_path: Path) -> None:
    empty = tmp_path / "landing"
    empty.mkdir()
    config = telco_config(tmp_path, landing=empty)
    with pytest.raises(LandingValidationError,
                       match=rf"expected in {empty}: telco_customer_churn.csv \(source telco\)"):
        validate_landing(config)
