"""Distributed scoring on Spark: `score_frame` in the Python workers (mapInPandas), the same champion.

Scoring is the stage whose cost grows with the customer base (exact TreeSHAP
reasons for every flagged customer), so on Spark it runs where the mart's
partitions are. The driver loads and verifies the champion as `churn score`
does and broadcasts it pickled; each worker unpickles it once per partition
and calls the very `score_frame` of the DuckDB path on Arrow batches, so
probabilities, decisions and reasons are the same numbers. Decimal features
are cast to double first, as DuckDB's reader converts them.

The band and the rank need every row. The band is a column expression of the
threshold. The rank (1 = highest risk, ties broken by key, as on DuckDB) is
counted per bucket of probability: each bucket's offset is the number of rows
in the buckets above it, so no step gathers all rows into one partition. The
scores are materialised once (a local checkpoint) because the rank reads them
twice and the model must not run twice.

`score_on_spark` is `churn score` on the Spark engine: the snapshot is
scored once (probabilities and reasons, checkpointed), tonight's operating
point is chosen on all probabilities and recorded by
`ml.modeling.operating_point` in the build database (a control-plane table),
and the ranked rows replace the Spark tables churn_scores and this
snapshot's rows of churn_scores_history.
"""

from __future__ import annotations

import datetime as dt
import pickle
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.mart import check_mart, current_contract, latest_snapshot_date, mart_columns, snapshot_select
from ml.logs import get_logger, timed
from ml.modeling import operating_point
from ml.modeling.explain import Explainer
from ml.modeling.model import ChurnModel
from ml.modeling.score import (
    DECISION_COLUMN,
    HISTORY_TABLE,
    PROBABILITY_COLUMN,
    SCORES_TABLE,
    ScoreError,
    ScoreResult,
    champion_for,
    refuse_redefined,
    score_frame,
    scored_reason_columns,
    scores_layout,
    typical_values,
)
from ml.warehouse import connect
from ml.warehouse.spark import SCHEMA, SparkWarehouse, spark_quote

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.types import StructType

log = get_logger("spark_score")

# Probability buckets of the distributed rank: only a bucket's rows are sorted together.
RANK_BUCKETS = 1000


def score_snapshot(warehouse: SparkWarehouse, config: ChurnConfig, model: ChurnModel, as_of_date: dt.date,
                   threshold: float, run_id: str) -> DataFrame:
    """churn_scores' rows (its columns, in its order) for the mart's `as_of_date` snapshot, scored on Spark.

    The mart is checked against the model's contract first, naming what
    differs. The result is computed (one Spark job) and held until the caller
    drops the returned DataFrame.
    """
    scored = explained_snapshot(warehouse, config, model, as_of_date)
    return ranked(scored, model.contract, threshold, config.scoring.high_risk_probability,
                  config.scoring.top_reasons, str(model.version), run_id)


def explained_snapshot(warehouse: SparkWarehouse, config: ChurnConfig, model: ChurnModel,
                       as_of_date: dt.date) -> DataFrame:
    """Probability, decision at the model's own threshold and reasons of every row of the snapshot,
    computed once on the workers and held (a local checkpoint) for the operating point and the rank."""
    from pyspark.sql import functions as F

    contract, mart = model.contract, config.dataset.feature_mart
    columns = mart_columns(warehouse, config, contract)
    check_mart(contract, current_contract(config), mart, columns, str(model.version))
    snapshot = warehouse.dataframe(snapshot_select(config, contract), [as_of_date])
    decimals = [f.name for f in snapshot.schema.fields if f.dataType.typeName() == "decimal"]
    snapshot = snapshot.withColumns({name: F.col(name).cast("double") for name in decimals})
    n_reasons = config.scoring.top_reasons
    scorer = batch_scorer(warehouse.spark.sparkContext.broadcast(pickle.dumps(model)), n_reasons,
                          f"feature mart {mart!r}", typical_values(model), config.scoring.reasons_for)
    scored = snapshot.mapInPandas(scorer, scored_schema(snapshot.schema, contract, n_reasons))
    scored = scored.localCheckpoint(eager=True)
    log.info("scored the %s snapshot of %s on Spark with %s", as_of_date, mart, model.version)
    return scored


def score_on_spark(config: ChurnConfig, warehouse: SparkWarehouse, run_id: str | None = None) -> ScoreResult:
    """`churn score` with the data plane on Spark: tonight's snapshot scored on the workers.

    The champion, the feature-definitions check and the operating point are
    the DuckDB path's own (the registry and operating_points are control-plane
    tables in the build database); the threshold is chosen on every
    probability (one column collected to the driver, 8 bytes a customer), and
    the scores go to the Spark tables churn_scores and churn_scores_history
    (`write_spark_scores`).
    """
    started = time.perf_counter()
    run_id = run_id or dt.datetime.now().strftime("score-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    model = champion_for(config)
    contract, version = model.contract, str(model.version)
    rule = operating_point.rule_choice(config, model)
    mart = config.dataset.feature_mart
    if not warehouse.exists(mart):
        raise ScoreError(f"feature mart {mart!r} not found in {warehouse.path}; run churn build")
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        refuse_redefined(session, config, model, data=warehouse)
        as_of_date = latest_snapshot_date(warehouse, config, contract)
        if as_of_date is None:
            raise ScoreError(f"feature mart {mart!r} in {warehouse.path} has no rows to score")
        scored = explained_snapshot(warehouse, config, model, as_of_date)
        probability = scored.select(PROBABILITY_COLUMN).toArrow().column(0).to_numpy()
        # the operating point is recorded with the scores it decided, or not at all
        with session.transaction():
            point = operating_point.apply(session, config, model, rule, probability, run_id)
            scores = ranked(scored, contract, point.threshold, config.scoring.high_risk_probability,
                            config.scoring.top_reasons, version, run_id)
            with timed(f"write {SCORES_TABLE} and {HISTORY_TABLE} on Spark", log):
                flagged = write_spark_scores(warehouse, scores, contract.as_of, as_of_date, version)
    result = ScoreResult(run_id, version, as_of_date, len(probability), flagged, time.perf_counter() - started)
    log.info("scored %d customers as of %s with %s on Spark: %d flagged (%.1f%%) in %.1fs",
             result.rows, as_of_date, version, flagged, 100 * result.flagged_share, result.seconds)
    return result


def write_spark_scores(warehouse: SparkWarehouse, scores: DataFrame, as_of_column: str, as_of_date: dt.date,
                       version: str) -> int:
    """Replace churn_scores, and this (snapshot, model version)'s rows of churn_scores_history; flagged rows.

    The warehouse's table format decides how (`TableFormat.history_write`).
    Plain Parquet tables cannot delete rows, so the history is rewritten: its
    kept rows and tonight's, materialised first (a local checkpoint), since a
    table cannot be overwritten by a plan that reads it; that costs the
    history's size each night. Delta replaces only tonight's rows
    (`replaceWhere`), which costs the night.
    """
    from pyspark.sql import functions as F

    fmt = warehouse.table_format
    plan = fmt.history_write(as_of_column, as_of_date, version)

    def overwrite(frame: DataFrame, table: str, options: Mapping[str, str]) -> None:
        frame.write.format(plan.file_format).mode("overwrite").options(**options).saveAsTable(qualified_table(table))
        warehouse.refresh(table)  # the SQL session's reads (audits, publish) see tonight's files

    scores = scores.localCheckpoint(eager=True)
    overwrite(scores, SCORES_TABLE, fmt.overwrite_options)
    if not warehouse.exists(HISTORY_TABLE):  # the first night creates it
        overwrite(scores, HISTORY_TABLE, {})
    elif plan.replace_where is not None:
        overwrite(scores, HISTORY_TABLE, plan.writer_options)
    else:
        old = warehouse.table(HISTORY_TABLE)
        replaced = (F.col(as_of_column) == F.lit(as_of_date)) & (F.col("model_version") == F.lit(version))
        kept = old.filter(~replaced)
        # columns the history lacks (scoring.top_reasons raised) are added; ones tonight lacks stay NULL
        history = kept.unionByName(scores, allowMissingColumns=True)
        overwrite(history.localCheckpoint(eager=True), HISTORY_TABLE, {})
    return int(scores.filter(F.col(DECISION_COLUMN)).count())


def qualified_table(name: str) -> str:
    return f"{SCHEMA}.{spark_quote(name)}"


def batch_scorer(model_bytes: Any, n_reasons: int, source: str, typical: dict[str, str],
                 reasons_for: str) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The function each worker runs over its partition's batches (pickled with its arguments)."""

    def score_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        # Bytes the driver pickled from the champion it verified, never a file from outside.
        model = pickle.loads(model_bytes.value)
        explainer = Explainer(model)
        for batch in batches:
            if len(batch):
                yield score_frame(model, explainer, batch, n_reasons, source, typical, reasons_for)

    return score_batches


def scored_schema(snapshot: StructType, contract: FeatureContract, n_reasons: int) -> StructType:
    """The Spark schema of `score_frame`'s output: key and as_of as in the mart, then the scores."""
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

    fields = [snapshot[contract.key], snapshot[contract.as_of],
              StructField(PROBABILITY_COLUMN, DoubleType()), StructField(DECISION_COLUMN, BooleanType()),
              StructField("contribution_unit", StringType())]
    for name in scored_reason_columns(n_reasons):
        fields.append(StructField(name, DoubleType() if name.endswith("_contribution") else StringType()))
    return StructType(fields)


def ranked(scored: DataFrame, contract: FeatureContract, threshold: float, high_probability: float,
           n_reasons: int, version: str, run_id: str) -> DataFrame:
    """Decision, band and rank at `threshold`, the run's columns, in churn_scores' layout."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    p = F.col(PROBABILITY_COLUMN)
    flagged = p >= F.lit(float(threshold))
    # as ml.modeling.score.risk_bands: derived from the decision so the two never disagree
    band = F.when(flagged & (p >= F.lit(float(high_probability))), "high").when(flagged, "medium").otherwise("low")
    bucket = F.least(F.floor(p * RANK_BUCKETS), F.lit(RANK_BUCKETS - 1)).cast("int")
    rows = scored.withColumns({DECISION_COLUMN: flagged, "risk_band": band, "_bucket": bucket})
    above = Window.orderBy(F.desc("_bucket")).rowsBetween(Window.unboundedPreceding, -1)
    offsets = rows.groupBy("_bucket").count().select(
        "_bucket", F.coalesce(F.sum("count").over(above), F.lit(0)).alias("_offset"))
    within = Window.partitionBy("_bucket").orderBy(p.desc(), F.col(contract.key).asc())
    out = (rows.join(F.broadcast(offsets), "_bucket")
           .withColumns({"rank": (F.col("_offset") + F.row_number().over(within)).cast("bigint"),
                         "model_version": F.lit(version), "scored_at": F.lit(dt.datetime.now()),
                         "run_id": F.lit(run_id)}))
    return out.select(*scores_layout(contract, scored_reason_columns(n_reasons)))
