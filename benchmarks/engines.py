"""The same demo nightly on both engines, timed alone (issue 15's note): DuckDB, then Spark local mode.

Run:  .venv/bin/python -m benchmarks.engines [--customers 2000 --months 24]
      (needs the .[spark] extra: make .venv/.installed-spark)

Each engine gets a fresh private warehouse at the same generator size (a
relocated churn.yml under `--workdir`) and runs `churn nightly` twice as its
own subprocess, exactly as `make nightly [ENGINE=spark]` would: the first night
generates the demo, builds, audits, trains, scores, monitors and publishes; the
second is the rerun an operator sees every night after (the champion kept, the
build incremental). Wall time, CPU seconds of the whole process tree and peak
memory come from `benchmarks.measure`, which waits for the machine to be quiet
first and records the load before and after. The nightly's own step timings
(pipeline_runs, through its owner's reader) split each night into stages, so
a per-stage ratio says where Spark's fixed costs (a cold JVM, about a second
per statement) land. Results are printed and saved to
benchmarks/results/engines-<timestamp>.json.

Ratios are only meaningful within one run: both engines measured minutes
apart on the same quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.measure import Load, LoadTooHighError, measure
from benchmarks.nightly import CHURN, REPO_ROOT, RESULTS_DIR, nightly_run_id, tail
from ml.config import load_config, write_relocated_config

ENGINES = ("duckdb", "spark")
NIGHTS = ("first_nightly", "second_nightly")


def engine_env(engine: str) -> dict[str, str]:
    """What `make nightly ENGINE=...` sets (Makefile's ENGINE_ENV)."""
    env = {"CHURN_ENGINE": engine}
    if engine == "spark":
        env["PYSPARK_PYTHON"] = sys.executable
    return env


def night_steps(config_file: Path, log: Path) -> dict[str, float]:
    """Seconds per nightly step, from pipeline_runs (read after the night, on DuckDB's control plane)."""
    from ml.pipeline import run_steps  # heavy imports: only once a nightly ran

    _, steps = run_steps(load_config(config_file), nightly_run_id(log))
    return {s.step: round(s.seconds, 2) for s in steps}


def bench_engine(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both nights of one engine on a fresh warehouse; the block saved for it."""
    root = args.workdir / engine
    shutil.rmtree(root, ignore_errors=True)
    config_file = write_relocated_config(
        load_config(args.config or REPO_ROOT / "churn.yml"), root,
        {"generator": {"customers": args.customers, "months": args.months}})
    block: dict[str, Any] = {"engine": engine, "status": "ok", "nights": {}}
    for night in NIGHTS:
        print(f"  {engine}: {night} ...", flush=True)
        result = measure(f"{engine}-{night}", [CHURN, "--config", str(config_file), "nightly"],
                         root / "logs" / f"{night}.log", cwd=REPO_ROOT, max_load=args.max_load,
                         settle_seconds=args.settle_seconds, allow_load=args.allow_load, env=engine_env(engine))
        entry = result.as_dict()
        print(f"    {result.wall_s:8.1f} s wall {result.cpu_s:8.1f} CPU-s {result.peak_mb:7.0f} MB peak  "
              f"load {result.load_before.one:.2f} -> {result.load_after.one:.2f}"
              f"{'' if result.load_ok else '  (LOADED)'}", flush=True)
        if result.exit_code != 0:
            block["status"] = f"{night} exited {result.exit_code}: {tail(Path(result.log))}"
            block["nights"][night] = entry
            break
        entry["steps"] = night_steps(config_file, Path(result.log))
        block["nights"][night] = entry
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return block


def ratios(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Spark / DuckDB for each night's wall and CPU time and each step both engines ran."""
    by_engine = {b["engine"]: b for b in blocks if b["status"] == "ok"}
    if set(by_engine) != set(ENGINES):
        return {}
    duck, spark = by_engine["duckdb"]["nights"], by_engine["spark"]["nights"]
    out: dict[str, Any] = {}
    for night in NIGHTS:
        d, s = duck[night], spark[night]
        steps = {step: round(s["steps"][step] / d["steps"][step], 1)
                 for step in d["steps"] if step in s["steps"] and d["steps"][step] > 0}
        out[night] = {"wall": round(s["wall_s"] / d["wall_s"], 1), "cpu": round(s["cpu_s"] / d["cpu_s"], 1),
                      "steps": steps}
    return out


def print_summary(results: dict[str, Any]) -> None:
    print(f"\n{results['customers']:,} customers x {results['months']} months, commit {results['commit']}")
    print(f"{'engine':8} {'night':15} {'wall s':>8} {'CPU s':>8} {'peak MB':>8} {'load':>12}")
    for block in results["engines"]:
        for night, m in block["nights"].items():
            print(f"{block['engine']:8} {night:15} {m['wall_s']:8.1f} {m['cpu_s']:8.1f} {m['peak_mb']:8.0f} "
                  f"{m['load_before']['one']:5.2f}->{m['load_after']['one']:5.2f}")
        if block["status"] != "ok":
            print(f"  {block['engine']} FAILED: {block['status']}")
    for night, r in results["spark_over_duckdb"].items():
        print(f"spark/duckdb {night}: wall x{r['wall']}, CPU x{r['cpu']}; steps: "
              + ", ".join(f"{step} x{x}" for step, x in r["steps"].items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engines", description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, help="generator customers (default: churn.yml's demo size)")
    parser.add_argument("--months", type=int, help="generator months (default: churn.yml's)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/churn-engines-bench"))
    parser.add_argument("--config", type=Path, help="base churn.yml (default: the repository's)")
    parser.add_argument("--keep", action="store_true", help="keep each warehouse after measuring")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="1-minute load average above which a night does not start (default 1.5: 2 cores)")
    parser.add_argument("--settle-seconds", type=float, default=300.0)
    parser.add_argument("--allow-load", action="store_true",
                        help="measure even when the load is high (loudly warned; figures marked as loaded)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generator = load_config(args.config or REPO_ROOT / "churn.yml").generator
    args.customers = args.customers or generator.customers
    args.months = args.months or generator.months
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "kind": "engines", "customers": args.customers, "months": args.months,
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=REPO_ROOT).stdout.strip(),
        "cpus": os.cpu_count(), "load_at_start": dataclasses.asdict(Load.now()), "engines": [],
    }
    code = 0
    try:
        for engine in ENGINES:
            results["engines"].append(bench_engine(engine, args))
    except LoadTooHighError as exc:
        print(f"\nREFUSED: {exc}", file=sys.stderr)
        results["refused"] = str(exc)
        code = 3
    results["spark_over_duckdb"] = ratios(results["engines"])
    results["minutes"] = round((dt.datetime.now(dt.UTC) - started).total_seconds() / 60, 1)
    print_summary(results)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"engines-{started.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nsaved {out}")
    return code or (0 if all(b["status"] == "ok" for b in results["engines"]) else 1)


if __name__ == "__main__":
    sys.exit(main())
