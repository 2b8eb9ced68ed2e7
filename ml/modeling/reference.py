"""Reference statistics of the champion's training data, for drift monitoring.

Drift is always measured against what the champion was trained on, so the
reference is computed once, at training time, and stored in the model's
metadata (`model.metadata.reference`). Nightly monitoring then never rereads
millions of training rows, and the reference cannot silently change when the
mart is rebuilt. What is stored is plain JSON (floats, lists, dicts), bounded
in size: PSI bin edges and shares, a few moments, the null share and a
fixed-size quantile sketch per numeric column (enough for KS and Wasserstein
against the reference), and category shares per categorical column.

Monitoring reads it back as typed, frozen objects (`DriftReference.from_dict`)
so drift code uses attributes, not string keys; `to_dict()` gives back exactly
the stored JSON, and models saved before the types existed load the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ml.config import MonitoringConfig
from ml.features.contract import FeatureContract
from ml.warehouse import finite_or_none

REFERENCE_VERSION = 1
# Category levels used in shares: a null is its own level, and rare tails are
# folded so a free-text-like column cannot blow up the stored reference.
NULL_LEVEL = "__null__"
OTHER_LEVEL = "__other__"
MAX_CATEGORIES = 100
FLAGGED_LEVEL = "flagged"
NOT_FLAGGED_LEVEL = "not_flagged"


def numeric_values(values: pd.Series | np.ndarray) -> np.ndarray:
    """Float array with NaN for every kind of missing value (None, pd.NA, NaT)."""
    series = pd.Series(values) if not isinstance(values, pd.Series) else values
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


@dataclass(frozen=True)
class NumericReference:
    """A numeric column at training time: moments, PSI bins (null share last) and a quantile sketch."""

    n: int
    null_share: float
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    median: float | None = None
    max: float | None = None
    q25: float | None = None
    q75: float | None = None
    iqr: float | None = None
    spread: float = 1.0
    bin_edges: tuple[float, ...] = ()
    bin_shares: tuple[float, ...] = ()
    sketch: tuple[float, ...] = ()
    kind: str = "numeric"

    @property
    def present_rows(self) -> int:
        """Non-null reference rows: the sample size behind the sketch."""
        return int(round(self.n * (1 - self.null_share)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NumericReference:
        return cls(
            n=int(d["n"]), null_share=float(d["null_share"]), mean=d.get("mean"), std=d.get("std"),
            min=d.get("min"), median=d.get("median"), max=d.get("max"), q25=d.get("q25"), q75=d.get("q75"),
            iqr=d.get("iqr"), spread=float(d.get("spread", 1.0)), bin_edges=tuple(d.get("bin_edges") or ()),
            bin_shares=tuple(d.get("bin_shares") or ()), sketch=tuple(d.get("sketch") or ()),
            kind=d.get("kind", "numeric"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "n": self.n, "null_share": self.null_share, "mean": self.mean, "std": self.std,
            "min": self.min, "median": self.median, "max": self.max, "q25": self.q25, "q75": self.q75,
            "iqr": self.iqr, "spread": self.spread, "bin_edges": list(self.bin_edges),
            "bin_shares": list(self.bin_shares), "sketch": list(self.sketch),
        }


@dataclass(frozen=True)
class CategoricalReference:
    """A categorical column at training time: level shares, null as its own level."""

    n: int
    null_share: float
    shares: Mapping[str, float] = field(default_factory=dict)
    folded: bool = False  # the rare tail was folded into OTHER_LEVEL
    kind: str = "categorical"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CategoricalReference:
        return cls(n=int(d["n"]), null_share=float(d["null_share"]), shares=dict(d.get("shares") or {}),
                   folded=bool(d.get("folded", False)), kind=d.get("kind", "categorical"))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "null_share": self.null_share, "shares": dict(self.shares),
                "folded": self.folded}


ColumnReference = NumericReference | CategoricalReference


def column_reference(d: Mapping[str, Any]) -> ColumnReference:
    """The typed reference of one stored column, by its `kind`."""
    return NumericReference.from_dict(d) if d.get("kind") == "numeric" else CategoricalReference.from_dict(d)


@dataclass(frozen=True)
class DriftReference:
    """Everything monitoring compares tonight with: per-feature references, the score's and the flagged share's."""

    features: Mapping[str, ColumnReference]
    score: NumericReference
    n_rows: int
    psi_bins: int
    threshold: float | None = None
    flagged: CategoricalReference | None = None
    version: int = REFERENCE_VERSION
    as_of_min: str | None = None
    as_of_max: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftReference:
        flagged = d.get("flagged")
        return cls(
            features={name: column_reference(ref) for name, ref in d["features"].items()},
            score=NumericReference.from_dict(d["score"]),
            n_rows=int(d.get("n_rows", 0)),
            psi_bins=int(d.get("psi_bins", 0)),
            threshold=d.get("threshold"),
            flagged=CategoricalReference.from_dict(flagged) if flagged else None,
            version=int(d.get("version", REFERENCE_VERSION)),
            as_of_min=d.get("as_of_min"),
            as_of_max=d.get("as_of_max"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON stored in the model's metadata (the as_of range only when it was known)."""
        out: dict[str, Any] = {
            "version": self.version,
            "n_rows": self.n_rows,
            "psi_bins": self.psi_bins,
            "features": {name: ref.to_dict() for name, ref in self.features.items()},
            "score": self.score.to_dict(),
            "threshold": self.threshold,
            "flagged": self.flagged.to_dict() if self.flagged is not None else None,
        }
        if self.as_of_min is not None or self.as_of_max is not None:
            out["as_of_min"] = self.as_of_min
            out["as_of_max"] = self.as_of_max
        return out


# Quantiles (PSI edges, sketch, IQR) come from a seeded sample of at most this
# many values: their error is ~1/sqrt(n) = 0.001 in probability, far below the
# sketch's own resolution, while sorting 12M values per column took minutes.
QUANTILE_SAMPLE = 1_000_000
SAMPLE_SEED = 0


def _sorted_present(values: np.ndarray) -> np.ndarray:
    present = values[~np.isnan(values)]
    if present.size > QUANTILE_SAMPLE:
        rng = np.random.default_rng(SAMPLE_SEED)
        present = present[rng.choice(present.size, QUANTILE_SAMPLE, replace=False)]
    return np.sort(present)


def observed_quantiles(sorted_values: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Quantiles that are observed values (numpy's 'inverted_cdf', DuckDB's quantile_disc), from one sort."""
    n = sorted_values.size
    idx = np.clip(np.ceil(probs * n).astype(np.int64) - 1, 0, n - 1)
    return sorted_values[idx]


def psi_edges(values: np.ndarray, bins: int, sorted_present: np.ndarray | None = None) -> list[float]:
    """Interior quantile edges of the non-null values, each an observed value.

    Bins are (-inf, e0], (e0, e1], ..., (e_last, inf). Taking edges from the data
    and dropping duplicates and the maximum means no reference bin is empty even
    for count-like columns with many ties.
    """
    present = _sorted_present(values) if sorted_present is None else sorted_present
    if present.size == 0 or bins < 2:
        return []
    edges = np.unique(observed_quantiles(present, np.arange(1, bins) / bins))
    edges = edges[edges < present[-1]]
    return [float(e) for e in edges]


def bin_shares(values: np.ndarray, edges: list[float]) -> list[float]:
    """Share of rows in each PSI bin, the last entry being the null share."""
    n = values.size
    if n == 0:
        return [0.0] * (len(edges) + 2)
    nulls = np.isnan(values)
    counts = np.asarray(bin_counts(values[~nulls], edges), dtype=float)
    return [float(c) for c in counts / n] + [float(nulls.sum() / n)]


def bin_counts(present: np.ndarray, edges: list[float]) -> list[int]:
    """Rows of the non-null `present` values in each PSI bin (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    idx = np.searchsorted(np.asarray(edges, dtype=float), present, side="left")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def quantile_sketch(values: np.ndarray, size: int, sorted_present: np.ndarray | None = None) -> list[float]:
    """`size` evenly spaced quantiles of the non-null values, used as a weighted sample.

    Mid-point probabilities (i + 0.5) / size make each sketch point stand for an
    equal share of the reference, so the sketch's empirical CDF is within
    1/size of the true one: enough for KS and Wasserstein at monitoring scale.
    Small columns are stored whole.
    """
    present = _sorted_present(values) if sorted_present is None else sorted_present
    if present.size <= size:
        return [float(v) for v in present]
    return [float(v) for v in observed_quantiles(present, (np.arange(size) + 0.5) / size)]


def numeric_reference(values: pd.Series | np.ndarray, monitoring: MonitoringConfig) -> NumericReference:
    """Everything later drift tests need about one numeric column."""
    x = numeric_values(values)
    present = _sorted_present(x)
    n = int(x.size)
    edges = psi_edges(x, monitoring.psi_bins, present)
    if present.size:
        q25, q50, q75 = (float(v) for v in np.quantile(present, [0.25, 0.5, 0.75]))
        mean, std = float(np.nanmean(x)), float(np.nanstd(x))
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    else:
        q25 = q50 = q75 = mean = std = lo = hi = float("nan")
    iqr = q75 - q25
    # Wasserstein is in the column's units; dividing by the reference std makes
    # one threshold fit every column (Evidently's "normed" Wasserstein). The IQR
    # was tried first but is tiny for heavy-tailed ratios, where it turned tail
    # noise into alarms. IQR for a degenerate std, 1 for a constant column.
    spread = std if std > 0 else (iqr if iqr > 0 else 1.0)
    return NumericReference(
        n=n,
        null_share=float(np.isnan(x).mean()) if n else 0.0,
        mean=finite_or_none(mean),
        std=finite_or_none(std),
        min=finite_or_none(lo),
        median=finite_or_none(q50),
        max=finite_or_none(hi),
        q25=finite_or_none(q25),
        q75=finite_or_none(q75),
        iqr=finite_or_none(iqr),
        spread=finite_or_none(spread) if finite_or_none(spread) is not None else 1.0,
        bin_edges=tuple(edges),
        bin_shares=tuple(bin_shares(x, edges)),
        sketch=tuple(quantile_sketch(x, monitoring.reference_quantiles, present)),
    )


def level_counts(values: pd.Series | np.ndarray) -> pd.Series:
    """Rows per level as text, null as NULL_LEVEL; counted before converting to text,
    which is what keeps this fast on millions of rows."""
    series = pd.Series(values) if not isinstance(values, pd.Series) else values
    counts = series.value_counts(dropna=False)
    keys = [NULL_LEVEL if pd.isna(k) else str(k) for k in counts.index]
    return pd.Series(counts.to_numpy(), index=keys, dtype=float).groupby(level=0, sort=False).sum()


def categorical_reference(values: pd.Series | np.ndarray) -> CategoricalReference:
    """Level shares (null as its own level, rare tail folded into OTHER_LEVEL)."""
    counts = level_counts(values)
    n = int(counts.sum())
    shares = (counts / n).sort_values(ascending=False, kind="stable") if n else pd.Series(dtype=float)
    kept = shares.iloc[:MAX_CATEGORIES]
    out = {str(k): float(v) for k, v in kept.items()}
    folded = float(shares.iloc[MAX_CATEGORIES:].sum())
    if folded > 0:
        out[OTHER_LEVEL] = out.get(OTHER_LEVEL, 0.0) + folded
    return CategoricalReference(n=n, null_share=float(out.get(NULL_LEVEL, 0.0)), shares=out, folded=folded > 0)


def flagged_reference(scores: np.ndarray, threshold: float) -> CategoricalReference:
    """The share flagged at the decision threshold, as a two-level categorical."""
    s = numeric_values(scores)
    return categorical_reference(flag_levels(s, threshold))


def flag_levels(scores: np.ndarray, threshold: float) -> pd.Series:
    """'flagged' / 'not_flagged' per row: the same rule scoring applies (p >= threshold)."""
    return pd.Series(np.where(scores >= threshold, FLAGGED_LEVEL, NOT_FLAGGED_LEVEL), dtype=object)


def compute_reference(
    features: pd.DataFrame,
    scores: np.ndarray,
    contract: FeatureContract,
    monitoring: MonitoringConfig,
    threshold: float | None = None,
) -> dict[str, Any]:
    """JSON-serialisable reference statistics of a model's training data.

    `features` holds (at least) the contract's feature columns of the training
    rows, `scores` the model's probabilities for those rows (out-of-fold or
    in-sample, the trainer's choice). With `threshold`, the flagged share is
    stored exactly; without it monitoring derives it from the score sketch.
    """
    missing = [name for name in contract.feature_names if name not in features.columns]
    if missing:
        raise ValueError(
            f"compute_reference: training frame lacks contract feature column(s) {', '.join(missing)}"
        )
    scores = numeric_values(scores)
    if scores.size != len(features):
        raise ValueError(
            f"compute_reference: {scores.size} scores for {len(features)} training rows"
        )
    stats: dict[str, ColumnReference] = {}
    for feature in contract.features:
        column = features[feature.name]
        stats[feature.name] = (
            numeric_reference(column, monitoring)
            if feature.kind == "numeric"
            else categorical_reference(column)
        )
    as_of_range: tuple[str | None, str | None] = (None, None)
    if contract.as_of in features.columns and len(features):
        dates = pd.to_datetime(features[contract.as_of])
        as_of_range = (str(dates.min().date()), str(dates.max().date()))
    return DriftReference(
        features=stats,
        score=numeric_reference(scores, monitoring),
        n_rows=int(len(features)),
        psi_bins=monitoring.psi_bins,
        threshold=threshold,
        flagged=flagged_reference(scores, threshold) if threshold is not None else None,
        as_of_min=as_of_range[0],
        as_of_max=as_of_range[1],
    ).to_dict()
