"""The incremental nightly at scale, in one command (issue 10's Benchmarks section).

Run:  .venv/bin/python -m benchmarks.nightly --customers 1000000 --months 12 24 --pandas-customers 200000
      .venv/bin/python -m benchmarks.nightly --write-readme [RESULTS.json]   # README table from a results file

For each history length, a private warehouse (a relocated churn.yml under
--workdir) gets a partitioned landing, and every step runs as its own `churn`
subprocess, as the nightly would: generate; the first nightly (trains the first
model); one more day landed (`churn generate --append-day`); the second
nightly on it, without retraining, with its per-step breakdown (pipeline_runs)
and its dbt nodes (run_results.json); one DuckDB scan-and-aggregate of the
last 90 days of the event tables (benchmarks/scan90.py) to put the night's
build in proportion; `churn build --full-refresh` (after the second night: a
full refresh makes the night after it audit and profile every snapshot); and
a full retrain with model selection (`churn train --force`). Then, at
--pandas-customers, the seed-style pandas pipeline (benchmarks/seed_pandas.py)
beside the project's first and second nightly on the same data.

Every step records wall time, CPU seconds (user + sys of the process tree),
peak RSS of the tree, and the load average before and after
(benchmarks/measure.py); a step does not start while the 1-minute load is above
--max-load (2 cores) unless --allow-load. Targets are printed as pass/fail and
everything is saved to benchmarks/results/nightly-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.measure import Load, LoadTooHighError, Measurement, measure
from benchmarks.nightly_report import figure_rows, latest_results, targets, write_readme
from ml.config import ChurnConfig, load_config, write_relocated_config

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
CHURN = str(Path(sys.executable).parent / "churn")
LANDING_TABLES = ("customers", "subscriptions", "payments", "support_tickets", "usage_events")
TOP_DBT_NODES = 10


class StepFailedError(RuntimeError):
    """A measured step exited non-zero; the rest of its history cannot run."""


class Bench:
    """The run-wide settings every measured step needs (load policy, where logs go)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.max_load, self.settle, self.allow_load = args.max_load, args.settle_seconds, args.allow_load

    def run(self, block: dict[str, Any], name: str, command: list[str], logs: Path) -> Measurement:
        """Measure one step into `block['steps']`; raise StepFailedError when it failed."""
        print(f"  {block['customers']:,} x {block['months']} months: {name} ...", flush=True)
        result = measure(name, command, logs / f"{name}.log", cwd=REPO_ROOT, max_load=self.max_load,
                         settle_seconds=self.settle, allow_load=self.allow_load)
        block["steps"][name] = result.as_dict()
        print(f"    {result.wall_s:8.1f} s wall {result.cpu_s:8.1f} CPU-s {result.peak_mb:7.0f} MB peak  "
              f"load {result.load_before.one:.2f} -> {result.load_after.one:.2f}"
              f"{'' if result.load_ok else '  (LOADED)'}", flush=True)
        if result.exit_code != 0:
            raise StepFailedError(f"{name} exited {result.exit_code}: {tail(Path(result.log))}")
        return result


def tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:])[-600:]


def churn(config_file: Path, *args: str) -> list[str]:
    return [CHURN, "--config", str(config_file), *args]


def private_config(base: ChurnConfig, root: Path, customers: int, months: int) -> tuple[Path, ChurnConfig]:
    """A fresh warehouse under `root` whose generator writes the partitioned landing at this size."""
    shutil.rmtree(root, ignore_errors=True)
    config_file = write_relocated_config(
        base, root, {"generator": {"customers": customers, "months": months, "partitioned": True}})
    return config_file, load_config(config_file)


def landing_sizes(landing: Path) -> dict[str, dict[str, float]]:
    """Rows and MB per landing table, a file or a folder of partitions."""
    out = {}
    for table in LANDING_TABLES:
        single = landing / f"{table}.parquet"
        files = [single] if single.exists() else sorted((landing / table).rglob("*.parquet"))
        out[table] = {"rows": sum(pq.read_metadata(f).num_rows for f in files),
                      "mb": round(sum(f.stat().st_size for f in files) / 1e6, 1), "files": len(files)}
    return out


def appended_as_of(log: Path) -> dt.date:
    """The --as-of `churn generate --append-day` says to replay its new day with."""
    found = re.search(r"--as-of (\d{4}-\d{2}-\d{2})", log.read_text())
    if not found:
        raise StepFailedError(f"append_day: no '--as-of YYYY-MM-DD' in {log}")
    return dt.date.fromisoformat(found.group(1))


def nightly_run_id(log: Path) -> str | None:
    found = re.search(r"^nightly (\S+) \(", log.read_text(errors="replace"), flags=re.MULTILINE)
    return found.group(1) if found else None


def stage_breakdown(config: ChurnConfig, log: Path) -> list[dict[str, Any]]:
    """The nightly's steps and their seconds, from pipeline_runs (through the owner's reader)."""
    from ml.pipeline import run_steps  # heavy imports (training, scoring): only once a nightly ran

    _, steps = run_steps(config, nightly_run_id(log))
    return [{"step": s.step, "status": s.status, "seconds": round(s.seconds, 2)} for s in steps]


def dbt_breakdown(config: ChurnConfig, keep_as: Path) -> dict[str, Any]:
    """The last dbt build's node timings (run_results.json, kept beside the logs): sums and the slowest nodes."""
    from ml.features.dbt import dbt_target_path

    source = dbt_target_path(config) / "run_results.json"
    if not source.exists():
        return {}
    shutil.copy(source, keep_as)
    nodes = json.loads(source.read_text())["results"]
    kinds: dict[str, float] = {}
    for node in nodes:
        kind = node["unique_id"].split(".", 1)[0]
        kinds[kind] = kinds.get(kind, 0.0) + float(node.get("execution_time") or 0.0)
    slowest = sorted(nodes, key=lambda n: -float(n.get("execution_time") or 0.0))[:TOP_DBT_NODES]
    return {
        "models_s": round(kinds.get("model", 0.0), 2), "tests_s": round(kinds.get("test", 0.0), 2),
        "nodes": len(nodes),
        "slowest": [{"node": n["unique_id"], "seconds": round(float(n.get("execution_time") or 0.0), 2)}
                    for n in slowest],
    }


def project_auc(config: ChurnConfig) -> float | None:
    """The champion's out-of-time ROC-AUC, from the training tables' own readers."""
    from ml.modeling.registry import champion_in
    from ml.modeling.train import held_out_metrics
    from ml.warehouse import connect

    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        version = champion_in(session, config.dataset.name)
        if version is None:
            return None
        metrics = held_out_metrics(session, version, ("roc_auc",))
    held_out = metrics[metrics["split"] == "out_of_time"]
    return None if held_out.empty else float(held_out["roc_auc"].iloc[0])


def folder_mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6, 1)


def sizes(config: ChurnConfig, root: Path) -> dict[str, Any]:
    """Disk the history needed (the whole private warehouse, landing included) and the mart's rows."""
    from ml.features.build import mart_row_counts

    counts = mart_row_counts(config)
    files = {"build_db_mb": config.warehouse.build_db, "published_db_mb": config.warehouse.published_db}
    out: dict[str, Any] = {k: round(p.stat().st_size / 1e6, 1) for k, p in files.items() if p.exists()}
    published = config.warehouse.published_db.parent / "published"
    if published.is_dir():
        out["published_parts_mb"] = folder_mb(published)
    out["landing_mb"] = folder_mb(config.dataset.landing_dir)
    out["workdir_mb"] = folder_mb(root)
    out["mart_rows"] = counts.get(config.dataset.feature_mart)
    return out


def seed_pandas(bench: Bench, block: dict[str, Any], config: ChurnConfig, as_of: dt.date, logs: Path) -> None:
    out = logs / "seed_pandas.json"
    bench.run(block, "seed_pandas", [sys.executable, "-m", "benchmarks.seed_pandas",
                                     "--landing", str(config.dataset.landing_dir), "--as-of", as_of.isoformat(),
                                     "--horizon-days", str(config.problem.horizon_days), "--json", str(out)], logs)
    block["seed"] = json.loads(out.read_text())
    block["project_auc"] = project_auc(config)


def second_night(bench: Bench, block: dict[str, Any], config_file: Path, config: ChurnConfig,
                 logs: Path) -> dt.date:
    """Land one more day and run the nightly on it; keep where its time went."""
    appended = bench.run(block, "append_day", churn(config_file, "generate", "--append-day"), logs)
    as_of = appended_as_of(Path(appended.log))
    block["as_of_second"] = as_of.isoformat()
    second = bench.run(block, "second_nightly", churn(config_file, "nightly", "--as-of", as_of.isoformat()), logs)
    text = Path(second.log).read_text(errors="replace")
    block["second_nightly_retrained"] = bool(re.search(r"retrain policy fired|training a challenger", text))
    scored = re.search(r"scored ([\d,]+) customers", text)
    block["scored_customers"] = int(scored.group(1).replace(",", "")) if scored else None
    block["second_nightly_stages"] = stage_breakdown(config, Path(second.log))
    block["second_nightly_dbt"] = dbt_breakdown(config, logs / "second_nightly_run_results.json")
    return as_of


def new_block(into: list[dict[str, Any]], root: Path, customers: int, months: int,
              config: ChurnConfig) -> dict[str, Any]:
    """A results block, registered with the caller first so a refused run still saves what it measured."""
    block: dict[str, Any] = {"customers": customers, "months": months, "workdir": str(root), "steps": {},
                             "as_of_first": config.decided_as_of().isoformat(), "status": "ok"}
    into.append(block)
    return block


def start_history(base: ChurnConfig, root: Path, customers: int, months: int,
                  into: list[dict[str, Any]]) -> tuple[Path, ChurnConfig, Path, dict[str, Any]]:
    """A fresh private warehouse at `root`, its logs folder and its registered results block."""
    config_file, config = private_config(base, root, customers, months)
    return config_file, config, root / "logs", new_block(into, root, customers, months, config)


def failed(block: dict[str, Any], exc: Exception) -> None:
    block["status"] = f"failed: {type(exc).__name__}: {exc}"
    print(f"    FAILED: {exc}", flush=True)


def bench_history(bench: Bench, base: ChurnConfig, customers: int, months: int, workdir: Path,
                  with_pandas: bool, into: list[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of one history length (and the pandas comparison when it is the same data)."""
    config_file, config, logs, block = start_history(base, workdir / f"customers-{customers}-months-{months}",
                                                     customers, months, into)
    try:
        bench.run(block, "generate", churn(config_file, "generate"), logs)
        block["landing"] = landing_sizes(config.dataset.landing_dir)
        bench.run(block, "first_nightly", churn(config_file, "nightly"), logs)
        if with_pandas:
            seed_pandas(bench, block, config, config.decided_as_of(), logs)
        as_of = second_night(bench, block, config_file, config, logs)
        scan = bench.run(block, "scan_90d", [sys.executable, "-m", "benchmarks.scan90", "--config",
                                             str(config_file), "--as-of", as_of.isoformat()], logs)
        block["scan_90d"] = json.loads(Path(scan.log).read_text().strip().splitlines()[-1])
        # after the second night: a full refresh makes the next night audit and profile every snapshot again
        bench.run(block, "full_refresh_build", churn(config_file, "build", "--full-refresh", "--as-of",
                                                     as_of.isoformat()), logs)
        block["full_refresh_dbt"] = dbt_breakdown(config, logs / "full_refresh_run_results.json")
        bench.run(block, "retrain", churn(config_file, "train", "--force"), logs)
        block["sizes"] = sizes(config, Path(block["workdir"]))
    except LoadTooHighError:
        raise
    except Exception as exc:  # a failed step (or a reader after it): keep what was measured, go on
        failed(block, exc)
    return block


def bench_pandas(bench: Bench, base: ChurnConfig, customers: int, months: int, workdir: Path,
                 into: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed-style pandas pipeline beside the project's first and second nightly on the same data."""
    config_file, config, logs, block = start_history(base, workdir / f"pandas-{customers}-months-{months}",
                                                     customers, months, into)
    try:
        bench.run(block, "generate", churn(config_file, "generate"), logs)
        bench.run(block, "first_nightly", churn(config_file, "nightly"), logs)
        seed_pandas(bench, block, config, config.decided_as_of(), logs)
        second_night(bench, block, config_file, config, logs)
    except LoadTooHighError:
        raise
    except Exception as exc:  # as in bench_history
        failed(block, exc)
    return block


def pandas_from_history(history: dict[str, Any]) -> dict[str, Any]:
    """The pandas comparison when it ran inside a history (same customers and months)."""
    names = ("generate", "first_nightly", "seed_pandas", "append_day", "second_nightly")
    return {
        "customers": history["customers"], "months": history["months"], "reused_history": True,
        "steps": {n: history["steps"][n] for n in names if n in history["steps"]},
        "seed": history.get("seed"), "project_auc": history.get("project_auc"), "status": history["status"],
    }


def print_summary(results: dict[str, Any]) -> None:
    print(f"\n{'size':22s} {'step':52s} {'wall s':>9s} {'CPU s':>9s} {'peak MB':>8s}  load before -> after")
    for size, step, wall, cpu, peak, load in figure_rows(results):
        print(f"{size:22s} {step:52s} {wall:>9s} {cpu:>9s} {peak:>8s}  {load}")
    for history in results["histories"]:
        print(f"\n{history['customers']:,} x {history['months']} months: {history['status']}")
        if history.get("landing"):
            usage = history["landing"]["usage_events"]
            print(f"  landing usage_events {usage['rows']:,} rows, {usage['mb']} MB in {usage['files']} files")
        if history.get("sizes"):
            print("  sizes: " + ", ".join(f"{k} {v:,}" for k, v in history["sizes"].items() if v is not None))
        if history.get("scored_customers"):
            print(f"  second nightly scored {history['scored_customers']:,} customers"
                  f"{' (the retrain policy fired: it trained)' if history.get('second_nightly_retrained') else ''}")
        slowest = (history.get("second_nightly_dbt") or {}).get("slowest", [])[:5]
        if slowest:
            print("  slowest dbt nodes: " + ", ".join(f"{n['node'].split('.')[-1]} {n['seconds']:.1f}s"
                                                      for n in slowest))
    print("\ntargets (issue 10):")
    for t in results["targets"]:
        mark = "PASS" if t["passed"] else "FAIL"
        print(f"  {mark}  {t['name']}: {t['value']} {t['unit']} (limit {t['limit']} {t['unit']})"
              f"{'  [measured under load]' if t['loaded'] else ''}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nightly", description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--months", type=int, nargs="+", default=[12, 24], help="history lengths (default 12 24)")
    parser.add_argument("--pandas-customers", type=int, default=200_000,
                        help="size of the pandas comparison, on the first --months (0: skip it)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/churn-nightly-bench"))
    parser.add_argument("--config", type=Path, help="base churn.yml (default: the repository's)")
    parser.add_argument("--keep", action="store_true", help="keep each warehouse after measuring")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="1-minute load average above which a step does not start (default 1.5: 2 cores)")
    parser.add_argument("--settle-seconds", type=float, default=300.0,
                        help="how long a step waits for the load to fall below --max-load before refusing")
    parser.add_argument("--allow-load", action="store_true",
                        help="measure even when the load is high (loudly warned; figures marked as loaded)")
    parser.add_argument("--write-readme", nargs="?", const="latest", metavar="RESULTS",
                        help="only rewrite the table in benchmarks/README.md from a results file (default: newest)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_readme:
        source = latest_results(RESULTS_DIR) if args.write_readme == "latest" else Path(args.write_readme)
        write_readme(source, README)
        print(f"rewrote the latest-figures table of {README} from {source}")
        return 0
    bench = Bench(args)
    base = load_config(args.config or REPO_ROOT / "churn.yml")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip()
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "kind": "nightly",
        "command": "python -m benchmarks.nightly " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"max_load": args.max_load, "allow_load": args.allow_load,
                     "memory_limit": base.warehouse.engine.memory_limit, "threads": base.warehouse.engine.threads},
        "load_at_start": dataclasses.asdict(Load.now()), "histories": [], "pandas": None,
    }
    reuse = args.pandas_customers == args.customers
    pandas_blocks: list[dict[str, Any]] = []
    code = 0
    try:
        for index, months in enumerate(args.months):
            history = bench_history(bench, base, args.customers, months, args.workdir, reuse and index == 0,
                                    results["histories"])
            if reuse and index == 0:
                results["pandas"] = pandas_from_history(history)
            if not args.keep:
                shutil.rmtree(history["workdir"], ignore_errors=True)
        if args.pandas_customers and not reuse:
            bench_pandas(bench, base, args.pandas_customers, args.months[0], args.workdir, pandas_blocks)
    except LoadTooHighError as exc:
        print(f"\nREFUSED: {exc}", file=sys.stderr)
        results["refused"] = str(exc)
        code = 3
    finally:
        if pandas_blocks:
            results["pandas"] = pandas_blocks[0]
        if not args.keep:
            for block in [*results["histories"], *pandas_blocks]:
                shutil.rmtree(block["workdir"], ignore_errors=True)
    results["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["minutes"] = round((dt.datetime.now(dt.UTC) - started).total_seconds() / 60, 1)
    results["targets"] = targets(results)
    print_summary(results)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"nightly-{started.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nsaved {out}\nREADME table: python -m benchmarks.nightly --write-readme {out}")
    failed = [b for b in [*results["histories"], results["pandas"] or {}] if b and b.get("status") != "ok"]
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
