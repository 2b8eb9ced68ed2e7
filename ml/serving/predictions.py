"""The prediction log: every answer the API gives, appended to files, ingested by the nightly.

The server never opens the build database (a nightly may hold its lock for
minutes), so answers go to append-only JSON-lines files under
`warehouse/prediction_log/`: one `os.write` of a whole line per answer on an
O_APPEND descriptor, so a killed server loses at most the line being written.
A file being written is named `*.open.jsonl` with the writer's pid; past
`serving.log_segment_bytes` it is closed and renamed to `*.jsonl`.

The nightly's `ingest_predictions` step reads every segment, keeps whole
lines that parse (a torn last line is skipped and counted), replaces the rows
of those request ids in `prediction_log` (so re-reading a live segment never
duplicates), and deletes segments no live server writes any more.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ml.config import ChurnConfig
from ml.logs import get_logger
from ml.warehouse import Session, connect, declare, fsync, quote, to_json

log = get_logger("predictions")

PREDICTION_LOG = declare(
    name="prediction_log",
    owner=__name__,
    grain="one row per answered API request and customer",
    description="what the real-time API answered: route, customer, as_of, model, probability, decision, latency",
    columns=[
        ("request_id", "VARCHAR"), ("logged_at", "TIMESTAMP"), ("route", "VARCHAR"), ("customer_id", "VARCHAR"),
        ("as_of", "DATE"), ("model_version", "VARCHAR"), ("churn_probability", "DOUBLE"),
        ("will_churn", "BOOLEAN"), ("latency_ms", "DOUBLE"), ("features_sha256", "VARCHAR"),
        ("segment", "VARCHAR"),
    ],
)
OPEN_SUFFIX = ".open.jsonl"


def log_dir(config: ChurnConfig) -> Path:
    return config.warehouse.dir / "prediction_log"


def features_hash(features: dict[str, Any]) -> str:
    """A stable digest of the feature values an answer was computed from."""
    return hashlib.sha256(to_json(features, sort_keys=True).encode()).hexdigest()


def new_request_id() -> str:
    return uuid.uuid4().hex


class PredictionLog:
    """Appends one JSON line per answer; thread-safe; rotates by size."""

    def __init__(self, folder: Path, segment_bytes: int) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0

    def _open(self) -> None:
        stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        self._path = self.folder / f"predictions-{stamp}-{os.getpid()}{OPEN_SUFFIX}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = 0
        fsync(self.folder, directory=True)

    def _close(self) -> None:
        if self._fd is None or self._path is None:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self._path, self._path.with_name(self._path.name.replace(OPEN_SUFFIX, ".jsonl")))
        fsync(self.folder, directory=True)
        self._fd, self._path = None, None

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append the records, one whole line each, in a single write."""
        data = "".join(to_json(r) + "\n" for r in records).encode()
        with self._lock:
            if self._fd is None:
                self._open()
            os.write(self._fd, data)
            self._size += len(data)
            if self._size >= self.segment_bytes:
                self._close()

    def close(self) -> None:
        with self._lock:
            self._close()


@dataclass(frozen=True)
class IngestResult:
    segments: int
    rows: int
    torn_lines: int
    removed: int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_alive(path: Path) -> bool:
    """Whether a live server may still append to this open segment (pid in its name)."""
    if not path.name.endswith(OPEN_SUFFIX):
        return False
    pid = path.name[: -len(OPEN_SUFFIX)].rsplit("-", 1)[-1]
    return pid.isdigit() and _pid_alive(int(pid))


def read_segment(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Whole, parseable lines of a segment, and how many lines were torn or unreadable."""
    records, torn = [], 0
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1]:  # no newline at the end: the write in flight when the server died
        torn += 1
    for line in lines[:-1]:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            torn += 1
            continue
        if isinstance(record, dict) and record.get("request_id"):
            records.append({**record, "segment": path.name})
        else:
            torn += 1
    return records, torn


def ingest_predictions(config: ChurnConfig) -> IngestResult:
    """Load every log segment into `prediction_log` in the build database; remove the finished ones."""
    folder = log_dir(config)
    segments = sorted(folder.glob("*.jsonl")) if folder.exists() else []
    records: list[dict[str, Any]] = []
    torn = 0
    for path in segments:
        found, bad = read_segment(path)
        records += found
        torn += bad
    frame = pd.DataFrame(records, columns=PREDICTION_LOG.column_names)
    if len(frame):
        # a whole line with an unreadable time or date is counted with the torn ones, never fails the step
        frame["logged_at"] = pd.to_datetime(frame["logged_at"], format="ISO8601", errors="coerce")
        as_of = pd.to_datetime(frame["as_of"], format="ISO8601", errors="coerce")
        readable = frame["logged_at"].notna() & as_of.notna()
        torn += int((~readable).sum())
        frame = frame.assign(as_of=as_of.dt.date)[readable].reset_index(drop=True)
        frame["churn_probability"] = pd.to_numeric(frame["churn_probability"], errors="coerce")
        frame["latency_ms"] = pd.to_numeric(frame["latency_ms"], errors="coerce")
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        session.create(PREDICTION_LOG)
        ids = sorted(set(frame["request_id"])) if len(frame) else []
        session.append(PREDICTION_LOG, frame, where="request_id in (select unnest(?::varchar[]))", params=[ids])
    removed = 0
    for path in segments:
        if not _writer_alive(path):
            path.unlink(missing_ok=True)
            removed += 1
    if torn:
        log.warning("prediction log: %d torn or unreadable line(s) skipped in %s", torn, folder)
    log.info("prediction log: %d row(s) from %d segment(s) ingested, %d removed", len(frame), len(segments), removed)
    return IngestResult(len(segments), len(frame), torn, removed)


def logged_predictions(session: Session) -> pd.DataFrame:
    """The latest logged answer per customer, as_of and model version (what monitoring joins to labels)."""
    columns = ["customer_id", "as_of", "model_version", "churn_probability", "will_churn"]
    if not session.exists(PREDICTION_LOG):
        return pd.DataFrame(columns=columns)
    return session.frame(
        f"select {', '.join(columns)} from {quote(PREDICTION_LOG.name)} "
        "qualify row_number() over (partition by customer_id, as_of, model_version order by logged_at desc) = 1"
    )
