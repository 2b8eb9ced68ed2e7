"""Where an in-process benchmark's figures go: printed beside the load average, then saved as JSON.

On the shared 2-core machine a figure means little without the load it was
taken under, so every saved result carries the load averages at its end and
the core count, whichever benchmark wrote it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def print_load() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages now, printed."""
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores (shared machine)")
    return load


def save_results(prefix: str, load: tuple[float, float, float], payload: dict[str, Any]) -> Path:
    """`payload` with the load and core count, as results/<prefix>-<timestamp>.json; the path printed."""
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{prefix}-{dt.datetime.now():%Y%m%dT%H%M%S}.json"
    out.write_text(json.dumps({"load_average": load, "cpus": os.cpu_count(), **payload}, indent=2))
    print(f"saved {out}")
    return out
