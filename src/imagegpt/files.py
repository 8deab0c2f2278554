"""Files written so that a crash never leaves a partial one, and output places checked before any work.

Every command's outputs go through `check_output` before the work starts, so a folder where a file is wanted,
a file where a folder is wanted, or a place that cannot take new files (a read-only disk, /proc, a device) is
one line at once rather than a traceback after minutes of work. A write that still fails later (a disk that
fills up meanwhile) is an OutputError naming the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


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


def check_output(path: str | os.PathLike, *, directory: bool = False, what: str = "output") -> Path:
    """Refuse an output place that cannot be written, before any work; returns the path (~ expanded).

    directory: the output is a folder (created if missing) rather than a file. `what` names the output in
    the message (the option, say). A file must be a regular file or not exist yet: outputs are written to a
    temporary file beside it and renamed into place, so the check is that its folder takes a new file. A
    folder that does not exist yet is checked at its nearest existing ancestor, and nothing is created.
    """
    path = Path(path).expanduser()
    if path.exists():
        if directory and not path.is_dir():
            raise OutputError(f"{what} {path} is a file, but a folder is needed there; choose another path")
        if not directory and path.is_dir():
            raise OutputError(f"{what} {path} is a folder; give a file name inside it or elsewhere")
        if not directory and not path.is_file():
            raise OutputError(
                f"{what} {path} is not a regular file (a device, pipe or socket); give a file name"
            )
        folder = path if directory else path.parent
    else:
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(f"{what} {path} cannot be created: {folder} is a file, not a folder")
    try:  # root passes every permission check, so only a real file says whether the folder takes one
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".imagegpt-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"{what} {path} cannot be written: {folder} does not take new files ({e.strerror or e}); choose "
            "another place"
        ) from e
    return path


def check_folders(**folders: str | os.PathLike | None) -> None:
    """check_output(directory=True) for each output folder given (None: not given), named by its keyword."""
    for name, folder in folders.items():
        if folder is not None:
            check_output(folder, directory=True, what=name)


@contextlib.contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError of the block (a full disk, a folder made read-only meanwhile) into an OutputError."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or e
        raise OutputError(f"cannot write {path}: {reason}; free some space or choose another place") from e


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """A file object whose contents replace `path` only when the block ends without error (fsynced, then
    renamed); readers see the old contents or the new, never a prefix. mode "w" (UTF-8 text) or "wb"."""
    path = Path(path)
    with write_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it (mkstemp makes 0600)
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old or the new contents, never a prefix."""
    with atomic_open(path) as f:
        f.write(text)
