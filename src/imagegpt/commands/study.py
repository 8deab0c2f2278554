"""`imagegpt study`: held-out bits/dim against linear-probe accuracy over a run's checkpoints."""

from __future__ import annotations

from dataclasses import fields

from ..study import StudyOptions, format_study, run_study
from ._options import add_device_options, add_output_argument, parse_data_options, parse_grid


def register(subparsers) -> None:
    defaults = {f.name: f.default for f in fields(StudyOptions)}
    defaults.update(presets=StudyOptions().presets)
    parser = subparsers.add_parser(
        "study",
        help="better generative models make better features: bits/dim against probe accuracy",
        description=(
            "Trains one run per --preset keeping log-spaced checkpoints (or takes --run directories that "
            "kept them: `imagegpt train --keep-checkpoints N`), then evaluates held-out bits/dim and "
            "probes every layer of every checkpoint. Writes study.json, accuracy_vs_bits.png and a "
            "per-layer plot per run under --out. Run it again to resume: finished checkpoints are cached."
        ),
    )
    add_output_argument(
        parser, "--out", kind="folder", default=defaults["out"], help=f"output folder ({defaults['out']})"
    )
    parser.add_argument("--run", action="append", default=[], help="a run directory to study (repeatable)")
    parser.add_argument(
        "--preset",
        action="append",
        help=f"a preset to train (repeatable; default {','.join(defaults['presets'])})",
    )
    parser.add_argument("--data", default=defaults["data"], help=f"(default {defaults['data']})")
    parser.add_argument(
        "--data-option", action="append", metavar="KEY=VALUE",
        help="dataset option for training (default colour=mono for shapes)",
    )  # fmt: skip
    for name in ("resolution", "clusters", "steps", "checkpoints", "batch_size", "seed", "labels_per_class"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=defaults[name], help=f"(default {defaults[name]})")
    parser.add_argument("--lr", type=float, default=defaults["lr"], help=f"(default {defaults['lr']})")
    grid = ",".join(f"{c:g}" for c in defaults["Cs"])
    parser.add_argument("--C-grid", default=grid, help=f"probe C grid, extended where an end wins ({grid})")
    parser.add_argument("--quiet", action="store_true", help="no progress output, only the table")
    add_device_options(parser, auto="bfloat16 training where the device has bfloat16 units; probes float32")
    parser.set_defaults(func=run)


def run(args) -> int:
    defaults = StudyOptions()
    data_options = parse_data_options(args.data_option) if args.data_option else None  # the data's default
    options = StudyOptions(
        out=args.out, runs=args.run, presets=args.preset or ([] if args.run else defaults.presets),
        data=args.data, data_options=data_options, resolution=args.resolution, clusters=args.clusters,
        steps=args.steps, checkpoints=args.checkpoints, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, Cs=tuple(parse_grid(args.C_grid)), labels_per_class=args.labels_per_class,
        device=args.device, dtype=args.dtype, progress=not args.quiet,
    )  # fmt: skip
    print(format_study(run_study(options)))
    return 0
