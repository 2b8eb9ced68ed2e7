"""CPU per what-if request, phase by phase, and which DuckDB operators of the prepared SQL cost (no HTTP).

Builds the API's `ScoringService` on the configured published warehouse (run
`make nightly` first), picks the published customer with the most landing rows
among the first `--candidates` (or `--customer`), checks that the what-if
answer equals churn_scores (1e-9), then times `--requests` sequential requests
of each phase with `time.process_time` (CPU of every thread of this process,
so a thread pool's spinning counts) beside the wall time:

  what-if          ScoringService.score_tables: what POST /score runs
  features SQL     FeatureConnection.features: the prepared mart SQL alone
  scoring          score_frame on those features: the champion, its reasons
  landing files    read_landing_rows of the customer at --as-of from the landing files, pooled
  landing index    the same rows from the state's by-customer copy (what GET ?as_of reads, when built)
  as_of path       that read, then the features SQL and scoring at --as-of: GET ?as_of's work
                   (default date: the earliest served night before tonight, else 6 months back)
  GET ?as_of       ScoringService.score_customer at --as-of, when it is a served date: the whole route

Then it profiles one execution of each prepared request statement with
DuckDB's profiler (the operator tree `EXPLAIN ANALYZE` prints): operators by
type (count, ms, rows) and the costliest single operators. Printed, and saved
to benchmarks/results/whatif-cpu-<timestamp>.json with the load average beside.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.output import print_load, save_results
from ml.config import load_config
from ml.modeling.score import score_frame
from ml.serving import features as features_module
from ml.serving.api import ScoringService
from ml.serving.features import read_landing_rows


def timed(requests: int, run: Callable[[], object]) -> dict[str, float]:
    """CPU and wall ms per call over `requests` sequential calls, after one warm-up call."""
    run()
    cpu, wall = [], []
    for _ in range(requests):
        c0, w0 = time.process_time(), time.perf_counter()
        run()
        cpu.append(1000 * (time.process_time() - c0))
        wall.append(1000 * (time.perf_counter() - w0))
    cpu.sort()
    wall.sort()

    def p(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 2)

    return {"cpu_p50": p(cpu, 0.5), "cpu_p95": p(cpu, 0.95), "cpu_mean": round(statistics.mean(cpu), 2),
            "wall_p50": p(wall, 0.5), "wall_p95": p(wall, 0.95), "load": round(os.getloadavg()[0], 2)}


def landing_read(service: ScoringService, customer: str, as_of: dt.date, session: Any) -> Callable[[], Any]:
    """The as_of route's read (a reader without date pruning is called without the date)."""
    if "as_of" in inspect.signature(read_landing_rows).parameters:
        return lambda: read_landing_rows(service.compiled, [customer], session, as_of=as_of)
    return lambda: read_landing_rows(service.compiled, [customer], session)


def pick_customer(service: ScoringService, candidates: int) -> str:
    """The published customer with the most landing rows among the first `candidates` answers."""
    sizes = {}
    for customer in list(service.state.answers)[:candidates]:
        sizes[customer] = sum(len(rows) for rows in read_landing_rows(service.compiled, [customer]).values())
    return max(sizes, key=sizes.__getitem__)


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("children", []):
        out += _walk(child)
    return out


def profile_statements(service: ScoringService, tables: dict[str, list[dict[str, Any]]], tonight: dt.date,
                       folder: Path, top: int) -> dict[str, Any]:
    """One profiled execution of each prepared request statement: operators by type and the costliest ones."""
    names = [getattr(features_module, n) for n in ("_CHECKS_STATEMENT", "_MART_STATEMENT", "_STATEMENT")
             if hasattr(features_module, n)]
    out: dict[str, Any] = {}
    with service.pool.connection() as connection:
        connection.features(tables, tonight, dt.date.today())  # sets the request variable
        session = connection.session
        for name in names:
            path = folder / f"profile-{name}.json"
            session.execute("pragma enable_profiling = 'json'")
            session.execute(f"pragma profiling_output = '{path}'")
            try:
                session.rows(getattr(connection.sql, "execute", None)
                             or f"execute {name}(request := getvariable('{features_module.REQUEST_VARIABLE}'))")
            finally:
                session.execute("pragma disable_profiling")
            document = json.loads(path.read_text())
            operators = [n for root in document.get("operator", []) for n in _walk(root)]
            by_type: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
            for node in operators:
                entry = by_type[node.get("type", "?")]
                entry[0] += 1
                entry[1] += 1000 * node.get("timing", 0.0)
                entry[2] += node.get("intermediate_rows", 0)
            costly = sorted(operators, key=lambda n: -n.get("timing", 0.0))[:top]
            out[name] = {
                "cpu_ms": round(1000 * document.get("query", {}).get("cpu_time", 0.0), 2),
                "optimizer_ms": round(1000 * document.get("optimizer", {}).get("total_time", 0.0), 3),
                "operators": len(operators),
                "intermediate_rows": document.get("query", {}).get("total_intermediate_rows"),
                "by_type": {t: {"count": c, "ms": round(ms, 2), "rows": r}
                            for t, (c, ms, r) in sorted(by_type.items(), key=lambda kv: -kv[1][1])},
                "costliest": [{"type": n.get("type"), "ms": round(1000 * n.get("timing", 0.0), 2),
                               "rows": n.get("intermediate_rows"), "info": str(n.get("extra_info"))[:160]}
                              for n in costly],
            }
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.whatif_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="churn.yml of the published warehouse (default ./churn.yml)")
    parser.add_argument("--requests", type=int, default=50, help="sequential requests per phase")
    parser.add_argument("--customer", help="customer id (default: most landing rows among the candidates)")
    parser.add_argument("--candidates", type=int, default=40, help="published customers searched for the default")
    parser.add_argument("--as-of", type=dt.date.fromisoformat, help="date of the as_of phases (YYYY-MM-DD)")
    parser.add_argument("--top", type=int, default=12, help="costliest operators listed per statement")
    parser.add_argument("--workdir", type=Path, help="where the compiled SQL goes (default: a temp folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="churn-whatif-cpu-"))
    service = ScoringService(config, workdir)
    try:
        state = service.state
        customer = args.customer or pick_customer(service, args.candidates)
        tables = read_landing_rows(service.compiled, [customer])
        rows = {name: len(value) for name, value in tables.items()}
        [answer] = service.score_tables(tables, state.tonight)
        published = state.answers[customer]["churn_probability"]
        parity = abs(answer["churn_probability"] - published)
        if parity > 1e-9:
            raise SystemExit(f"what-if answer {answer['churn_probability']} != churn_scores {published} for {customer}")
        earlier = [d for d in state.served_dates if d != state.tonight]
        as_of = args.as_of or (earlier[0] if earlier else
                               (state.tonight.replace(day=1) - dt.timedelta(days=182)).replace(day=1))
        phases: dict[str, dict[str, float]] = {}
        phases["what-if"] = timed(args.requests, lambda: service.score_tables(tables, state.tonight))
        with service.pool.connection() as connection:
            frame = connection.features(tables, state.tonight, dt.date.today())
            phases["features SQL"] = timed(args.requests,
                                           lambda: connection.features(tables, state.tonight, dt.date.today()))
            top = config.scoring.top_reasons
            phases["scoring"] = timed(args.requests, lambda: score_frame(state.model, state.explainer, frame, top,
                                                                         typical=state.typical))
            files = landing_read(service, customer, as_of, connection.session)
            phases["landing files"] = timed(args.requests, files)
            # what the route reads: the state's by-customer copy when it has one (ml.serving.features.LandingIndex)
            read = (files if state.landing is None else lambda: state.landing.rows([customer], as_of))
            if state.landing is not None:
                phases["landing index"] = timed(args.requests, read)

            def as_of_path() -> object:
                features = connection.features(read(), as_of, dt.date.today())
                if features.empty:
                    raise SystemExit(f"{customer} is not active on {as_of}; pass another --as-of or --customer")
                return score_frame(state.model, state.explainer, features, top, typical=state.typical)

            phases["as_of path"] = timed(args.requests, as_of_path)
        if as_of in state.served_dates:
            phases["GET ?as_of"] = timed(args.requests, lambda: service.score_customer(customer, as_of))
        profile = profile_statements(service, tables, state.tonight, workdir, args.top)
    finally:
        service.close()
    load = print_load()
    print(f"customer {customer}: {rows} landing rows; model {state.model.version}; as_of phases at {as_of}; "
          f"what-if parity with churn_scores {parity:.1e}")
    print(f"{'phase':14s} {'cpu p50':>8s} {'cpu p95':>8s} {'cpu mean':>8s} {'wall p50':>9s} {'load':>5s}  (ms)")
    for name, t in phases.items():
        print(f"{name:14s} {t['cpu_p50']:8.1f} {t['cpu_p95']:8.1f} {t['cpu_mean']:8.1f} {t['wall_p50']:9.1f} "
              f"{t['load']:5.2f}")
    for name, p in profile.items():
        print(f"\nstatement {name}: profiled cpu {p['cpu_ms']} ms, {p['operators']} operators, "
              f"{p['intermediate_rows']} intermediate rows, optimizer {p['optimizer_ms']} ms on EXECUTE")
        for kind, entry in list(p["by_type"].items())[:10]:
            print(f"  {kind:24s} x{entry['count']:<4d} {entry['ms']:7.2f} ms {entry['rows']:>8d} rows")
        print("  costliest:")
        for node in p["costliest"]:
            print(f"    {node['ms']:6.2f} ms {node['type']:18s} {node['rows']:>7} rows  {node['info'][:100]}")
    save_results("whatif-cpu", load, {"customer": customer, "landing_rows": rows, "as_of": str(as_of),
                                      "model": state.model.version, "phases": phases, "profile": profile})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
