"""`churn promote VERSION` and `churn rollback`: change the champion by hand, with the reason recorded."""

from __future__ import annotations

import argparse

from ml.config import ChurnConfig
from ml.modeling.operating_point import actor
from ml.modeling.registry import ChampionChange, PromotionError, RegistryError, promote, rollback


def _print(change: ChampionChange) -> None:
    print(f"{change.event}: {change.version} is now the champion (was {change.previous_champion}); "
          f"recorded in model_registry_events by {change.actor}: {change.reason}")
    print("scores follow at the next `churn score` or nightly, with the operating point re-chosen for this model")


def promote_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    try:
        _print(promote(config, args.version, args.reason, args.by or actor()))
    except (PromotionError, RegistryError) as exc:
        print(f"churn promote: {exc}")
        return 2
    return 0


def rollback_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    try:
        _print(rollback(config, args.reason, args.by or actor()))
    except (PromotionError, RegistryError) as exc:
        print(f"churn rollback: {exc}")
        return 2
    return 0
