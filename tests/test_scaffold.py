"""`churn new-dataset` writes a dataset that runs end to end, from a file the project has never seen.

The file is a bank-style customer table with its own names (`CustomerId`,
`Exited`, mixed-case columns, text categories, a few missing balances). The
scaffold must guess its key and label, write the source, staging, mart,
contract, suites and dataset profile, refuse to overwrite any of it, and the
nightly must then build, audit, train, score and publish the new dataset with
no file edited by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import ChurnConfig, load_config, write_relocated_config
from ml.features.scaffold import ScaffoldError, guess_roles, read_file, scaffold
from ml.warehouse import connect
from tests.conftest import QUICK_TRAINING, REPO_ROOT

ROWS = 2000


def bank_file(folder: Path, rows: int = ROWS, seed: int = 5) -> Path:
    """A bank-style churn table whose label depends on age, activity and products."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows)
    active = rng.integers(0, 2, rows)
    products = rng.integers(1, 5, rows)
    balance = np.round(rng.gamma(2.0, 40000.0, rows), 2)
    logit = -3.0 + 0.06 * (age - 40) - 1.2 * active + 0.9 * (products >= 3)
    exited = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pd.DataFrame({
        "RowNumber": np.arange(1, rows + 1) * 0 + 1,  # constant: not a key
        "CustomerId": 15_000_000 + rng.permutation(rows),
        "Geography": rng.choice(["France", " Spain", "germany "], rows),
        "Age": age,
        "Balance": np.where(rng.random(rows) < 0.02, np.nan, balance),
        "NumOfProducts": products,
        "IsActiveMember": active,
        "Exited": exited,
    })
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bank_customers.csv"
    frame.to_csv(path, index=False)
    return path


def scaffold_config(root: Path) -> ChurnConfig:
    """A private warehouse, dbt project, suites folder and churn.yml the scaffold may write into."""
    project, suites = root / "dbt_project", root / "expectations"
    shutil.copytree(REPO_ROOT / "dbt_project", project,
                    ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    shutil.copytree(REPO_ROOT / "expectations", suites)
    base = load_config(REPO_ROOT / "churn.yml")
    overrides = {**QUICK_TRAINING, "warehouse": {"dbt_project_dir": str(project), "expectations_dir": str(suites)}}
    return load_config(write_relocated_config(base, root / "warehouse", overrides))


def test_key_and_label_are_guessed_from_names_and_values(tmp_path: Path) -> None:
    profile = read_file(bank_file(tmp_path / "data"))
    roles = guess_roles(profile)
    assert (roles.key.name, roles.label.name) == ("CustomerId", "Exited")
    assert [c.snake for c in roles.features] == [
        "row_number", "geography", "age", "balance", "num_of_products", "is_active_member"]
    with pytest.raises(ScaffoldError, match="--key 'nope' is not a column"):
        guess_roles(profile, key="nope")


def test_bad_names_and_existing_files_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    config = scaffold_config(tmp_path)
    source = bank_file(tmp_path / "data")
    with pytest.raises(ScaffoldError, match="lower-case letters"):
        scaffold(config, "Bank!", source)
    with pytest.raises(ScaffoldError, match="'telco' already has a profile"):
        scaffold(config, "telco", source)
    clash = config.warehouse.expectations_dir / "bank" / "scores.json"
    clash.parent.mkdir()
    clash.write_text("{}")
    before = config.source_file.read_text()
    with pytest.raises(ScaffoldError, match="scores.json exists already; nothing was written"):
        scaffold(config, "bank", source)
    assert config.source_file.read_text() == before
    assert not (config.warehouse.dbt_project_dir / "models" / "marts" / "bank_features.sql").exists()


def account_file(folder: Path) -> Path:
    """The bank table under other names: key `AccountId`, label `Exited`."""
    frame = pd.read_csv(bank_file(folder / "tmp", seed=9)).rename(columns={"CustomerId": "AccountId"})
    shutil.rmtree(folder / "tmp")
    path = folder / "accounts.csv"
    frame.to_csv(path, index=False)
    return path


def rename_in(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def test_a_dataset_with_its_own_names_runs_end_to_end_and_leaves_other_datasets_alone(tmp_path: Path) -> None:
    """Key `account_id`, snapshot `snapshot_date`, label `exited`: no stage reads churn.yml's names.

    Then a second dataset's nightly: the first's published file must be byte-identical afterwards.
    """
    from ml.modeling.registry import champion_record
    from ml.pipeline import nightly
    from ml.quality.audit import AuditError, audit
    from ml.quality.default_suites import generated_folder

    config = scaffold_config(tmp_path)
    scaffold(config, "acct", account_file(tmp_path / "acct_data"))
    marts = config.warehouse.dbt_project_dir / "models" / "marts"
    for path in (marts / "acct_features.sql", marts / "_acct_marts__models.yml"):
        rename_in(path, "as_of_date", "snapshot_date")
    shutil.rmtree(config.warehouse.expectations_dir / "acct")  # no suites: default ones are generated
    acct = load_config(config.source_file, dataset="acct")

    nightly(acct)

    generated = sorted(p.name for p in generated_folder(acct).glob("*.json"))
    assert generated == ["acct_default_landing_accounts.json", "acct_default_mart_feature_mart.json",
                         "acct_default_scores_churn_scores.json"]
    with connect(acct.warehouse.build_db, read_only=True) as session:
        judged = dict(session.rows("select stage, count(*) from data_quality_results group by 1"))
        unique_pairs = session.scalar(
            "select column_name from data_quality_results "
            "where expectation_type = 'expect_compound_columns_to_be_unique'")
    assert judged["landing"] >= 1 and judged["mart"] > 10 and judged["scores"] >= 4, judged
    assert unique_pairs == "account_id,snapshot_date", "the default suite uses the contract's names"

    with connect(acct.warehouse.published_db, read_only=True) as session:
        rows, accounts, dates = session.one(
            "select count(*), count(distinct account_id), count(distinct snapshot_date) from churn_scores")
        recall = session.scalar("select recall from model_metrics where split = 'out_of_time' and chosen")
    assert (rows, accounts, dates) == (ROWS, ROWS, 1)
    record = champion_record(acct)
    assert record.success_metric == "recall" and record.meets_success_target == (recall >= record.success_target)

    demo = load_config(config.source_file)
    assert acct.warehouse.published_db == demo.warehouse.dir / "acct" / "published.duckdb"
    assert demo.warehouse.published_db == demo.warehouse.dir / "published.duckdb"
    published = acct.warehouse.published_db.read_bytes()

    result = scaffold(load_config(config.source_file), "bank", bank_file(tmp_path / "bank_data"))
    assert any("make nightly DATASET=bank" in step for step in result.next_steps)
    bank = load_config(config.source_file, dataset="bank")
    assert set(bank.datasets) == {"demo", "telco", "acct", "bank"}, "the profiles were added beside the others"
    nightly(bank)

    assert bank.warehouse.published_db.exists() and bank.warehouse.published_db != acct.warehouse.published_db
    assert acct.warehouse.published_db.read_bytes() == published, "another dataset's nightly changed acct's file"
    with connect(acct.warehouse.published_db, read_only=True) as session:
        assert session.scalar("select count(distinct dataset) from model_registry") == 1
    with connect(bank.warehouse.published_db, read_only=True) as session:
        rows, customers, bad = session.one(
            "select count(*), count(distinct customer_id), "
            "count(*) filter (where churn_probability not between 0 and 1) from churn_scores")
        roc_auc = session.scalar("select roc_auc from model_metrics where split = 'out_of_time' and chosen")
    assert (rows, customers, bad) == (ROWS, ROWS, 0)
    assert roc_auc > 0.7, "the planted signal (age, activity, products) is learned"

    # the generated mart suite catches a label that is not 0/1 (planted in acct's build database)
    with connect(acct.warehouse.build_db) as session:
        session.execute("update acct_features set exited = 2 where account_id in "
                        "(select account_id from acct_features limit 3)")
    with pytest.raises(AuditError, match=r"acct_features, column exited\): expect_column_values_to_be_in_set"):
        audit(acct, "mart", "planted")
