"""`churn contract`: show the feature contract the ML layer will use."""

from __future__ import annotations

import argparse
import json

from ml.config import ChurnConfig
from ml.features.dbt import run_dbt
from ml.features.mart import current_contract


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    if not args.no_parse:
        run_dbt(config, "parse")
    contract = current_contract(config)
    print(json.dumps(contract.to_dict(), indent=2))
    return 0
