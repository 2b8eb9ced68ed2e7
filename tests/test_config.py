"""The config file is the single statement of the problem: check it loads and fails loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ml.config import ConfigError, load_config, write_relocated_config
from tests.conftest import REPO_ROOT


def test_repo_config_states_the_problem() -> None:
    config = load_config(REPO_ROOT / "churn.yml")
    assert config.problem.horizon_days == 30
    assert config.problem.success_metric == "recall"
    assert config.problem.success_target == pytest.approx(0.80)
    assert config.dataset.name == "demo"
    assert config.warehouse.build_db.is_absolute()


def test_dataset_override_selects_another_profile() -> None:
    config = load_config(REPO_ROOT / "churn.yml", dataset="telco")
    assert config.dataset.feature_mart == "telco_customer_features"
    with pytest.raises(ConfigError, match="unknown dataset"):
        config.with_dataset("nope")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO_ROOT / "churn.yml").read_text())
    raw["problem"]["horizon_dayz"] = 30
    path = tmp_path / "churn.yml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="horizon_dayz"):
        load_config(path)


def test_relocated_config_moves_only_generated_paths(tmp_path: Path) -> None:
    base = load_config(REPO_ROOT / "churn.yml")
    moved = load_config(write_relocated_config(base, tmp_path, {"generator": {"customers": 10}}))
    assert moved.warehouse.build_db == tmp_path / "build.duckdb"
    assert moved.datasets["demo"].landing_dir == tmp_path / "landing"
    assert moved.datasets["telco"].landing_dir == base.datasets["telco"].landing_dir
    assert moved.warehouse.dbt_project_dir == base.warehouse.dbt_project_dir
    assert moved.generator.customers == 10


def write_changed(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load((REPO_ROOT / "churn.yml").read_text())
    change(raw)
    path = tmp_path / "churn.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["warehouse"].pop("build_db"), r"missing key\(s\) in 'warehouse': build_db"),
        (lambda raw: raw.pop("scoring"), "section 'scoring' is missing or not a mapping"),
        (lambda raw: raw["problem"].update(success_target=1.5), r"problem.success_target must be in \(0, 1\]"),
        (lambda raw: raw["training"].update(cost_missed_churner=5.0, cost_wasted_offer=None),
         "set both training.cost_missed_churner and training.cost_wasted_offer, or neither"),
        (lambda raw: raw["quality"].update(label_share_band=[0.5, 0.2]), "quality.label_share_band must be"),
        (lambda raw: raw.update(dataset="nope"), "dataset 'nope' is not one of: demo, telco"),
    ],
)
def test_each_inconsistency_is_named(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_changed(tmp_path, change))


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "churn.yml"
    path.write_text("problem: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
