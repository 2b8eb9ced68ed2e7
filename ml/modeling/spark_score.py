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

The threshold is the caller's: tonight's operating point is chosen on all
probabilities and recorded by `ml.modeling.operating_point`, which writes a
DuckDB table today.
"""

from __future__ import annotations

import datetime as dt
import pickle
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.mart import check_mart, current_contract, mart_columns, snapshot_select
from ml.logs import get_logger
from ml.modeling.explain import Explainer
from ml.modeling.model import ChurnModel
from ml.modeling.score import (
    DECISION_COLUMN,
    PROBABILITY_COLUMN,
    score_frame,
    scored_reason_columns,
    scores_layout,
    typical_values,
)
from ml.warehouse.spark import SparkWarehouse

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
    return ranked(scored, contract, threshold, config.scoring.high_risk_probability, n_reasons,
                  str(model.version), run_id)


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
