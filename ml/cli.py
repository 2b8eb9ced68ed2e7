"""`churn` command line: one sub-command per stage, plus the nightly pipeline.

Every command's options are declared here, in `COMMANDS`, as plain data. The
stage modules pull in GX, scikit-learn, XGBoost, matplotlib and DuckDB; asking
each of them for its arguments made `churn --help` take seconds. So building
the parser imports no stage module, and a command's module is imported only
when that command runs (`run_command(config, args)` unless the table names
another handler).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.config import ChurnConfig, ConfigError, load_config
from ml.logs import configure_logging, get_logger

# Stage defaults that appear in help texts. They are copies of the stages' own
# constants (importing the stage to read them is what made --help slow);
# tests/test_cli.py checks that each copy equals the stage's value.
PLOT_SAMPLE_ROWS = 20_000  # ml.reports.profile.PLOT_SAMPLE_ROWS
SCORE_CHUNK_ROWS = 200_000  # ml.modeling.score.DEFAULT_CHUNK_ROWS
AUDIT_STAGES = ("landing", "mart", "scores")  # ml.quality.audit.STAGES

Handler = Callable[[ChurnConfig, argparse.Namespace], int | None]


@dataclass(frozen=True)
class Option:
    """One `parser.add_argument(*flags, **settings)` call, kept as data."""

    flags: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)


def option(*flags: str, **settings: Any) -> Option:
    return Option(flags, settings)


@dataclass(frozen=True)
class Command:
    """A sub-command: where its code lives, what it says, which options it takes.

    `exclusive` holds groups of options of which at most one may be given; they
    are added after `options`, as the stages always did.
    """

    name: str
    module: str
    help: str
    options: tuple[Option, ...] = ()
    exclusive: tuple[tuple[Option, ...], ...] = ()
    handler: str = "run_command"
    # False: a stage that reads the data plane on its own; with engine spark it runs inside `churn nightly`,
    # whose one Spark session every stage shares (one JVM per process, one per Derby folder)
    on_spark: bool = True


def optional_date(text: str) -> dt.date | str:
    """A date, or the string 'none' that the generator reads as 'disabled'."""
    return "none" if text.lower() in ("none", "null", "") else dt.date.fromisoformat(text)


_GENERATOR_DEFAULTS = "(default: churn.yml generator section)"

COMMANDS: tuple[Command, ...] = (
    Command(
        "generate", "ml.data.generate",
        "write demo raw tables (and the hidden oracle) to the landing folder",
        options=(
            option("--customers", type=int,
                   help=f"customers in total, initial base plus signups {_GENERATOR_DEFAULTS}"),
            option("--start-date", type=dt.date.fromisoformat,
                   help=f"first day of data, a month start {_GENERATOR_DEFAULTS}"),
            option("--months", type=int, help=f"months of events {_GENERATOR_DEFAULTS}"),
            option("--seed", type=int,
                   help=f"random seed; same options and seed give identical files {_GENERATOR_DEFAULTS}"),
            option("--out", type=Path, help="landing folder (default: the demo dataset's landing_dir)"),
            option("--oracle-out", type=Path, help=f"folder for oracle.parquet {_GENERATOR_DEFAULTS}"),
            option("--drift-from", type=optional_date,
                   help="date from which one segment gets a price rise and uses less; "
                        f"'none' disables {_GENERATOR_DEFAULTS}"),
            option("--overwrite", action="store_true", help="replace the landing folder if it holds files"),
            option("--partitioned", action="store_true",
                   help="write usage_events, payments and support_tickets as date=YYYY-MM-DD partition folders "
                        "(default: generator.partitioned)"),
            option("--append-day", action="store_true",
                   help="land one more day into every partition folder after the newest partition, then stop"),
        ),
    ),
    Command(
        "build", "ml.features.build",
        "run dbt build: staging, intermediate and feature marts, with dbt tests",
        options=(
            option("--as-of", help="build as if on this date (YYYY-MM-DD): later data is invisible"),
            option("--full-refresh", action="store_true",
                   help="rebuild every incremental model from all history instead of adding tonight's snapshots"),
        ),
    ),
    Command(
        "profile", "ml.reports.profile",
        "profile the feature mart: missing values, balance, outliers, plots",
        options=(
            option("--sample-rows", type=int, default=PLOT_SAMPLE_ROWS,
                   help="labelled rows sampled for the plots "
                        f"(statistics always use every row; default {PLOT_SAMPLE_ROWS:,d})"),
        ),
        on_spark=False,
    ),
    Command(
        "contract", "ml.features.contract_cli",
        "print the feature contract read from dbt's manifest",
        options=(option("--no-parse", action="store_true", help="read the existing manifest, do not run dbt parse"),),
    ),
    Command(
        "new-dataset", "ml.features.scaffold",
        "scaffold a dataset from a CSV or Parquet file: source, staging, mart, contract, suites, profile",
        options=(
            option("name", help="the dataset's name (lower-case letters, digits, _)"),
            option("--from", dest="source", required=True, help="the landing file (.csv or .parquet)"),
            option("--key", help="the key column (default: guessed: unique, never null, named like an id)"),
            option("--label", help="the label column (default: guessed: two values, named like churn)"),
            option("--snapshot-date", type=dt.date.fromisoformat,
                   help="the file's one snapshot date (default: the file's modification date)"),
        ),
    ),
    Command(
        "train", "ml.modeling.train",
        "train, compare and register a model (champion/challenger)",
        options=(option("--force", action="store_true", help="train even if a champion model exists"),),
        on_spark=False,
    ),
    Command(
        "score", "ml.modeling.score",
        "score active customers with the champion into churn_scores",
        options=(
            option("--chunk-rows", type=int, default=SCORE_CHUNK_ROWS,
                   help=f"rows scored per chunk; bounds memory (default {SCORE_CHUNK_ROWS:,d})"),
        ),
        on_spark=False,
    ),
    Command(
        "threshold", "ml.modeling.operating_point",
        "show the champion's threshold curve around its operating point, or pin / unpin a threshold",
        options=(
            option("--show", action="store_true", help="print the curve (the default; also after --set/--unpin)"),
            option("--set", type=float, metavar="T", help="pin the champion's threshold at T (0 < T < 1)"),
            option("--unpin", action="store_true", help="return to the churn.yml rule (and capacity)"),
            option("--reason", help="why (required with --set and --unpin; recorded in operating_points)"),
            option("--by", help="who (default: the user running the command)"),
        ),
    ),
    Command(
        "promote", "ml.modeling.champion_cli",
        "make a registered model the champion by hand (recorded with the reason)",
        options=(
            option("version", help="the model_version to promote (see model_registry)"),
            option("--reason", required=True, help="why; recorded in model_registry_events"),
            option("--by", help="who (default: the user running the command)"),
        ),
        handler="promote_command",
    ),
    Command(
        "rollback", "ml.modeling.champion_cli",
        "bring back the previous champion (the model retired most recently)",
        options=(
            option("--reason", required=True, help="why; recorded in model_registry_events"),
            option("--by", help="who (default: the user running the command)"),
        ),
        handler="rollback_command",
    ),
    Command(
        "audit", "ml.quality.audit",
        "run the Great Expectations suites against the build database",
        options=(
            option("--stage", choices=[*AUDIT_STAGES, "all"], default="all",
                   help="which suites to run (default: all; landing suites read the landing files)"),
            option("--as-of", help="the run's as-of date (YYYY-MM-DD) for date and row-count bands"),
        ),
        on_spark=False,
    ),
    Command(
        # Retraining is orchestrated by the pipeline, so the command's handler lives there.
        "monitor", "ml.pipeline",
        "drift, realized and estimated performance, retraining decision",
        options=(
            option("--as-of", help="'today' for the retrain calendar rule (YYYY-MM-DD; default: today)"),
            option("--retrain", action="store_true",
                   help="train a challenger when the policy fires (the nightly does; plain monitor only decides)"),
        ),
        handler="monitor_command",
        on_spark=False,
    ),
    Command(
        "publish", "ml.serving.publish",
        "atomically publish BI tables to the published database",
        options=(option("--run-id", help="the nightly run the published state comes from (recorded in publish_info)"),),
        on_spark=False,
    ),
    Command(
        "nightly", "ml.pipeline",
        "the whole refresh: build, audit, train if needed, score, monitor, publish",
        options=(
            option("--as-of", help="run as if on this date (YYYY-MM-DD): later data is invisible"),
            option("--force-train", action="store_true", help="train a new model even if a champion exists"),
            option("--accept-drift", metavar="REASON",
                   help="publish although drift crosses monitoring.publish_gate (the reason is kept in pipeline_runs)"),
        ),
    ),
    Command(
        "backfill", "ml.backfill",
        "replay the nightly over past dates to build monitoring history",
        options=(
            option("--from", dest="start", type=dt.date.fromisoformat,
                   help="first replayed date (default: monitoring.backfill_months before --to)"),
            option("--to", dest="end", type=dt.date.fromisoformat,
                   help="last replayed date (default: the end of the data)"),
            option("--every", help="spacing of replayed nights, e.g. 7d, 2w, 1m "
                                   "(default: monitoring.backfill_every); month starts are always replayed"),
            option("--no-month-starts", dest="month_starts", action="store_false",
                   help="replay only the --every dates (month starts give realized performance later)"),
        ),
        exclusive=((
            option("--in-place", action="store_true",
                   help="replay into the configured warehouse (refused if its champion saw later data)"),
            option("--into", type=Path, help="sandbox folder (default: <warehouse>/backfill, recreated)"),
        ),),
        on_spark=False,
    ),
    Command(
        "serve", "ml.serving.api",
        "real-time scoring API computing features with the mart's own SQL",
        options=(
            option("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"),
            option("--port", type=int, default=8000, help="port (default 8000)"),
        ),
    ),
)


def add_command(sub: argparse._SubParsersAction, command: Command) -> None:
    """Declare one sub-command and its options; imports nothing."""
    parser = sub.add_parser(command.name, help=command.help, description=command.help)
    for opt in command.options:
        parser.add_argument(*opt.flags, **opt.settings)
    for group_options in command.exclusive:
        group = parser.add_mutually_exclusive_group()
        for opt in group_options:
            group.add_argument(*opt.flags, **opt.settings)
    parser.set_defaults(command_spec=command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="churn", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="path to churn.yml (default: $CHURN_CONFIG or ./churn.yml)")
    parser.add_argument("--dataset", help="dataset profile from churn.yml (default: its `dataset`)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        add_command(sub, command)
    return parser


def load_handler(command: Command) -> Handler:
    """Import the command's module now that it is about to run, and return its handler."""
    return getattr(importlib.import_module(command.module), command.handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    log = get_logger()
    try:
        config = load_config(args.config, dataset=args.dataset)
        if config.engine == "spark" and not args.command_spec.on_spark:
            log.error("churn %s reads the mart on its own, which engine spark does inside `churn nightly` (its "
                      "stages share the run's one Spark session); run `churn nightly`, or this command with "
                      "CHURN_ENGINE=duckdb on a DuckDB build", args.command)
            return 2
        handler = load_handler(args.command_spec)
        return int(handler(config, args) or 0)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # every stage's own errors already say table, column and count
        if args.verbose:
            log.exception("churn %s failed", args.command)
        else:
            log.error("churn %s failed: %s", args.command, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
