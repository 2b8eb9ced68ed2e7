"""The command line answers `--help` without loading the stages, and keeps its options.

`churn --help` used to import every stage (GX, scikit-learn, XGBoost,
matplotlib) to ask it for its arguments. The options now live in a table in
ml/cli.py; these tests pin that the parser stays import-free, that every
command still reaches a handler, and that no option changed on the way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ml import cli
from tests.conftest import REPO_ROOT

HEAVY_MODULES = ("sklearn", "xgboost", "great_expectations", "matplotlib", "duckdb", "dbt", "pandas", "scipy")

# Every command's options as the stages declared them before the table existed:
# (flags, dest, action, type, default, choices, help).
EXPECTED_OPTIONS: dict[str, list[tuple]] = {
    "generate": [
        (("--customers",), "customers", "Store", "int", None, None,
         "customers in total, initial base plus signups (default: churn.yml generator section)"),
        (("--start-date",), "start_date", "Store", "fromisoformat", None, None,
         "first day of data, a month start (default: churn.yml generator section)"),
        (("--months",), "months", "Store", "int", None, None,
         "months of events (default: churn.yml generator section)"),
        (("--seed",), "seed", "Store", "int", None, None,
         "random seed; same options and seed give identical files (default: churn.yml generator section)"),
        (("--out",), "out", "Store", "Path", None, None, "landing folder (default: the demo dataset's landing_dir)"),
        (("--oracle-out",), "oracle_out", "Store", "Path", None, None,
         "folder for oracle.parquet (default: churn.yml generator section)"),
        (("--drift-from",), "drift_from", "Store", "optional_date", None, None,
         "date from which one segment gets a price rise and uses less; 'none' disables "
         "(default: churn.yml generator section)"),
        (("--overwrite",), "overwrite", "StoreTrue", None, False, None, "replace the landing folder if it holds files"),
        (("--partitioned",), "partitioned", "StoreTrue", None, False, None,
         "write usage_events, payments and support_tickets as date=YYYY-MM-DD partition folders "
         "(default: generator.partitioned)"),
        (("--append-day",), "append_day", "StoreTrue", None, False, None,
         "land one more day into every partition folder after the newest partition, then stop"),
    ],
    "build": [
        (("--as-of",), "as_of", "Store", None, None, None,
         "build as if on this date (YYYY-MM-DD): later data is invisible"),
        (("--full-refresh",), "full_refresh", "StoreTrue", None, False, None,
         "rebuild every incremental model from all history instead of adding tonight's snapshots"),
    ],
    "profile": [
        (("--sample-rows",), "sample_rows", "Store", "int", 20000, None,
         "labelled rows sampled for the plots (statistics always use every row; default 20,000)"),
    ],
    "contract": [
        (("--no-parse",), "no_parse", "StoreTrue", None, False, None,
         "read the existing manifest, do not run dbt parse"),
    ],
    "new-dataset": [
        ((), "name", "Store", None, None, None, "the dataset's name (lower-case letters, digits, _)"),
        (("--from",), "source", "Store", None, None, None, "the landing file (.csv or .parquet)"),
        (("--key",), "key", "Store", None, None, None,
         "the key column (default: guessed: unique, never null, named like an id)"),
        (("--label",), "label", "Store", None, None, None,
         "the label column (default: guessed: two values, named like churn)"),
        (("--snapshot-date",), "snapshot_date", "Store", "fromisoformat", None, None,
         "the file's one snapshot date (default: the file's modification date)"),
    ],
    "train": [
        (("--force",), "force", "StoreTrue", None, False, None, "train even if a champion model exists"),
    ],
    "score": [
        (("--chunk-rows",), "chunk_rows", "Store", "int", 200000, None,
         "rows scored per chunk; bounds memory (default 200,000)"),
    ],
    "threshold": [
        (("--show",), "show", "StoreTrue", None, False, None,
         "print the curve (the default; also after --set/--unpin)"),
        (("--set",), "set", "Store", "float", None, None, "pin the champion's threshold at T (0 < T < 1)"),
        (("--unpin",), "unpin", "StoreTrue", None, False, None, "return to the churn.yml rule (and capacity)"),
        (("--reason",), "reason", "Store", None, None, None,
         "why (required with --set and --unpin; recorded in operating_points)"),
        (("--by",), "by", "Store", None, None, None, "who (default: the user running the command)"),
    ],
    "promote": [
        ((), "version", "Store", None, None, None, "the model_version to promote (see model_registry)"),
        (("--reason",), "reason", "Store", None, None, None, "why; recorded in model_registry_events"),
        (("--by",), "by", "Store", None, None, None, "who (default: the user running the command)"),
    ],
    "rollback": [
        (("--reason",), "reason", "Store", None, None, None, "why; recorded in model_registry_events"),
        (("--by",), "by", "Store", None, None, None, "who (default: the user running the command)"),
    ],
    "audit": [
        (("--stage",), "stage", "Store", None, "all", ("landing", "mart", "scores", "all"),
         "which suites to run (default: all; landing suites read the landing files)"),
        (("--as-of",), "as_of", "Store", None, None, None,
         "the run's as-of date (YYYY-MM-DD) for date and row-count bands"),
    ],
    "monitor": [
        (("--as-of",), "as_of", "Store", None, None, None,
         "'today' for the retrain calendar rule (YYYY-MM-DD; default: today)"),
        (("--retrain",), "retrain", "StoreTrue", None, False, None,
         "train a challenger when the policy fires (the nightly does; plain monitor only decides)"),
    ],
    "publish": [
        (("--run-id",), "run_id", "Store", None, None, None,
         "the nightly run the published state comes from (recorded in publish_info)"),
    ],
    "nightly": [
        (("--as-of",), "as_of", "Store", None, None, None,
         "run as if on this date (YYYY-MM-DD): later data is invisible"),
        (("--force-train",), "force_train", "StoreTrue", None, False, None,
         "train a new model even if a champion exists"),
        (("--accept-drift",), "accept_drift", "Store", None, None, None,
         "publish although drift crosses monitoring.publish_gate (the reason is kept in pipeline_runs)"),
    ],
    "backfill": [
        (("--from",), "start", "Store", "fromisoformat", None, None,
         "first replayed date (default: monitoring.backfill_months before --to)"),
        (("--to",), "end", "Store", "fromisoformat", None, None, "last replayed date (default: the end of the data)"),
        (("--every",), "every", "Store", None, None, None,
         "spacing of replayed nights, e.g. 7d, 2w, 1m (default: monitoring.backfill_every); "
         "month starts are always replayed"),
        (("--no-month-starts",), "month_starts", "StoreFalse", None, True, None,
         "replay only the --every dates (month starts give realized performance later)"),
        (("--in-place",), "in_place", "StoreTrue", None, False, None,
         "replay into the configured warehouse (refused if its champion saw later data)"),
        (("--into",), "into", "Store", "Path", None, None, "sandbox folder (default: <warehouse>/backfill, recreated)"),
    ],
    "serve": [
        (("--host",), "host", "Store", None, "127.0.0.1", None, "address to listen on (default 127.0.0.1)"),
        (("--port",), "port", "Store", "int", 8000, None, "port (default 8000)"),
    ],
}
EXPECTED_EXCLUSIVE = {"backfill": [["in_place", "into"]]}
EXPECTED_HELP = {
    "generate": "write demo raw tables (and the hidden oracle) to the landing folder",
    "build": "run dbt build: staging, intermediate and feature marts, with dbt tests",
    "profile": "profile the feature mart: missing values, balance, outliers, plots",
    "contract": "print the feature contract read from dbt's manifest",
    "new-dataset": "scaffold a dataset from a CSV or Parquet file: source, staging, mart, contract, suites, profile",
    "train": "train, compare and register a model (champion/challenger)",
    "score": "score active customers with the champion into churn_scores",
    "threshold": "show the champion's threshold curve around its operating point, or pin / unpin a threshold",
    "promote": "make a registered model the champion by hand (recorded with the reason)",
    "rollback": "bring back the previous champion (the model retired most recently)",
    "audit": "run the Great Expectations suites against the build database",
    "monitor": "drift, realized and estimated performance, retraining decision",
    "publish": "atomically publish BI tables to the published database",
    "nightly": "the whole refresh: build, audit, train if needed, score, monitor, publish",
    "backfill": "replay the nightly over past dates to build monitoring history",
    "serve": "real-time scoring API computing features with the mart's own SQL",
}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def described(parser: argparse.ArgumentParser) -> list[tuple]:
    def type_name(action: argparse.Action) -> str | None:
        return getattr(action.type, "__name__", None) if action.type else None

    return [
        (tuple(a.option_strings), a.dest, type(a).__name__.strip("_").removesuffix("Action"), type_name(a),
         a.default, tuple(a.choices) if a.choices else None, a.help)
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction)
    ]


def test_help_imports_no_stage_dependency() -> None:
    """A fresh interpreter builds the parser and prints every help page without the heavy libraries."""
    script = f"""
import json, sys
from ml import cli
cli.build_parser()
for argv in (["--help"], *[[c.name, "--help"] for c in cli.COMMANDS]):
    try:
        cli.main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY_MODULES!r}))
stages = sorted({{c.module for c in cli.COMMANDS}} & set(sys.modules))
print(json.dumps({{"heavy": loaded, "stages": stages}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"heavy": [], "stages": []}, f"`churn --help` imported {found}"


def test_every_command_reaches_a_handler_in_its_module() -> None:
    for command in cli.COMMANDS:
        module = importlib.import_module(command.module)
        handler = getattr(module, command.handler, None)
        assert callable(handler), f"{command.module}.{command.handler} (command {command.name!r}) is missing"
        assert cli.load_handler(command) is handler


def test_help_defaults_equal_the_stage_constants() -> None:
    """cli.py copies three stage constants to keep --help import-free; the copies must not drift."""
    from ml.modeling.score import DEFAULT_CHUNK_ROWS
    from ml.quality.audit import STAGES
    from ml.reports.profile import PLOT_SAMPLE_ROWS

    assert cli.PLOT_SAMPLE_ROWS == PLOT_SAMPLE_ROWS
    assert cli.SCORE_CHUNK_ROWS == DEFAULT_CHUNK_ROWS
    assert cli.AUDIT_STAGES == STAGES


def test_commands_and_options_are_unchanged() -> None:
    parser = cli.build_parser()
    commands = subcommands(parser)
    assert list(commands) == list(EXPECTED_OPTIONS)
    assert [c.name for c in cli.COMMANDS] == list(EXPECTED_OPTIONS)
    for name, command_parser in commands.items():
        assert described(command_parser) == EXPECTED_OPTIONS[name], name
        assert command_parser.description == EXPECTED_HELP[name]
        groups = [[a.dest for a in g._group_actions] for g in command_parser._mutually_exclusive_groups]
        assert groups == EXPECTED_EXCLUSIVE.get(name, []), name
    help_lines = {a.dest: a.help for a in next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction))._choices_actions}
    assert help_lines == EXPECTED_HELP
    assert [(tuple(a.option_strings), a.dest) for a in parser._actions if a.option_strings] == [
        (("-h", "--help"), "help"),
        (("--config",), "config"),
        (("--dataset",), "dataset"),
        (("-v", "--verbose"), "verbose"),
    ]


def test_option_types_parse_as_before() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--drift-from", "none", "--start-date", "2024-01-01", "--out", "x"])
    assert (args.drift_from, args.start_date, args.out) == ("none", dt.date(2024, 1, 1), Path("x"))
    assert parser.parse_args(["generate", "--drift-from", "2024-06-01"]).drift_from == dt.date(2024, 6, 1)
    args = parser.parse_args(["backfill", "--from", "2024-01-01", "--no-month-starts"])
    assert (args.start, args.end, args.month_starts, args.in_place, args.into) == (
        dt.date(2024, 1, 1), None, False, False, None)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["backfill", "--in-place", "--into", "x"])
    assert exc.value.code == 2


def test_configuration_error_exits_2_before_loading_the_stage(tmp_path: Path) -> None:
    assert cli.main(["--config", str(tmp_path / "missing.yml"), "train"]) == 2


def test_a_stage_that_reads_the_mart_alone_is_refused_on_spark(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """On engine spark the stages share the nightly's one Spark session; alone they would each need one."""
    monkeypatch.setenv("CHURN_ENGINE", "spark")
    refused = [c.name for c in cli.COMMANDS if not c.on_spark]
    assert {"score", "train", "monitor", "publish", "audit", "profile"} <= set(refused)
    for name in refused:
        assert cli.main(["--config", str(REPO_ROOT / "churn.yml"), name]) == 2, name
    assert "run `churn nightly`" in caplog.text
