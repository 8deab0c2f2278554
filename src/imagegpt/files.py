"""Files written so that a crash never leaves a partial one: readers see the old contents or the new."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open directories
        fsync_file(path)


def fsync_tree(path: str | os.PathLike) -> None:
    for root, _, names in os.walk(path):
        for name in names:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old or the new contents, never a prefix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
