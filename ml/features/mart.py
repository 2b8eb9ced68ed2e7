"""Checked reads of the feature mart: the one place the ML layer reads dbt's mart.

The mart is dbt's table; its shape is the contract in dbt's manifest. Every
stage that reads it (training, the registry's champion comparison, scoring,
monitoring, the profile) first refuses a mart that is missing or does not
match the contract, naming the table and the columns, and then reads only the
contract's columns. Keeping those reads here breaks what used to be a cycle
(training and the registry both need the evaluation rows) and means a second
engine needs one more implementation of this module, not of five stages.

The reads typed `Reader` run on a DuckDB session and on Spark's
`SparkWarehouse` alike (the mart is the data plane the nightly moves to
Spark), so their SQL is the dialect both engines share; `snapshot_chunks`
streams, which only DuckDB's session does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import ContractError, FeatureContract, load_contract
from ml.features.dbt import dbt_target_path
from ml.logs import get_logger
from ml.warehouse import Reader, Session, column_list, connect, is_numeric_type, quote

# The capped training sample compares a hex prefix of md5(key || ':' || seed) with a cut: md5,
# substr, || and string comparison compute the same on DuckDB and Spark (hash() differs by
# engine), so both select the same customers. 8 hex digits: shares in steps of 2^-32.
SAMPLE_HEX_DIGITS = 8

log = get_logger("mart")


class MartError(ContractError):
    """The feature mart is missing, empty, or does not match the feature contract."""


class TrainingError(RuntimeError):
    """The labelled mart cannot support training (empty, one class, labels not 0/1)."""


def current_contract(config: ChurnConfig) -> FeatureContract:
    """The active dataset's mart contract, from the manifest of the last dbt run."""
    return load_contract(dbt_target_path(config) / "manifest.json", config.dataset.feature_mart)


def mart_columns(
    session: Reader, config: ChurnConfig, contract: FeatureContract,
    require_label: bool = False, numeric_label: bool = False,
) -> dict[str, str]:
    """The mart's column types, after refusing a mart that is absent or lacks contract columns.

    `require_label` also needs the label column (training, profiling);
    `numeric_label` checks the label's type with the numeric features'.
    """
    mart = config.dataset.feature_mart
    if not session.exists(mart):
        raise MartError(f"feature mart {mart!r} not found in {session.path} (run `churn build` first)")
    columns = session.columns(mart)
    contract.check_columns(mart, columns)
    if require_label and contract.label not in columns:
        raise MartError(f"feature mart {mart!r} in {session.path}: label column {contract.label!r} is missing")
    typed = [*contract.numeric, *([contract.label] if numeric_label else [])]
    not_numeric = [f"{c} ({columns[c]})" for c in typed if c in columns and not is_numeric_type(columns[c])]
    if not_numeric:
        raise MartError(
            f"feature mart {mart!r} in {session.path}: column(s) declared numeric in the contract have "
            f"non-numeric types: {', '.join(not_numeric)}"
        )
    return columns


def check_mart(
    model_contract: FeatureContract,
    current: FeatureContract,
    table: str,
    columns: dict[str, str],
    version: str = "the model",
) -> None:
    """Refuse a mart that no longer matches the contract a model was trained on.

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
        if c in columns and not is_numeric_type(columns[c])
    ]
    if problems:
        raise ContractError(
            f"table {table!r} does not match the feature contract {version} was trained on: "
            + "; ".join(problems)
            + ". Retrain (churn train --force) or restore the column(s)."
        )


@contextmanager
def mart_reader(config: ChurnConfig, data: Reader | None = None) -> Iterator[Reader]:
    """Where a stage reads the mart: `data` when the caller has it on an engine (Spark), else a session
    on the build database for the block, as before engines were configurable. The caller's `data` is
    not closed: it outlives the stage."""
    if data is not None:
        yield data
        return
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        yield session


def _labelled_select(config: ChurnConfig, contract: FeatureContract) -> str:
    return (f"select {column_list(contract.columns)} from {quote(config.dataset.feature_mart)} "
            f"where {quote(contract.label)} is not null")


def sample_cut(share: float) -> str:
    """The hex prefix below which about `share` of md5 digests fall."""
    buckets = 16 ** SAMPLE_HEX_DIGITS
    return f"{min(max(int(share * buckets), 0), buckets - 1):0{SAMPLE_HEX_DIGITS}x}"


def sample_predicate(key: str, seed: int, share: float) -> str:
    """SQL true for about `share` of the keys: the same keys on DuckDB and Spark, run after run."""
    digest = f"md5(cast({quote(key)} as string) || ':{int(seed)}')"
    return f"substr({digest}, 1, {SAMPLE_HEX_DIGITS}) < '{sample_cut(share)}'"


def load_training_rows(session: Reader, config: ChurnConfig, contract: FeatureContract) -> pd.DataFrame:
    """Labelled mart rows, capped at about training.max_training_rows.

    Above the cap a seeded md5 of the customer key picks a share of customers
    with all their snapshots: every as_of_date stays represented (the
    out-of-time split needs the newest ones, the model the older ones) and a
    customer is never split, which grouped cross-validation relies on. Keeping
    the newest rows instead would shrink to a single snapshot at scale. The
    SQL is the same on DuckDB and Spark, and so are the rows it returns.
    """
    mart_columns(session, config, contract, require_label=True)
    mart = config.dataset.feature_mart
    cap = config.training.max_training_rows
    labelled = f"{quote(contract.label)} is not null"
    total = session.scalar(f"select count(*) from {quote(mart)} where {labelled}")
    sample = ""
    if total > cap:
        share = cap / total
        sample = f"and {sample_predicate(contract.key, config.training.random_state, share)}"
        log.info("%s has %d labelled rows, above training.max_training_rows=%d: "
                 "training on %.1f%% of customers, all snapshots", mart, total, cap, 100 * share)
    frame = session.frame(
        f"{_labelled_select(config, contract)} {sample} order by {quote(contract.as_of)} desc, {quote(contract.key)}"
    )
    if frame.empty:
        raise TrainingError(f"feature mart {mart!r} has no labelled rows ({contract.label} is null everywhere)")
    label = pd.to_numeric(frame[contract.label], errors="coerce")
    bad = int((~label.isin([0, 1])).sum())
    if bad:
        raise TrainingError(f"feature mart {mart!r}: label {contract.label!r} is not 0/1 in {bad} row(s)")
    frame[contract.label] = label.astype(int)
    frame[contract.as_of] = pd.to_datetime(frame[contract.as_of])
    positives = int(frame[contract.label].sum())
    if positives == 0 or positives == len(frame):
        raise TrainingError(
            f"feature mart {mart!r}: all {len(frame)} labelled rows have {contract.label} = "
            f"{int(frame[contract.label].iloc[0])}; a classifier needs both classes"
        )
    return frame


def fully_labelled_dates(session: Reader, config: ChurnConfig, contract: FeatureContract) -> list[pd.Timestamp]:
    """as_of_dates whose horizon is fully observed: every row has a label."""
    mart_columns(session, config, contract, require_label=True)
    rows = session.rows(
        f"select {quote(contract.as_of)} from {quote(config.dataset.feature_mart)} group by 1 "
        f"having count({quote(contract.label)}) = count(*) order by 1"
    )
    return [pd.Timestamp(r[0]) for r in rows]


def count_labelled_dates_after(
    session: Reader, config: ChurnConfig, contract: FeatureContract, after: dt.date
) -> int:
    """Fully labelled as_of_dates in the mart after `after` (new data a retrain would learn from)."""
    a, y = quote(contract.as_of), quote(contract.label)
    return int(session.scalar(
        f"select count(*) from (select {a} from {quote(config.dataset.feature_mart)} where {a} > ? group by 1 "
        f"having count({y}) = count(*))",
        [after],
    ))


def load_evaluation_rows(
    session: Reader, config: ChurnConfig, contract: FeatureContract, validation: dict[str, Any]
) -> pd.DataFrame:
    """Re-read a model's evaluation rows (its out-of-time dates or held-out keys) from the mart."""
    mart_columns(session, config, contract, require_label=True)
    base = _labelled_select(config, contract)
    if validation["strategy"] == "out_of_time":
        held_out, dates = dates_in(contract.as_of, validation["eval_as_of_dates"])
        frame = session.frame(f"{base} and {held_out}", dates)
    else:
        keys = pd.DataFrame(validation["eval_keys"], columns=["_key", "_as_of"])
        keys["_as_of"] = pd.to_datetime(keys["_as_of"]).dt.date
        with session.registered(keys) as eval_keys:
            frame = session.frame(
                f"select m.* from ({base}) m join {eval_keys} k "
                f"on m.{quote(contract.key)} = k._key and cast(m.{quote(contract.as_of)} as date) = k._as_of"
            )
    if frame.empty:
        raise TrainingError(
            f"feature mart {config.dataset.feature_mart!r}: none of the model's evaluation rows are present"
        )
    frame[contract.label] = frame[contract.label].astype(int)
    return frame


def latest_snapshot_date(session: Reader, config: ChurnConfig, contract: FeatureContract) -> dt.date | None:
    """The mart's newest as_of_date (tonight's scoring snapshot), or None for an empty mart."""
    value = session.scalar(f"select max({quote(contract.as_of)}) from {quote(config.dataset.feature_mart)}")
    return None if value is None else pd.Timestamp(value).date()


def snapshot_rows(
    session: Reader, config: ChurnConfig, contract: FeatureContract, as_of_date: dt.date,
    with_label: bool = False, features: list[str] | None = None,
) -> pd.DataFrame:
    """Key, as_of and the contract's features (or only `features`; and the label) of one snapshot."""
    chosen = contract.feature_names if features is None else [f for f in contract.feature_names if f in features]
    columns = [contract.key, contract.as_of, *([contract.label] if with_label else []), *chosen]
    return session.frame(
        f"select {column_list(columns)} from {quote(config.dataset.feature_mart)} where {quote(contract.as_of)} = ?",
        [as_of_date],
    )


def snapshot_select(config: ChurnConfig, contract: FeatureContract) -> str:
    """Key, as_of and features of the snapshot given as the one parameter: what scoring reads, on either engine."""
    columns = [contract.key, contract.as_of, *contract.feature_names]
    return (f"select {column_list(columns)} from {quote(config.dataset.feature_mart)} "
            f"where {quote(contract.as_of)} = ?")


def snapshot_chunks(
    session: Session, config: ChurnConfig, contract: FeatureContract, as_of_date: dt.date, chunk_rows: int,
):
    """One snapshot's key, as_of and features in chunks (bounded memory for scoring), in the mart's order.

    Unsorted: a row's score does not depend on its chunk, ranks are computed
    over the whole snapshot, and sorting by key was a quarter of reading it.
    """
    return session.chunks(snapshot_select(config, contract), [as_of_date], chunk_rows)


def snapshot_size(session: Reader, config: ChurnConfig, contract: FeatureContract, as_of_date: dt.date) -> int:
    return int(session.scalar(
        f"select count(*) from {quote(config.dataset.feature_mart)} where {quote(contract.as_of)} = ?", [as_of_date]
    ))


def labels_of(session: Reader, config: ChurnConfig, contract: FeatureContract,
              as_of_dates: list[dt.date]) -> pd.DataFrame:
    """Key, as_of and label of the given snapshots (NULL labels included)."""
    columns = [contract.key, contract.as_of, contract.label]
    chosen, dates = dates_in(contract.as_of, as_of_dates)
    return session.frame(
        f"select {column_list(columns)} from {quote(config.dataset.feature_mart)} where {chosen}", dates
    )


def dates_in(column: str, dates: Sequence[dt.date | str]) -> tuple[str, list[dt.date]]:
    """SQL true where `column`'s date is one of `dates`, and its parameters: one `?` per date.

    Both engines bind a date per `?`; DuckDB's list parameter (`unnest(?::date[])`)
    has no Spark spelling. No dates selects no rows.
    """
    values = [pd.Timestamp(d).date() for d in dates]
    if not values:
        return "1 = 0", []
    return f"cast({quote(column)} as date) in ({', '.join(['?'] * len(values))})", values
