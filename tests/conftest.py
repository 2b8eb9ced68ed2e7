"""Shared fixtures: a private warehouse per test session, on small generated data.

Generating and building once per session keeps `make test` to a few minutes;
tests that change the warehouse copy it first (`private_warehouse`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from ml.config import ChurnConfig, load_config, write_relocated_config
from ml.warehouse import Session, connect

REPO_ROOT = Path(__file__).resolve().parent.parent

# Small but not tiny: enough churners per monthly snapshot for stable metrics.
SMALL_GENERATOR = {"customers": 3000, "months": 18, "start_date": "2024-01-01", "seed": 7}


def make_config(root: Path, overrides: dict | None = None) -> ChurnConfig:
    """A config whose warehouse lives under `root`, reading the repo's SQL and suites."""
    base = load_config(REPO_ROOT / "churn.yml")
    merged = {"generator": dict(SMALL_GENERATOR), **(overrides or {})}
    return load_config(write_relocated_config(base, root, merged))


@pytest.fixture(scope="session")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    """Config for a session-wide warehouse with small generated demo data."""
    return make_config(tmp_path_factory.mktemp("warehouse"))


@pytest.fixture(scope="session")
def generated(small_config: ChurnConfig) -> ChurnConfig:
    """Small demo landing data (and oracle) written once per session."""
    from ml.data.generate import GenerateOptions, generate

    generate(GenerateOptions.from_config(small_config))
    return small_config


@pytest.fixture(scope="session")
def built_warehouse(generated: ChurnConfig) -> ChurnConfig:
    """The session warehouse after `dbt build`. Treat as read-only; copy to change it."""
    from ml.features.build import build_warehouse

    build_warehouse(generated)
    return generated


def copy_warehouse(config: ChurnConfig, root: Path, overrides: dict | None = None) -> ChurnConfig:
    """A private copy of a built warehouse (build DB, dbt target, models) under `root`."""
    new = make_config(root, overrides)
    shutil.copytree(config.warehouse.dir, new.warehouse.dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("churn.yml"))
    return new


@pytest.fixture
def private_warehouse(built_warehouse: ChurnConfig, tmp_path: Path) -> ChurnConfig:
    """A built warehouse this test may change freely."""
    return copy_warehouse(built_warehouse, tmp_path / "wh")


# Enough search to pick a sensible model, little enough to train in a minute or two; three
# out-of-time snapshots give the quality tests enough churners (~160) for stable metrics.
# small_table_iterations too: on a table of a few thousand rows (scaffolded datasets) the default
# 12 draws per candidate would otherwise replace the quick search.
QUICK_TRAINING = {"training": {"search_iterations": 2, "small_table_iterations": 2, "cv_folds": 3,
                               "out_of_time_snapshots": 3}}


@pytest.fixture(scope="session")
def trained_warehouse(built_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    """A copy of the built warehouse with a champion trained once (quick search). Read-only;
    use `copy_warehouse(trained_warehouse, root, QUICK_TRAINING)` to change it."""
    from ml.modeling.train import train

    config = copy_warehouse(built_warehouse, tmp_path_factory.mktemp("trained"), QUICK_TRAINING)
    train(config)
    return config


@pytest.fixture(scope="session")
def published_warehouse(trained_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> ChurnConfig:
    """A copy of the trained warehouse after one complete nightly: scored, audited and published.
    Read-only; bad-input, crash and concurrency tests copy it with `copy_warehouse`."""
    from ml.pipeline import nightly

    config = copy_warehouse(trained_warehouse, tmp_path_factory.mktemp("published"), QUICK_TRAINING)
    nightly(config)
    return config


def query(config: ChurnConfig, sql: str, params: list | None = None) -> pd.DataFrame:
    """Read the build database (read-only) into a DataFrame."""
    with connect(config.warehouse.build_db, read_only=True) as con:
        return con.frame(sql, params or [])


def rewrite(config: ChurnConfig, table: str, select: str) -> None:
    """Replace a landing Parquet file by `select` over its rows (available as `t`): how tests plant faults.

    A raw DuckDB connection on purpose: the planted file is written the way an
    upstream extract would write it, outside the pipeline's own warehouse layer.
    """
    path = config.dataset.landing_dir / f"{table}.parquet"
    new = path.with_suffix(".new")
    with duckdb.connect() as con:
        con.execute(f"create view t as select * from read_parquet('{path}')")
        con.execute(f"copy ({select}) to '{new}' (format parquet)")
    new.replace(path)


@pytest.fixture(scope="session")
def spark_warehouse(small_config: ChurnConfig, tmp_path_factory: pytest.TempPathFactory):
    """The test process's one Spark session (local mode), on its own Derby and table folder.

    One JVM per process, and the JVM keeps the Derby folder it started with, so
    every in-process Spark test module shares this session and adds tables of
    its own names to its `churn` schema (dbt runs go to subprocesses instead).
    """
    pytest.importorskip("pyspark", reason="needs the .[spark] extra (make test-spark)")
    from ml.warehouse.spark import spark_session

    folder = tmp_path_factory.mktemp("spark")
    with pytest.MonkeyPatch.context() as env:
        # the factory must point the workers at this interpreter itself (make test-spark sets it for dbt)
        env.delenv("PYSPARK_PYTHON", raising=False)
        with spark_session(folder, small_config.spark) as warehouse:
            yield warehouse


@pytest.fixture(scope="module")
def service(published_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory):
    """A scoring service over the published session warehouse (one per test module)."""
    from ml.serving.api import ScoringService

    svc = ScoringService(published_warehouse, workdir=tmp_path_factory.mktemp("serve"))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    """An in-process HTTP client of `service`'s FastAPI app."""
    from fastapi.testclient import TestClient

    from ml.serving.api import asgi_app

    with TestClient(asgi_app(service)) as test_client:
        yield test_client


@dataclass
class CountingReader:
    """The Reader vocabulary over a DuckDB session, counting the rows each statement returns: a test
    that a stage fetches no row per customer reads through it (no `chunks`: streaming fails here)."""

    inner: Session
    returned: list[tuple[str, int]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.inner.path

    def frame(self, sql: str, params: Any = None) -> pd.DataFrame:
        out = self.inner.frame(sql, params)
        self.returned.append((sql, len(out)))
        return out

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        out = self.inner.rows(sql, params)
        self.returned.append((sql, len(out)))
        return out

    def one(self, sql: str, params: Any = None) -> tuple[Any, ...] | None:
        return (self.rows(sql, params) or [None])[0]

    def scalar(self, sql: str, params: Any = None) -> Any:
        row = self.one(sql, params)
        return row[0] if row else None

    def exists(self, table: Any) -> bool:
        return self.inner.exists(table)

    def columns(self, table: Any) -> dict[str, str]:
        return self.inner.columns(table)
