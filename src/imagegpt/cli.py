"""The `imagegpt` command. Each subcommand is imagegpt/commands/NAME.py, a thin shell over a library call.

A subcommand module defines `register(subparsers)`, which adds its parser and sets `func` to a function taking
the parsed arguments. Modules are discovered, so adding a subcommand means adding one file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__, commands
from .errors import ImageGPTError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegpt", description="ImageGPT: generative pretraining from pixels, sampling and probes."
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
        result = args.func(args)
    except ImageGPTError as e:
        message = " ".join(str(e).split())
        print(f"imagegpt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imagegpt {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
