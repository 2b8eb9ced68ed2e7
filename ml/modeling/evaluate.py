"""Pure evaluation functions: metrics at a threshold, threshold choice, curves.

Kept free of I/O so each rule (how the threshold is picked, what the naive
baseline scores, how calibration error is measured) can be tested on a handful
of hand-made numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

ECE_BINS = 10
PROBABILITY_EPS = 1e-15


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen decision threshold and what it buys on the rows it was chosen on."""

    threshold: float
    recall: float
    precision: float
    share_flagged: float
    rule: str  # "recall_target" or "expected_cost"
    expected_cost: float | None = None


def confusion_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts when customers with probability >= threshold are flagged as churners."""
    y = np.asarray(y, dtype=int)
    flagged = np.asarray(p, dtype=float) >= threshold
    return {
        "tp": int(np.sum(flagged & (y == 1))),
        "fp": int(np.sum(flagged & (y == 0))),
        "tn": int(np.sum(~flagged & (y == 0))),
        "fn": int(np.sum(~flagged & (y == 1))),
    }


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Rows, mean predicted probability and observed churn rate per equal-width probability bin.

    The reliability diagram and the expected calibration error are drawn from
    this one table, so the ECE printed beside the chart is the one recorded.
    Empty bins are kept (n_rows 0, means NaN) so every run has the same bins.
    """
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    index = np.clip((p * bins).astype(int), 0, bins - 1)
    rows = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=bins) / rows
        observed_rate = np.bincount(index, weights=y, minlength=bins) / rows
    edges = np.arange(bins + 1) / bins
    return pd.DataFrame({
        "bin": np.arange(bins), "bin_lower": edges[:-1], "bin_upper": edges[1:], "n_rows": rows.astype(int),
        "mean_predicted": np.where(rows > 0, mean_predicted, np.nan),
        "observed_rate": np.where(rows > 0, observed_rate, np.nan),
    })


def calibration_error_of_bins(table: pd.DataFrame) -> float:
    """Row-weighted mean |mean predicted - observed rate| over the bins of `reliability_bins`."""
    filled = table[table["n_rows"] > 0]
    total = filled["n_rows"].sum()
    if total == 0:
        return float("nan")
    gaps = (filled["mean_predicted"] - filled["observed_rate"]).abs()
    return float((filled["n_rows"] * gaps).sum() / total)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Row-weighted mean |mean predicted - observed rate| over equal-width probability bins."""
    return calibration_error_of_bins(reliability_bins(y, p, bins))


def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Ranking, probability and threshold metrics for calibrated probabilities `p`.

    Undefined values follow the baseline's conventions: precision with nobody
    flagged is 0; ROC-AUC with one class present is NaN.
    """
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    counts = confusion_at(y, p, threshold)
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    both_classes = 0 < y.sum() < len(y)
    recall = tp / (tp + fn) if tp + fn else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    clipped = np.clip(p, PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    log_loss = float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))) if len(y) else float("nan")
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if y.sum() else float("nan"),
        "log_loss": log_loss,
        "brier": float(np.mean((p - y) ** 2)) if len(y) else float("nan"),
        "recall": float(recall),
        "precision": float(precision),
        "f1": float(f1),
        "accuracy": float((tp + tn) / len(y)) if len(y) else float("nan"),
        **counts,
        "calibration_error": expected_calibration_error(y, p),
        "threshold": float(threshold),
        "rows": len(y),
        "prevalence": float(y.mean()) if len(y) else float("nan"),
    }


def baseline_metrics(y: np.ndarray, training_prevalence: float) -> dict[str, float]:
    """The naive "nobody churns" model: a constant score at the training churn rate,
    with a threshold above it so no one is flagged (recall 0, precision 0,
    ROC-AUC 0.5, PR-AUC = prevalence, accuracy = 1 - prevalence)."""
    y = np.asarray(y, dtype=int)
    constant = np.full(len(y), float(training_prevalence))
    return classification_metrics(y, constant, threshold=np.nextafter(training_prevalence, 2.0))


def threshold_table(y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """For every distinct score t (descending): tp, fp when flagging p >= t."""
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    values, inverse = np.unique(p, return_inverse=True)
    positives = np.bincount(inverse, weights=y, minlength=len(values))
    totals = np.bincount(inverse, minlength=len(values))
    # cumulative from the highest score down
    tp = np.cumsum(positives[::-1])
    flagged = np.cumsum(totals[::-1])
    return pd.DataFrame({
        "threshold": values[::-1],
        "tp": tp.astype(int),
        "fp": (flagged - tp).astype(int),
        "flagged": flagged.astype(int),
    })


def choose_threshold_for_recall(y: np.ndarray, p: np.ndarray, target_recall: float) -> ThresholdChoice:
    """The HIGHEST threshold whose recall on churners still meets `target_recall`.

    Highest, because every lower threshold flags more customers for the same goal;
    the precision it costs is reported with it.
    """
    y = np.asarray(y, dtype=int)
    positives = int(y.sum())
    if positives == 0:
        raise ValueError("cannot choose a recall threshold: no churners among the rows")
    table = threshold_table(y, p)
    recall = table["tp"] / positives
    meeting = table[recall >= target_recall - 1e-12]
    best = meeting.iloc[0]  # descending thresholds: the first that meets the target is the highest
    return ThresholdChoice(
        threshold=float(best["threshold"]),
        recall=float(best["tp"] / positives),
        precision=float(best["tp"] / best["flagged"]),
        share_flagged=float(best["flagged"] / len(y)),
        rule="recall_target",
    )


def choose_threshold_for_cost(
    y: np.ndarray, p: np.ndarray, cost_missed_churner: float, cost_wasted_offer: float
) -> ThresholdChoice:
    """The threshold minimising cost_missed * FN + cost_wasted * FP (ties: the highest).

    Flagging nobody is a candidate too (threshold just above the highest score).
    """
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    positives = int(y.sum())
    table = threshold_table(y, p)
    none_flagged = pd.DataFrame({
        "threshold": [float(np.nextafter(p.max(), np.inf)) if len(p) else 1.0],
        "tp": [0], "fp": [0], "flagged": [0],
    })
    table = pd.concat([none_flagged, table], ignore_index=True)
    cost = cost_missed_churner * (positives - table["tp"]) + cost_wasted_offer * table["fp"]
    best_index = int(np.argmin(cost.to_numpy()))  # first minimum = highest threshold
    best = table.iloc[best_index]
    return ThresholdChoice(
        threshold=float(best["threshold"]),
        recall=float(best["tp"] / positives) if positives else 0.0,
        precision=float(best["tp"] / best["flagged"]) if best["flagged"] else 0.0,
        share_flagged=float(best["flagged"] / len(y)) if len(y) else 0.0,
        rule="expected_cost",
        expected_cost=float(cost.iloc[best_index]),
    )


def threshold_curve(y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """Recall, precision, F1 and share flagged at thresholds 0.01 .. 0.99 (step 0.01)."""
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    rows = []
    for threshold in np.round(np.arange(1, 100) / 100, 2):
        m = confusion_at(y, p, threshold)
        flagged = m["tp"] + m["fp"]
        recall = m["tp"] / (m["tp"] + m["fn"]) if m["tp"] + m["fn"] else 0.0
        precision = m["tp"] / flagged if flagged else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({
            "threshold": float(threshold),
            "recall": float(recall),
            "precision": float(precision),
            "f1": float(f1),
            "share_flagged": float(flagged / len(y)) if len(y) else 0.0,
        })
    return pd.DataFrame(rows)


def aggregate_importance(values: np.ndarray, sources: list[str]) -> pd.Series:
    """Sum per-transformed-column importances back onto their source features."""
    if len(values) != len(sources):
        raise ValueError(f"{len(values)} importances for {len(sources)} transformed columns")
    return pd.Series(np.asarray(values, dtype=float), index=sources).groupby(level=0, sort=False).sum()


@dataclass(frozen=True)
class CandidateScore:
    """Cross-validated score of one candidate configuration."""

    algorithm: str
    mean: float
    std: float
    folds: int

    @property
    def std_error(self) -> float:
        return self.std / np.sqrt(self.folds) if self.folds else float("inf")


def select_by_simplicity(
    scores: list[CandidateScore], simplicity_order: tuple[str, ...], min_tolerance: float = 0.002
) -> CandidateScore:
    """The simplest candidate whose mean CV score is within the best's tolerance.

    Tolerance = max(one standard error of the best candidate, `min_tolerance`): a
    difference smaller than the fold-to-fold noise is not worth a more complex
    model that is harder to explain and slower to score.
    """
    if not scores:
        raise ValueError("no candidates to select from")
    best = max(scores, key=lambda s: s.mean)
    tolerance = max(best.std_error, min_tolerance)
    tied = [s for s in scores if s.mean >= best.mean - tolerance]
    return min(tied, key=lambda s: (simplicity_order.index(s.algorithm), -s.mean))
