"""The retraining policy: when does tonight's monitoring ask for a new model?

Each rule is a reason a business would accept for spending a training run:
the champion is old (calendar), the population moved (dataset drift, or drift
in a feature the model leans on), or the model is missing its success target
(realized recall once labels are in, estimated recall before). A triggered
retrain only trains a challenger; the registry's champion/challenger rule still
decides whether it replaces the champion, so a drift alarm can never make the
model worse.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from ml.config import ChurnConfig
from ml.warehouse import float_or_none, to_json

SCHEDULE = "schedule"
DATASET_DRIFT = "dataset_drift"
TOP_FEATURE_DRIFT = "top_feature_drift"
REALIZED_RECALL = "realized_recall"
ESTIMATED_RECALL = "estimated_recall"
NO_CHAMPION = "no_champion"

OUTCOME_NOT_TRIGGERED = "not triggered"
OUTCOME_PROMOTED = "promoted"
OUTCOME_REJECTED = "rejected challenger"
OUTCOME_FAILED = "failed"
OUTCOME_NO_NEW_LABELS = "not triggered: no new labelled data"
OUTCOME_RETRAINING_DISABLED = "triggered (retraining disabled)"


@dataclass(frozen=True)
class PolicyInputs:
    """What monitoring measured tonight, as the policy needs it."""

    today: dt.date
    champion_since: dt.date | None  # the date the champion was trained (as_of under time travel)
    drifted_share: float | None
    top_features_drifted: tuple[str, ...] = ()
    realized_recall: float | None = None
    realized_as_of: dt.date | None = None
    estimated_recall: float | None = None
    # Fully labelled snapshots newer than any training run's data, a rejected
    # challenger's included (None: unknown).
    new_labelled_snapshots: int | None = None


@dataclass(frozen=True)
class RetrainDecision:
    """`rules` lists every rule that fired; `triggered` is False when they fired but a
    challenger could only be trained on the champion's own data (`blocked`)."""

    triggered: bool
    rules: tuple[str, ...]
    values: dict[str, Any] = field(default_factory=dict)
    blocked: bool = False

    def values_json(self) -> str:
        return to_json(self.values, sort_keys=True)


@dataclass(frozen=True)
class PolicyOutcome:
    """What became of one decision: the outcome recorded in retrain_decisions and the challenger, if any."""

    decision: RetrainDecision
    outcome: str
    challenger_version: str | None = None
    message: str = ""

    @classmethod
    def without_training(cls, decision: RetrainDecision) -> PolicyOutcome:
        """The outcome when no challenger is trained: not triggered, blocked, or retraining switched off."""
        outcome = (
            OUTCOME_NO_NEW_LABELS if decision.blocked
            else OUTCOME_NOT_TRIGGERED if not decision.triggered
            else OUTCOME_RETRAINING_DISABLED
        )
        return cls(decision, outcome)


def decide(config: ChurnConfig, inputs: PolicyInputs) -> RetrainDecision:
    """Apply every rule; the decision lists each one that fired and the values it saw."""
    m = config.monitoring
    floor = config.problem.success_target - m.recall_margin
    days = (inputs.today - inputs.champion_since).days if inputs.champion_since else None
    realized = float_or_none(inputs.realized_recall)
    estimated = float_or_none(inputs.estimated_recall)
    share = float_or_none(inputs.drifted_share)
    fired: list[str] = []
    if inputs.champion_since is None:
        fired.append(NO_CHAMPION)
    if days is not None and days >= m.retrain_every_days:
        fired.append(SCHEDULE)
    if share is not None and share >= m.dataset_drift_share:
        fired.append(DATASET_DRIFT)
    if inputs.top_features_drifted:
        fired.append(TOP_FEATURE_DRIFT)
    if realized is not None and realized < floor:
        fired.append(REALIZED_RECALL)
    if estimated is not None and estimated < floor:
        fired.append(ESTIMATED_RECALL)
    values = {
        "today": inputs.today.isoformat(),
        "champion_since": inputs.champion_since.isoformat() if inputs.champion_since else None,
        "days_since_champion": days,
        "retrain_every_days": m.retrain_every_days,
        "drifted_share": share,
        "dataset_drift_share": m.dataset_drift_share,
        "top_features_drifted": list(inputs.top_features_drifted),
        "realized_recall": realized,
        "realized_as_of": inputs.realized_as_of.isoformat() if inputs.realized_as_of else None,
        "estimated_recall": estimated,
        "recall_floor": round(floor, 6),
        "new_labelled_snapshots": inputs.new_labelled_snapshots,
    }
    # A challenger trained on exactly the champion's labelled snapshots cannot
    # learn anything new (e.g. the night the champion itself was trained).
    blocked = bool(fired) and inputs.new_labelled_snapshots == 0 and NO_CHAMPION not in fired
    return RetrainDecision(triggered=bool(fired) and not blocked, rules=tuple(fired), values=values,
                           blocked=blocked)
