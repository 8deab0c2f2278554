"""`imagegpt eval`: bits per dimension of a model on a dataset split, beside uniform and unigram baselines."""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluate import evaluate
from ..files import write_text_atomic
from ._options import add_data_arguments, add_device_options, add_output_argument, data_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="bits per dimension of a model on a dataset",
        description=(
            "Negative log-likelihood of every token of each image, predicted from [SOS, x0, ..., x_{n-2}] as "
            "in training: nats per token, bits per token, and the paper's bits per dimension (bits per token "
            "/ 3 channels; with a palette this is not the 8-bit bits/dim of PixelCNN-style models). "
            "Also reports a palette-unigram baseline (entropy of the colour frequencies of the train split) "
            "and the uniform baseline (log2 K / 3). A BERT model (train --objective bert) is scored on the "
            "masked tokens of fixed, seeded masks instead (--masks per image), each predicted from all "
            "unmasked tokens: its numbers are not comparable to a next-pixel model's."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="a model directory, or an imagegpt train run directory"
    )
    add_data_arguments(parser)
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument(
        "--masks",
        type=int,
        default=1,
        help="BERT models: fixed evaluation masks per image (default 1, the masks training validates on)",
    )
    add_output_argument(
        parser, "--cache-dir", kind="folder", default=None, help="cache the dataset's token ids here"
    )
    parser.add_argument(
        "--no-unigram", action="store_true", help="skip the unigram baseline (reads the train split)"
    )
    add_output_argument(parser, "--json", metavar="PATH", help="also write the numbers as JSON")
    add_device_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    result = evaluate(
        args.model,
        args.data,
        args.split,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        cache_dir=args.cache_dir,
        unigram=not args.no_unigram,
        progress=True,
        data_options=data_options(args),
        masks=args.masks,
    )
    print(result.summary())
    if args.json:
        write_text_atomic(Path(args.json).expanduser(), json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
