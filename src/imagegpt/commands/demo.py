"""`imagegpt demo`: palette, pretraining, bits/dim, completions, samples and probes on built-in data."""

from __future__ import annotations

from dataclasses import fields

from ..demo import MAX_STEPS, MIN_STEPS, DemoOptions, format_summary, run_demo
from ._options import AUTO_TRAINING, add_device_options, add_output_argument


def register(subparsers) -> None:
    defaults = {f.name: f.default for f in fields(DemoOptions)}
    parser = subparsers.add_parser(
        "demo",
        help="the whole pipeline on built-in data in a few minutes (the main job)",
        description=(
            "Fits a colour palette, pretrains a small ImageGPT, reports bits/dim on held-out images "
            "against the unigram and uniform baselines, completes held-out images from their top half, "
            "samples new ones, and probes every layer. Everything goes under --out; an interrupted demo "
            "resumes its training (stopped by Ctrl-C or SIGTERM, it exits 130 or 143: see imagegpt --help)."
        ),
    )
    add_output_argument(
        parser, "--out", kind="folder", default=defaults["out"], help=f"output folder ({defaults['out']})"
    )
    parser.add_argument("--data", default=defaults["data"], help="built-in dataset: shapes, digits or photos")
    parser.add_argument(
        "--colour", default=defaults["colour"], choices=["mono", "random"], help="shapes' colours (mono)"
    )
    for name in ("resolution", "images", "clusters", "batch_size", "seed", "samples", "completions"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=defaults[name], help=f"(default {defaults[name]})")
    parser.add_argument(
        "--steps", type=int, default=None,
        help=f"pretraining steps (default: as many as fit --train-seconds here, {MIN_STEPS} to {MAX_STEPS})",
    )  # fmt: skip
    parser.add_argument(
        "--train-seconds", type=float, default=defaults["train_seconds"],
        help=f"the pretraining budget that sets the steps (default {defaults['train_seconds']:g})",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: 2 where two CPUs are idle, else 1)",
    )  # fmt: skip
    parser.add_argument("--preset", default=defaults["preset"], help=f"(default {defaults['preset']})")
    parser.add_argument("--lr", type=float, default=defaults["lr"], help=f"(default {defaults['lr']})")
    parser.add_argument("--keep", type=float, default=defaults["keep"], help="rows kept when completing")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probes")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished demo in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    auto = f"training in {AUTO_TRAINING}; evaluation and probes in float32; sampling as imagegpt sample"
    add_device_options(parser, auto=auto)
    parser.set_defaults(func=run)


def run(args) -> int:
    options = DemoOptions(
        out=args.out,
        data=args.data,
        colour=args.colour,
        resolution=args.resolution,
        images=args.images,
        clusters=args.clusters,
        preset=args.preset,
        steps=args.steps,
        train_seconds=args.train_seconds,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        keep=args.keep,
        completions=args.completions,
        samples=args.samples,
        probe=not args.no_probe,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(format_summary(run_demo(options)))
    return 0
