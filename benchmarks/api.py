"""Bounded loopback load on both API routes: p50/p95/p99 and errors at fixed request rates.

Starts `churn serve` on a free 127.0.0.1 port against the configured published
warehouse (run `make nightly` first), waits for /health, then for each route
and rate sends a fixed number of requests on a fixed schedule (open loop:
latency counts from the scheduled send time, so a server that falls behind is
charged for the queue), stops, and kills the server. Printed, and saved to
benchmarks/results/api-<timestamp>.json with the load average beside.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.output import print_load, save_results

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class RouteResult:
    route: str
    rate: float
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    seconds: float


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    churn = [sys.executable, "-m", "ml.cli"] + (["--config", args.config] if args.config else [])
    server = subprocess.Popen([*churn, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT,
                              start_new_session=True)
    deadline = time.monotonic() + args.startup_seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"churn serve exited with {server.returncode} before answering /health")
        try:
            if _get(port, "/health")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise SystemExit(f"churn serve did not answer /health within {args.startup_seconds}s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


class Client(threading.local):
    """One keep-alive connection per worker thread."""

    connection: http.client.HTTPConnection | None = None


def drive(port: int, route: str, method: str, paths: list[str], body: bytes | None, rate: float, count: int,
          workers: int) -> RouteResult:
    """`count` requests at `rate` per second on a fixed schedule; latency from the scheduled time."""
    local = Client()
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    start = time.perf_counter() + 0.2

    def one(i: int) -> None:
        nonlocal errors
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ok = False
        try:
            if local.connection is None:
                local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
            headers = {"Content-Type": "application/json"} if body is not None else {}
            local.connection.request(method, paths[i % len(paths)], body=body, headers=headers)
            response = local.connection.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            local.connection = None
        elapsed = 1000 * (time.perf_counter() - scheduled)
        with lock:
            latencies.append(elapsed)
            errors += 0 if ok else 1

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(count)))
    seconds = time.perf_counter() - start
    values = np.array(latencies)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return RouteResult(route, rate, count, errors, round(float(p50), 2), round(float(p95), 2), round(float(p99), 2),
                       round(float(values.max()), 2), round(seconds, 2))


@dataclass(frozen=True)
class WhatIfRequest:
    """The POST body and what it holds: the sampled customer with the longest event history."""

    customer: str
    body: bytes
    rows: dict[str, int]  # request rows per source table
    first_event: str | None
    last_event: str | None


def what_if_request(customers: list[str], as_of: str) -> WhatIfRequest:
    """A real customer's raw rows (read from the landing files by the server's own reader).

    Of the sampled customers, the one whose dated events span the most days: the
    issue's target is for a customer with a year of events, not a newcomer's few rows.
    """
    from ml.config import load_config
    from ml.serving.features import compile_features, read_landing_rows

    config = load_config(os.environ.get("CHURN_CONFIG"))
    compiled = compile_features(config)
    tables = read_landing_rows(compiled, customers)
    spans: dict[str, list[str]] = {c: [] for c in customers}
    for source in compiled.sources:
        if source.date_column is None:
            continue
        for row in tables[source.name]:
            if row[source.date_column] is not None:
                spans[str(row[source.key_column])].append(str(row[source.date_column])[:10])
    customer = max(customers, key=lambda c: (dt.date.fromisoformat(max(spans[c])) - dt.date.fromisoformat(min(spans[c]))
                                             if spans[c] else dt.timedelta(0)))
    mine = {source.name: [r for r in tables[source.name] if str(r[source.key_column]) == customer]
            for source in compiled.sources}
    return WhatIfRequest(customer, json.dumps({"as_of": as_of, "tables": mine}).encode(),
                         {name: len(rows) for name, rows in mine.items()},
                         min(spans[customer], default=None), max(spans[customer], default=None))


def served_customers(port: int, limit: int, as_of: str | None = None) -> list[str]:
    """Real customer ids answered on `as_of` (tonight when None), found by probing the API."""
    suffix = f"?as_of={as_of}" if as_of else ""
    customers: list[str] = []
    for attempt in range(2000):
        candidate = f"C{attempt:07d}"
        if _get(port, f"/customers/{candidate}/score{suffix}")[0] == 200:
            customers.append(candidate)
        if len(customers) >= limit:
            break
    if not customers:
        raise SystemExit(f"no customer ids C0000000..C0001999 are answered{' on ' + as_of if as_of else ''}")
    return customers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="churn.yml of the published warehouse to serve (default ./churn.yml)")
    parser.add_argument("--rates", default="50,100,200", help="req/s for GET /customers/{id}/score")
    parser.add_argument("--what-if-rates", default="5,10,20",
                        help="req/s for POST /score and GET /customers/{id}/score?as_of=<an earlier night>")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each rate (count = rate x seconds)")
    parser.add_argument("--workers", type=int, default=32, help="client threads")
    parser.add_argument("--startup-seconds", type=float, default=300.0, help="give up if /health is not up by then")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config:
        os.environ["CHURN_CONFIG"] = args.config
    port = free_port()
    server = start_server(args, port)
    results: list[RouteResult] = []
    try:
        health = json.loads(_get(port, "/health")[1])
        paths = [f"/customers/{c}/score" for c in served_customers(port, 50)]
        for rate in (float(r) for r in args.rates.split(",")):
            results.append(drive(port, "GET published", "GET", paths, None, rate, int(rate * args.seconds),
                                 args.workers))
        what_if = what_if_request([p.split("/")[2] for p in paths], health["tonight"])
        print(f"what-if customer {what_if.customer}: events {what_if.first_event} .. {what_if.last_event}, "
              f"request rows {what_if.rows}")
        for rate in (float(r) for r in args.what_if_rates.split(",")):
            results.append(drive(port, "POST what-if", "POST", ["/score"], what_if.body, rate,
                                 int(rate * args.seconds), min(args.workers, 8)))
        earlier = sorted(d for d in health["served_dates"] if d != health["tonight"])
        if earlier:
            as_of = earlier[-1]
            as_of_paths = [f"/customers/{c}/score?as_of={as_of}" for c in served_customers(port, 20, as_of)]
            for rate in (float(r) for r in args.what_if_rates.split(",")):
                results.append(drive(port, f"GET as_of {as_of}", "GET", as_of_paths, None, rate,
                                     int(rate * args.seconds), min(args.workers, 8)))
        else:
            print("GET ?as_of= not measured: only tonight is served (publish two nights, e.g. "
                  "`churn nightly --as-of <an earlier date>` then `churn nightly`)")
    finally:
        stop_server(server)
    load = print_load()
    print(f"{'route':22s} {'req/s':>6s} {'n':>6s} {'errors':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s}")
    for r in results:
        print(f"{r.route:22s} {r.rate:6.0f} {r.requests:6d} {r.errors:6d} {r.p50_ms:8.1f} {r.p95_ms:8.1f} "
              f"{r.p99_ms:8.1f}")
    save_results("api", load, {"model": health.get("model_version"), "served_dates": health["served_dates"],
                               "what_if": {"customer": what_if.customer, "rows": what_if.rows,
                                           "first_event": what_if.first_event, "last_event": what_if.last_event},
                               "results": [asdict(r) for r in results]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
