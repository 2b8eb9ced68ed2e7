"""`churn contract`: show the feature contract the ML layer will use."""

from __future__ import annotations

import argparse
import json

from ml.config import ChurnConfig
from ml.features.contract import load_contract
from ml.features.dbt import dbt_target_path, run_dbt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-parse", action="store_true", help="read the existing manifest, do not run dbt parse")


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    if not args.no_parse:
        run_dbt(config, "parse")
    contract = load_contract(dbt_target_path(config) / "manifest.json", config.dataset.feature_mart)
    print(json.dumps(contract.to_dict(), indent=2))
    return 0
