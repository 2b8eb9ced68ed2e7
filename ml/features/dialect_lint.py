"""Refuse DuckDB-only SQL in the dbt project, so the same models build on Spark.

The project is written once in the dialect DuckDB and Spark share; the few
spellings they do not share live in `duckdb__` dispatch macros
(dbt_project/macros/cross_engine.sql). Building on Spark to find a stray
`::varchar` costs a JVM and minutes; this check reads the sources in well
under a second. It looks at the SQL text outside Jinja comments, `--`
comments, Jinja tags and `duckdb__` macro bodies (a `{{ ... }}` expression
counts as one opaque word), and reports each hit with file and line.

Rules cover what broke the first Spark build (issue 15). Semantic differences
a text rule cannot see (`date - date` is a day count in DuckDB, an interval in
Spark) are left to the Spark parity test (tests/test_spark_nightly.py).

    python -m ml.features.dialect_lint [dbt_project]   # exit 1 on any finding
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

# (pattern, why it fails on Spark and what to write instead)
RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), message)
    for pattern, message in (
        (r"::\s*(varchar|text|string)\b", "`::varchar`: Spark needs a length; cast(x as {{ dbt.type_string() }})"),
        (r"\basof\s+(left\s+)?join\b", "ASOF join is DuckDB-only; use {{ latest_before(...) }}"),
        (r",(\s*)(from\b|\))", "trailing comma before `from`/`)`: Spark refuses it"),
        (r"\barg_(max|min)\s*\(", "arg_max/arg_min are DuckDB names; write max_by/min_by (both engines)"),
        (r"\bhash\s*\(", "hash() differs by engine, so hash-based samples would too; use md5()"),
        (r"\b(generate_series|unnest)\s*\(", "generate_series/unnest are DuckDB-only; use {{ date_series(...) }}"),
        (r"\brange\s*\(", "the range() table function is DuckDB-only; use {{ date_series(...) }}"),
        (r"\bread_(parquet|csv|json)\w*\s*\(", "DuckDB file readers: read sources through {{ source(...) }}"),
        (r"\*\s*(exclude|replace)\s*\(", "`select * exclude/replace` is DuckDB-only; list the columns"),
        (r"/\s*\d+\.\d+(?![\d.e])", "division by a decimal literal is DECIMAL on Spark, DOUBLE on DuckDB; "
                                     "divide by cast(<literal> as double)"),
    )
)

JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.DOTALL)
DUCKDB_MACRO = re.compile(r"\{%-?\s*macro\s+duckdb__\w+.*?\{%-?\s*endmacro\s*-?%\}", re.DOTALL)
SQL_COMMENT = re.compile(r"--[^\n]*")
JINJA_TAG = re.compile(r"\{%.*?%\}", re.DOTALL)
JINJA_EXPRESSION = re.compile(r"\{\{.*?\}\}", re.DOTALL)
FOLDERS = ("models", "macros", "tests", "analyses", "snapshots")


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _blank(match: re.Match[str], keep: str = " ") -> str:
    """The match replaced by `keep` padding, newlines kept so line numbers stay true."""
    text = match.group(0)
    return re.sub(r"[^\n]", keep, text)


def shared_sql(text: str) -> str:
    """The text a rule may judge: comments, tags and duckdb__ bodies blanked, expressions one word."""
    text = JINJA_COMMENT.sub(_blank, text)
    text = DUCKDB_MACRO.sub(_blank, text)
    text = SQL_COMMENT.sub(_blank, text)
    text = JINJA_TAG.sub(_blank, text)
    # an expression renders to something, so it may stand between a comma and `from`
    return JINJA_EXPRESSION.sub(lambda m: "x" + _blank(m)[1:], text)


def lint_text(text: str, path: Path) -> list[Finding]:
    sql = shared_sql(text)
    findings = []
    for pattern, message in RULES:
        for match in pattern.finditer(sql):
            findings.append(Finding(path, sql.count("\n", 0, match.start()) + 1, message))
    return sorted(findings, key=lambda f: (str(f.path), f.line))


def lint_project(project: Path) -> list[Finding]:
    """Every finding in the project's SQL files, paths relative to `project`."""
    findings: list[Finding] = []
    for folder in FOLDERS:
        for sql_file in sorted((project / folder).rglob("*.sql")):
            findings += lint_text(sql_file.read_text(), sql_file.relative_to(project))
    return findings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    project = Path(args[0]) if args else Path(__file__).resolve().parents[2] / "dbt_project"
    findings = lint_project(project)
    for finding in findings:
        print(f"{project / finding.path}:{finding.line}: {finding.message}")
    if findings:
        print(f"dialect lint: {len(findings)} DuckDB-only construct(s) in {project}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
