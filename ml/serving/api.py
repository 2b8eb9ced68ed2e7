"""`churn serve`: a real-time scoring API that computes features with the mart's own SQL.

A request's features are computed by the dbt SQL that builds the nightly mart:
the project is compiled once per as_of date (against an in-memory DuckDB, so
the build database a nightly may hold locked is never touched), and each request
runs the compiled staging -> intermediate -> mart queries over just the
requested customers' raw rows, in a private in-memory DuckDB. No feature is
re-implemented in Python, so the API and `churn_scores` cannot disagree.

The model and the default as_of date come from the published database (what BI
sees), so a running server never blocks or is blocked by a nightly build.

Endpoints:
  GET  /health                               model version and default as_of date
  GET  /customers/<id>/score[?as_of=DATE]    features from the landing files for one customer
  POST /score                                {"as_of": "DATE", "tables": {"customers": [...], ...}}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import load_contract
from ml.features.dbt import run_dbt
from ml.logs import get_logger, timed
from ml.modeling.explain import Explainer
from ml.modeling.model import ChurnModel
from ml.modeling.registry import REGISTRY_TABLE, champion_in, load_model
from ml.modeling.score import SCORES_TABLE, latest_scores_summary, risk_bands, score_frame
from ml.warehouse import MEMORY, Session, connect, is_missing, json_value, quote, to_json

log = get_logger("serve")

# Compiling against ":memory:" makes every relation "memory"."main"."<model>",
# the default catalog of a fresh in-memory DuckDB connection.
COMPILE_DATABASE = ":memory:"
MAX_COMPILED_DATES = 8


class RequestError(ValueError):
    """The request cannot be scored as given; the message says what to fix."""


@dataclass(frozen=True)
class CompiledSource:
    """A raw table as the compiled SQL reads it, and how to fetch one customer's rows."""

    name: str
    relation: str  # the expression the compiled SQL uses, e.g. read_parquet('.../customers.parquet')
    columns: dict[str, str | None]  # declared column -> declared data_type
    key_column: str | None


@dataclass(frozen=True)
class CompiledFeatures:
    """The mart and everything upstream of it, compiled for one as_of date."""

    as_of: dt.date
    mart: str
    key: str
    as_of_column: str
    models: tuple[tuple[str, str], ...]  # (relation_name, compiled select) in dependency order
    sources: tuple[CompiledSource, ...]


def _dependency_order(nodes: dict[str, Any], target: str) -> list[str]:
    """Model ids upstream of (and including) `target`, parents before children."""
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for parent in nodes[node_id]["depends_on"]["nodes"]:
            if parent in nodes and nodes[parent]["resource_type"] == "model":
                visit(parent)
        ordered.append(node_id)

    visit(target)
    return ordered


def compile_features(config: ChurnConfig, as_of: dt.date, workdir: Path) -> CompiledFeatures:
    """Compile the dataset's mart for `as_of` and collect the SQL a request will run."""
    target = workdir / f"compiled-{config.dataset.name}-{as_of.isoformat()}"
    run_dbt(config, "compile", as_of=as_of.isoformat(), target_path=target, database=COMPILE_DATABASE)
    manifest = json.loads((target / "manifest.json").read_text())
    nodes = manifest["nodes"]
    mart_id = next(
        (k for k, n in nodes.items() if n["resource_type"] == "model" and n["name"] == config.dataset.feature_mart),
        None,
    )
    if mart_id is None:
        raise RequestError(f"dbt project has no model {config.dataset.feature_mart!r}")
    contract = load_contract(target / "manifest.json", config.dataset.feature_mart)
    order = _dependency_order(nodes, mart_id)
    used_sources = {p for n in order for p in nodes[n]["depends_on"]["nodes"] if p.startswith("source.")}
    sources = []
    for source_id in sorted(used_sources):
        source = manifest["sources"][source_id]
        meta = {**(source.get("meta") or {}), **((source.get("config") or {}).get("meta") or {})}
        columns = {name: col.get("data_type") for name, col in source["columns"].items()}
        key_column = meta.get("entity_key", config.problem.entity_key)
        sources.append(
            CompiledSource(
                name=source["name"],
                relation=source["relation_name"],
                columns=columns,
                key_column=key_column if key_column in columns else None,
            )
        )
    return CompiledFeatures(
        as_of=as_of,
        mart=config.dataset.feature_mart,
        key=contract.key,
        as_of_column=contract.as_of,
        models=tuple((nodes[n]["relation_name"], nodes[n]["compiled_code"]) for n in order),
        sources=tuple(sources),
    )


def read_landing_rows(compiled: CompiledFeatures, customer_ids: list[str]) -> dict[str, pd.DataFrame]:
    """The raw rows of `customer_ids` in every source, read from the landing files."""
    frames: dict[str, pd.DataFrame] = {}
    with connect(MEMORY) as session:
        for source in compiled.sources:
            if source.key_column is None:
                raise RequestError(
                    f"source table {source.name!r} has no customer key column; "
                    "set `entity_key` in its source meta to look customers up"
                )
            placeholders = ", ".join("?" for _ in customer_ids)
            frames[source.name] = session.frame(
                f"select * from {source.relation} where {quote(source.key_column)}::varchar in ({placeholders})",
                customer_ids,
            )
    return frames


# What is not code in SQL: string literals, quoted identifiers and comments (quotes doubled inside).
_NOT_CODE = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?(?:\*/|$)""", re.S)


def _name_char(char: str) -> bool:
    """Whether `char` next to a match would make it part of a longer name (`x.customers`, `customers_2`)."""
    return char.isalnum() or char in '_."'


def replace_relations(sql: str, relations: dict[str, str]) -> str:
    """`sql` with each relation reference (dict key, as dbt compiled it) replaced by its value.

    A reference matches only where a SQL name or expression can start: in code
    or at the opening quote of a quoted identifier, never inside a string
    literal, a comment or a quoted identifier, and never as part of a longer
    (e.g. qualified) name. So a column or a literal that happens to spell a
    relation's name is left alone. A match may run on through literals and
    identifiers: dbt compiles a file source as `read_parquet('.../x.parquet')`
    and a table as `"db"."schema"."x"`.
    """
    if not relations:
        return sql
    inside: list[tuple[int, int]] = []  # spans where no reference may start
    for token in _NOT_CODE.finditer(sql):
        first = token.start() + (1 if token.group().startswith('"') else 0)  # a quoted name may start one
        inside.append((first, token.end()))
    pattern = re.compile("|".join(re.escape(r) for r in sorted(relations, key=len, reverse=True)))
    out, last = [], 0
    for match in pattern.finditer(sql):
        start, end = match.span()
        if any(a <= start < b for a, b in inside):
            continue
        if (start > 0 and _name_char(sql[start - 1])) or (end < len(sql) and _name_char(sql[end])):
            continue
        out += [sql[last:start], relations[match.group()]]
        last = end
    out.append(sql[last:])
    return "".join(out)


def _raw_table(source: CompiledSource) -> str:
    return f"__raw_{source.name}"


def compute_features(compiled: CompiledFeatures, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Run the compiled mart SQL over `tables`; the rows of the as_of snapshot.

    The models are created under the very names dbt compiled them with
    ("memory"."main"."<model>" is the default catalog and schema of an
    in-memory DuckDB), so their references need no rewriting; only the
    sources, which dbt compiled as reads of the landing files, are pointed at
    the request's rows.
    """
    with connect(MEMORY) as session:
        local: dict[str, str] = {}
        for source in compiled.sources:
            if source.name not in tables:
                raise RequestError(f"table {source.name!r} is missing from the request")
            frame = tables[source.name]
            if frame.empty and len(frame.columns) == 0:  # `[]` in JSON: no rows, not no columns
                frame = pd.DataFrame({column: pd.Series(dtype=object) for column in source.columns})
            missing = [c for c in source.columns if c not in frame.columns]
            if missing:
                raise RequestError(
                    f"table {source.name!r} ({len(frame)} rows) lacks column(s) {', '.join(missing)}"
                )
            select_list = ", ".join(
                f"cast({quote(c)} as {t}) as {quote(c)}" if t else quote(c) for c, t in source.columns.items()
            )
            with session.registered(frame) as incoming:
                _reject_uncastable(session, source, incoming, len(frame))
                session.execute(f"create table {quote(_raw_table(source))} as select {select_list} from {incoming}")
            local[source.relation] = quote(_raw_table(source))
        for relation, sql in compiled.models:
            session.execute(f"create table {relation} as {replace_relations(sql, local)}")
        mart_relation = compiled.models[-1][0]
        return session.frame(
            f"select * from {mart_relation} where {quote(compiled.as_of_column)} = ?", [compiled.as_of]
        )


def _reject_uncastable(session: Session, source: CompiledSource, incoming: str, rows: int) -> None:
    """Name the column and row count of values that do not fit the declared type."""
    typed = [(column, dtype) for column, dtype in source.columns.items() if dtype]
    if not typed:
        return
    counts = ", ".join(
        f"count(*) filter (where {quote(c)} is not null and try_cast({quote(c)} as {t}) is null)" for c, t in typed
    )
    # rows(), not one(): a fully read result leaves the connection free to register the next frame.
    [bad_counts] = session.rows(f"select {counts} from {incoming}")
    for (column, dtype), bad in zip(typed, bad_counts, strict=True):
        if bad:
            raise RequestError(
                f"table {source.name!r}, column {column!r}: {bad} of {rows} value(s) are not {dtype}"
            )


def published_champion(config: ChurnConfig) -> tuple[str, dt.date]:
    """The champion version and latest scored as_of date, as BI sees them."""
    db = config.warehouse.published_db
    if not db.exists():
        raise RequestError(f"nothing published yet ({db} missing); run `make nightly` first")
    with connect(db, read_only=True) as session:
        present = set(session.tables())
        for table in (REGISTRY_TABLE, SCORES_TABLE):
            if table not in present:
                raise RequestError(f"published database {db} has no {table} table; run `make nightly`")
        version = champion_in(session, config.dataset.name)
        scored = latest_scores_summary(session, config.problem.as_of_column)
        latest = scored.last_as_of if scored else None
    if version is None or latest is None:
        raise RequestError(f"published database {db} has no champion or scores for {config.dataset.name!r}")
    return version, latest


def answer_value(value: Any) -> Any:
    """A feature or key value as the API answers it: plain JSON, dates cut to YYYY-MM-DD.

    The cut is the API's own choice (answers have always given as_of dates as
    days), made here explicitly before the shared conversion.
    """
    if isinstance(value, (pd.Timestamp, dt.date)) and not is_missing(value):
        return value.isoformat()[:10]
    return json_value(value)


class ScoringService:
    """Holds the champion and compiled SQL; turns raw rows into scored answers."""

    def __init__(self, config: ChurnConfig, workdir: Path | None = None) -> None:
        self.config = config
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="churn-serve-"))
        version, self.default_as_of = published_champion(config)
        with timed(f"loading champion {version}", log):
            self.model: ChurnModel = load_model(config, version, registry_db=config.warehouse.published_db)
            self.explainer = Explainer(self.model)
        self._compiled: dict[dt.date, CompiledFeatures] = {}
        self._lock = threading.Lock()

    def compiled(self, as_of: dt.date) -> CompiledFeatures:
        with self._lock:
            if as_of not in self._compiled:
                if len(self._compiled) >= MAX_COMPILED_DATES:
                    self._compiled.pop(next(iter(self._compiled)))
                with timed(f"compiling feature SQL for as_of {as_of}", log):
                    self._compiled[as_of] = compile_features(self.config, as_of, self.workdir)
            return self._compiled[as_of]

    def score_tables(self, tables: dict[str, pd.DataFrame], as_of: dt.date | None = None) -> list[dict[str, Any]]:
        compiled = self.compiled(as_of or self.default_as_of)
        features = compute_features(compiled, tables)
        if features.empty:
            return []
        scored = score_frame(self.model, self.explainer, features, self.config.scoring.top_reasons)
        bands = risk_bands(scored["churn_probability"].to_numpy(), self.model.threshold,
                           self.config.scoring.high_risk_probability)
        answers = []
        reason_names = [c for c in scored.columns if c.startswith("reason_") and c.removeprefix("reason_").isdigit()]
        for position, (index, row) in enumerate(scored.iterrows()):
            answers.append({
                compiled.key: answer_value(row[compiled.key]),
                compiled.as_of_column: answer_value(row[compiled.as_of_column]),
                "churn_probability": float(row["churn_probability"]),
                "will_churn": bool(row["will_churn"]),
                "risk_band": bands[position],
                "model_version": self.model.version,
                "reasons": [
                    {"feature": row[name], "contribution": answer_value(row[f"{name}_contribution"])}
                    for name in reason_names
                    if row[name] is not None
                ],
                "features": {f: answer_value(features.loc[index, f]) for f in self.model.contract.feature_names},
            })
        return answers

    def score_customer(self, customer_id: str, as_of: dt.date | None = None) -> dict[str, Any]:
        compiled = self.compiled(as_of or self.default_as_of)
        answers = self.score_tables(read_landing_rows(compiled, [customer_id]), compiled.as_of)
        if not answers:
            raise LookupError(f"customer {customer_id!r} is not active on {compiled.as_of} (or unknown)")
        return answers[0]


def _parse_date(text: str | None) -> dt.date | None:
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise RequestError(f"as_of must be YYYY-MM-DD, got {text!r}") from exc


def make_handler(service: ScoringService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "churn-serve"

        def _send(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            payload = to_json(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _handle(self, work) -> None:
            started = time.perf_counter()
            try:
                self._send(HTTPStatus.OK, work())
            except LookupError as exc:
                self._send(HTTPStatus.NOT_FOUND, {"error": str(exc)})
            except (RequestError, json.JSONDecodeError, ValueError) as exc:
                self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except Exception as exc:  # reported to the client and the log, never a dropped connection
                log.exception("request %s failed", self.path)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            log.info("%s %s %.0f ms", self.command, self.path, 1000 * (time.perf_counter() - started))

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            parts = [p for p in url.path.split("/") if p]
            as_of_text = parse_qs(url.query).get("as_of", [None])[0]
            if parts == ["health"]:
                self._handle(lambda: {
                    "status": "ok",
                    "dataset": service.config.dataset.name,
                    "model_version": service.model.version,
                    "default_as_of": service.default_as_of.isoformat(),
                })
            elif len(parts) == 3 and parts[0] == "customers" and parts[2] == "score":
                self._handle(lambda: service.score_customer(parts[1], _parse_date(as_of_text)))
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {url.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if urlparse(self.path).path != "/score":
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
                return

            def work() -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body.get("tables"), dict):
                    raise RequestError('body needs "tables": {"<source table>": [ {row}, ... ], ...}')
                tables = {name: pd.DataFrame(rows) for name, rows in body["tables"].items()}
                return {"scores": service.score_tables(tables, _parse_date(body.get("as_of")))}

            self._handle(work)

        def log_message(self, format: str, *args: Any) -> None:  # timing is logged in _handle
            return

    return Handler


def make_server(service: ScoringService, host: str, port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(service))


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    service = ScoringService(config)
    service.compiled(service.default_as_of)  # compile up front: the first request is then fast
    server = make_server(service, args.host, args.port)
    log.info("serving %s model %s on http://%s:%d", config.dataset.name, service.model.version, args.host, args.port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
