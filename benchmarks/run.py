"""Speed and memory of each pipeline stage at realistic sizes.

Run:  .venv/bin/python -m benchmarks.run --customers 20000 1000000 \
          --stages generate,build,train,score,monitor

Each size gets a private warehouse (a relocated churn.yml under --workdir), and
each stage runs as its own `churn` subprocess, exactly as `make nightly` would
run it, so the numbers include start-up and dbt's own processes. Wall time and
the peak resident memory of the stage's process tree (from wait4's rusage) are
printed as a table and saved as JSON under benchmarks/results/ (git-ignored).
The warehouse of each size is deleted after measuring unless --keep is given:
a million customers take several GB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from ml.config import ChurnConfig, load_config, write_relocated_config

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHURN = Path(sys.executable).parent / "churn"
STAGE_ARGS = {"train": ["--force"]}  # extra arguments a stage needs to do its full work
LARGE = 100_000  # from this many customers, default to fewer months


@dataclass
class StageResult:
    customers: int
    months: int
    stage: str
    status: str  # ok, failed, skipped
    seconds: float | None = None
    peak_rss_mb: float | None = None
    note: str = ""
    details: dict[str, object] = field(default_factory=dict)


def available_commands() -> set[str]:
    """Sub-commands `churn --help` lists (stages not yet installed are absent)."""
    text = subprocess.run([str(CHURN), "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^    ([a-z][a-z0-9_-]*)(?:\s|$)", text, flags=re.MULTILINE))


def run_stage(config_file: Path, stage: str, log_file: Path) -> tuple[int, float, float]:
    """Run one stage; return exit code, wall seconds and peak RSS (MB) of its process tree."""
    command = [str(CHURN), "--config", str(config_file), stage, *STAGE_ARGS.get(stage, [])]
    with log_file.open("w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Linux reports ru_maxrss in KiB; for wait4 it covers the child and its waited-for descendants.
    return proc.returncode, seconds, usage.ru_maxrss / 1024


def stage_details(config: ChurnConfig, stage: str) -> dict[str, object]:
    """What the stage produced, to put the time in proportion."""
    if stage == "generate":
        landing = config.datasets["demo"].landing_dir
        return {
            p.stem: {"rows": pq.read_metadata(p).num_rows, "mb": round(p.stat().st_size / 1e6, 1)}
            for p in sorted(landing.glob("*.parquet"))
        }
    if stage == "build" and config.warehouse.build_db.exists():
        with duckdb.connect(str(config.warehouse.build_db), read_only=True) as con:
            rows = con.execute(f'select count(*) from "{config.dataset.feature_mart}"').fetchone()[0]
        return {"mart_rows": rows, "build_db_mb": round(config.warehouse.build_db.stat().st_size / 1e6, 1)}
    return {}


def tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:])[-300:]


def benchmark_size(
    base: ChurnConfig, customers: int, months: int, stages: list[str], available: set[str], workdir: Path
) -> list[StageResult]:
    root = workdir / f"customers-{customers}"
    shutil.rmtree(root, ignore_errors=True)
    config_file = write_relocated_config(
        base, root, {"generator": {"customers": customers, "months": months}}
    )
    config = load_config(config_file)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []
    failed: str | None = None
    for stage in stages:
        result = StageResult(customers, months, stage, "skipped")
        if stage not in available:
            result.note = f"`churn {stage}` does not exist in this build"
        elif failed:
            result.note = f"{failed} failed"
        else:
            print(f"  {customers:,} customers: {stage} ...", flush=True)
            code, seconds, peak = run_stage(config_file, stage, logs / f"{stage}.log")
            result.seconds, result.peak_rss_mb = round(seconds, 1), round(peak)
            if code == 0:
                result.status = "ok"
                result.details = stage_details(config, stage)
            else:
                result.status, failed = "failed", stage
                result.note = f"exit {code}: {tail(logs / f'{stage}.log')}"
        results.append(result)
    return results


def print_table(results: list[StageResult]) -> None:
    print(f"\n{'customers':>10} {'months':>6} {'stage':10} {'status':8} {'seconds':>9} {'peak MB':>8}  note")
    for r in results:
        seconds = f"{r.seconds:9.1f}" if r.seconds is not None else f"{'-':>9}"
        peak = f"{r.peak_rss_mb:8.0f}" if r.peak_rss_mb is not None else f"{'-':>8}"
        print(f"{r.customers:>10,} {r.months:>6} {r.stage:10} {r.status:8} {seconds} {peak}  {r.note}")
        if r.stage == "generate" and r.details:
            for table, d in r.details.items():
                print(f"{'':>37} {table:16s} {d['rows']:>13,d} rows {d['mb']:>9.1f} MB")
        elif r.details:
            print(f"{'':>37} " + ", ".join(f"{k} {v:,}" for k, v in r.details.items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[20_000, 1_000_000])
    parser.add_argument(
        "--months", type=int, nargs="+",
        help=f"months per size (one value for all, or one per size); default 24, or 12 from {LARGE:,} customers",
    )
    parser.add_argument("--stages", default="generate,build,train,score,monitor",
                        help="comma-separated stages, run in this order")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/churn-bench"))
    parser.add_argument("--config", type=Path, help="base churn.yml (default: the repository's)")
    parser.add_argument("--keep", action="store_true", help="keep each size's warehouse after measuring")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    months = args.months or [24 if n < LARGE else 12 for n in args.customers]
    if len(months) == 1:
        months = months * len(args.customers)
    if len(months) != len(args.customers):
        raise SystemExit("--months takes one value, or one per --customers value")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    base = load_config(args.config or REPO_ROOT / "churn.yml")
    available = available_commands()
    results: list[StageResult] = []
    for n, m in zip(args.customers, months, strict=True):
        try:
            results += benchmark_size(base, n, m, stages, available, args.workdir)
        finally:
            if not args.keep:
                shutil.rmtree(args.workdir / f"customers-{n}", ignore_errors=True)
    print_table(results)
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip()
    payload = {
        "started": stamp,
        "commit": commit,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "results": [asdict(r) for r in results],
    }
    out = RESULTS_DIR / f"{stamp}.json"
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nsaved {out}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
