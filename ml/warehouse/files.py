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
