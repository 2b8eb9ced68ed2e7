"""DuckDB's memory is bounded by churn.yml: every connection and dbt get warehouse.memory_limit."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from ml.features.dbt import engine_env
from ml.modeling.registry import registry_frame
from ml.warehouse import MEMORY, connect
from tests.conftest import make_config

LIMITED = {"warehouse": {"memory_limit": "1GiB", "threads": 1}}


def test_connections_report_the_configured_memory_limit(tmp_path: Path) -> None:
    config = make_config(tmp_path / "wh", LIMITED)
    engine = config.warehouse.engine
    with connect(config.warehouse.build_db, settings=engine) as session:
        assert session.setting("memory_limit") == "1.0 GiB"
        assert session.setting("threads") == 1
    with connect(config.warehouse.build_db, read_only=True, settings=engine) as session:
        assert session.setting("memory_limit") == "1.0 GiB"
    with connect(MEMORY, settings=engine) as session:
        assert session.setting("memory_limit") == "1.0 GiB"
    with connect(MEMORY) as session:  # control: without settings DuckDB's own default (80% of RAM) applies
        assert session.setting("memory_limit") != "1.0 GiB"


def test_stage_reads_open_their_connections_with_the_settings(tmp_path: Path, monkeypatch) -> None:
    """Plant a spy on the engine: a stage's read must pass churn.yml's memory_limit."""
    config = make_config(tmp_path / "wh", LIMITED)
    with connect(config.warehouse.build_db):
        pass
    seen: list[dict] = []
    real = duckdb.connect

    def spy(database: str = MEMORY, read_only: bool = False, config: dict | None = None):
        seen.append(dict(config or {}))
        return real(database, read_only=read_only, config=config or {})

    monkeypatch.setattr(duckdb, "connect", spy)
    registry_frame(config)
    assert seen and all(c.get("memory_limit") == "1GiB" and c.get("threads") == 1 for c in seen)


def test_dbt_gets_the_same_settings(tmp_path: Path) -> None:
    config = make_config(tmp_path / "wh", {"warehouse": {"memory_limit": "2GB", "threads": 3,
                                                         "temp_directory": str(tmp_path / "spill")}})
    assert engine_env(config) == {"CHURN_DUCKDB_MEMORY_LIMIT": "2GB", "CHURN_DUCKDB_THREADS": "3",
                                  "CHURN_DUCKDB_TEMP_DIRECTORY": str(tmp_path / "spill")}
    profile = (config.warehouse.dbt_project_dir / "profiles.yml").read_text()
    for name in engine_env(config):
        assert f"env_var('{name}'" in profile


def test_dbt_sets_the_spill_folder_once_at_open(tmp_path: Path) -> None:
    """dbt-duckdb re-applies a profile's `settings` on every new cursor; once a query has spilled,
    DuckDB refuses to set temp_directory again, which failed a 200k-customer build mid-run.
    So the spill folder goes in `config_options` (applied once, when the database opens)."""
    import yaml

    profile = yaml.safe_load((Path(__file__).parents[1] / "dbt_project" / "profiles.yml").read_text())
    output = profile["churn"]["outputs"]["build"]
    assert "temp_directory" in output["config_options"] and "temp_directory" not in output["settings"]
    # the engine behaviour behind it, planted: spill, then set the folder again as a new cursor would
    spill = tmp_path / "spill"
    con = duckdb.connect(str(tmp_path / "b.duckdb"), config={"temp_directory": str(spill)})
    con.execute("set memory_limit = '64MB'; set threads = 1; set preserve_insertion_order = false")
    con.execute("create table t as select range as i, md5(range::varchar) as s from range(2000000)")
    con.execute("select s, count(*) from t group by s order by s").fetchall()  # a sort/aggregate larger than 64MB
    cursor = con.cursor()
    cursor.execute("select 1").fetchall()  # a new cursor without re-setting the folder works
    with pytest.raises(duckdb.Error, match="temporary directory"):
        cursor.execute(f"set temp_directory = '{spill}'")
    con.close()
