"""`churn score`: score every active customer with the champion into `churn_scores`.

BI tools read one table with one row per active customer at the latest
snapshot: calibrated probability, the yes/no decision at the model's chosen
threshold, a risk band, a rank, and the top reasons. Each run also lands in
`churn_scores_history` (one row per customer, snapshot and model version), which
monitoring joins to realised labels once the horizon has passed.

Before scoring, the mart is checked against the contract the model was trained
on: a dropped, renamed or retyped feature column stops the run with the
column's name instead of producing silently wrong scores. Both tables are
replaced in one transaction, so a failed run never leaves half a night's scores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
import uuid
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import ContractError, FeatureContract, load_contract
from ml.features.dbt import dbt_target_path
from ml.modeling.explain import Explainer, top_k
from ml.logs import get_logger, timed
from ml.modeling.model import ChurnModel
from ml.modeling.registry import load_champion
from ml.warehouse import connect, table_columns, table_exists

log = get_logger("score")

SCORES_TABLE = "churn_scores"
HISTORY_TABLE = "churn_scores_history"
# Rows per chunk: bounds memory (features + contributions) at a million customers.
DEFAULT_CHUNK_ROWS = 200_000
# DuckDB hands results over in vectors of this many rows.
DUCKDB_VECTOR_ROWS = 2048
NUMERIC_TYPE_PREFIXES = (
    "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
    "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "REAL", "DOUBLE", "DECIMAL", "NUMERIC", "BOOLEAN",
)


class ScoreError(RuntimeError):
    """Scoring cannot run: no champion, no mart, or no rows to score."""


@dataclass(frozen=True)
class ScoreResult:
    """What one scoring run wrote, for logs, the nightly summary and tests."""

    run_id: str
    model_version: str
    as_of_date: dt.date
    rows: int
    flagged: int
    seconds: float

    @property
    def flagged_share(self) -> float:
        return self.flagged / self.rows if self.rows else 0.0


def _is_numeric_type(duckdb_type: str) -> bool:
    return duckdb_type.upper().startswith(NUMERIC_TYPE_PREFIXES)


def check_mart(
    model_contract: FeatureContract,
    current: FeatureContract,
    table: str,
    columns: dict[str, str],
    version: str = "the model",
) -> None:
    """Refuse a mart that no longer matches the contract the model was trained on.

    Three checks, all reported together: the contract in today's manifest
    (missing or re-kinded features, changed key/as_of columns), the table's
    actual columns, and each numeric feature's SQL type.
    """
    problems = [f"manifest: {p}" for p in model_contract.diff(current)]
    required = [model_contract.key, model_contract.as_of, *model_contract.feature_names]
    problems += [f"column {c!r} is missing from the table" for c in required if c not in columns]
    problems += [
        f"numeric feature {c!r} has type {columns[c]} (expected a number)"
        for c in model_contract.numeric
        if c in columns and not _is_numeric_type(columns[c])
    ]
    if problems:
        raise ContractError(
            f"table {table!r} does not match the feature contract {version} was trained on: "
            + "; ".join(problems)
            + ". Retrain (churn train --force) or restore the column(s)."
        )


def risk_bands(probability: np.ndarray, bands: dict[str, float]) -> np.ndarray:
    """Name of the highest band whose lower bound is <= the probability (None below all)."""
    ordered = sorted(bands.items(), key=lambda item: item[1])
    bounds = np.array([bound for _, bound in ordered])
    names = np.array([name for name, _ in ordered] + [None], dtype=object)
    index = np.searchsorted(bounds, probability, side="right") - 1
    return np.where(index >= 0, names[index], None)


def score_frame(
    model: ChurnModel, explainer: Explainer, frame: pd.DataFrame, n_reasons: int, source: str = "input frame"
) -> pd.DataFrame:
    """Probability, decision and reasons for the rows of one chunk (rank and band come later).

    The chunk is preprocessed once and shared by the score and its reasons;
    the probability is the model's own calibrator applied to the estimator's
    score, i.e. exactly `model.predict_proba`.
    """
    matrix = explainer.matrix(frame, source)
    probability = model.calibrator.predict(explainer.raw_scores(matrix))
    out = pd.DataFrame(
        {
            model.contract.key: frame[model.contract.key].to_numpy(),
            model.contract.as_of: frame[model.contract.as_of].to_numpy(),
            "churn_probability": probability.astype(np.float64),
            "will_churn": probability >= model.threshold,
        },
        index=frame.index,
    )
    reasons = top_k(explainer.contributions(matrix, frame.index).values, n_reasons)
    return pd.concat([out, reasons], axis=1)


def _read_chunks(con: duckdb.DuckDBPyConnection, sql: str, params: list, chunk_rows: int):
    result = con.execute(sql, params)
    vectors = max(1, math.ceil(chunk_rows / DUCKDB_VECTOR_ROWS))
    while True:
        chunk = result.fetch_df_chunk(vectors)
        if chunk.empty:
            return
        yield chunk


def _write_scores(
    con: duckdb.DuckDBPyConnection,
    scores: pd.DataFrame,
    as_of_column: str,
    as_of_type: str,
    as_of_date: dt.date,
    version: str,
) -> None:
    """Replace churn_scores and this (snapshot, model version)'s history rows in one transaction."""
    con.register("_scores", scores)
    try:
        con.execute("begin transaction")
        select = f'select * replace (cast("{as_of_column}" as {as_of_type}) as "{as_of_column}") from _scores'
        # churn_scores holds the latest snapshot only; recreating it also follows a changed layout.
        con.execute(f'create or replace table "{SCORES_TABLE}" as {select}')
        if not table_exists(con, HISTORY_TABLE):
            con.execute(f'create table "{HISTORY_TABLE}" as {select} limit 0')
        existing = table_columns(con, HISTORY_TABLE)
        current = table_columns(con, SCORES_TABLE)
        for name, dtype in current.items():
            if name not in existing:  # e.g. scoring.top_reasons was raised
                con.execute(f'alter table "{HISTORY_TABLE}" add column "{name}" {dtype}')
        con.execute(
            f'delete from "{HISTORY_TABLE}" where "{as_of_column}" = ? and model_version = ?',
            [as_of_date, version],
        )
        con.execute(f'insert into "{HISTORY_TABLE}" by name {select}')
        con.execute("commit")
    except Exception:
        con.execute("rollback")
        raise
    finally:
        con.unregister("_scores")


def score(
    config: ChurnConfig, run_id: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> ScoreResult:
    """Score the latest snapshot of the feature mart with the champion model."""
    started = time.perf_counter()
    run_id = run_id or dt.datetime.now().strftime("score-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    model = load_champion(config)
    if model is None:
        raise ScoreError("no champion model; run churn train")
    mart = config.dataset.feature_mart
    if model.contract.model != mart:
        raise ScoreError(
            f"the champion ({model.version}) was trained on {model.contract.model!r}, "
            f"but dataset {config.dataset.name!r} uses {mart!r}; run churn train"
        )
    current = load_contract(dbt_target_path(config) / "manifest.json", mart)
    contract = model.contract
    n_reasons = config.scoring.top_reasons
    version = str(model.version)
    with connect(config.warehouse.build_db) as con:
        if not table_exists(con, mart):
            raise ScoreError(f"feature mart {mart!r} not found in {config.warehouse.build_db}; run churn build")
        columns = table_columns(con, mart)
        check_mart(contract, current, mart, columns, version)
        as_of_date, total = con.execute(
            f'select max("{contract.as_of}"), count(*) filter (where "{contract.as_of}" = '
            f'(select max("{contract.as_of}") from "{mart}")) from "{mart}"'
        ).fetchone()
        if not total:
            raise ScoreError(f"feature mart {mart!r} has no rows to score")
        selected = ", ".join(f'"{c}"' for c in [contract.key, contract.as_of, *contract.feature_names])
        sql = f'select {selected} from "{mart}" where "{contract.as_of}" = ? order by "{contract.key}"'
        parts: list[pd.DataFrame] = []
        with timed(f"score {total:,d} rows of {mart} as of {as_of_date} with {version}", log):
            done = 0
            explainer = Explainer(model)
            for chunk in _read_chunks(con, sql, [as_of_date], chunk_rows):
                parts.append(score_frame(model, explainer, chunk, n_reasons, f"feature mart {mart!r}"))
                done += len(chunk)
                log.info("scored %d/%d rows (%.0f%%)", done, total, 100 * done / total)
        scores = pd.concat(parts, ignore_index=True)
        scores["risk_band"] = pd.array(
            risk_bands(scores["churn_probability"].to_numpy(), config.scoring.risk_bands), dtype="string"
        )
        # 1 = highest risk; ties broken by key so ranks are unique and stable across re-runs.
        order = np.lexsort((scores[contract.key].to_numpy(), -scores["churn_probability"].to_numpy()))
        rank = np.empty(len(scores), dtype=np.int64)
        rank[order] = np.arange(1, len(scores) + 1)
        scores["rank"] = rank
        scores["model_version"] = version
        scores["scored_at"] = pd.Timestamp(dt.datetime.now())
        scores["run_id"] = run_id
        layout = [contract.key, contract.as_of, "churn_probability", "will_churn", "risk_band", "rank"]
        reasons = [c for c in scores.columns if c.startswith("reason_")]
        scores = scores[[*layout, *reasons, "model_version", "scored_at", "run_id"]]
        with timed(f"write {SCORES_TABLE} and {HISTORY_TABLE}", log):
            _write_scores(con, scores, contract.as_of, columns[contract.as_of], as_of_date, version)
    flagged = int(scores["will_churn"].sum())
    result = ScoreResult(
        run_id=run_id,
        model_version=version,
        as_of_date=as_of_date,
        rows=len(scores),
        flagged=flagged,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "scored %d customers as of %s with %s: %d flagged (%.1f%%) in %.1fs",
        result.rows, as_of_date, version, flagged, 100 * result.flagged_share, result.seconds,
    )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
        help=f"rows scored per chunk; bounds memory (default {DEFAULT_CHUNK_ROWS:,d})",
    )


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    result = score(config, chunk_rows=args.chunk_rows)
    print(
        f"{SCORES_TABLE}: {result.rows:,d} customers as of {result.as_of_date}, "
        f"{result.flagged:,d} flagged ({result.flagged_share:.1%}), model {result.model_version}"
    )
    return 0
