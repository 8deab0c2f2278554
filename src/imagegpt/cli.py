"""The `imagegpt` command. Each subcommand is imagegpt/commands/NAME.py, a thin shell over a library call.

A subcommand module defines `register(subparsers)`, which adds its parser and sets `func` to a function taking
the parsed arguments. Modules are discovered, so adding a subcommand means adding one file. Options naming
outputs are added with commands._options.add_output_argument, and checked here before the command runs.

Exit statuses (commands._options.EXIT_STATUS): 0 done; 1 a bug, with its traceback; 2 a one-line error (the
user's mistake, an output that cannot be written, a size that does not fit); 128 + the signal's number for a
command stopped by a signal (130 Ctrl-C, 143 SIGTERM), which a training command returns after saving its
checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys

from . import __version__, commands
from .commands._options import EXIT_STATUS, check_outputs
from .errors import ImageGPTError, Interrupted

# OSErrors that are the machine's state, never a bug: one line, as a user's mistake is, with what to do.
DISK_ERRORS = {
    errno.ENOSPC: "free some space or choose another place",
    errno.EDQUOT: "free some space or choose another place",
    errno.EFBIG: "the file is larger than this filesystem allows; choose another place",
    errno.EROFS: "the filesystem is read-only; choose another place",
    errno.EACCES: "check its permissions or choose another file",
    errno.EPERM: "check its permissions or choose another file",
    errno.EIO: "the disk reported an input/output error",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegpt",
        description="ImageGPT: generative pretraining from pixels, sampling and probes.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imagegpt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        check_outputs(args)
        result = args.func(args)
    except Interrupted as e:
        print(f"imagegpt {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 128 + e.signal
    except ImageGPTError as e:
        return _error(args, str(e))
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = e.filename or "a file"
        return _error(args, f"{where}: {e.strerror}; {DISK_ERRORS[e.errno]}")
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _error(args, f"out of memory ({reason}); use a smaller batch size, model or resolution")
    except KeyboardInterrupt:
        print(f"imagegpt {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _error(args, message: str) -> int:
    print(f"imagegpt {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed (numpy's MemoryError, torch's CPU allocator or CUDA out of memory)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return "can't allocate memory" in str(e) or "not enough memory" in str(e)


if __name__ == "__main__":
    sys.exit(main())
