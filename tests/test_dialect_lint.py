"""The dialect lint refuses DuckDB-only SQL with file and line, and passes the shipped project.

Each DuckDB-only construct that broke the first Spark build is planted in a
copy of a real model; the lint must name that file and the planted line. The
same text inside a `duckdb__` dispatch macro (where DuckDB-only SQL belongs)
must pass.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ml.features.dialect_lint import lint_project, main

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT = REPO_ROOT / "dbt_project"
MODEL = Path("models/staging/saas/stg_saas__customers.sql")
ANCHOR = "        signup_date::date as signup_date,\n"

# construct -> (line planted after ANCHOR, words the finding must contain)
PLANTS = {
    "varchar_cast": ("        customer_id::varchar as customer_key,\n", "::varchar"),
    "asof_join": ("        (select 1 from source as a asof left join source as b on a.x >= b.x) as one,\n", "ASOF"),
    "trailing_comma": ("        region as region_raw,\n    from source,\n", "trailing comma"),
    "arg_max": ("        (select arg_max(region, signup_date) from source) as latest_region,\n", "arg_max"),
}


def test_shipped_project_is_clean() -> None:
    assert lint_project(PROJECT) == []


@pytest.mark.parametrize("construct", sorted(PLANTS))
def test_planted_duckdb_only_construct_is_refused_with_file_and_line(
    construct: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "dbt_project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("target", "logs"))
    planted, words = PLANTS[construct]
    text = (project / MODEL).read_text()
    assert text.count(ANCHOR) == 1, f"{MODEL} no longer contains the line this test plants after"
    (project / MODEL).write_text(text.replace(ANCHOR, ANCHOR + planted))
    line = text[: text.index(ANCHOR)].count("\n") + 2

    findings = lint_project(project)

    assert [(f.path, f.line) for f in findings] == [(MODEL, line)]
    assert words in findings[0].message
    assert main([str(project)]) == 1
    assert f"{project / MODEL}:{line}:" in capsys.readouterr().out


def test_duckdb_dispatch_macros_may_use_duckdb_sql(tmp_path: Path) -> None:
    project = tmp_path / "dbt_project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("target", "logs"))
    body = "select arg_max(a, b)::varchar, from t asof left join u on t.d >= u.d"
    (project / "macros" / "planted.sql").write_text(
        "{% macro duckdb__planted() %}\n" + body + "\n{% endmacro %}\n"
        "{% macro default__planted() %}\n" + body + "\n{% endmacro %}\n"
    )
    findings = lint_project(project)
    # only the default__ copy (lines 4-5) is judged
    assert {f.line for f in findings} == {5}
    assert {f.path for f in findings} == {Path("macros/planted.sql")}
