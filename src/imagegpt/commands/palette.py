"""`imagegpt palette fit`: k-means colour palette on pixels sampled from a dataset."""

from __future__ import annotations

from ..data import fit_palette, load_dataset
from ..errors import ArgumentError
from ..palette import check_clusters
from ._options import add_data_arguments, add_output_argument, data_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("palette", help="fit a colour palette (k-means on a dataset's pixels)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    fit = actions.add_parser(
        "fit",
        help="fit a palette on a dataset",
        description=(
            "k-means with K clusters on pixels drawn at random from the training split; writes a "
            "palette.json that imagegpt train --palette (and ImageProcessor) read."
        ),
    )
    add_data_arguments(fit)
    fit.add_argument(
        "--clusters", type=int, default=512, help="number of colours K (default 512, as the paper)"
    )
    add_output_argument(fit, "--out", required=True, help="the palette file to write, e.g. palette.json")
    fit.add_argument(
        "--pixels", type=int, default=100_000, help="pixels sampled for k-means (default 100000)"
    )
    fit.add_argument("--split", default="train", choices=["train", "val", "test", "all"])
    fit.set_defaults(func=run_fit)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_fit(args) -> int:
    check_clusters(args.clusters)
    if args.pixels < args.clusters:
        raise ArgumentError(f"--pixels ({args.pixels}) must be at least --clusters ({args.clusters})")
    dataset = load_dataset(args.data, split=args.split, seed=args.seed, **data_options(args))
    palette = fit_palette(dataset, args.clusters, args.pixels, seed=args.seed)
    palette.save(args.out)
    print(f"fitted {len(palette)} colours on {args.pixels} pixels of {dataset.name}; wrote {args.out}")
    return 0
