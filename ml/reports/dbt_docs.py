"""dbt docs for analysts: lineage from the landing sources to the exposures, every column described.

`make docs` runs `python -m ml.reports.dbt_docs`: `dbt docs generate --static`
against the build database (so the catalog shows real column types), written
to `warehouse/reports/dbt_docs/` (its `static_index.html` is one offline file
the reports index links to), then `dbt docs serve` on 127.0.0.1 unless
`--no-serve`. Works on a fresh clone: without a build the catalog is empty but
the lineage, descriptions and exposures are all there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ml.config import ChurnConfig, load_config
from ml.features.dbt import dbt_executable, dbt_vars
from ml.reports.index_page import dbt_docs_page


def _dbt(config: ChurnConfig, *args: str) -> None:
    project = config.warehouse.dbt_project_dir
    target = dbt_docs_page(config).parent
    target.mkdir(parents=True, exist_ok=True)
    config.warehouse.build_db.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CHURN_BUILD_DB": str(config.warehouse.build_db), "DBT_LOG_PATH": str(target / "logs"),
           "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DO_NOT_TRACK": "1"}
    command = [dbt_executable(), "docs", args[0], "--project-dir", str(project), "--profiles-dir", str(project),
               "--target-path", str(target), *args[1:]]
    if args[0] == "generate":
        command += ["--vars", json.dumps(dbt_vars(config))]
    completed = subprocess.run(command, env=env, cwd=project, check=False)
    if completed.returncode:
        raise SystemExit(f"dbt docs {args[0]} failed (exit {completed.returncode}); see {target / 'logs'}")


def generate(config: ChurnConfig) -> Path:
    """dbt docs generate --static; returns the single-file page."""
    _dbt(config, "generate", "--static")
    return dbt_docs_page(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--no-serve", action="store_true", help="generate only")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    page = generate(config)
    print(f"dbt docs: {page} (offline single file)")
    if not args.no_serve:
        print(f"serving on http://127.0.0.1:{args.port} (Ctrl-C stops)")
        _dbt(config, "serve", "--host", "127.0.0.1", "--port", str(args.port), "--no-browser")
    return 0


if __name__ == "__main__":
    sys.exit(main())
