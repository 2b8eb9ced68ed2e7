"""Scoring throughput at N customers, phase by phase: which part of `churn score` costs what (issue 10).

Issue 10 asks scoring (probability, decision, band, rank, written) to reach
500k customers/s, with exact reasons at least for every flagged customer. This
times each phase of the score stage separately, in-process, on a synthetic
night: a copy of the configured warehouse's build database (run `make nightly`
first) whose newest mart snapshot is the real one repeated under new ids
(`<id>-<copy>`) up to `--customers` rows. Phases, each with wall and CPU
seconds (`time.process_time`: every thread of this process):

  read            the snapshot's key, as_of and features, in the stage's chunks
  preprocess      the contract's dtypes, then the fitted preprocessing (Explainer.matrix)
  predict         the estimator's score and the calibrator
  rank and band   the decision at the model's threshold, risk bands, ranks, run columns
  reasons         exact contributions of the flagged rows (TreeSHAP for XGBoost), top k, texts
  write           churn_scores and the snapshot's churn_scores_history rows, one transaction

Customers/s is printed for the scoring without reasons (read through write) and
for reasons alone. The copy goes to a temp folder (`--workdir` to keep it).
Printed, and saved to benchmarks/results/score-phases-<timestamp>.json with the
load average beside.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from benchmarks.output import print_load, save_results
from ml.config import ChurnConfig, load_config, write_relocated_config
from ml.features.mart import latest_snapshot_date, snapshot_chunks
from ml.modeling.explain import Explainer
from ml.modeling.score import (
    DEFAULT_CHUNK_ROWS,
    champion_for,
    chunk_probabilities,
    chunk_reasons,
    ranked_layout,
    score_columns,
    typical_values,
    write_scores,
)
from ml.warehouse import connect, quote

T = TypeVar("T")


class Phases:
    """Wall and CPU seconds summed per phase name."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def run(self, name: str, step: Callable[..., T], *args: Any) -> T:
        wall, cpu = time.perf_counter(), time.process_time()
        out = step(*args)
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
        return out


def synthetic_night(base: ChurnConfig, customers: int, root: Path) -> Path:
    """A private warehouse whose newest snapshot holds `customers` rows (real rows, new ids); its churn.yml."""
    shutil.rmtree(root, ignore_errors=True)
    config_file = write_relocated_config(base, root)
    config = load_config(config_file)
    for name in ("build.duckdb", "models", "dbt_target"):
        source = base.warehouse.dir / name
        if not source.exists():
            raise SystemExit(f"{source} missing; run `make nightly` first")
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, config.warehouse.dir / name)
    mart = quote(config.dataset.feature_mart)
    model = champion_for(config)
    key, as_of = quote(model.contract.key), quote(model.contract.as_of)
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        tonight = latest_snapshot_date(session, config, model.contract)
        real = int(session.scalar(f"select count(*) from {mart} where {as_of} = ?", [tonight]))
        copies = -(-customers // real)
        with session.transaction():
            session.execute(f"create temp table night as select * exclude (copy) replace "
                            f"({key} || '-' || copy as {key}) from {mart} cross join "
                            f"(select range as copy from range({copies})) where {as_of} = ? limit {customers}",
                            [tonight])
            session.execute(f"delete from {mart} where {as_of} = ?", [tonight])
            session.execute(f"insert into {mart} select * from night")
    return config_file


def measure(config_file: Path, chunk_rows: int) -> dict[str, Any]:
    config = load_config(config_file)
    model = champion_for(config)
    contract, phases = model.contract, Phases()
    explainer, typical = Explainer(model), typical_values(model)
    n_reasons = config.scoring.top_reasons
    parts, flagged = [], 0
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        tonight = latest_snapshot_date(session, config, contract)
        assert tonight is not None
        chunks = iter(snapshot_chunks(session, config, contract, tonight, chunk_rows))
        while (chunk := phases.run("read", next, chunks, None)) is not None:
            matrix = phases.run("preprocess", explainer.matrix, chunk, "feature mart")
            probability = phases.run("predict", chunk_probabilities, model, explainer, matrix)
            explained = probability >= model.threshold
            flagged += int(explained.sum())
            reasons = phases.run("reasons", chunk_reasons, model, explainer, chunk, matrix, explained, n_reasons,
                                 typical)
            parts.append(pd.concat([score_columns(model, chunk, probability, explainer.output), reasons], axis=1))
            del matrix  # as in score_frame, whose matrix is gone before the next chunk's is allocated
        scored = pd.concat(parts, ignore_index=True)
        scores = phases.run("rank and band", ranked_layout, scored, config, contract, str(model.version),
                            "bench-score-phases", float(model.threshold))
        as_of_type = session.columns(config.dataset.feature_mart)[contract.as_of]
        phases.run("write", write_scores, session, scores, contract.as_of, as_of_type, tonight, str(model.version))
    rows = len(scores)
    scoring = [p for p in phases.wall if p != "reasons"]
    scoring_wall = sum(phases.wall[p] for p in scoring)
    return {
        "customers": rows, "flagged": flagged, "as_of": tonight.isoformat(), "model": str(model.version),
        "estimator": explainer.kind, "chunk_rows": chunk_rows,
        "phases": {p: {"wall_s": round(phases.wall[p], 3), "cpu_s": round(phases.cpu[p], 3)} for p in phases.wall},
        "scoring_wall_s": round(scoring_wall, 3),
        "scoring_customers_per_s": round(rows / scoring_wall) if scoring_wall else None,
        "reasons_rows_per_s": round(flagged / phases.wall["reasons"]) if phases.wall.get("reasons") else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.score_phases", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="churn.yml of the built warehouse (default ./churn.yml)")
    parser.add_argument("--customers", type=int, default=726_000, help="rows of the synthetic night")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="the score stage's chunk size")
    parser.add_argument("--workdir", type=Path, help="where the synthetic warehouse goes (default: a temp folder)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="score the night this many times; each figure is the median run's (a shared VM's "
                             "speed swings from run to run)")
    return parser.parse_args(argv)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result whose phase figures are the medians over `runs` (each run's figures kept under "runs")."""
    def middle(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    out = dict(runs[0])
    out["phases"] = {name: {unit: middle([r["phases"][name][unit] for r in runs]) for unit in ("wall_s", "cpu_s")}
                     for name in runs[0]["phases"]}
    out["scoring_wall_s"] = middle([r["scoring_wall_s"] for r in runs])
    out["scoring_customers_per_s"] = round(out["customers"] / out["scoring_wall_s"])
    reasons = out["phases"]["reasons"]["wall_s"]
    out["reasons_rows_per_s"] = round(out["flagged"] / reasons) if reasons else None
    out["repeat"] = len(runs)
    out["runs"] = [{"phases": r["phases"], "scoring_wall_s": r["scoring_wall_s"]} for r in runs]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="churn-bench-score-"))
    try:
        night = synthetic_night(load_config(args.config), args.customers, root / "warehouse")
        result = median_run([measure(night, args.chunk_rows) for _ in range(max(1, args.repeat))])
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    load = print_load()
    print(f"{result['customers']:,d} customers ({result['flagged']:,d} flagged) as of {result['as_of']}, "
          f"{result['estimator']} {result['model']}; median of {result['repeat']} run(s)")
    print(f"{'phase':14s} {'wall s':>8s} {'cpu s':>8s}")
    for name, t in result["phases"].items():
        print(f"{name:14s} {t['wall_s']:8.2f} {t['cpu_s']:8.2f}")
    print(f"scoring without reasons: {result['scoring_wall_s']:.2f} s, {result['scoring_customers_per_s']:,d} "
          f"customers/s (target 500,000); reasons: {result['reasons_rows_per_s'] or 0:,d} flagged rows/s")
    save_results("score-phases", load, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
