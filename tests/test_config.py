"""The config file is the single statement of the problem: check it loads and fails loudly."""

from __future__ import annotations

import re
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
    # relocated again: what the first copy holds under its warehouse moves again, the rest stays
    again = load_config(write_relocated_config(moved, tmp_path / "again"))
    assert again.warehouse.build_db == tmp_path / "again" / "build.duckdb"
    assert again.datasets["demo"].landing_dir == tmp_path / "again" / "landing"
    assert again.datasets["telco"].landing_dir == base.datasets["telco"].landing_dir
    assert again.generator.customers == 10
    outside = write_relocated_config(moved, tmp_path / "outside", {"warehouse": {"build_db": "/elsewhere/b.duckdb"}})
    with pytest.raises(ConfigError, match="warehouse.build_db .* outside the warehouse folder"):
        write_relocated_config(load_config(outside), tmp_path / "third")


def write_changed(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load((REPO_ROOT / "churn.yml").read_text())
    change(raw)
    path = tmp_path / "churn.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # file order matters (risk bands)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["warehouse"].pop("build_db"), r"missing key\(s\) in 'warehouse': build_db"),
        (lambda raw: raw.pop("scoring"), "section 'scoring' is missing or not a mapping"),
        (lambda raw: raw["problem"].update(success_target=1.5),
         r"problem.success_target = 1.5 is out of range; allowed: \(0, 1\]"),
        (lambda raw: raw["training"].update(cost_missed_churner=5.0, cost_wasted_offer=None),
         "set both training.cost_missed_churner and training.cost_wasted_offer, or neither"),
        (lambda raw: raw["quality"].update(label_share_band=[0.5, 0.2]), "quality.label_share_band must be"),
        (lambda raw: raw.update(dataset="nope"), "dataset 'nope' is not one of: demo, telco"),
        (lambda raw: raw["operating_point"].update(capacity_customers=100, capacity_share=0.05),
         "set operating_point.capacity_customers or operating_point.capacity_share, not both"),
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


# (section, key, planted value, what the message must say is allowed): every wrong type and
# out-of-range value the issue found running with exit 0, and the like for every numeric setting.
BAD_VALUES = [
    ("problem", "horizon_days", "thirty", "expected a whole number"),
    ("problem", "horizon_days", -30, "allowed: a whole number of days >= 1"),
    ("problem", "horizon_days", 0, "allowed: a whole number of days >= 1"),
    ("problem", "horizon_days", 30.5, "expected a whole number"),
    ("problem", "horizon_days", True, "expected a whole number"),
    ("problem", "success_target", "high", "expected a number"),
    ("problem", "selection_metric", "accuracy", "allowed: one of pr_auc, roc_auc"),
    ("scoring", "top_reasons", -2, r"allowed: \[1, 50\]"),
    ("scoring", "top_reasons", 1000, r"allowed: \[1, 50\]"),
    ("scoring", "top_reasons", "three", "expected a whole number"),
    ("monitoring", "psi_bins", 0, r"allowed: \[2, 1000\]"),
    ("monitoring", "psi_bins", 1, r"allowed: \[2, 1000\]"),
    ("monitoring", "psi_threshold", -0.2, "allowed: > 0"),
    ("monitoring", "distance_threshold", 0, "allowed: > 0"),
    ("monitoring", "max_p_value", 1.5, r"allowed: \(0, 1\]"),
    ("monitoring", "dataset_drift_share", 0, r"allowed: \(0, 1\]"),
    ("monitoring", "top_features", 0, "allowed: >= 1"),
    ("monitoring", "retrain_every_days", -1, "allowed: >= 1"),
    ("monitoring", "recall_margin", 1, r"allowed: \[0, 1\)"),
    ("monitoring", "reference_quantiles", 5, r"allowed: \[10, 100000\]"),
    ("monitoring", "null_share_jump", -0.05, r"allowed: \(0, 1\]"),
    ("monitoring", "new_category_share", 2, r"allowed: \(0, 1\]"),
    ("monitoring", "backfill_months", 0, "allowed: >= 1"),
    ("monitoring", "backfill_every", "weekly", "allowed: a count and a unit d, w or m"),
    ("quality", "row_count_tolerance", -0.5, "allowed: >= 0"),
    ("quality", "row_count_tolerance", "half", "expected a number"),
    ("quality", "chunk_rows", 10, "allowed: >= 1000"),
    ("quality", "label_share_band", [0.1], "expected a list of 2 numbers"),
    ("operating_point", "capacity_customers", 0, r"allowed: >= 1 \(or null\)"),
    ("operating_point", "capacity_customers", 2.5, "expected a whole number or null"),
    ("operating_point", "capacity_share", 1.5, r"allowed: > 0 and <= 1 \(or null\)"),
    ("promotion", "margin", -0.01, r"allowed: \[0, 1\)"),
    ("training", "cv_folds", 1, "allowed: >= 2"),
    ("training", "out_of_time_snapshots", 0, "allowed: >= 1"),
    ("training", "search_iterations", 0, "allowed: >= 1"),
    ("training", "calibration", "platt", "allowed: one of isotonic, sigmoid"),
    ("training", "max_training_rows", 0, "allowed: >= 1"),
    ("training", "search_rows", 10, "allowed: >= 1000"),
    ("training", "early_stopping_rounds", 0, r"allowed: >= 1 \(or null\)"),
    ("training", "importance_rows", 5, "allowed: >= 100"),
    ("training", "random_state", -1, "allowed: >= 0"),
    ("generator", "customers", 0, "allowed: >= 1"),
    ("generator", "months", -24, "allowed: >= 1"),
    ("generator", "start_date", "the first of January", r"expected a date \(YYYY-MM-DD\)"),
    ("warehouse", "memory_limit", "lots", "allowed: a size such as 3GB"),
    ("warehouse", "threads", 0, "allowed: >= 1"),
    ("warehouse", "build_db", 5, "expected a path"),
    ("datasets", "generate_if_empty", "yes", "expected true or false"),
    ("spark", "master", "yarn", "allowed: local, local"),
    ("spark", "shuffle_partitions", 0, "allowed: >= 1"),
    ("spark", "driver_memory", "2GB", "allowed: a JVM size such as 2g"),
    ("spark", "table_format", "iceberg", "allowed: one of parquet, delta"),
]


@pytest.mark.parametrize(("section", "key", "value", "allowed"), BAD_VALUES,
                         ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD_VALUES])
def test_wrong_type_or_range_fails_at_start_naming_path_value_and_allowed(
    tmp_path: Path, section: str, key: str, value, allowed: str
) -> None:
    def plant(raw: dict) -> None:
        (raw["datasets"]["demo"] if section == "datasets" else raw[section])[key] = value

    path = "datasets.demo" if section == "datasets" else section
    shown = repr(tuple(value) if isinstance(value, list) else value)  # lists are read as tuples
    with pytest.raises(ConfigError, match=rf"{re.escape(path)}\.{key} = {re.escape(shown)}.*{allowed}"):
        load_config(write_changed(tmp_path, plant))


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "0.3"])
def test_bad_high_risk_probability_is_refused(tmp_path: Path, value: object) -> None:
    """Bands follow the decision; only the `high` cut is a setting, a probability in (0, 1]."""
    with pytest.raises(ConfigError, match=r"scoring.high_risk_probability = .*(allowed|expected)"):
        load_config(write_changed(tmp_path, lambda raw: raw["scoring"].update(high_risk_probability=value)))


def test_engine_settings_are_typed_and_relocated_configs_keep_them(tmp_path: Path) -> None:
    base = load_config(REPO_ROOT / "churn.yml")
    assert base.warehouse.engine.pragmas() == {"memory_limit": "3GB"}
    moved = load_config(write_relocated_config(
        base, tmp_path, {"warehouse": {"threads": 2, "temp_directory": str(tmp_path / "spill")}}))
    assert moved.warehouse.engine.pragmas() == {"memory_limit": "3GB", "threads": 2,
                                                "temp_directory": str(tmp_path / "spill")}


def test_each_dataset_has_its_own_files_and_the_demo_keeps_the_top_level(tmp_path: Path) -> None:
    config = load_config(write_relocated_config(load_config(REPO_ROOT / "churn.yml"), tmp_path))
    telco = config.with_dataset("telco")
    assert config.warehouse.published_db == tmp_path / "published.duckdb", "BI's README queries read this file"
    home = tmp_path / "telco"
    assert (telco.warehouse.build_db, telco.warehouse.published_db, telco.warehouse.models_dir,
            telco.warehouse.reports_dir) == (home / "build.duckdb", home / "published.duckdb",
                                             home / "models", home / "reports")
    assert telco.with_dataset("demo").warehouse == config.warehouse
    assert load_config(config.source_file, dataset="telco").warehouse == telco.warehouse


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["datasets"]["telco"].update(warehouse_dir="warehouse"),
         "datasets 'demo' and 'telco' share warehouse_dir"),
        (lambda raw: raw["datasets"].update(models=dict(raw["datasets"]["telco"])),
         r"datasets.models.warehouse_dir .*warehouse/models lies inside .*warehouse/models, which dataset 'demo'"),
        (lambda raw: raw["datasets"]["telco"].update(success_target=0),
         r"datasets.telco.success_target = 0 is out of range"),
        (lambda raw: raw["datasets"]["telco"].update(cost_wasted_offer=2.0),
         "set both datasets.telco.cost_missed_churner and datasets.telco.cost_wasted_offer"),
    ],
)
def test_datasets_that_would_mix_or_bad_overrides_are_refused(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_changed(tmp_path, change))


def test_a_dataset_profile_overrides_the_business_settings(tmp_path: Path) -> None:
    def override(raw: dict) -> None:
        raw["datasets"]["telco"].update(success_target=0.6, selection_metric="roc_auc",
                                        cost_missed_churner=10.0, cost_wasted_offer=1.0)
    config = load_config(write_changed(tmp_path, override))
    telco = config.with_dataset("telco")
    assert (telco.problem.success_target, telco.problem.selection_metric) == (0.6, "roc_auc")
    assert (telco.training.cost_missed_churner, telco.training.cost_wasted_offer) == (10.0, 1.0)
    assert (config.problem.success_target, config.training.cost_missed_churner) == (0.8, None), "demo unchanged"
    assert telco.with_dataset("demo").problem == config.problem


def test_engine_comes_from_the_file_or_churn_engine_and_a_typo_is_named(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHURN_ENGINE", raising=False)
    assert load_config(REPO_ROOT / "churn.yml").engine == "duckdb"
    monkeypatch.setenv("CHURN_ENGINE", "spark")  # what `make nightly ENGINE=spark` sets
    assert load_config(REPO_ROOT / "churn.yml").engine == "spark"
    monkeypatch.setenv("CHURN_ENGINE", "sprak")
    with pytest.raises(ConfigError, match=r"\$CHURN_ENGINE is 'sprak', not one of: duckdb, spark"):
        load_config(REPO_ROOT / "churn.yml")
    monkeypatch.delenv("CHURN_ENGINE")
    raw = yaml.safe_load((REPO_ROOT / "churn.yml").read_text())
    raw["engine"] = "postgres"
    path = tmp_path / "churn.yml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"churn.yml: engine is 'postgres', not one of: duckdb, spark"):
        load_config(path)
