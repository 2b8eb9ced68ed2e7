"""`churn score`: score every active customer with the champion into `churn_scores`.

BI tools read one table with one row per active customer at the latest
snapshot: calibrated probability, the yes/no decision at the model's chosen
threshold, a risk band, a rank, and the top reasons. Each run also lands in
`churn_scores_history` (one row per customer, snapshot and model version), which
monitoring joins to realised labels once the horizon has passed.

Before scoring, the mart is checked against the contract the model was trained
on: a dropped, renamed or retyped feature column stops the run with the
column's name instead of producing silently wrong scores, and so is a mart
whose SQL now computes one of the model's features differently
(`ml.modeling.definitions`). The decision threshold is re-chosen at every run
(`ml.modeling.operating_point`: pin, rule on the stored out-of-fold
predictions, capacity). Both tables are replaced in one transaction, so a
failed run never leaves half a night's scores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.mart import check_mart, current_contract, latest_snapshot_date, snapshot_chunks, snapshot_size
from ml.logs import get_logger, timed
from ml.modeling import operating_point
from ml.modeling.definitions import check_definitions, current_definitions_sha256
from ml.modeling.explain import Explainer, top_k
from ml.modeling.model import ChurnModel
from ml.modeling.reference import CategoricalReference, DriftReference, NumericReference
from ml.modeling.registry import load_champion, version_on_definitions
from ml.warehouse import Reader, Session, connect, declare, quote

log = get_logger("score")

__all__ = ["HISTORY_SPEC", "HISTORY_TABLE", "SCORES_SPEC", "SCORES_TABLE", "ScoreError", "ScoreResult",
           "ScoresSummary", "check_mart", "chunk_probabilities", "chunk_reasons", "history_by_snapshot",
           "latest_scores_summary", "published_scores", "risk_bands", "score", "score_columns", "score_frame",
           "scored_dates", "scored_reason_columns", "scored_rows", "scored_snapshots", "scores_layout",
           "tonight_probabilities", "tonight_scores"]

# Columns after the contract's key and as_of; reason_<i> / reason_<i>_contribution
# (scoring.top_reasons of them) sit between rank and model_version.
_SCORE_COLUMNS = [
    ("churn_probability", "DOUBLE", "calibrated churn probability"),
    ("will_churn", "BOOLEAN", "churn_probability >= the model's decision threshold"),
    ("risk_band", "VARCHAR", "low = not will_churn; medium = will_churn; high = will_churn and "
                             "churn_probability >= scoring.high_risk_probability"),
    ("rank", "BIGINT", "1 = highest risk; ties broken by key"),
    ("contribution_unit", "VARCHAR", "unit of every reason_<i>_contribution: log_odds (XGBoost, logistic "
                                     "regression) or probability (random forest)"),
    ("model_version", "VARCHAR", "the model that scored the row"),
    ("scored_at", "TIMESTAMP", "when the scoring run wrote the row"),
    ("run_id", "VARCHAR", "the scoring run"),
]
SCORES_SPEC = declare(
    name="churn_scores",
    owner=__name__,
    grain="one row per active customer at the latest snapshot",
    description="tonight's scores for BI: probability, decision, band, rank and top reasons",
    columns=_SCORE_COLUMNS,
    contract_columns=True,
)
HISTORY_SPEC = declare(
    name="churn_scores_history",
    owner=__name__,
    grain="one row per customer, snapshot and model version",
    description="every scoring run's rows, joined to realised labels by monitoring",
    columns=_SCORE_COLUMNS,
    contract_columns=True,
)
SCORES_TABLE = SCORES_SPEC.name
HISTORY_TABLE = HISTORY_SPEC.name
PROBABILITY_COLUMN = "churn_probability"
DECISION_COLUMN = "will_churn"
# Rows per chunk: bounds memory (features + contributions) at a million customers.
DEFAULT_CHUNK_ROWS = 200_000


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


@dataclass(frozen=True)
class Snapshot:
    """The mart snapshot tonight's run scores: its date, row count and the mart's column types."""

    as_of_date: dt.date
    rows: int
    columns: dict[str, str]


_BANDS = np.array(["low", "medium", "high"], dtype=object)


def risk_bands(probability: np.ndarray, threshold: float, high_probability: float) -> np.ndarray:
    """The band of each probability, derived from the decision so the two never disagree.

    low = not flagged (probability < threshold); medium = flagged; high =
    flagged and probability >= high_probability (with calibrated
    probabilities, at least that share of the band is expected to churn). A
    threshold above high_probability makes every flagged customer high.
    """
    flagged = probability >= threshold
    high = flagged & (probability >= high_probability)
    # a take from three names: nested np.where over strings built a unicode array, then objects
    return _BANDS[flagged.astype(np.int8) + high.astype(np.int8)]


def _format_value(value: object) -> str:
    """A feature value as a person reads it: missing, a short number, or the category."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "missing"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, float, np.integer, np.floating)):
        # 9 significant digits first: a value summed in another order (another engine, another
        # partitioning) differs in its last bits and must still print the same, also at a boundary
        # such as -3.085, which features of whole minutes over whole days hit often
        number = float(f"{float(value):.9g}")
        return f"{number:,.0f}" if number.is_integer() else f"{number:,.3g}"
    return str(value)


def typical_values(model: ChurnModel) -> dict[str, str]:
    """Per contract feature, its typical training value: the median, or the most common category.

    Read from the drift reference stored with the model, so the "typical"
    a reason quotes is what the model learned from, not tonight's population.
    """
    stored = model.metadata.reference
    if not stored:
        return {}
    typical: dict[str, str] = {}
    for name, ref in DriftReference.from_dict(stored).features.items():
        if isinstance(ref, NumericReference) and ref.median is not None:
            typical[name] = _format_value(ref.median)
        elif isinstance(ref, CategoricalReference) and ref.shares:
            typical[name] = _format_value(max(ref.shares.items(), key=lambda item: item[1])[0])
    return typical


def reason_texts(model: ChurnModel, frame: pd.DataFrame, reasons: pd.DataFrame, n_reasons: int,
                 typical: dict[str, str]) -> pd.DataFrame:
    """reason_<i>_text: "<description>: <value> (typical <value>), raises risk" for each top reason.

    The description is the feature's YAML description (its name when it has
    none); the direction is the contribution's sign.
    """
    described = {f.name: f.description.strip().rstrip(".") or f.name for f in model.contract.features}
    out: dict[str, pd.Series] = {}
    for i in range(1, n_reasons + 1):
        names, contribution = reasons[f"reason_{i}"], reasons[f"reason_{i}_contribution"].to_numpy()
        text = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        for feature in names.dropna().unique():
            rows = (names == feature).to_numpy()
            values = frame.loc[rows, feature].map(_format_value)
            usual = f" (typical {typical[feature]})" if feature in typical else ""
            direction = np.where(contribution[rows] > 0, "raises risk", "lowers risk")
            text[rows] = (f"{described[feature]}: " + values + usual + ", " + direction).to_numpy()
        out[f"reason_{i}_text"] = pd.array(text, dtype="string")
    return pd.DataFrame(out, index=frame.index)


def chunk_probabilities(model: ChurnModel, explainer: Explainer, matrix: Any) -> np.ndarray:
    """Calibrated probabilities of preprocessed rows: the calibrator on the estimator's score,
    i.e. exactly `model.predict_proba` without preprocessing twice."""
    return np.asarray(model.calibrator.predict(explainer.raw_scores(matrix)), dtype=np.float64)


def score_columns(model: ChurnModel, frame: pd.DataFrame, probability: np.ndarray, unit: str) -> pd.DataFrame:
    """Key, as_of, probability, decision at the model's threshold and contribution unit of a chunk."""
    return pd.DataFrame(
        {
            model.contract.key: frame[model.contract.key].to_numpy(),
            model.contract.as_of: frame[model.contract.as_of].to_numpy(),
            "churn_probability": probability,
            "will_churn": probability >= model.threshold,
            "contribution_unit": pd.array([unit] * len(frame), dtype="string"),
        },
        index=frame.index,
    )


def chunk_reasons(model: ChurnModel, explainer: Explainer, frame: pd.DataFrame, matrix: Any,
                  explained: np.ndarray, n_reasons: int, typical: dict[str, str], texts: bool = True,
                  ) -> pd.DataFrame:
    """The reason columns of every row of a chunk: exact contributions of the `explained` rows, their top
    `n_reasons` (and texts), NULL on the other rows."""
    contributions = explainer.contributions(matrix[explained], frame.index[explained])
    reasons = top_k(contributions.values, n_reasons)
    if texts:
        reasons = pd.concat([reasons, reason_texts(model, frame.loc[explained], reasons, n_reasons, typical)],
                            axis=1)
        reasons = reasons[scored_reason_columns(n_reasons)]
    return reasons if explained.all() else spread_to_all_rows(reasons, frame.index)


def score_frame(
    model: ChurnModel, explainer: Explainer, frame: pd.DataFrame, n_reasons: int, source: str = "input frame",
    typical: dict[str, str] | None = None, reasons_for: str = "all", texts: bool = True,
) -> pd.DataFrame:
    """Probability, decision and reasons for the rows of one chunk (rank and band come later).

    The chunk is preprocessed once and shared by the score and its reasons
    (`chunk_probabilities`, `chunk_reasons`). With `reasons_for="flagged"`
    only will_churn rows are explained (exact contributions, the most costly
    step by far); the other rows' reason columns are NULL. `texts=False` leaves
    out the reason_<i>_text columns (the API answers features and contributions;
    the texts are ~5 ms of a one-row request).
    """
    matrix = explainer.matrix(frame, source)
    probability = chunk_probabilities(model, explainer, matrix)
    explained = np.ones(len(frame), dtype=bool) if reasons_for == "all" else probability >= model.threshold
    reasons = chunk_reasons(model, explainer, frame, matrix, explained, n_reasons,
                            typical_values(model) if typical is None and texts else typical or {}, texts)
    return pd.concat([score_columns(model, frame, probability, explainer.output), reasons], axis=1)


def scored_reason_columns(n_reasons: int) -> list[str]:
    """reason_<i>, reason_<i>_contribution, reason_<i>_text for each reason, in table order."""
    return [c for i in range(1, n_reasons + 1) for c in (f"reason_{i}", f"reason_{i}_contribution", f"reason_{i}_text")]


def scores_layout(contract: FeatureContract, reason_columns: list[str]) -> list[str]:
    """churn_scores' columns in table order (whichever engine scored)."""
    layout = [contract.key, contract.as_of, PROBABILITY_COLUMN, DECISION_COLUMN, "risk_band", "rank"]
    return [*layout, *reason_columns, "contribution_unit", "model_version", "scored_at", "run_id"]


def spread_to_all_rows(explained: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
    """Reason columns of the explained rows spread over every row, NULL where not explained."""
    return explained.reindex(index).astype(explained.dtypes.to_dict())


def champion_for(config: ChurnConfig) -> ChurnModel:
    """The champion, refused when it was trained on another dataset's mart."""
    model = load_champion(config)
    if model is None:
        raise ScoreError("no champion model; run churn train")
    mart = config.dataset.feature_mart
    if model.contract.model != mart:
        raise ScoreError(
            f"the champion ({model.version}) was trained on {model.contract.model!r}, "
            f"but dataset {config.dataset.name!r} uses {mart!r}; run churn train"
        )
    return model


def _snapshot_to_score(session: Session, config: ChurnConfig, model: ChurnModel) -> Snapshot:
    """Tonight's snapshot, after refusing a mart that no longer matches the model's contract."""
    mart = config.dataset.feature_mart
    if not session.exists(mart):
        raise ScoreError(f"feature mart {mart!r} not found in {config.warehouse.build_db}; run churn build")
    # Raw column types, not mart_columns: check_mart reports every mismatch against the model's contract.
    columns = session.columns(mart)
    check_mart(model.contract, current_contract(config), mart, columns, str(model.version))
    refuse_redefined(session, config, model)
    as_of_date = latest_snapshot_date(session, config, model.contract)
    total = snapshot_size(session, config, model.contract, as_of_date) if as_of_date is not None else 0
    if not total:
        raise ScoreError(f"feature mart {mart!r} has no rows to score")
    return Snapshot(as_of_date, total, columns)


def refuse_redefined(session: Session, config: ChurnConfig, model: ChurnModel, data: Reader | None = None) -> None:
    """Stop before scoring when the mart now computes one of the model's features differently.

    `data` reads the mart where it lives (None: the build database `session` opens)."""
    check = check_definitions(data if data is not None else session, config, model)
    if not check.affects_model:
        if check.sql_changed:
            log.info("mart SQL changed since %s was trained; %s", model.version, check.describe())
        return
    newer = version_on_definitions(session, config.dataset.name, current_definitions_sha256(config))
    hint = (f"model {newer.model_version} was trained on the new definitions and is {newer.status} "
            f"({newer.decision}); `churn promote {newer.model_version} --reason ...` makes it champion"
            if newer is not None else "the nightly trains a challenger on the new mart (or `churn train --force`)")
    raise ScoreError(
        f"feature mart {config.dataset.feature_mart!r}: {check.describe()}; the champion would score "
        f"definitions it never learned, so nothing was scored. {hint}; or revert the SQL change"
    )


def _score_chunks(
    session: Session, config: ChurnConfig, model: ChurnModel, snapshot: Snapshot, chunk_rows: int
) -> pd.DataFrame:
    """Probability, decision and reasons of every row of the snapshot, a chunk at a time."""
    mart = config.dataset.feature_mart
    parts: list[pd.DataFrame] = []
    with timed(f"score {snapshot.rows:,d} rows of {mart} as of {snapshot.as_of_date} with {model.version}", log):
        done = 0
        explainer, typical = Explainer(model), typical_values(model)
        for chunk in snapshot_chunks(session, config, model.contract, snapshot.as_of_date, chunk_rows):
            parts.append(score_frame(model, explainer, chunk, config.scoring.top_reasons, f"feature mart {mart!r}",
                                     typical, config.scoring.reasons_for))
            done += len(chunk)
            log.info("scored %d/%d rows (%.0f%%)", done, snapshot.rows, 100 * done / snapshot.rows)
    return pd.concat(parts, ignore_index=True)


def ranked_layout(scores: pd.DataFrame, config: ChurnConfig, contract: FeatureContract, version: str,
                   run_id: str, threshold: float) -> pd.DataFrame:
    """The BI layout: band and rank (which need every row), run columns, columns in table order."""
    out = scores.copy()
    out["risk_band"] = pd.array(
        risk_bands(out[PROBABILITY_COLUMN].to_numpy(), threshold, config.scoring.high_risk_probability),
        dtype="string",
    )
    # 1 = highest risk; ties broken by key so ranks are unique and stable across re-runs. Arrow's
    # sort: numpy's lexsort compares the keys as Python strings, 3x slower on unsorted rows.
    ranking = pa.table({"p": out[PROBABILITY_COLUMN].to_numpy(), "k": pa.array(out[contract.key])})
    order = pc.sort_indices(ranking, sort_keys=[("p", "descending"), ("k", "ascending")]).to_numpy()
    rank = np.empty(len(out), dtype=np.int64)
    rank[order] = np.arange(1, len(out) + 1)
    out["rank"] = rank
    out["model_version"] = version
    out["scored_at"] = pd.Timestamp(dt.datetime.now())
    out["run_id"] = run_id
    return out[scores_layout(contract, [c for c in out.columns if c.startswith("reason_")])]


def write_scores(session: Session, scores: pd.DataFrame, as_of_column: str, as_of_type: str,
                 as_of_date: dt.date, version: str) -> None:
    """Replace churn_scores and this (snapshot, model version)'s history rows in one transaction.

    The as_of column is cast to the mart's own type, so BI joins scores to the
    mart without a cast. churn_scores holds the latest snapshot only; recreating
    it also follows a changed layout (e.g. scoring.top_reasons was raised),
    which the history then gains as new columns.
    """
    a = quote(as_of_column)
    # As Arrow: DuckDB scans an Arrow table about twice as fast as the same pandas frame (NaN -> NULL alike).
    with session.transaction(), session.registered(pa.Table.from_pandas(scores, preserve_index=False)) as incoming:
        session.replace_table(SCORES_SPEC, f"select * replace (cast({a} as {as_of_type}) as {a}) from {incoming}")
        if not session.exists(HISTORY_SPEC):
            session.replace_table(HISTORY_SPEC, f"select * from {quote(SCORES_TABLE)} limit 0")
        session.add_missing_columns(HISTORY_SPEC, session.columns(SCORES_SPEC))
        # from the table just written, not the frame again: a second scan of a million pandas rows
        # cost more than DuckDB copying its own columns
        session.execute(f"delete from {quote(HISTORY_TABLE)} where {a} = ? and model_version = ?",
                        [as_of_date, version])
        session.execute(f"insert into {quote(HISTORY_TABLE)} by name select * from {quote(SCORES_TABLE)}")


def score(
    config: ChurnConfig, run_id: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> ScoreResult:
    """Score the latest snapshot of the feature mart with the champion model."""
    started = time.perf_counter()
    run_id = run_id or dt.datetime.now().strftime("score-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    model = champion_for(config)
    contract, version = model.contract, str(model.version)
    rule = operating_point.rule_choice(config, model)
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        snapshot = _snapshot_to_score(session, config, model)
        scored = _score_chunks(session, config, model, snapshot, chunk_rows)
        probability = scored[PROBABILITY_COLUMN].to_numpy(dtype=float)
        # The operating point is recorded with the scores it decided, or not at all.
        with session.transaction():
            point = operating_point.apply(session, config, model, rule, probability, run_id)
            scored[DECISION_COLUMN] = probability >= point.threshold
            scores = ranked_layout(scored, config, contract, version, run_id, point.threshold)
            with timed(f"write {SCORES_TABLE} and {HISTORY_TABLE}", log):
                write_scores(session, scores, contract.as_of, snapshot.columns[contract.as_of],
                             snapshot.as_of_date, version)
    flagged = int(scores[DECISION_COLUMN].sum())
    result = ScoreResult(run_id, version, snapshot.as_of_date, len(scores), flagged, time.perf_counter() - started)
    log.info(
        "scored %d customers as of %s with %s: %d flagged (%.1f%%) in %.1fs",
        result.rows, result.as_of_date, version, flagged, 100 * result.flagged_share, result.seconds,
    )
    return result


# ---------------------------------------------------------------- reads for other stages
# Those typed `Reader` read the data plane and run on DuckDB's session and Spark's warehouse alike.


@dataclass(frozen=True)
class ScoresSummary:
    """What churn_scores holds: its row and flagged counts, the scoring model and snapshot range."""

    rows: int
    flagged: int
    model_version: str | None
    first_as_of: dt.date | None
    last_as_of: dt.date | None
    # Sums of calibrated probabilities: the churners expected among the flagged and among the rest.
    expected_churners_flagged: float = 0.0
    expected_churners_missed: float = 0.0


def _date(value: object) -> dt.date | None:
    return None if value is None else pd.Timestamp(value).date()


def latest_scores_summary(session: Reader, as_of_column: str) -> ScoresSummary | None:
    """Counts of tonight's churn_scores, or None when nothing was ever scored."""
    if not session.exists(SCORES_SPEC):
        return None
    a, d, p = quote(as_of_column), quote(DECISION_COLUMN), quote(PROBABILITY_COLUMN)
    rows, flagged, version, first, last, caught, missed = session.one(
        f"select count(*), count(*) filter (where {d}), min(model_version), min({a}), max({a}), "
        f"coalesce(sum({p}) filter (where {d}), 0), coalesce(sum({p}) filter (where not {d}), 0) "
        f"from {quote(SCORES_TABLE)}"
    )
    return ScoresSummary(int(rows), int(flagged), version, _date(first), _date(last), float(caught), float(missed))


def tonight_scores(data: Reader, contract: FeatureContract, as_of_date: dt.date,
                   version: str) -> pd.DataFrame | None:
    """Key, probability and decision of `version`'s scores of snapshot `as_of_date` (None: nothing was
    ever scored), in no particular order: the key lets a caller line them up with other rows."""
    if not data.exists(SCORES_SPEC):
        return None
    return data.frame(
        f"select {quote(contract.key)}, {quote(PROBABILITY_COLUMN)}, {quote(DECISION_COLUMN)} "
        f"from {quote(SCORES_TABLE)} where {quote(contract.as_of)} = ? and model_version = ?",
        [as_of_date, version],
    )


def tonight_probabilities(data: Reader, contract: FeatureContract, as_of_date: dt.date,
                          version: str) -> np.ndarray | None:
    """`version`'s probabilities of snapshot `as_of_date` in churn_scores (None: nothing was ever scored).

    What the operating point's capacity rule needs when the scores were
    computed elsewhere (Spark's churn_scores): the threshold choice itself is
    `ml.modeling.operating_point.choose` on this array, whose order it ignores.
    """
    frame = tonight_scores(data, contract, as_of_date, version)
    return None if frame is None else frame[PROBABILITY_COLUMN].to_numpy(dtype=float)


def scored_snapshots(session: Reader, as_of_column: str, before: dt.date) -> list[tuple[dt.date, str]]:
    """(as_of_date, model_version) of every snapshot in the history scored before `before`, oldest first."""
    if not session.exists(HISTORY_SPEC):
        return []
    a = quote(as_of_column)
    rows = session.rows(
        f"select distinct {a}, model_version from {quote(HISTORY_TABLE)} where {a} < ? order by 1, 2", [before]
    )
    return [(_date(as_of), version) for as_of, version in rows]


def published_scores(session: Session) -> pd.DataFrame:
    """Tonight's churn_scores as a whole (the API indexes it in memory)."""
    return session.frame(f"select * from {quote(SCORES_TABLE)}")


def scored_dates(session: Session, as_of_column: str) -> list[dt.date]:
    """Every snapshot date the history holds, oldest first."""
    a = quote(as_of_column)
    return [_date(d) for (d,) in session.rows(f"select distinct {a} from {quote(HISTORY_TABLE)} order by 1")]


def scored_rows(session: Reader, contract: FeatureContract, as_of_date: dt.date, version: str) -> pd.DataFrame:
    """Key, probability and decision of one (snapshot, model version) of the history."""
    return session.frame(
        f"select {quote(contract.key)}, {quote(PROBABILITY_COLUMN)}, {quote(DECISION_COLUMN)} "
        f"from {quote(HISTORY_TABLE)} where {quote(contract.as_of)} = ? and model_version = ?",
        [as_of_date, version],
    )


def history_by_snapshot(session: Reader, as_of_column: str) -> pd.DataFrame:
    """Per snapshot and model version of the history: rows, share flagged and mean probability, oldest first.

    Empty (with those columns) before the first scoring run.
    """
    columns = ["as_of_date", "model_version", "rows", "flagged_share", "mean_probability"]
    if not session.exists(HISTORY_SPEC):
        return pd.DataFrame(columns=columns)
    a, d, p = quote(as_of_column), quote(DECISION_COLUMN), quote(PROBABILITY_COLUMN)
    return session.frame(
        f"select cast({a} as date) as as_of_date, model_version, count(*) as rows, "
        f"avg(cast({d} as double)) as flagged_share, avg({p}) as mean_probability "
        f"from {quote(HISTORY_TABLE)} group by 1, 2 order by 1, 2"
    )


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    result = score(config, chunk_rows=args.chunk_rows)
    print(
        f"{SCORES_TABLE}: {result.rows:,d} customers as of {result.as_of_date}, "
        f"{result.flagged:,d} flagged ({result.flagged_share:.1%}), model {result.model_version}"
    )
    return 0
