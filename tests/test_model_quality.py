"""The issue's acceptance test at small scale: the chosen model is nearly as good as the truth.

The generator knows each customer's true churn probability at every snapshot
(the oracle). No model can rank churners better than the oracle on the same
rows, so the gap between the two ROC-AUCs measures what the features and the
model lose; recall at the chosen threshold and the calibration error check the
two promises made to the business (catch 80% of churners; probabilities mean
what they say).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ml.config import ChurnConfig
from ml.features.mart import load_evaluation_rows
from ml.modeling.evaluate import classification_metrics, expected_calibration_error
from ml.modeling.registry import load_champion
from ml.warehouse import connect

# Tolerances of the small warehouse (about 3 x 55 churners out of time).
MAX_AUC_GAP_TO_ORACLE = 0.05
MAX_RECALL_SHORTFALL = 0.07
MAX_CALIBRATION_ERROR = 0.05


@pytest.fixture(scope="module")
def oot_with_oracle(trained_warehouse: ChurnConfig) -> tuple[pd.DataFrame, object]:
    """The champion's out-of-time rows with the oracle's true probability joined on."""
    config = trained_warehouse
    model = load_champion(config)
    contract = model.contract
    with connect(config.warehouse.build_db, read_only=True) as session:
        rows = load_evaluation_rows(session, config, contract, model.metadata.validation)
    oracle = pd.read_parquet(config.generator.oracle_dir / "oracle.parquet")
    for frame in (rows, oracle):
        frame["_as_of_day"] = pd.to_datetime(frame[contract.as_of]).dt.date
    joined = rows.merge(
        oracle[[contract.key, "_as_of_day", "churn_probability"]].rename(columns={"churn_probability": "_oracle"}),
        on=[contract.key, "_as_of_day"],
        how="left",
        validate="one_to_one",
    )
    assert joined["_oracle"].notna().all(), "every out-of-time row must have an oracle probability"
    return joined, model


def test_out_of_time_rows_are_the_newest_labelled_snapshots(trained_warehouse: ChurnConfig, oot_with_oracle) -> None:
    joined, model = oot_with_oracle
    validation = model.metadata.validation
    assert validation["strategy"] == "out_of_time"
    assert len(validation["eval_as_of_dates"]) == trained_warehouse.training.out_of_time_snapshots
    assert joined[model.contract.label].sum() >= 100  # enough churners for the tolerances below


def test_roc_auc_is_within_reach_of_the_oracle(oot_with_oracle) -> None:
    joined, model = oot_with_oracle
    y = joined[model.contract.label].to_numpy(dtype=int)
    oracle_auc = roc_auc_score(y, joined["_oracle"])
    model_auc = roc_auc_score(y, model.predict_proba(joined))
    print(f"out-of-time ROC-AUC: model {model.algorithm} {model_auc:.4f}, oracle {oracle_auc:.4f}, "
          f"{len(y)} rows, {y.sum()} churners")
    assert oracle_auc > 0.6, "the generator's hidden process should make churn predictable at all"
    assert model_auc >= oracle_auc - MAX_AUC_GAP_TO_ORACLE


def test_recall_at_the_chosen_threshold_meets_the_target(trained_warehouse: ChurnConfig, oot_with_oracle) -> None:
    joined, model = oot_with_oracle
    y = joined[model.contract.label].to_numpy(dtype=int)
    metrics = classification_metrics(y, model.predict_proba(joined), model.threshold)
    target = trained_warehouse.problem.success_target
    print(f"out-of-time recall {metrics['recall']:.3f} (target {target}), precision {metrics['precision']:.3f}, "
          f"threshold {model.threshold:.4f}")
    assert metrics["recall"] >= target - MAX_RECALL_SHORTFALL
    # The threshold must still discriminate: flagging everyone would also reach the target.
    assert metrics["tp"] + metrics["fp"] < 0.8 * len(y)


def test_probabilities_are_calibrated(oot_with_oracle) -> None:
    joined, model = oot_with_oracle
    y = joined[model.contract.label].to_numpy(dtype=int)
    p = model.predict_proba(joined)
    error = expected_calibration_error(y, p)
    print(f"out-of-time expected calibration error {error:.4f}; mean p {p.mean():.4f} vs churn rate {y.mean():.4f}")
    assert error < MAX_CALIBRATION_ERROR
    assert abs(p.mean() - y.mean()) < 0.5 * y.mean()
    assert np.isfinite(p).all()
