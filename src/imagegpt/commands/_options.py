"""Options that several subcommands share."""

from __future__ import annotations

import argparse


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast compute dtype; auto = bfloat16 where supported, else float32",
    )
