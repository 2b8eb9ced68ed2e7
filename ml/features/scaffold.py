"""`churn new-dataset NAME --from FILE`: the files a new dataset needs, written from the file itself.

Bringing a new table to the pipeline is SQL and YAML only, but most of those
lines are boilerplate an analyst should not type: every column listed in the
source YAML with its type, a staging model that renames, casts and trims each
one, a mart and its contract with a role and kind per column, expectation
suites, and the dataset profile in churn.yml. This module reads the file's
columns and types with DuckDB, guesses the key and the label from names and
values, and writes all of it; what it could not know is marked `EDIT:` and
listed in what it prints, so the analyst's work starts where judgement does.

Nothing existing is overwritten: a dataset whose files or profile exist is
refused, naming the first file in the way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ml.config import ChurnConfig
from ml.warehouse import MEMORY, connect, is_numeric_type, quote, quote_literal

KEY_HINTS = re.compile(r"(^id$|_id$|^id_|customer|account|client|user|member)", re.IGNORECASE)
LABEL_HINTS = re.compile(r"(churn|exited|attrition|left|cancel|label|target)", re.IGNORECASE)
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class ScaffoldError(ValueError):
    """The dataset cannot be scaffolded as asked (bad name, unreadable file, files already there)."""


@dataclass(frozen=True)
class SourceColumn:
    """One column of the landing file, as DuckDB reads it."""

    name: str
    sql_type: str
    distinct: int
    nulls: int

    @property
    def snake(self) -> str:
        spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", self.name.strip())
        return re.sub(r"[^a-z0-9]+", "_", spaced.lower()).strip("_") or "column"

    @property
    def is_numeric(self) -> bool:
        return is_numeric_type(self.sql_type)

    @property
    def is_boolean(self) -> bool:
        return self.sql_type.upper() == "BOOLEAN"


@dataclass(frozen=True)
class FileProfile:
    path: Path
    file_format: str  # csv | parquet
    rows: int
    columns: tuple[SourceColumn, ...]


@dataclass(frozen=True)
class Roles:
    key: SourceColumn
    label: SourceColumn | None
    features: tuple[SourceColumn, ...]


@dataclass(frozen=True)
class MartNames:
    """The key, snapshot and label names the mart gives its roles.

    The file's own key and label names (snake_case) are kept: every stage reads
    the names from the contract, so `account_id` and `exited` need no renaming.
    The snapshot column (the file has none) and a missing label take churn.yml's
    `problem:` defaults.
    """

    key: str
    as_of: str
    label: str

    @classmethod
    def for_file(cls, config: ChurnConfig, roles: Roles) -> MartNames:
        label = roles.label.snake if roles.label is not None else config.problem.target
        return cls(roles.key.snake, config.problem.as_of_column, label)


@dataclass(frozen=True)
class ScaffoldResult:
    name: str
    written: tuple[Path, ...]
    next_steps: tuple[str, ...]


def read_file(path: Path) -> FileProfile:
    """Columns, types, distinct and null counts of a CSV or Parquet file."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ScaffoldError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ScaffoldError(f"{path}: expected a .csv or .parquet file")
    file_format = suffix[1:]
    reader = (f"read_csv({quote_literal(str(path))}, header = true)" if file_format == "csv"
              else f"read_parquet({quote_literal(str(path))})")
    with connect(MEMORY) as session:
        described = session.rows(f"describe select * from {reader}")
        if not described:
            raise ScaffoldError(f"{path}: no columns")
        stats = ", ".join(f"count(distinct {quote(c[0])}), count(*) - count({quote(c[0])})" for c in described)
        values = session.one(f"select count(*), {stats} from {reader}")
    rows = int(values[0])
    if rows == 0:
        raise ScaffoldError(f"{path}: no rows")
    columns = tuple(
        SourceColumn(name, str(sql_type), int(values[1 + 2 * i]), int(values[2 + 2 * i]))
        for i, (name, sql_type, *_rest) in enumerate(described)
    )
    snakes = [c.snake for c in columns]
    clashes = sorted({s for s in snakes if snakes.count(s) > 1})
    if clashes:
        raise ScaffoldError(f"{path}: columns {clashes} collide after renaming to snake_case; rename them")
    return FileProfile(path, file_format, rows, columns)


def guess_roles(profile: FileProfile, key: str | None = None, label: str | None = None) -> Roles:
    """The key (named like an id, unique, never null), the label (named like churn, two values), the rest."""
    by_name = {c.name: c for c in profile.columns}
    for given, what in ((key, "key"), (label, "label")):
        if given is not None and given not in by_name:
            raise ScaffoldError(f"{profile.path}: --{what} {given!r} is not a column ({', '.join(by_name)})")
    unique = [c for c in profile.columns if c.distinct == profile.rows and c.nulls == 0]
    key_column = by_name[key] if key else next(
        (c for c in unique if KEY_HINTS.search(c.name)), unique[0] if unique else None)
    if key_column is None:
        raise ScaffoldError(f"{profile.path}: no column is unique and never null; name the key with --key")
    binary = [c for c in profile.columns if c.distinct == 2 and c is not key_column]
    label_column = by_name[label] if label else next((c for c in binary if LABEL_HINTS.search(c.name)), None)
    features = tuple(c for c in profile.columns if c is not key_column and c is not label_column)
    return Roles(key_column, label_column, features)


def feature_kind(column: SourceColumn) -> str:
    """Numbers and flags are numeric features; text is categorical (an EDIT may turn codes into categories)."""
    return "numeric" if column.is_numeric or column.is_boolean else "categorical"


def _staging_expression(column: SourceColumn) -> str:
    source = quote(column.name)
    if column.is_numeric or column.is_boolean:
        return f"cast({source} as {column.sql_type.lower()}) as {quote(column.snake)}"
    if column.sql_type.upper().startswith(("DATE", "TIMESTAMP")):
        return f"cast({source} as {column.sql_type.lower()}) as {quote(column.snake)}"
    return f"lower(trim(cast({source} as varchar))) as {quote(column.snake)}"


def staging_sql(name: str, table: str, profile: FileProfile) -> str:
    renamed = ",\n        ".join(_staging_expression(c) for c in profile.columns)
    return f"""with

source as (

    select * from {{{{ source('{name}', '{table}') }}}}

),

renamed as (

    select
        {renamed}
    from source

),

deduplicated as (

    select distinct * from renamed

),

final as (

    select * from deduplicated

)

select * from final
"""


def _label_expression(roles: Roles, names: MartNames) -> str:
    """The label's select item, its trailing comma, and an EDIT comment on what to check."""
    if roles.label is None:
        return (f"cast(null as integer) as {names.label},"
                "  -- EDIT: no label column was found; compute 1 = churned, 0 = stayed")
    label = quote(roles.label.snake)
    if roles.label.is_numeric or roles.label.is_boolean:
        return f"cast({label} as integer) as {names.label},  -- EDIT: check that 1 means churned"
    return (f"cast({label} in ('yes', 'true', '1', 'churned', 'exited') as integer) as {names.label},"
            "  -- EDIT: check which value means churned")


def mart_sql(name: str, table: str, roles: Roles, names: MartNames, snapshot_date: dt.date) -> str:
    features = ",\n        ".join(quote(c.snake) for c in roles.features)
    return f"""with

customers as (

    select * from {{{{ ref('stg_{name}__{table}') }}}}

),

final as (

    select
        {quote(roles.key.snake)} as {names.key},
        -- EDIT: the file has no snapshot date; every row is one snapshot taken on this day
        cast('{snapshot_date.isoformat()}' as date) as {names.as_of},
        {_label_expression(roles, names)}
        -- EDIT: the raw columns as features; add engineered ones here (and in the YAML)
        {features}
    from customers

)

select * from final
"""


def sources_yaml(name: str, table: str, profile: FileProfile) -> dict:
    reader = ("read_csv('{{ var('landing_dir') }}/{name}.csv', header = true)" if profile.file_format == "csv"
              else "read_parquet('{{ var('landing_dir') }}/{name}.parquet')")
    return {"version": 2, "sources": [{
        "name": name,
        "description": f"Landing file {profile.path.name}, scaffolded by churn new-dataset.",
        "config": {"meta": {"external_location": reader}},
        "tables": [{
            "name": table,
            "description": f"{profile.rows:,d} rows as first read.",
            "columns": [{"name": c.name, "data_type": c.sql_type.lower(),
                         "description": f"{c.name} ({c.sql_type.lower()}; {c.distinct:,d} distinct, "
                                        f"{c.nulls:,d} missing when scaffolded)."} for c in profile.columns],
        }],
    }]}


def staging_yaml(name: str, table: str, roles: Roles) -> dict:
    return {"version": 2, "models": [{
        "name": f"stg_{name}__{table}",
        "description": f"The {table} landing file renamed to snake_case, cast, categories trimmed and lower-cased, "
                       "exact duplicate rows dropped.",
        "columns": [{"name": roles.key.snake, "description": "The key.", "data_tests": ["unique", "not_null"]}],
    }]}


def marts_yaml(name: str, roles: Roles, names: MartNames) -> dict:
    columns = [
        {"name": names.key, "description": f"The key ({roles.key.name} in the file).",
         "config": {"meta": {"role": "key"}}, "data_tests": ["unique", "not_null"]},
        {"name": names.as_of, "description": "The snapshot date.", "config": {"meta": {"role": "as_of"}},
         "data_tests": ["not_null"]},
        {"name": names.label, "description": "1 = churned, 0 = stayed.", "config": {"meta": {"role": "label"}},
         "data_tests": [{"accepted_values": {"arguments": {"values": [0, 1], "quote": False}}}]},
    ]
    columns += [{"name": c.snake, "description": f"{c.name} from the landing file.",
                 "config": {"meta": {"role": "feature", "kind": feature_kind(c)}}} for c in roles.features]
    return {"version": 2, "models": [{
        "name": f"{name}_features",
        "description": f"One row per {roles.key.snake} at the single snapshot of the {name} file: the label and "
                       "the raw columns as features (EDIT: describe what the mart adds).",
        "columns": columns,
    }]}


def _expectation(kind: str, severity: str, notes: str, **kwargs: object) -> dict:
    return {"type": kind, "kwargs": kwargs, "meta": {"severity": severity, "notes": notes}}


def suites(name: str, table: str, profile: FileProfile, roles: Roles) -> dict[str, dict]:
    """Default suites from the contract: volume, keys, label values, features' null shares.

    Mart and score suites name the key and label by placeholder, so renaming a
    role column in the mart's YAML needs no suite edit.
    """
    rows = {"min_value": {"$PARAMETER": "min_rows"}, "max_value": {"$PARAMETER": "max_rows"}}
    volume = _expectation("expect_table_row_count_to_be_between", "critical",
                          "Within quality.row_count_tolerance of the last audited run.", **rows)
    landing = [volume, _expectation("expect_column_values_to_not_be_null", "critical",
                                    "Every row has its key.", column=roles.key.name)]
    landing += [_expectation("expect_column_values_to_not_be_null", "warning",
                             "Null share no higher than when scaffolded, with a margin.", column=c.name,
                             mostly=round(max(0.0, 1 - c.nulls / profile.rows - 0.05), 3))
                for c in roles.features if c.nulls]
    mart = [volume,
            _expectation("expect_column_values_to_be_unique", "critical", "One row per key and snapshot.",
                         column="$entity_key"),
            _expectation("expect_column_values_to_be_in_set", "critical", "The label is 0 or 1.",
                         column="$target", value_set=[0, 1]),
            _expectation("expect_column_mean_to_be_between", "critical",
                         "Share of churners within quality.label_share_band.", column="$target",
                         min_value={"$PARAMETER": "label_share_min"}, max_value={"$PARAMETER": "label_share_max"})]
    scores = [_expectation("expect_column_values_to_be_between", "critical", "Probabilities lie in [0, 1].",
                           column="churn_probability", min_value=0, max_value=1),
              _expectation("expect_column_values_to_be_unique", "critical", "One score per key.",
                           column="$entity_key")]
    return {
        f"raw_{table}.json": {"name": f"{name}_raw_{table}", "meta": {"stage": "landing", "table": table,
                              "description": f"Landing {profile.path.name} before dbt."}, "expectations": landing},
        "mart_features.json": {"name": f"{name}_mart_features", "meta": {"stage": "mart", "table": "$feature_mart",
                               "description": "The feature mart after dbt build."}, "expectations": mart},
        "scores.json": {"name": f"{name}_scores", "meta": {"stage": "scores", "table": "churn_scores",
                        "description": "Tonight's churn_scores."}, "expectations": scores},
    }


def _profile_block(name: str, profile: FileProfile, config: ChurnConfig, snapshot_date: dt.date) -> str:
    """The dataset profile as YAML lines indented under `datasets:`."""
    try:
        landing = profile.path.parent.relative_to(config.root)
    except ValueError:
        landing = profile.path.parent
    block = yaml.safe_dump({name: {
        "description": f"Scaffolded from {profile.path.name} by churn new-dataset (EDIT: say what it is).",
        "landing_dir": str(landing),
        "landing_format": profile.file_format,
        "feature_mart": f"{name}_features",
        "generate_if_empty": False,
        "clock": snapshot_date.isoformat(),  # the one snapshot's date: tonight for this data
    }}, sort_keys=False)
    return "".join(f"  {line}\n" for line in block.splitlines())


def _add_profile(config: ChurnConfig, block: str) -> None:
    """Insert the dataset profile at the end of churn.yml's `datasets:` mapping, keeping its comments."""
    lines = config.source_file.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() == "datasets:")
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    lines.insert(end, block)
    config.source_file.write_text("".join(lines))


def scaffold(config: ChurnConfig, name: str, source: Path, key: str | None = None,
             label: str | None = None, snapshot_date: dt.date | None = None) -> ScaffoldResult:
    """Write the source, staging, mart, contract, suites and dataset profile of dataset `name`."""
    if not NAME_PATTERN.match(name):
        raise ScaffoldError(f"dataset name {name!r}: use lower-case letters, digits and _, starting with a letter")
    if name in config.datasets:
        raise ScaffoldError(f"dataset {name!r} already has a profile in {config.source_file}")
    profile = read_file(source)
    roles = guess_roles(profile, key, label)
    names = MartNames.for_file(config, roles)
    table = re.sub(r"[^a-z0-9]+", "_", profile.path.stem.lower()).strip("_")
    if table != profile.path.stem:
        raise ScaffoldError(f"{profile.path}: rename the file to {table}{profile.path.suffix} "
                            "(dbt reads a landing file by its table name)")
    models = config.warehouse.dbt_project_dir / "models"
    snapshot_date = snapshot_date or dt.date.fromtimestamp(profile.path.stat().st_mtime)
    files: dict[Path, str] = {
        models / "staging" / name / f"_{name}__sources.yml": yaml.safe_dump(sources_yaml(name, table, profile),
                                                                          sort_keys=False),
        models / "staging" / name / f"_{name}__models.yml": yaml.safe_dump(staging_yaml(name, table, roles),
                                                                         sort_keys=False),
        models / "staging" / name / f"stg_{name}__{table}.sql": staging_sql(name, table, profile),
        models / "marts" / f"_{name}_marts__models.yml": yaml.safe_dump(marts_yaml(name, roles, names),
                                                                       sort_keys=False),
        models / "marts" / f"{name}_features.sql": mart_sql(name, table, roles, names, snapshot_date),
    }
    files |= {config.warehouse.expectations_dir / name / file: json.dumps(suite, indent=2) + "\n"
              for file, suite in suites(name, table, profile, roles).items()}
    in_the_way = [p for p in files if p.exists()]
    if in_the_way:
        raise ScaffoldError(f"dataset {name!r}: {in_the_way[0]} exists already; nothing was written")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    _add_profile(config, _profile_block(name, profile, config, snapshot_date))
    steps = (
        f"key: {roles.key.name} -> {roles.key.snake}; label: "
        + (f"{roles.label.name} -> {roles.label.snake}" if roles.label else "NOT FOUND (edit the mart)"),
        f"review the lines marked EDIT: in {models / 'marts' / f'{name}_features.sql'}",
        f"check each feature's kind in {models / 'marts' / f'_{name}_marts__models.yml'}",
        f"churn contract --dataset {name}   # what training will see",
        f"make nightly DATASET={name}",
    )
    return ScaffoldResult(name, tuple(files) + (config.source_file,), steps)


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    result = scaffold(config, args.name, Path(args.source), key=args.key, label=args.label,
                      snapshot_date=args.snapshot_date)
    print(f"dataset {result.name!r} scaffolded:")
    for path in result.written:
        print(f"  wrote {path}")
    print("next:")
    for step in result.next_steps:
        print(f"  {step}")
    return 0
