"""Publishing: a complete copy replaces the published file atomically, or nothing changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pytest

import ml.serving.publish as publish_module
from ml.config import ChurnConfig
from ml.features.mart import current_contract
from ml.serving.publish import (
    FEATURE_DICTIONARY,
    INFO_TABLE,
    KEYWORD_RENAMES,
    LEGACY_SCHEMA,
    PUBLISHED_PARTS,
    PublishError,
    is_sql_keyword,
    publish,
    published_tables,
    remove_stale_temps,
)
from ml.warehouse import connect


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def scored(private_warehouse: ChurnConfig) -> ChurnConfig:
    """A built warehouse with a churn_scores table of the latest snapshot's customers."""
    config = private_warehouse
    mart, key, as_of = config.dataset.feature_mart, config.problem.entity_key, config.problem.as_of_column
    with connect(config.warehouse.build_db) as con:
        con.execute(f"create table churn_scores as select {key}, {as_of}, 0.1 as churn_probability from {mart} "
                    f"where {as_of} = (select max({as_of}) from {mart})")
        con.execute("create table pipeline_runs as select 'r0' as run_id, 'build' as step")
    return config


def build_rows(config: ChurnConfig, table: str) -> int:
    with connect(config.warehouse.build_db, read_only=True) as con:
        return con.scalar(f"select count(*) from {table}")


def leftovers(config: ChurnConfig) -> list[str]:
    folder = config.warehouse.published_db.parent
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".wal"))


def test_publish_copies_the_bi_tables_and_leaves_no_temp(scored: ChurnConfig) -> None:
    result = publish(scored, run_id="r1")
    assert result.tables == {"churn_scores": build_rows(scored, "churn_scores"), "pipeline_runs": 1}
    contract = current_contract(scored)
    dictionary_rows = len(contract.feature_names) + 3  # key, as_of, label and the features
    assert published_tables(scored) == {**result.tables, INFO_TABLE: 1, FEATURE_DICTIONARY.name: dictionary_rows,
                                        PUBLISHED_PARTS.name: 1}
    with connect(scored.warehouse.published_db, read_only=True) as con:
        assert con.rows(f"select run_id, dataset from {INFO_TABLE}") == [("r1", "demo")]
    assert leftovers(scored) == []


def test_republishing_the_same_build_gives_the_same_tables(scored: ChurnConfig) -> None:
    publish(scored, run_id="r1")
    with connect(scored.warehouse.published_db, read_only=True) as con:
        first = con.rows("select * from churn_scores order by all")
    publish(scored, run_id="r1")
    with connect(scored.warehouse.published_db, read_only=True) as con:
        again = con.rows("select * from churn_scores order by all")
    assert again == first and len(first) == build_rows(scored, "churn_scores")


def test_without_scores_nothing_is_published(scored: ChurnConfig) -> None:
    publish(scored, run_id="r1")
    before = digest(scored.warehouse.published_db)
    with connect(scored.warehouse.build_db) as con:
        con.execute("drop table churn_scores")
    with pytest.raises(PublishError, match="lacks churn_scores"):
        publish(scored, run_id="r2")
    assert digest(scored.warehouse.published_db) == before


def test_a_failure_while_copying_keeps_the_old_file_and_removes_the_temp(
    scored: ChurnConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(scored, run_id="r1")
    before = digest(scored.warehouse.published_db)

    def pause_then_fail(name: str) -> None:
        if name == "publish:before_replace":
            raise OSError("disk full")

    monkeypatch.setattr(publish_module, "pause_point", pause_then_fail)
    with pytest.raises(OSError, match="disk full"):
        publish(scored, run_id="r2")
    assert digest(scored.warehouse.published_db) == before
    assert leftovers(scored) == []


def test_stale_temp_files_of_a_dead_publish_are_removed(scored: ChurnConfig) -> None:
    folder = scored.warehouse.published_db.parent
    stale = folder / f".{scored.warehouse.published_db.name}.tmp-999999"
    stale.write_bytes(b"half a database")
    publish(scored, run_id="r1")
    assert not stale.exists()
    assert remove_stale_temps(scored.warehouse.published_db) == []


def test_a_reader_of_the_old_file_keeps_its_snapshot(scored: ChurnConfig) -> None:
    publish(scored, run_id="r1")
    old_rows = build_rows(scored, "churn_scores")
    reader = duckdb.connect(str(scored.warehouse.published_db), read_only=True)
    try:
        with connect(scored.warehouse.build_db) as con:
            con.execute("delete from churn_scores where hash(customer_id) % 2 = 0")
        new_rows = build_rows(scored, "churn_scores")
        publish(scored, run_id="r2")
        # The open connection still reads the old inode; a new one sees the new file.
        assert reader.execute("select count(*) from churn_scores").fetchall()[0][0] == old_rows
    finally:
        reader.close()
    with connect(scored.warehouse.published_db, read_only=True) as con:
        assert con.scalar("select count(*) from churn_scores") == new_rows < old_rows


def test_a_keyword_column_without_a_rename_stops_the_publish(scored: ChurnConfig) -> None:
    publish(scored, run_id="r1")
    before = digest(scored.warehouse.published_db)
    with connect(scored.warehouse.build_db) as con:
        con.execute('alter table pipeline_runs add column "order" integer')
    with pytest.raises(PublishError, match=r"'pipeline_runs' would have SQL-keyword column\(s\) order"):
        publish(scored, run_id="r2")
    assert digest(scored.warehouse.published_db) == before
    assert leftovers(scored) == []


def test_published_tables_are_documented_and_keyword_free(published_warehouse: ChurnConfig) -> None:
    """What a BI tool's data dictionary shows: every table and column has a comment, no name needs quoting."""
    config = published_warehouse
    with connect(config.warehouse.published_db, read_only=True) as con:
        tables = con.tables()
        assert {"churn_scores", "model_runs", FEATURE_DICTIONARY.name, INFO_TABLE} <= set(tables)
        mine = "schema_name = 'main' and database_name = current_database()"
        undocumented = con.rows(f"select table_name from duckdb_tables() where {mine} and coalesce(comment, '') = ''")
        assert undocumented == []
        bare = con.rows(f"select table_name, column_name from duckdb_columns() where {mine} "
                        "and coalesce(comment, '') = '' order by all")
        assert bare == []
        columns = con.rows(f"select table_name, column_name from duckdb_columns() where {mine}")
        assert [c for c in columns if is_sql_keyword(con, c[1])] == []
        comment = con.scalar(f"select comment from duckdb_columns() where {mine} and table_name = 'churn_scores' "
                             "and column_name = 'risk_band'")
        assert "will_churn" in comment
        # The old names still answer, for one release, through the legacy views.
        assert con.scalar(f"select min(rank) from {LEGACY_SCHEMA}.churn_scores") == 1
        assert con.scalar("select min(risk_rank) from churn_scores") == 1
        for table, renames in KEYWORD_RENAMES.items():
            if table in tables:
                legacy = dict(con.rows(
                    "select column_name, data_type from duckdb_columns() where schema_name = ? and table_name = ?",
                    [LEGACY_SCHEMA, table]))
                assert set(renames) <= set(legacy)
        dictionary = con.frame(f"select * from {FEATURE_DICTIONARY.name}")
    contract = current_contract(config)
    assert set(dictionary["column_name"]) == {contract.key, contract.as_of, contract.label, *contract.feature_names}
    features = dictionary[dictionary["role"] == "feature"]
    assert features["kind"].isin(["numeric", "categorical"]).all()
    assert features["description"].str.len().gt(0).all()
