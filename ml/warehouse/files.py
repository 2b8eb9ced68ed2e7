"""Replacing files and folders so that a reader sees the old complete version or the new one.

Reports, Data Docs and published databases are written whole in a staging
place beside their target and swapped in with a rename, which POSIX makes
atomic within one file system; fsync makes the swap survive a power cut.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(target: Path) -> Path:
    """A fresh hidden sibling of `target` to write into before `replace_folder`."""
    return target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:6]}")


def replace_folder(staged: Path, target: Path) -> None:
    """Swap a fully written folder into place, so a failed run never leaves half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:6]}")
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def partition_folders(landing_dir: Path, file_format: str) -> list[str]:
    """Landing tables that arrived as a folder of partitions rather than one `<table>.<format>` file.

    The one rule both the landing checks (ml.data.landing) and dbt's sources
    (var `landing_folders`) follow, so they always read the same form.
    """
    if not landing_dir.is_dir():
        return []
    return sorted(p.name for p in landing_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and not (landing_dir / f"{p.name}.{file_format}").exists())
