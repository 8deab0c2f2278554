"""Options that several subcommands share."""

from __future__ import annotations

import argparse

AUTO_TRAINING = "bfloat16 where the device has bfloat16 units (CUDA, AVX512-BF16/AMX CPUs), else float32"
AUTO_FORWARD = "float32 (exact, the same on every machine)"


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
