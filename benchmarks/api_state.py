"""Load time of the API's published state (the GET fast path) at N customers, on synthetic published rows.

`churn serve` builds its in-memory state at start and on every new publish
(`ml.serving.state.load_state`): it reads the published database, computes
tonight's features by the mart's SQL, and indexes the answers by customer.
Reading and indexing grow with the customer count, so each N gets a synthetic
published database: a copy of the configured one (run `make nightly` first)
whose `churn_scores` is the real rows repeated under new ids up to N rows,
with tonight's features repeated under the same ids. Tonight's features are
timed once, at the warehouse's own size: they read the landing files, which a
synthetic N does not change. Printed, and saved to
benchmarks/results/api-state-<timestamp>.json with the load average beside.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from benchmarks.output import print_load, save_results
from ml.config import ChurnConfig, load_config
from ml.modeling.registry import load_model
from ml.modeling.score import SCORES_TABLE
from ml.serving.features import compile_features, snapshot_features
from ml.serving.state import AnswerIndex, read_published
from ml.warehouse import connect, quote


@dataclass(frozen=True)
class StateResult:
    customers: int
    read_seconds: float  # published database -> frames (read_published)
    index_seconds: float  # frames -> answers by customer (AnswerIndex: position maps over the columns)
    answer_us: float  # one answer assembled from the index, microseconds (median of 1,000 customers)
    peak_mb: float  # largest resident set of this process so far


def synthetic_published(config: ChurnConfig, customers: int, folder: Path) -> ChurnConfig:
    """A copy of the published database whose churn_scores has `customers` rows (real rows, new ids)."""
    # the same config with only the published file moved (the build database and landing stay shared)
    folder.mkdir(parents=True, exist_ok=True)
    target = dataclasses.replace(config, warehouse=dataclasses.replace(
        config.warehouse, published_db=folder / config.warehouse.published_db.name))
    shutil.copy2(config.warehouse.published_db, target.warehouse.published_db)
    key, scores = quote(config.problem.entity_key), quote(SCORES_TABLE)
    with connect(target.warehouse.published_db) as session:
        real = session.scalar(f"select count(*) from {scores}")
        copies = math.ceil(customers / real)
        # the same id scheme as `repeat_features`: real id + '-' + copy number
        session.execute(
            f"create or replace table {scores} as "
            f"select * exclude (copy) replace ({key} || '-' || copy as {key}) "
            f"from {scores} cross join (select range as copy from range({copies})) limit {customers}"
        )
    return target


def repeat_features(features: pd.DataFrame, key: str, copies: int) -> pd.DataFrame:
    """Tonight's features repeated `copies` times under the synthetic ids."""
    parts = []
    for copy in range(copies):
        part = features.copy()
        part[key] = part[key].astype(str) + f"-{copy}"
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def answer_microseconds(answers: AnswerIndex, samples: int = 1_000) -> float:
    """Median time to assemble one answer (what the GET route does per request), over customers spread evenly."""
    customers = list(answers)
    step = max(1, len(customers) // samples)
    times = []
    for customer in customers[::step][:samples]:
        started = time.perf_counter()
        answers[customer]
        times.append(time.perf_counter() - started)
    times.sort()
    return round(1e6 * times[len(times) // 2], 1) if times else 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api_state", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="churn.yml of the published warehouse (default ./churn.yml)")
    parser.add_argument("--customers", type=int, nargs="+", default=[20_000, 100_000, 1_000_000],
                        help="synthetic published customer counts")
    parser.add_argument("--workdir", type=Path, help="where the synthetic databases go (default: a temp folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    if not config.warehouse.published_db.exists():
        raise SystemExit(f"nothing published at {config.warehouse.published_db}; run `make nightly` first")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="churn-bench-state-"))
    compiled = compile_features(config, workdir)
    real = read_published(config, compiled.as_of_column)
    model = load_model(config, real.version, registry_db=config.warehouse.published_db)
    started = time.perf_counter()
    features = snapshot_features(compiled, real.tonight)
    features_seconds = time.perf_counter() - started
    results: list[StateResult] = []
    try:
        for customers in args.customers:
            folder = workdir / f"n{customers}"
            target = synthetic_published(config, customers, folder)
            started = time.perf_counter()
            published = read_published(target, compiled.as_of_column)
            read_seconds = time.perf_counter() - started
            repeated = repeat_features(features, model.contract.key, math.ceil(customers / max(len(features), 1)))
            repeated = repeated.set_index(repeated[model.contract.key].astype(str))  # as load_state keeps it
            started = time.perf_counter()
            answers = AnswerIndex(published.scores, repeated, model.contract)
            index_seconds = time.perf_counter() - started
            assert len(answers) == customers, f"{len(answers)} answers for {customers} customers"
            results.append(StateResult(customers, round(read_seconds, 2), round(index_seconds, 2),
                                       answer_microseconds(answers), round(peak_mb(), 1)))
            del published, repeated, answers
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    load = print_load()
    print(f"tonight's features by the mart's SQL: {len(features):,d} customers in {features_seconds:.2f}s "
          "(the warehouse's own landing files; not scaled)")
    print(f"{'customers':>10s} {'read s':>8s} {'index s':>8s} {'answer us':>10s} {'peak MB':>8s}")
    for r in results:
        print(f"{r.customers:10,d} {r.read_seconds:8.2f} {r.index_seconds:8.2f} {r.answer_us:10.1f} {r.peak_mb:8.1f}")
    save_results("api-state", load, {"model": real.version,
                                     "features": {"customers": len(features), "seconds": round(features_seconds, 2)},
                                     "results": [asdict(r) for r in results]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
