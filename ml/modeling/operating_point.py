"""The operating point: which threshold turns tonight's probabilities into `will_churn`.

The threshold is a choice, not part of the fitted model, so it is re-made at
every scoring without retraining:

1. a threshold pinned by hand (`churn threshold --set`) wins until unpinned;
2. otherwise the rule of churn.yml (expected cost when both costs are set,
   else the `success_target` recall) is applied to the champion's stored,
   calibrated out-of-fold predictions (`ml.modeling.registry.stored_predictions`)
   — the same rows and rule training used, so an unchanged config gives the
   trained threshold and a changed one takes effect the next night;
3. `operating_point.capacity_customers` / `capacity_share` then raise it, if
   needed, until tonight's flagged customers fit the capacity (ties at the
   boundary are left out, so the cap is never exceeded).

Models stored before their predictions were keep the threshold they were
trained with (step 2 is skipped, and the row says so). Every scoring run and
every pin is recorded in `operating_points`, and the registry's `threshold`
column is set to the threshold in force, so monitoring, the API and BI follow.

The choice (`choose`) is pure Python on tonight's probabilities, whichever
engine scored them (`ml.modeling.score.tonight_probabilities` reads them from
churn_scores on DuckDB or Spark); the record (`record`) is a control-plane
write to the build DuckDB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ml.config import ChurnConfig
from ml.logs import get_logger
from ml.modeling.evaluate import confusion_at
from ml.modeling.model import ChurnModel
from ml.modeling.registry import (
    SPLIT_OUT_OF_FOLD,
    RegistryError,
    champion_version,
    load_model,
    set_threshold,
    stored_predictions,
)
from ml.modeling.train import choose_threshold
from ml.warehouse import Session, connect, declare, quote

log = get_logger("operating_point")

RULE_PINNED = "pinned"
RULE_UNPINNED = "unpinned"
RULE_TRAINED = "trained"  # no stored predictions: the threshold chosen at training
SOURCE_SCORING = "scoring"
SOURCE_CLI = "churn threshold"
CURVE_STEP = 0.01
CURVE_SPAN = 5  # thresholds shown either side of the choice

OPERATING_POINTS = declare(
    name="operating_points",
    owner=__name__,
    grain="one row per scoring run, and one per threshold pinned or unpinned by hand",
    description="The threshold in force for a model, the rule and capacity that chose it, "
                "what it buys on the stored out-of-fold rows, and who pinned it and why.",
    columns=[
        ("dataset", "VARCHAR NOT NULL"),
        ("model_version", "VARCHAR NOT NULL"),
        ("run_id", "VARCHAR"),
        ("source", "VARCHAR NOT NULL"),
        ("rule", "VARCHAR NOT NULL"),
        ("threshold", "DOUBLE"),
        ("rule_threshold", "DOUBLE"),
        ("capacity_limited", "BOOLEAN"),
        ("capacity_rows", "BIGINT"),
        ("success_target", "DOUBLE"),
        ("cost_missed_churner", "DOUBLE"),
        ("cost_wasted_offer", "DOUBLE"),
        ("oof_recall", "DOUBLE"),
        ("oof_precision", "DOUBLE"),
        ("oof_share_flagged", "DOUBLE"),
        ("scored_rows", "BIGINT"),
        ("flagged_rows", "BIGINT"),
        ("set_by", "VARCHAR"),
        ("reason", "VARCHAR"),
        ("set_at", "TIMESTAMP NOT NULL"),
    ],
)


class OperatingPointError(RuntimeError):
    """A threshold cannot be shown or set (no champion, out of range, no reason)."""


@dataclass(frozen=True)
class RuleChoice:
    """The rule's threshold for a model, before any pin or capacity, and the rows it was chosen on."""

    rule: str
    threshold: float
    oof: pd.DataFrame | None  # label, probability of the stored out-of-fold rows


@dataclass(frozen=True)
class OperatingPoint:
    """The threshold in force tonight and how it was reached."""

    threshold: float
    rule: str
    rule_threshold: float
    capacity_limited: bool
    capacity_rows: int | None
    flagged: int
    rows: int

    def describe(self) -> str:
        cap = f", capped to {self.capacity_rows:,d} customers" if self.capacity_limited else ""
        return f"threshold {self.threshold:.4f} ({self.rule}{cap}): {self.flagged:,d} of {self.rows:,d} flagged"


def actor() -> str:
    """Who ran the command, for the record."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


def oof_rows(config: ChurnConfig, version: str) -> pd.DataFrame | None:
    stored = stored_predictions(config, version)
    if stored is None:
        return None
    return stored[stored["split"] == SPLIT_OUT_OF_FOLD].reset_index(drop=True)


def rule_choice(config: ChurnConfig, model: ChurnModel) -> RuleChoice:
    """The config's rule on the model's stored out-of-fold predictions (the trained threshold without them)."""
    oof = oof_rows(config, str(model.version))
    if oof is None or oof.empty or not oof["label"].any():
        trained = float(model.metadata.threshold_choice["threshold"]) if model.metadata.threshold_choice \
            else float(model.threshold)
        return RuleChoice(RULE_TRAINED, trained, None)
    choice = choose_threshold(config, oof["label"].to_numpy(dtype=int), oof["probability"].to_numpy(dtype=float))
    return RuleChoice(choice.rule, float(choice.threshold), oof)


def capacity_rows(config: ChurnConfig, rows: int) -> int | None:
    """How many customers tonight's capacity allows, or None without a capacity."""
    point = config.operating_point
    if point.capacity_customers is not None:
        return int(point.capacity_customers)
    if point.capacity_share is not None:
        return int(np.floor(point.capacity_share * rows))
    return None


def capped_threshold(probability: np.ndarray, threshold: float, cap: int) -> float:
    """The lowest threshold >= `threshold` that flags at most `cap` rows (ties at the boundary are left out)."""
    p = np.asarray(probability, dtype=float)
    if int((p >= threshold).sum()) <= cap:
        return float(threshold)
    values = np.unique(p)[::-1]  # descending
    flagged = np.searchsorted(np.sort(p), values, side="left")
    counts = len(p) - flagged  # rows >= each value
    fits = values[counts <= cap]
    if len(fits) == 0:
        return float(np.nextafter(values[0], np.inf))  # even the top tie is above capacity: nobody
    return float(max(fits.min(), threshold))


def current_pin(session: Session, version: str) -> float | None:
    """The threshold pinned by hand for `version`, or None (never pinned, or unpinned since)."""
    if not session.exists(OPERATING_POINTS):
        return None
    row = session.one(
        f"select rule, threshold from {quote(OPERATING_POINTS.name)} where model_version = ? and source = ? "
        "order by set_at desc limit 1",
        [version, SOURCE_CLI],
    )
    if row is None or row[0] != RULE_PINNED:
        return None
    return float(row[1])


def _oof_metrics(oof: pd.DataFrame | None, threshold: float) -> dict[str, float | None]:
    if oof is None or oof.empty:
        return {"oof_recall": None, "oof_precision": None, "oof_share_flagged": None}
    m = confusion_at(oof["label"].to_numpy(dtype=int), oof["probability"].to_numpy(dtype=float), threshold)
    flagged, positives = m["tp"] + m["fp"], m["tp"] + m["fn"]
    return {"oof_recall": m["tp"] / positives if positives else None,
            "oof_precision": m["tp"] / flagged if flagged else None,
            "oof_share_flagged": flagged / len(oof)}


def _row(config: ChurnConfig, version: str, run_id: str | None, source: str, rule: str, threshold: float,
         rule_threshold: float | None, oof: pd.DataFrame | None, **extra: object) -> pd.DataFrame:
    t = config.training
    row = {
        "dataset": config.dataset.name, "model_version": version, "run_id": run_id, "source": source,
        "rule": rule, "threshold": threshold, "rule_threshold": rule_threshold,
        "success_target": config.problem.success_target, "cost_missed_churner": t.cost_missed_churner,
        "cost_wasted_offer": t.cost_wasted_offer, **_oof_metrics(oof, threshold),
        "set_at": dt.datetime.now(), **extra,
    }
    return pd.DataFrame({name: pd.Series([value], dtype=object) for name, value in row.items()})


def choose(config: ChurnConfig, choice: RuleChoice, pin: float | None, probability: np.ndarray) -> OperatingPoint:
    """Tonight's threshold: the pin, else the rule's, raised to fit the capacity on `probability`.

    Pure on the array (in any order), so it is the same choice whichever engine
    scored: `ml.modeling.score.tonight_probabilities` reads the array from a
    churn_scores on Spark as well as DuckDB.
    """
    rule, base = (RULE_PINNED, pin) if pin is not None else (choice.rule, choice.threshold)
    cap = capacity_rows(config, len(probability))
    threshold = capped_threshold(probability, base, cap) if cap is not None else base
    flagged = int((np.asarray(probability) >= threshold).sum())
    return OperatingPoint(threshold, rule, base, threshold > base, cap, flagged, len(probability))


def record(session: Session, config: ChurnConfig, model: ChurnModel, choice: RuleChoice, point: OperatingPoint,
           run_id: str) -> None:
    """Record a scoring run's operating point and set it in the registry, together (control plane: DuckDB)."""
    version = str(model.version)
    with session.transaction():
        session.append(OPERATING_POINTS, _row(
            config, version, run_id, SOURCE_SCORING, point.rule, point.threshold, point.rule_threshold, choice.oof,
            capacity_limited=point.capacity_limited, capacity_rows=point.capacity_rows, scored_rows=point.rows,
            flagged_rows=point.flagged,
        ))
        set_threshold(session, version, point.threshold)


def apply(session: Session, config: ChurnConfig, model: ChurnModel, choice: RuleChoice,
          probability: np.ndarray, run_id: str) -> OperatingPoint:
    """Tonight's threshold for `model` (pin, else rule, then capacity); recorded and set in the registry."""
    point = choose(config, choice, current_pin(session, str(model.version)), probability)
    record(session, config, model, choice, point, run_id)
    log.info("operating point of %s: %s", model.version, point.describe())
    return point


# ---------------------------------------------------------------- churn threshold

def curve_around(oof: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Recall, precision and share flagged on the out-of-fold rows at thresholds near `threshold`."""
    near = np.round(threshold + CURVE_STEP * np.arange(-CURVE_SPAN, CURVE_SPAN + 1), 4)
    points = sorted({float(threshold), *[float(t) for t in near if 0 < t < 1]})
    rows = []
    for t in points:
        m = _oof_metrics(oof, t)
        rows.append({"threshold": t, "recall": m["oof_recall"] or 0.0, "precision": m["oof_precision"] or 0.0,
                     "share_flagged": m["oof_share_flagged"] or 0.0, "chosen": t == threshold})
    return pd.DataFrame(rows)


def show_lines(config: ChurnConfig) -> list[str]:
    """The champion's threshold in force, how it was chosen, and the curve around it."""
    version = champion_version(config)
    if version is None:
        raise OperatingPointError(f"dataset {config.dataset.name!r} has no champion; run churn train")
    model = load_model(config, version)
    choice = rule_choice(config, model)
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        pin = current_pin(session, version)
    lines = [f"champion {version}: threshold in force {model.threshold:.4f}"]
    if pin is not None:
        lines.append(f"  pinned by hand at {pin:.4f} (churn threshold --unpin returns to the rule)")
    lines.append(f"  the rule ({choice.rule}) on the stored out-of-fold predictions gives {choice.threshold:.4f}"
                 + ("" if choice.oof is not None else " (no stored predictions: the trained threshold)"))
    cap = config.operating_point
    if cap.capacity_customers is not None or cap.capacity_share is not None:
        lines.append(f"  capacity: at most {cap.capacity_customers or f'{cap.capacity_share:.1%} of'} customers "
                     "per night (applied to tonight's scores)")
    if choice.oof is None:
        return lines
    lines.append(f"  {'threshold':>10s} {'recall':>8s} {'precision':>10s} {'flagged':>8s}   "
                 f"(out-of-fold, {len(choice.oof):,d} rows)")
    for row in curve_around(choice.oof, model.threshold).itertuples():
        mark = "  <- in force" if row.chosen else ""
        lines.append(f"  {row.threshold:>10.4f} {row.recall:>8.3f} {row.precision:>10.3f} "
                     f"{row.share_flagged:>8.1%}{mark}")
    return lines


def pin(config: ChurnConfig, threshold: float | None, reason: str, by: str) -> str:
    """Pin (or, with None, unpin) the champion's threshold; recorded with who and why."""
    if not reason.strip():
        raise OperatingPointError("a reason is required (--reason): it is recorded in operating_points")
    if threshold is not None and not 0 < threshold < 1:
        raise OperatingPointError(f"threshold {threshold} is out of range; allowed: > 0 and < 1")
    version = champion_version(config)
    if version is None:
        raise OperatingPointError(f"dataset {config.dataset.name!r} has no champion; run churn train")
    model = load_model(config, version)
    choice = rule_choice(config, model)
    in_force = choice.threshold if threshold is None else threshold
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session, session.transaction():
        session.append(OPERATING_POINTS, _row(
            config, version, None, SOURCE_CLI, RULE_UNPINNED if threshold is None else RULE_PINNED, in_force,
            choice.threshold, choice.oof, set_by=by, reason=reason,
        ))
        set_threshold(session, version, in_force)
    what = "unpinned: the rule's" if threshold is None else "pinned at"
    return f"champion {version}: threshold {what} {in_force:.4f} (by {by}: {reason}); scores follow at the next scoring"


def history(session: Session, version: str) -> pd.DataFrame:
    """The operating points recorded for `version`, newest first."""
    if not session.exists(OPERATING_POINTS):
        return pd.DataFrame(columns=OPERATING_POINTS.column_names)
    return session.frame(f"select * from {quote(OPERATING_POINTS.name)} where model_version = ? "
                         "order by set_at desc", [version])


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    """`churn threshold`: show the curve (default), --set T, or --unpin."""
    try:
        if args.set is not None or args.unpin:
            print(pin(config, None if args.unpin else args.set, args.reason or "", args.by or actor()))
        print("\n".join(show_lines(config)))
    except (OperatingPointError, RegistryError) as exc:
        print(f"churn threshold: {exc}")
        return 2
    return 0

