"""Model performance: realized once labels arrive, estimated (CBPE) before that.

A churn label is only known `horizon_days` after the snapshot, so for a month
the model runs blind. Confidence-based performance estimation (CBPE, as in
NannyML) fills the gap: if the probabilities are calibrated, a customer scored
p is a churner with probability p, so the expected confusion matrix at the
decision threshold (and the expected ROC-AUC, PR-AUC and Brier score) follow
from the probabilities alone. The estimate is only as good as the calibration:
it tracks covariate shift but cannot see concept drift (the same features now
meaning a different churn risk), which is why realized metrics replace it as
soon as the horizon has passed.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

REALIZED = "realized"
ESTIMATED = "estimated"
METRICS = ("roc_auc", "pr_auc", "recall", "precision", "brier", "flagged_share")


def _ratio(numerator: float, denominator: float) -> float:
    """0 when nothing is in the denominator, the conventions of ml.modeling.evaluate."""
    return float(numerator / denominator) if denominator > 0 else 0.0


def realized_metrics(y: np.ndarray, probability: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    """Metrics of the decisions actually taken (`flagged`, as scored) against the known labels."""
    y = np.asarray(y, dtype=int)
    p = np.asarray(probability, dtype=float)
    f = np.asarray(flagged, dtype=bool)
    tp = float(np.sum(f & (y == 1)))
    fp = float(np.sum(f & (y == 0)))
    fn = float(np.sum(~f & (y == 1)))
    both = 0 < y.sum() < y.size
    return {
        "n_rows": int(y.size),
        "positives": float(y.sum()),
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if y.sum() else float("nan"),
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "brier": float(np.mean((p - y) ** 2)) if y.size else float("nan"),
        "flagged_share": float(f.mean()) if f.size else float("nan"),
    }


def estimated_metrics(probability: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    """CBPE: the same metrics as `realized_metrics`, in expectation under calibration.

    Expected TP = sum of p over flagged rows, FN = sum of p over unflagged rows,
    FP = sum of (1 - p) over flagged rows. For the ranking metrics each row counts
    once as a positive with weight p and once as a negative with weight 1 - p, so
    ROC-AUC and average precision are their expectations over the label draws
    (pairwise, ignoring the p_i * p_j correlation of the same row, as NannyML).
    """
    p = np.clip(np.asarray(probability, dtype=float), 0.0, 1.0)
    f = np.asarray(flagged, dtype=bool)
    tp = float(p[f].sum())
    fp = float((1 - p[f]).sum())
    fn = float(p[~f].sum())
    n = p.size
    y_twice = np.concatenate([np.ones(n), np.zeros(n)])
    p_twice = np.concatenate([p, p])
    weights = np.concatenate([p, 1 - p])
    positives = float(p.sum())
    has_both = 0 < positives < n
    return {
        "n_rows": int(n),
        "positives": positives,
        "roc_auc": float(roc_auc_score(y_twice, p_twice, sample_weight=weights)) if has_both else float("nan"),
        "pr_auc": (float(average_precision_score(y_twice, p_twice, sample_weight=weights))
                   if positives > 0 else float("nan")),
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "brier": float(np.mean(p * (1 - p))) if n else float("nan"),
        "flagged_share": float(f.mean()) if n else float("nan"),
    }
