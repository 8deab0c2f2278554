"""Hugging Face Hub ids, told apart from mistyped local paths before anything is fetched.

Every loader that takes "a directory or a Hub id" (checkpoint.resolve_directory,
ImageProcessor.from_pretrained) asks `hub_id` about a path that does not exist here. It refuses at once, in
one line:
- a value that looks like a local path: not owner/name, or whose first part is a folder here (runs/shapes when
  runs/ exists is a mistyped run directory, not the Hub user "runs");
- any value when the Hub cannot be reached: HF_HUB_OFFLINE is set, or a connection to the Hub's host
  (HF_ENDPOINT) fails within a few seconds.
Only then does huggingface_hub fetch it, inside `quiet()`, so that its retries do not print a line each.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from .errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # owner/name
CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def local_reason(name: str) -> str | None:
    """Why `name` (a path that does not exist here) must have been meant as a local path; None if it can be
    a Hub id."""
    if not HUB_ID.match(name) or ".." in name or "--" in name:
        return "a Hub id has the form owner/name"
    first = name.split("/")[0]
    if Path(first).exists():
        return f"{first} is a folder here"
    return None


def offline_reason() -> str | None:
    """Why the Hub cannot be reached now (HF_HUB_OFFLINE, no connection to its host); None if it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"{host} cannot be reached: {e.strerror or e}"
    return None


def hub_id(path: str | os.PathLike, what: str = "a directory") -> str:
    """`path`, which does not exist here, as a Hub id to fetch; a CheckpointError at once if it looks like a
    mistyped local path or the Hub cannot be reached. `what` names what was expected, for the message."""
    name = str(path)
    reason = local_reason(name)
    if reason is not None:
        raise CheckpointError(f"no such file or directory: {path} ({reason}); pass {what}")
    try:
        import huggingface_hub  # noqa: F401 - only whether it is installed
    except ImportError as e:
        raise CheckpointError(
            f"{path} is not a local path, and loading a Hugging Face Hub id needs the optional "
            f"huggingface_hub package: pip install 'imagegpt[hub]', or pass {what}"
        ) from e
    reason = offline_reason()
    if reason is not None:
        raise CheckpointError(
            f"{path} is not a local path, and the Hugging Face Hub cannot be reached ({reason}); pass "
            f"{what}, or connect and try again"
        )
    return name


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """huggingface_hub's retry and progress messages silenced for the block: a failure is one error."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from huggingface_hub.utils import logging as hub_logging

    verbosity, bars_off = hub_logging.get_verbosity(), are_progress_bars_disabled()
    hub_logging.set_verbosity_error()
    disable_progress_bars()
    try:
        yield
    finally:
        hub_logging.set_verbosity(verbosity)
        if not bars_off:
            enable_progress_bars()


def fetch_error(path, e: BaseException) -> CheckpointError:
    """The one-line error for a Hub fetch that failed."""
    reason = " ".join(str(e).split()) or type(e).__name__
    return CheckpointError(
        f"{path} is not a local path, and fetching it from the Hugging Face Hub failed ({reason}). Check "
        "the id, or pass a local directory"
    )
