"""`imagegpt train`: pretrain an ImageGPT on a dataset (the paper's recipe); resumable; torchrun for DDP."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from ..errors import ArgumentError
from ..train import TrainOptions, resume_options, train
from ._options import EXIT_STATUS, add_device_options, add_output_argument, parse_data_options

EXAMPLE = """examples:
  imagegpt train --data shapes --preset igpt-nano --resolution 16 --clusters 16 --out runs/shapes --steps 500
  imagegpt train --data cifar-10-python.tar.gz --preset igpt-mini --resolution 32 --palette palette.json \\
      --out runs/cifar --steps 20000 --batch-size 64 --accumulate 2
  imagegpt train --resume runs/shapes                   # continue after Ctrl-C, a crash or --stop-after
  imagegpt train --data shapes --objective bert --out runs/bert   # the paper's masked-pixel objective
  torchrun --standalone --nproc_per_node=4 -m imagegpt train --data ... --out runs/ddp   # DDP, 4 processes
"""

# TrainOptions fields given as options. Their parser defaults are None, so that --resume sees what was given.
TRAIN_ARGUMENTS = (
    "data",
    "out",
    "preset",
    "resolution",
    "clusters",
    "palette",
    "palette_pixels",
    "steps",
    "batch_size",
    "accumulate",
    "lr",
    "warmup",
    "weight_decay",
    "clip",
    "dropout",
    "eval_every",
    "eval_images",
    "save_every",
    "seed",
    "data_seed",
    "cache_dir",
    "stop_after",
    "keep_checkpoints",
    "objective",
    "mask_prob",
)


def register(subparsers) -> None:
    defaults = {f.name: f.default for f in fields(TrainOptions)}
    parser = subparsers.add_parser(
        "train",
        help="pretrain an ImageGPT on a dataset",
        description=(
            "Fit a palette (unless --palette is given), tokenise the dataset once (cached), and train the "
            "next-pixel objective (or, with --objective bert, the paper's masked-pixel one) with AdamW "
            "(0.9, 0.95), linear warmup then cosine decay to 0, gradient clipping at 1.0 and bfloat16 "
            "autocast where supported. RUN_DIR gets args.json, metrics.jsonl, loss.png, checkpoints/latest "
            "(a transformers model directory plus the training state) and, when the run finishes, model/. "
            "Ctrl-C or SIGTERM saves a checkpoint; --resume RUN_DIR continues exactly. Under torchrun the "
            "same command runs DistributedDataParallel."
        ),
        epilog=EXAMPLE + "\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_options(parser.add_argument_group("data and palette"), defaults)
    _add_model_options(parser.add_argument_group("model and optimisation"), defaults)
    _add_run_options(parser.add_argument_group("run"), defaults)
    add_device_options(parser, training=True)
    parser.set_defaults(func=run_train, device=None, dtype=None)


def _add_data_options(data, defaults: dict) -> None:
    data.add_argument(
        "--data", help=f"a built-in dataset (digits, shapes, photos) or a path (default {defaults['data']})"
    )
    data.add_argument("--resolution", type=int, help="image side in pixels (default: the dataset's own size)")
    data.add_argument("--clusters", type=int, help=f"palette size to fit (default {defaults['clusters']})")
    data.add_argument("--palette", help="a palette.json (imagegpt palette fit) instead of fitting one")
    data.add_argument(
        "--palette-pixels",
        type=int,
        help=f"pixels sampled to fit the palette (default {defaults['palette_pixels']})",
    )
    data.add_argument(
        "--data-seed", type=int, help="seed of the dataset's splits and generated data (default 0)"
    )
    data.add_argument("--limit", type=int, help="use at most N images of each split")
    data.add_argument(
        "--data-option",
        action="append",
        metavar="KEY=VALUE",
        help="a dataset option, e.g. n=2000 (repeatable)",
    )
    add_output_argument(data, "--cache-dir", kind="folder", help="token cache (default: RUN_DIR/cache)")


def _add_model_options(model, defaults: dict) -> None:
    model.add_argument("--preset", help=f"model size: igpt-nano ... igpt-xl (default {defaults['preset']})")
    model.add_argument("--steps", type=int, help=f"optimizer steps (default {defaults['steps']})")
    model.add_argument(
        "--batch-size",
        type=int,
        help=f"images per optimizer step, over all processes (default {defaults['batch_size']})",
    )
    model.add_argument(
        "--accumulate", type=int, help="micro-batches per step (gradient accumulation; default 1)"
    )
    model.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults['lr']})")
    model.add_argument("--warmup", type=int, help=f"linear warmup steps (default {defaults['warmup']})")
    model.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0)")
    model.add_argument("--clip", type=float, help="gradient norm clipping (default 1.0; 0 turns it off)")
    model.add_argument("--dropout", type=float, help="dropout rate (default 0, as the paper)")
    model.add_argument(
        "--objective",
        choices=["ar", "bert"],
        help="ar: predict each pixel from the ones before (default); bert: masked pixels from the rest",
    )
    model.add_argument(
        "--mask-prob",
        type=float,
        help=f"with --objective bert: probability of masking each pixel (default {defaults['mask_prob']})",
    )
    model.add_argument("--seed", type=int, help="seed of the initialisation and BERT masks (default 0)")
    model.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2), not DDP",
    )
    model.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute activations (less memory)",
    )


def _add_run_options(run, defaults: dict) -> None:
    add_output_argument(run, "--out", kind="folder", help="the run directory RUN_DIR")
    add_output_argument(
        run,
        "--resume",
        kind="folder",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (its saved arguments)",
    )
    run.add_argument(
        "--eval-every",
        type=int,
        help=f"steps between validations (default {defaults['eval_every']}; 0: at the end)",
    )
    run.add_argument(
        "--eval-images",
        type=int,
        help=f"validation images per periodic evaluation (default {defaults['eval_images']})",
    )
    run.add_argument(
        "--save-every",
        type=int,
        help=f"steps between checkpoints (default {defaults['save_every']}; 0: at the end)",
    )
    run.add_argument(
        "--keep-checkpoints",
        type=int,
        metavar="N",
        help="also keep the model at N log-spaced steps (checkpoints/step-NNNNNNN), for `imagegpt study`",
    )
    run.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after N steps of this session")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args):
    """(TrainOptions, resume) from parsed arguments; with --resume, the run's saved arguments + overrides."""
    given = {name: getattr(args, name) for name in TRAIN_ARGUMENTS if getattr(args, name) is not None}
    for flag in ("gradient_checkpointing", "fsdp"):
        if getattr(args, flag):
            given[flag] = True
    data_options = parse_data_options(args.data_option)
    if args.limit is not None:
        data_options["limit"] = args.limit
    if data_options:
        given["data_options"] = data_options
    for name in ("device", "dtype"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    progress = not args.no_progress
    if args.resume:
        if args.out is not None and args.out != args.resume:
            raise ArgumentError("give --resume RUN_DIR alone (it is the output directory), not with --out")
        given.pop("out", None)
        return resume_options(args.resume, progress=progress, **given), True
    if args.out is None:
        raise ArgumentError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
    if args.palette is not None and args.clusters is not None:
        raise ArgumentError(
            "give --palette or --clusters, not both (the palette fixes the number of colours)"
        )
    return TrainOptions(**given, progress=progress), False


def run_train(args) -> int:
    options, resume = options_from_args(args)
    result = train(options, resume=resume)
    status = 0 if result.signal is None else 128 + result.signal  # as shells report it: 130, 143
    if os.environ.get("RANK", "0") != "0":
        return status
    if result.stopped:
        print(
            f"stopped at step {result.step} of {options.steps} with a checkpoint; continue with "
            f"`imagegpt train --resume {result.run_dir}`"
        )
    elif result.val_bits_per_dim is not None:
        what = (
            "bits/dim"
            if result.objective == "ar"
            else "bits/dim of masked tokens (BERT; not comparable to ar)"
        )
        print(
            f"step {result.step}: validation {result.val_loss:.4f} nats/token = "
            f"{result.val_bits_per_dim:.4f} {what}; model in {result.model_dir}"
        )
    return status
