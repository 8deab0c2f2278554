"""Options that several subcommands share, and the outputs every command checks before its work starts."""

from __future__ import annotations

import argparse

AUTO_TRAINING = "bfloat16 where the device has bfloat16 units (CUDA, AVX512-BF16/AMX CPUs), else float32"
AUTO_FORWARD = "float32 (exact, the same on every machine)"

# Every command's exit statuses; `imagegpt --help` and the training commands' --help print this.
EXIT_STATUS = """exit status:
  0    done (a run stopped by --stop-after too: it stopped where it was asked to)
  1    a bug: a traceback is printed (please report it)
  2    refused or failed with a one-line message: a bad argument or input file, an output that cannot be
       written, a size that does not fit in memory or on disk
  130  stopped by Ctrl-C (SIGINT); a training run saved a checkpoint first: continue it with --resume
  143  stopped by SIGTERM; likewise"""

# How an output option is checked: a file (any name), an image file (its suffix picks the format), a folder.
OUTPUT_KINDS = ("file", "image", "folder")


def add_device_options(parser: argparse.ArgumentParser, *, training: bool = False, auto: str = "") -> None:
    """--device and --dtype; `training` words what dtype auto means (imagegpt.device), `auto` overrides it."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    auto = auto or (AUTO_TRAINING if training else AUTO_FORWARD)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help=f"autocast compute dtype; auto = {auto}",
    )


def add_output_argument(parser, *flags: str, kind: str = "file", **kwargs) -> argparse.Action:
    """parser.add_argument for an option naming an output; the CLI checks it (check_outputs) before the
    command's work starts. kind: one of OUTPUT_KINDS."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    action = parser.add_argument(*flags, **kwargs)
    outputs = parser.get_default("output_options") or ()
    parser.set_defaults(output_options=(*outputs, (action.dest, action.option_strings[0], kind)))
    return action


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, every output option of the command that could not be written."""
    from ..files import check_output
    from ..grid import image_format

    for dest, flag, kind in getattr(args, "output_options", ()):
        value = getattr(args, dest, None)
        if value is None:
            continue
        check_output(value, directory=kind == "folder", what=flag)
        if kind == "image":
            image_format(value, what=flag)
