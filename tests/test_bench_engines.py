"""benchmarks.engines judges Spark against DuckDB only on nights both engines finished."""

from __future__ import annotations

import sys

from benchmarks.engines import engine_env, ratios


def night(wall: float, cpu: float, steps: dict[str, float]) -> dict[str, object]:
    return {"wall_s": wall, "cpu_s": cpu, "steps": steps}


def test_ratios_per_night_and_per_step_both_engines_ran() -> None:
    duck = {"engine": "duckdb", "status": "ok", "nights": {
        "first_nightly": night(50, 60, {"build": 10, "train": 20, "score": 0.0}),
        "second_nightly": night(20, 25, {"build": 5})}}
    spark = {"engine": "spark", "status": "ok", "nights": {
        "first_nightly": night(250, 150, {"build": 80, "train": 22, "score": 3, "spark_only": 1}),
        "second_nightly": night(100, 50, {"build": 40})}}
    out = ratios([duck, spark])
    assert out["first_nightly"] == {"wall": 5.0, "cpu": 2.5, "steps": {"build": 8.0, "train": 1.1}}
    assert out["second_nightly"]["steps"] == {"build": 8.0}


def test_a_failed_engine_gives_no_ratio() -> None:
    duck = {"engine": "duckdb", "status": "ok", "nights": {"first_nightly": night(50, 60, {})}}
    spark = {"engine": "spark", "status": "first_nightly exited 2: ...", "nights": {}}
    assert ratios([duck, spark]) == {}


def test_engine_env_is_what_make_nightly_sets() -> None:
    assert engine_env("duckdb") == {"CHURN_ENGINE": "duckdb"}
    assert engine_env("spark") == {"CHURN_ENGINE": "spark", "PYSPARK_PYTHON": sys.executable}
