"""Drift statistics: today's scoring snapshot against the champion's reference.

Pure functions on tonight's digests (ml/monitoring/digest.py: counts, moments and a
quantile sketch per feature, computed by SQL where the snapshot lives) or on
arrays, and the typed reference (ml/modeling/reference.py); the monitor stage
reads the warehouse and writes the rows. Drift is *flagged* on
effect size (PSI, normalised Wasserstein, Jensen-Shannon distance, null-share
jump, share of unseen categories), never on p-values alone: with tens of
thousands of rows a p-value flags differences too small to matter. The tests'
p-values (KS, chi-square, binomial for null shares) are reported beside each
effect size and only veto a flag the sample is too small to support
(`monitoring.max_p_value`): a feature filled for a few hundred customers
otherwise "drifts" every night by chance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial.distance import jensenshannon

from ml.config import MonitoringConfig
from ml.modeling.reference import (
    FLAGGED_LEVEL,
    NOT_FLAGGED_LEVEL,
    NULL_LEVEL,
    OTHER_LEVEL,
    CategoricalReference,
    DriftReference,
    NumericReference,
    flag_levels,
    numeric_values,
)
from ml.monitoring.digest import CategoricalDigest, Digest, NumericDigest
from ml.warehouse import finite_or_none, to_json

# Shares are floored before logs so an empty bin gives a large, finite PSI.
PSI_EPSILON = 1e-4
TOP_LEVELS_IN_SUMMARY = 5
# Statistic names written to drift_stats.statistic.
PSI = "psi"
KS = "ks"
WASSERSTEIN = "wasserstein_normalised"
CHI2 = "chi_square"
JENSEN_SHANNON = "jensen_shannon"
NULL_SHARE = "null_share_change"
NEW_CATEGORIES = "new_category_share"
DRIFTED_SHARE = "drifted_feature_share"
TOP_FEATURE_DRIFT = "top_feature_drift"
# drift_stats.feature / kind of the rows that are not contract features.
SCORE_FEATURE = "score"
FLAGGED_FEATURE = "share_flagged"
DATASET_FEATURE = "dataset"
SCORE_KIND = "score"
DATASET_KIND = "dataset"


@dataclass(frozen=True)
class DriftStat:
    """One row of drift_stats (without the run's id, date and model version)."""

    feature: str
    kind: str
    statistic: str
    value: float | None
    p_value: float | None
    threshold: float | None
    drifted: bool | None  # None: a test reported beside, not a drift decision
    reference_summary: str
    current_summary: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def psi(reference_shares: np.ndarray | list[float], current_shares: np.ndarray | list[float]) -> float:
    """Population stability index: sum (c - r) * ln(c / r) over matching bins."""
    r = np.maximum(np.asarray(reference_shares, dtype=float), PSI_EPSILON)
    c = np.maximum(np.asarray(current_shares, dtype=float), PSI_EPSILON)
    return float(np.sum((c - r) * np.log(c / r)))


def ks_against_sketch(sketch: Sequence[float], n_reference: int, current: Sequence[float] | np.ndarray,
                      n_current: int | None = None) -> tuple[float, float]:
    """KS statistic of the current values (or their sketch) against the reference sketch, and its p-value.

    A sketch stands for its sample's CDF (to within 1/len(sketch)); the p-value
    uses the real sample sizes (reference rows, current rows), not the sketch
    sizes, via scipy's exact two-sided KS distribution at the effective n.
    """
    current = np.asarray(current, dtype=float)
    result = stats.ks_2samp(np.asarray(sketch, dtype=float), current, method="asymp")
    d = float(result.statistic)
    n, m = max(int(n_reference), 1), max(int(current.size if n_current is None else n_current), 1)
    n_eff = max(int(round(n * m / (n + m))), 1)
    return d, float(stats.kstwo.sf(d, n_eff))


def reference_numeric_summary(ref: NumericReference) -> dict[str, Any]:
    return {"n": ref.n, "null_share": ref.null_share, "mean": ref.mean, "std": ref.std, "median": ref.median}


def _top(shares: dict[str, float]) -> dict[str, float]:
    ordered = sorted(shares.items(), key=lambda kv: -kv[1])[:TOP_LEVELS_IN_SUMMARY]
    return {k: round(v, 6) for k, v in ordered}


def _json(data: dict[str, Any]) -> str:
    return to_json(data, sort_keys=True)


def numeric_drift(
    feature: str,
    reference: NumericReference,
    current: NumericDigest | pd.Series | np.ndarray,
    monitoring: MonitoringConfig,
    kind: str = "numeric",
) -> list[DriftStat]:
    """PSI (training-time bins, null as a bin), KS, normalised Wasserstein, null-share change.

    `current` is tonight's digest (ml/monitoring/digest.py), or values to digest here.
    """
    digest = current if isinstance(current, NumericDigest) else NumericDigest.of_values(current, reference)
    ref_summary = _json(reference_numeric_summary(reference))
    cur_summary = _json(digest.summary())

    def row(statistic: str, value: float | None, p: float | None, threshold: float | None,
            drifted: bool | None) -> DriftStat:
        return DriftStat(feature, kind, statistic, finite_or_none(value), finite_or_none(p), threshold,
                         drifted, ref_summary, cur_summary)

    sketch = np.asarray(reference.sketch, dtype=float)
    tonight = np.asarray(digest.sketch, dtype=float)
    d = p = distance = None
    if sketch.size and tonight.size and digest.present:
        d, p = ks_against_sketch(sketch, reference.present_rows, tonight, digest.present)
        distance = stats.wasserstein_distance(sketch, tonight) / reference.spread
    psi_value = psi(list(reference.bin_shares), digest.bin_shares())
    rows = [row(PSI, psi_value, p, monitoring.psi_threshold,
                flag(psi_value, monitoring.psi_threshold, p, monitoring))]
    if d is not None:
        rows.append(row(KS, d, p, None, None))
        rows.append(row(WASSERSTEIN, distance, p, monitoring.distance_threshold,
                        flag(distance, monitoring.distance_threshold, p, monitoring)))
    rows.append(_null_share_row(feature, kind, reference.null_share, digest.n, digest.nulls,
                                monitoring, ref_summary, cur_summary))
    return rows


def flag(effect: float, threshold: float, p_value: float | None, monitoring: MonitoringConfig) -> bool:
    """Drift = an effect size above its threshold that sampling noise cannot explain.

    The decision is on effect size; the p-value only vetoes differences a small
    sample (a rarely filled feature, a small segment) produces by chance. On
    large samples every p-value is tiny and the effect size alone decides.
    """
    significant = p_value is None or p_value < monitoring.max_p_value
    return bool(effect > threshold and significant)


def _null_share_row(
    feature: str, kind: str, ref_null: float, n: int, n_null: int,
    monitoring: MonitoringConfig, ref_summary: str, cur_summary: str,
) -> DriftStat:
    """Signed change in null share; p-value of a one-sample binomial test against the reference."""
    current = n_null / n if n else 0.0
    change = current - ref_null
    p = stats.binomtest(n_null, n, min(max(ref_null, 1e-12), 1 - 1e-12)).pvalue if n else None
    return DriftStat(feature, kind, NULL_SHARE, finite_or_none(change), finite_or_none(p), monitoring.null_share_jump,
                     flag(abs(change), monitoring.null_share_jump, p, monitoring), ref_summary, cur_summary)


def categorical_drift(
    feature: str,
    reference: CategoricalReference,
    current: CategoricalDigest | pd.Series | np.ndarray,
    monitoring: MonitoringConfig,
    kind: str = "categorical",
) -> list[DriftStat]:
    """PSI, chi-square, Jensen-Shannon distance, share of unseen levels and null-share change.

    `current` is tonight's level counts (ml/monitoring/digest.py), or values to count here.
    """
    counts = (current if isinstance(current, CategoricalDigest) else CategoricalDigest.of_values(current)).counts
    n = int(sum(counts.values()))
    ref_shares = reference.shares
    unseen = [lvl for lvl in counts if lvl not in ref_shares and lvl != NULL_LEVEL]
    # With a folded reference tail, an unknown level may have been seen in training.
    unseen_target = OTHER_LEVEL if reference.folded else None
    current: dict[str, float] = {}
    for lvl, count in counts.items():
        key = unseen_target if (lvl in unseen and unseen_target) else lvl
        current[key] = current.get(key, 0.0) + float(count)
    new_levels = [] if unseen_target else unseen
    universe = sorted(set(ref_shares) | set(current))
    r = np.array([ref_shares.get(lvl, 0.0) for lvl in universe])
    c_counts = np.array([current.get(lvl, 0.0) for lvl in universe])
    c = c_counts / n if n else c_counts

    ref_summary = _json({"n": reference.n, "null_share": round(reference.null_share, 6),
                         "top": _top(ref_shares)})
    cur_summary = _json({"n": n, "null_share": round(current.get(NULL_LEVEL, 0.0) / n, 6) if n else 0.0,
                         "top": _top({k: v / n for k, v in current.items()}) if n else {},
                         **({"new_levels": new_levels[:10]} if new_levels else {})})

    def row(statistic: str, value: float | None, p: float | None, threshold: float | None,
            drifted: bool | None) -> DriftStat:
        return DriftStat(feature, kind, statistic, finite_or_none(value), finite_or_none(p), threshold,
                         drifted, ref_summary, cur_summary)

    rows: list[DriftStat] = []
    chi2, p = _chi_square(r * reference.n, c_counts)
    psi_value = psi(r, c)
    rows.append(row(PSI, psi_value, p, monitoring.psi_threshold,
                    flag(psi_value, monitoring.psi_threshold, p, monitoring)))
    rows.append(row(CHI2, chi2, p, None, None))
    js = float(jensenshannon(r, c, base=2)) if n and r.sum() > 0 else 0.0
    rows.append(row(JENSEN_SHANNON, js, p, monitoring.distance_threshold,
                    flag(js, monitoring.distance_threshold, p, monitoring)))
    if kind != SCORE_KIND:
        new_share = sum(current[lvl] for lvl in new_levels) / n if n else 0.0
        rows.append(row(NEW_CATEGORIES, new_share, None, monitoring.new_category_share,
                        new_share > monitoring.new_category_share))
        rows.append(_null_share_row(feature, kind, reference.null_share, n,
                                    int(current.get(NULL_LEVEL, 0.0)), monitoring, ref_summary, cur_summary))
    return rows


def _chi_square(reference_counts: np.ndarray, current_counts: np.ndarray) -> tuple[float, float]:
    """Chi-square test of homogeneity of the two level distributions (levels seen on either side)."""
    table = np.vstack([reference_counts, current_counts])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    result = stats.chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


def score_drift(
    reference: DriftReference, scores: np.ndarray, threshold: float, monitoring: MonitoringConfig
) -> list[DriftStat]:
    """Drift of the score distribution and of the share flagged at the decision threshold."""
    rows = numeric_drift(SCORE_FEATURE, reference.score, scores, monitoring, kind=SCORE_KIND)
    flagged_ref = reference.flagged
    if flagged_ref is None or reference.threshold != threshold:
        flagged_ref = flagged_reference_from_sketch(reference.score, threshold)
    current = flag_levels(numeric_values(scores), threshold)
    rows += categorical_drift(FLAGGED_FEATURE, flagged_ref, current, monitoring, kind=SCORE_KIND)
    return rows


def flagged_reference_from_sketch(score_reference: NumericReference, threshold: float) -> CategoricalReference:
    """Reference share flagged at `threshold`, read off the score sketch (within 1/sketch size)."""
    sketch = np.asarray(score_reference.sketch, dtype=float)
    share = float((sketch >= threshold).mean()) if sketch.size else 0.0
    return CategoricalReference(n=score_reference.n, null_share=0.0,
                                shares={FLAGGED_LEVEL: share, NOT_FLAGGED_LEVEL: 1 - share}, folded=False)


def feature_drift(
    reference: DriftReference, current: Mapping[str, Digest] | pd.DataFrame, kinds: dict[str, str],
    monitoring: MonitoringConfig,
) -> list[DriftStat]:
    """Drift rows for every contract feature (name -> kind) present in the reference.

    `current` holds tonight's digest per feature (the nightly's, computed by SQL
    where the snapshot lives), or tonight's values as a frame's columns.
    """
    rows: list[DriftStat] = []
    for name, kind in kinds.items():
        ref = reference.features.get(name)
        if ref is None:
            continue  # a feature added after the champion was trained has no reference
        if ref.kind != kind:
            raise ValueError(f"feature {name!r} is {kind} in the mart but {ref.kind} in the reference")
        drift = numeric_drift if kind == "numeric" else categorical_drift
        rows += drift(name, ref, current[name], monitoring)
    return rows


def drifted_features(rows: list[DriftStat]) -> list[str]:
    """Features (not the score rows) with at least one drift decision that fired."""
    seen: dict[str, bool] = {}
    for row in rows:
        if row.kind in (SCORE_KIND, DATASET_KIND):
            continue
        seen[row.feature] = seen.get(row.feature, False) or bool(row.drifted)
    return [name for name, drifted in seen.items() if drifted]


def dataset_drift(
    rows: list[DriftStat], top_features: list[str], monitoring: MonitoringConfig
) -> list[DriftStat]:
    """Dataset-level rows: share of drifted features, and drift among the most important ones."""
    features = sorted({r.feature for r in rows if r.kind not in (SCORE_KIND, DATASET_KIND)})
    drifted = set(drifted_features(rows))
    share = len(drifted) / len(features) if features else 0.0
    top = [f for f in top_features[: monitoring.top_features] if f in features]
    top_drifted = [f for f in top if f in drifted]
    summary = _json({"features": len(features), "drifted": sorted(drifted)})
    return [
        DriftStat(DATASET_FEATURE, DATASET_KIND, DRIFTED_SHARE, share, None, monitoring.dataset_drift_share,
                  share >= monitoring.dataset_drift_share, _json({"features": len(features)}), summary),
        DriftStat(DATASET_FEATURE, DATASET_KIND, TOP_FEATURE_DRIFT, float(len(top_drifted)), None, 0.0,
                  bool(top_drifted), _json({"top_features": top}), _json({"drifted": top_drifted})),
    ]
