"""`make report-screenshots`: a PNG of every report page, so a reviewer can look without a browser.

Headless Debian chromium (driven by Playwright, installed with the test
extras) opens each page the reports index links to, from file://, at the
default demo size (1280 x 900, full page), and saves
`warehouse/reports/screenshots/<name>.png`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ml.config import ChurnConfig, load_config
from ml.reports.index_page import index_path

VIEWPORT = {"width": 1280, "height": 900}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def pages(config: ChurnConfig) -> dict[str, Path]:
    """The index and every page it links to, by a file-system-safe name."""
    index = index_path(config)
    if not index.is_file():
        raise SystemExit(f"no reports index at {index}: run make nightly first")
    found = {"index": index}
    for href in re.findall(r'href="([^"]+)"', index.read_text()):
        target = index.parent / href
        found[re.sub(r"[^a-z0-9]+", "_", str(Path(href).parent).lower()).strip("_") or "page"] = target
    return found


def screenshots(config: ChurnConfig, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out = config.warehouse.reports_dir / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=chromium, args=CHROMIUM_ARGS,
                                                       headless=True, viewport=VIEWPORT)
        for name, path in pages(config).items():
            page = context.new_page()
            page.goto(path.resolve().as_uri(), wait_until="load")
            target = out / f"{name}.png"
            page.screenshot(path=str(target), full_page=True)
            page.close()
            written.append(target)
        context.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    for path in screenshots(load_config(args.config), args.chromium):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
