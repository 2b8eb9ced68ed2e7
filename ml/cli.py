"""`churn` command line: one sub-command per stage, plus the nightly pipeline.

Each stage module exposes `add_arguments(parser)` and `run_command(config, args)`;
this file only wires them up, so a stage's options live beside its code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ml.config import ConfigError, load_config
from ml.logs import configure_logging, get_logger

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("ml.data.generate", "write demo raw tables (and the hidden oracle) to the landing folder"),
    "build": ("ml.features.build", "run dbt build: staging, intermediate and feature marts, with dbt tests"),
    "profile": ("ml.reports.profile", "profile the feature mart: missing values, balance, outliers, plots"),
    "contract": ("ml.features.contract_cli", "print the feature contract read from dbt's manifest"),
    "train": ("ml.modeling.train", "train, compare and register a model (champion/challenger)"),
    "score": ("ml.modeling.score", "score active customers with the champion into churn_scores"),
    "audit": ("ml.quality.audit", "run the Great Expectations suites against the build database"),
    "monitor": ("ml.monitoring.monitor", "drift, realized and estimated performance, retraining decision"),
    "publish": ("ml.serving.publish", "atomically publish BI tables to the published database"),
    "nightly": ("ml.pipeline", "the whole refresh: build, audit, train if needed, score, monitor, publish"),
    "backfill": ("ml.backfill", "replay the nightly over past dates to build monitoring history"),
    "serve": ("ml.serving.api", "real-time scoring API computing features with the mart's own SQL"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="churn", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="path to churn.yml (default: $CHURN_CONFIG or ./churn.yml)")
    parser.add_argument("--dataset", help="dataset profile from churn.yml (default: its `dataset`)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # stage not installed in this build
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(handler=module.run_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    log = get_logger()
    try:
        config = load_config(args.config, dataset=args.dataset)
        return int(args.handler(config, args) or 0)
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
