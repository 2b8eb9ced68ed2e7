"""`churn serve`: the real-time scoring API (FastAPI on uvicorn, loopback by default).

Two routes, two speeds:
  GET  /customers/{id}/score          tonight's published answer, from memory (swapped on a new publish)
  GET  /customers/{id}/score?as_of=D  a served earlier date: the customer's landing rows through the mart's SQL
  POST /score                         what-if: raw rows for one or a few customers, through the mart's SQL
  GET  /health                        publish, model, served dates (no key needed)

The mart's SQL is compiled once at start and kept prepared on a pool of
in-memory DuckDBs (`ml.serving.features`); nothing is compiled on the request
path, and a date that is not served is refused with the list of those that are.
Every answer is appended to the prediction log (`ml.serving.predictions`).
Bodies are bounded in size and in time before the framework reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import hmac
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ml.config import ChurnConfig
from ml.logs import get_logger
from ml.modeling.score import risk_bands, score_frame
from ml.serving.features import FeaturePool, RequestError, compile_features, read_landing_rows
from ml.serving.predictions import PredictionLog, features_hash, log_dir, new_request_id
from ml.serving.state import PublishedState, StateHolder, answer_value

log = get_logger("serve")

Scalar = str | int | float | bool | None
API_KEY_HEADER = "X-API-Key"
DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"


def _parse_date(text: str | None) -> dt.date | None:
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise RequestError(f"as_of must be a date YYYY-MM-DD, got {text!r}") from exc


class Reason(BaseModel):
    feature: str
    contribution: float | None


class Score(BaseModel):
    customer_id: str
    as_of: dt.date
    churn_probability: float
    will_churn: bool
    risk_band: str | None
    model_version: str
    reasons: list[Reason]
    features: dict[str, Scalar]


class ScoreList(BaseModel):
    scores: list[Score]


class WhatIf(BaseModel):
    """Raw rows per source table, as the landing files hold them; as_of defaults to tonight."""

    model_config = ConfigDict(extra="forbid")
    as_of: dt.date | None = None
    tables: dict[str, list[dict[str, Scalar]]] = Field(
        description="source table -> rows (column -> value), e.g. {\"customers\": [{\"customer_id\": \"C1\", ...}]}"
    )


class Health(BaseModel):
    status: str
    dataset: str
    model_version: str
    tonight: dt.date
    served_dates: list[dt.date]
    run_id: str | None
    published_at: dt.datetime | None


class Problem(BaseModel):
    error: str


class BodyLimit:
    """Refuse bodies over `max_bytes` (by Content-Length or as they stream) and bodies that stall.

    Pure ASGI so it runs before FastAPI reads anything: a huge Content-Length
    is answered at once, and the body is read here, whole, against a deadline,
    so a lying Content-Length costs a bounded wait and the app never stalls.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            text = length.decode("latin-1").strip()
            if not text.isdigit():
                await _problem(send, 400, f"Content-Length must be a non-negative integer, got {text!r}")
                return
            if int(text) > self.max_bytes:
                await _problem(send, 413, f"body of {int(text)} bytes exceeds the limit of {self.max_bytes}")
                return
        try:
            body = await self._read_body(receive)
        except _BodyRefused as refused:
            await _problem(send, refused.status, refused.message)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body, or _BodyRefused when it grows past the limit or stalls past the timeout."""
        chunks: list[bytes] = []
        seen = 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError as exc:
                raise _BodyRefused(408, f"request body not received within {self.timeout:g}s") from exc
            if message["type"] == "http.disconnect":
                raise _BodyRefused(400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise _BodyRefused(413, f"body exceeds the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _BodyRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _problem(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class ScoringService:
    """The compiled SQL, its connection pool, the published state and the prediction log."""

    def __init__(self, config: ChurnConfig, workdir: Path | None = None) -> None:
        self.config = config
        self.compiled = compile_features(config, workdir)
        self.holder = StateHolder(config, self.compiled)
        # one thread per connection: a request's rows are few, and the pool gives the concurrency
        self.pool = FeaturePool(self.compiled, config.serving.pool_size,
                                dataclasses.replace(config.warehouse.engine, threads=1))
        self.log = PredictionLog(log_dir(config), config.serving.log_segment_bytes)

    @property
    def state(self) -> PublishedState:
        return self.holder.current

    def close(self) -> None:
        self.holder.stop()
        self.pool.close()
        self.log.close()

    def check_date(self, state: PublishedState, as_of: dt.date) -> None:
        if as_of not in state.served_dates:
            served = ", ".join(d.isoformat() for d in state.served_dates)
            raise RequestError(f"as_of {as_of.isoformat()} is not served; served dates: {served}")

    def score_tables(self, tables: dict[str, list[dict[str, Any]]], as_of: dt.date | None = None,
                     state: PublishedState | None = None) -> list[dict[str, Any]]:
        """Answers for raw rows at a served date, by the mart's SQL and the published champion."""
        state = state or self.state
        as_of = as_of or state.tonight
        self.check_date(state, as_of)
        limit = self.config.serving.max_rows_per_table
        for name, rows in tables.items():
            if len(rows) > limit:
                raise RequestError(f"table {name!r}: {len(rows)} rows exceed serving.max_rows_per_table ({limit})")
        with self.pool.connection() as connection:
            features = connection.features(tables, as_of, dt.date.today())
        if features.empty:
            return []
        model = state.model
        scored = score_frame(model, state.explainer, features, self.config.scoring.top_reasons,
                             typical=state.typical, texts=False)
        bands = risk_bands(scored["churn_probability"].to_numpy(), model.threshold,
                           self.config.scoring.high_risk_probability)
        reason_names = [c for c in scored.columns if c.startswith("reason_") and c.removeprefix("reason_").isdigit()]
        names = model.contract.feature_names
        values = features[names].to_dict("records")  # one conversion, not a .loc lookup per feature
        answers = []
        for position, (_, row) in enumerate(scored.iterrows()):
            answers.append({
                "customer_id": str(row[model.contract.key]),
                "as_of": answer_value(row[model.contract.as_of]),
                "churn_probability": float(row["churn_probability"]),
                "will_churn": bool(row["will_churn"]),
                "risk_band": bands[position],
                "model_version": model.version,
                "reasons": [{"feature": row[n], "contribution": answer_value(row[f"{n}_contribution"])}
                            for n in reason_names if row[n] is not None],
                "features": {f: answer_value(values[position][f]) for f in names},
            })
        return answers

    def score_customer(self, customer_id: str, as_of: dt.date | None = None) -> dict[str, Any]:
        """Tonight's answer from memory; another served date through the SQL over the landing rows."""
        state = self.state
        if as_of is None or as_of == state.tonight:
            answer = state.answer(customer_id)
            if answer is None:
                raise LookupError(f"customer {customer_id!r} is not active on {state.tonight} (or unknown)")
            return answer
        self.check_date(state, as_of)
        if state.landing is not None:
            tables = state.landing.rows([customer_id], as_of)
        else:
            with self.pool.connection() as connection:
                tables = read_landing_rows(self.compiled, [customer_id], connection.session, as_of=as_of)
        answers = self.score_tables(tables, as_of, state)
        if not answers:
            raise LookupError(f"customer {customer_id!r} is not active on {as_of} (or unknown)")
        return answers[0]

    def record(self, route: str, answers: list[dict[str, Any]], started: float) -> None:
        latency = 1000 * (time.perf_counter() - started)
        request_id, now = new_request_id(), dt.datetime.now().isoformat()
        self.log.write([{
            "request_id": request_id, "logged_at": now, "route": route, "customer_id": a["customer_id"],
            "as_of": a["as_of"], "model_version": a["model_version"], "churn_probability": a["churn_probability"],
            "will_churn": a["will_churn"], "latency_ms": latency, "features_sha256": features_hash(a["features"]),
        } for a in answers])


def _api_key_check(config: ChurnConfig) -> Callable[..., None]:
    expected = os.environ.get(config.serving.api_key_env) or None

    def check(x_api_key: Annotated[str | None, Header(alias=API_KEY_HEADER)] = None) -> None:
        if expected is not None and not hmac.compare_digest((x_api_key or "").encode(), expected.encode()):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header")

    return check


def create_app(service: ScoringService) -> FastAPI:
    """The HTTP surface over `service`; every failure a client can cause is a 4xx with a message."""
    app = FastAPI(title="churn-warehouse scoring API", version="2",
                  description="Tonight's published churn scores, and what-if scoring by the mart's own SQL.")
    authorised = [Depends(_api_key_check(service.config))]
    errors = {400: {"model": Problem}, 401: {"model": Problem}, 404: {"model": Problem}}

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5]]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/health", response_model=Health)
    def health() -> dict[str, Any]:
        state = service.state
        return {"status": "ok", "dataset": service.config.dataset.name, "model_version": state.model.version,
                "tonight": state.tonight, "served_dates": list(state.served_dates),
                "run_id": state.info.run_id if state.info else None,
                "published_at": state.info.published_at if state.info else None}

    @app.get("/customers/{customer_id}/score", response_model=Score, responses=errors, dependencies=authorised)
    def customer_score(
        customer_id: str,
        as_of: Annotated[str | None, Query(pattern=DATE_PATTERN, description="YYYY-MM-DD, a served date")] = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            day = _parse_date(as_of)
            answer = service.score_customer(customer_id, day)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from exc
        service.record("published" if day is None or day == service.state.tonight else "as_of", [answer], started)
        return answer

    @app.post("/score", response_model=ScoreList, responses=errors, dependencies=authorised)
    def what_if(body: WhatIf) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            answers = service.score_tables(body.tables, body.as_of)
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from exc
        service.record("what_if", answers, started)
        return {"scores": answers}

    return app


def asgi_app(service: ScoringService) -> ASGIApp:
    """The app behind the body limits (what uvicorn runs)."""
    serving = service.config.serving
    return BodyLimit(create_app(service), serving.max_body_bytes, serving.body_timeout_seconds)


def run_command(config: ChurnConfig, args: argparse.Namespace) -> int:
    import uvicorn

    service = ScoringService(config)
    service.holder.start(freeze_heap=True)  # this process only serves: its states need no cyclic GC passes
    state = service.state
    log.info("serving %s model %s on http://%s:%d (%d customers tonight, dates %s)", config.dataset.name,
             state.model.version, args.host, args.port, len(state.answers),
             ", ".join(d.isoformat() for d in state.served_dates))
    try:
        uvicorn.run(asgi_app(service), host=args.host, port=args.port, log_level="warning",
                    timeout_keep_alive=5, limit_concurrency=256, timeout_graceful_shutdown=5)
    finally:
        service.close()
    return 0
