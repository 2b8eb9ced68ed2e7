"""An analyst adds a feature with SQL and YAML only; training and scoring pick it up.

This is the promise that feature definitions live in SQL and nowhere else: on a
copy of the dbt project, one new mart column plus its YAML entry must reach the
model, its feature importance and the scores, with no Python change.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import yaml

from ml.config import ChurnConfig
from ml.features.dbt import run_dbt
from ml.features.mart import current_contract
from ml.modeling.registry import load_champion
from ml.modeling.score import SCORES_TABLE, score
from ml.modeling.train import train
from ml.warehouse import connect, quote
from tests.conftest import copy_warehouse

PROBE = "e2e_probe_bucket"
# Quicker than the shared fixture: this test checks plumbing, not model quality.
PLUMBING_TRAINING = {"training": {"search_iterations": 1, "cv_folds": 2, "out_of_time_snapshots": 1}}


def add_probe_feature(project: Path, mart: str, key: str) -> None:
    """Edit the copied mart the way an analyst would: a SQL column and a YAML entry."""
    sql_path = project / "models" / "marts" / f"{mart}.sql"
    sql = sql_path.read_text().rstrip()
    last = "select * from final"
    assert sql.endswith(last), f"{sql_path} should end with '{last}' (team SQL style)"
    sql_path.write_text(
        sql[: -len(last)]
        + f"select\n    *,\n    (hash({key}) % 97) / 97.0 as {PROBE},\nfrom final\n"
    )
    for yml in sorted((project / "models" / "marts").glob("*.yml")):
        doc = yaml.safe_load(yml.read_text())
        for model in doc.get("models", []):
            if model["name"] == mart:
                model["columns"].append({
                    "name": PROBE,
                    "description": "Test probe: a stable pseudo-random bucket of the customer key.",
                    "config": {"meta": {"role": "feature", "kind": "numeric"}},
                })
                yml.write_text(yaml.safe_dump(doc, sort_keys=False))
                return
    raise AssertionError(f"no YAML in {project / 'models' / 'marts'} describes {mart!r}")


def test_a_feature_added_in_sql_and_yaml_reaches_model_and_scores(
    built_warehouse: ChurnConfig, tmp_path: Path
) -> None:
    project = tmp_path / "dbt_project"
    shutil.copytree(built_warehouse.warehouse.dbt_project_dir, project,
                    ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    config = copy_warehouse(
        built_warehouse, tmp_path / "wh",
        {**PLUMBING_TRAINING, "warehouse": {"dbt_project_dir": str(project)}},
    )
    mart = config.dataset.feature_mart
    key = current_contract(config).key
    add_probe_feature(project, mart, key)

    # Only the mart needs rebuilding: its upstream tables are in the copied database.
    run_dbt(config, "build", "--full-refresh", select=mart, project_dir=project)
    with connect(config.warehouse.build_db, read_only=True) as con:
        assert PROBE in con.columns(mart)

    result = train(config)
    model = load_champion(config)
    assert model.version == result.version
    assert (PROBE, "numeric") in [(f.name, f.kind) for f in model.contract.features]

    with connect(config.warehouse.build_db, read_only=True) as con:
        importance = con.frame(
            "select importance_type, value from feature_importance where model_version = ? and feature = ?",
            [result.version, PROBE],
        )
    assert len(importance) >= 1
    native = importance[importance["importance_type"] != "permutation"]
    assert len(native) == 1 and native["value"].iloc[0] > 0

    scored = score(config)
    with connect(config.warehouse.build_db, read_only=True) as con:
        scores = con.frame(f"select * from {quote(SCORES_TABLE)}")
    assert len(scores) == scored.rows > 0
    reasons = pd.concat([scores[f"reason_{i}"] for i in range(1, config.scoring.top_reasons + 1)]).dropna()
    assert set(reasons) <= set(model.contract.feature_names)
