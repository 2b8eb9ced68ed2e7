"""The drift publish gate: pure decision, no I/O (like `policy`).

Drift alone never stopped a nightly, so a partial extract that drifted 14-22
features still published. The gate fails the run when tonight's drift crosses
`monitoring.publish_gate` and nothing resolved it: a challenger promoted
tonight (trained on the newer labelled data and judged better by the registry)
resolves it, and so does an operator's recorded `--accept-drift "reason"`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ml.config import PublishGateConfig


@dataclass(frozen=True)
class GateDecision:
    """Whether tonight may publish, and why."""

    blocked: bool
    crossed: tuple[str, ...]  # the thresholds tonight's drift crossed, in words
    resolution: str  # "", "retrain" or "accepted"

    def message(self) -> str:
        return "; ".join(self.crossed)


def publish_gate(gate: PublishGateConfig, drifted_features: list[str], drifted_share: float,
                 top_features_drifted: list[str], promoted: bool, accept_reason: str | None) -> GateDecision:
    """Block publishing when drift crosses the gate, unless a promoted retrain or an override resolves it."""
    crossed = []
    if drifted_share >= gate.drifted_share:
        crossed.append(f"drifted-feature share {drifted_share:.0%} >= {gate.drifted_share:.0%} "
                       f"({len(drifted_features)} features: {', '.join(drifted_features[:12])})")
    if gate.top_feature_drift and top_features_drifted:
        crossed.append(f"top features drifted: {', '.join(top_features_drifted)}")
    if not crossed:
        return GateDecision(False, (), "")
    if promoted:
        return GateDecision(False, tuple(crossed), "retrain")
    if accept_reason:
        return GateDecision(False, tuple(crossed), "accepted")
    return GateDecision(True, tuple(crossed), "")
