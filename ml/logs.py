"""Logging set-up and step timing shared by every command.

Nightly runs are read from logs after the fact, so every long step says when it
starts, how long it took, and how much memory the process had reached.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER_NAME = "churn"


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record.

    A handler bound to the stderr of its creation keeps writing to a stream that
    a test runner (or a caller redirecting output) has since closed.
    """

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool = False) -> None:
    """One stderr handler, time-stamped; idempotent so tests can call it freely."""
    root = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _CurrentStderrHandler) for h in root.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timed(step: str, logger: logging.Logger | None = None) -> Iterator[dict[str, float]]:
    """Log a step's start and its duration; the yielded dict receives `seconds`."""
    log = logger or get_logger()
    log.info("%s ...", step)
    result: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start
        log.info("%s done in %.1fs (peak memory %.0f MB)", step, result["seconds"], peak_memory_mb())
