"""Default expectation suites for a dataset that has none, generated from its contract.

A dataset without suites used to pass its audit with 0 expectations, which
reads like a clean bill of health. Instead the audit warns loudly and judges a
default suite: keys present and unique per snapshot, the label 0/1 and within
quality.label_share_band, and each feature's null share and (numeric) range as
the first audited run saw them. The suite is written once, to
`<warehouse_dir>/generated_suites/<dataset>/`, so later runs are judged
against the first run rather than against themselves; copy it into
`expectations/<dataset>/` to review and own it (a suite there always wins).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ml.config import ChurnConfig
from ml.data.landing import landing_tables
from ml.features.contract import FeatureContract
from ml.features.mart import current_contract
from ml.warehouse import connect, quote

GENERATED_DIR = "generated_suites"
# Margins around the first run's observations: warnings, not noise on every run.
NULL_SHARE_MARGIN = 0.05
RANGE_MOSTLY = 0.95

ROWS = {"min_value": {"$PARAMETER": "min_rows"}, "max_value": {"$PARAMETER": "max_rows"}}


def generated_folder(config: ChurnConfig) -> Path:
    return config.warehouse.dir / GENERATED_DIR / config.dataset.name


def _expectation(kind: str, severity: str, notes: str, **kwargs: Any) -> dict[str, Any]:
    return {"type": kind, "kwargs": kwargs, "meta": {"severity": severity, "notes": notes}}


def _suite(config: ChurnConfig, stage: str, table: str, expectations: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": f"{config.dataset.name}_default_{stage}_{table.strip('$')}",
            "meta": {"stage": stage, "table": table, "generated": True,
                     "description": "Generated from the contract because the dataset has no suite of this stage."},
            "expectations": expectations}


def _feature_expectations(config: ChurnConfig, contract: FeatureContract) -> list[dict[str, Any]]:
    """Null share and range of each feature as the mart holds them now (the first audited run)."""
    mart = quote(config.dataset.feature_mart)
    numeric = set(contract.numeric)
    parts = [f"count({quote(f)})::double / greatest(count(*), 1)" for f in contract.feature_names]
    parts += [f"min({quote(f)})::double, max({quote(f)})::double" for f in contract.numeric]
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        values = list(session.one(f"select {', '.join(parts)} from {mart}"))
    shares = dict(zip(contract.feature_names, values[: len(contract.feature_names)], strict=True))
    bounds = values[len(contract.feature_names):]
    out = []
    for feature in contract.feature_names:
        share = float(shares[feature])
        if share < 1.0:
            out.append(_expectation(
                "expect_column_values_to_not_be_null", "warning",
                f"Known for {share:.1%} of rows in the first audited run (less {NULL_SHARE_MARGIN:.0%}).",
                column=feature, mostly=round(max(0.0, share - NULL_SHARE_MARGIN), 4)))
        else:
            out.append(_expectation("expect_column_values_to_not_be_null", "warning",
                                    "Never null in the first audited run.", column=feature, mostly=0.99))
    for i, feature in enumerate(f for f in contract.feature_names if f in numeric):
        low, high = bounds[2 * i], bounds[2 * i + 1]
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            continue
        out.append(_expectation(
            "expect_column_values_to_be_between", "warning",
            f"Within the first audited run's range [{low:g}, {high:g}] for {RANGE_MOSTLY:.0%} of rows.",
            column=feature, min_value=low, max_value=high, mostly=RANGE_MOSTLY))
    return out


def default_suites(config: ChurnConfig, stage: str) -> list[dict[str, Any]]:
    """The generated suites of one stage (GX suite JSON, with the audit's placeholders)."""
    if stage == "landing":
        return [_suite(config, stage, t.name, [_expectation(
            "expect_table_row_count_to_be_between", "critical",
            "Within quality.row_count_tolerance of the last audited run.", **ROWS)])
            for t in landing_tables(config)]
    if stage == "mart":
        contract = current_contract(config)
        return [_suite(config, stage, "$feature_mart", [
            _expectation("expect_table_row_count_to_be_between", "critical",
                         "Within quality.row_count_tolerance of the last audited run.", **ROWS),
            _expectation("expect_column_values_to_not_be_null", "critical", "Every row has its key.",
                         column="$entity_key"),
            _expectation("expect_column_values_to_not_be_null", "critical", "Every row has its snapshot date.",
                         column="$as_of_column"),
            _expectation("expect_compound_columns_to_be_unique", "critical", "One row per key and snapshot.",
                         column_list=["$entity_key", "$as_of_column"]),
            _expectation("expect_column_values_to_be_in_set", "critical", "The label is 0 or 1 (or not yet known).",
                         column="$target", value_set=[0, 1]),
            _expectation("expect_column_mean_to_be_between", "critical",
                         "Share of churners within quality.label_share_band.", column="$target",
                         min_value={"$PARAMETER": "label_share_min"}, max_value={"$PARAMETER": "label_share_max"}),
            *_feature_expectations(config, contract),
        ])]
    return [_suite(config, stage, "churn_scores", [
        _expectation("expect_table_row_count_to_equal", "critical",
                     "Every customer of the latest snapshot is scored, once.",
                     value={"$PARAMETER": "active_customers"}),
        _expectation("expect_column_values_to_be_unique", "critical", "One score per key.", column="$entity_key"),
        _expectation("expect_column_values_to_not_be_null", "critical", "Every score has its key.",
                     column="$entity_key"),
        _expectation("expect_column_values_to_be_between", "critical", "Probabilities lie in [0, 1].",
                     column="churn_probability", min_value=0, max_value=1),
    ])]


def write_default_suites(config: ChurnConfig, stage: str) -> list[Path]:
    """The stage's generated suite files: written on the first run, kept (and reused) after."""
    folder = generated_folder(config)
    existing = [p for p in sorted(folder.glob("*.json"))
                if json.loads(p.read_text()).get("meta", {}).get("stage") == stage] if folder.exists() else []
    if existing:
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suite in default_suites(config, stage):
        path = folder / f"{suite['name']}.json"
        path.write_text(json.dumps(suite, indent=2) + "\n")
        paths.append(path)
    return paths
