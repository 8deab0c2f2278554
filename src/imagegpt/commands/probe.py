"""`imagegpt probe`: per-layer linear probes on a pretrained model's features, beside a raw-pixel baseline."""

from __future__ import annotations

import argparse

from ..probe import format_report, probe_pretrained
from ._options import add_data_arguments, add_device_options, add_output_argument, data_options, parse_grid

EXAMPLE = """examples:
  imagegpt probe --model runs/digits/model --data digits --layers all --out probe-digits
  imagegpt probe --model runs/shapes/model --data shapes --layers middle --labels-per-class 4 --out p4
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear probes on each layer's features (the paper's protocol)",
        description=(
            "Average-pooled, layer-normed features of [SOS, x0, ..., x_{n-2}] at each chosen layer, an "
            "L-BFGS logistic regression on the standardised features with C chosen on the validation split, "
            "and test accuracy for that choice; logistic regressions on the raw and on the palette-quantised "
            "pixels of the same splits as baselines. A BERT model (train --objective bert) reads each image "
            "under a fixed mask, as the paper evaluates it, and the test accuracy of the modal prediction "
            "over --ensemble-masks masks per image is reported beside. "
            "Writes probe.json and probe.png under --out."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="a pretrained model directory (imagegpt train's model/)"
    )
    add_data_arguments(parser)
    add_output_argument(
        parser,
        "--out",
        kind="folder",
        required=True,
        help="folder for probe.json, probe.png and the feature cache",
    )
    parser.add_argument(
        "--layers", default="all", help="all (0..n_layer), middle (n_layer // 2), or numbers like 0,3,5"
    )
    parser.add_argument("--concat", action="store_true", help="also probe the chosen layers concatenated")
    parser.add_argument(
        "--labels-per-class",
        type=int,
        default=None,
        metavar="K",
        help="low-data mode: K training labels per class",
    )
    parser.add_argument(
        "--seeds", type=int, default=5, help="low-data mode: draws of the K labels (mean ± std)"
    )
    parser.add_argument(
        "--C-grid",
        default="0.001,0.01,0.1,1,10",
        help="regularisation strengths tried on the validation split",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the pixel baselines")
    parser.add_argument(
        "--ensemble-masks",
        type=int,
        default=5,
        metavar="N",
        help="BERT models: also vote over N masks per test image (default 5, the paper's; 1: no vote)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_output_argument(
        parser, "--cache-dir", kind="folder", default=None, help="token and feature cache (OUT/cache)"
    )
    add_device_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    report, paths = probe_pretrained(
        args.model,
        args.data,
        args.out,
        layers=args.layers,
        concat=args.concat,
        labels_per_class=args.labels_per_class,
        seeds=args.seeds,
        Cs=parse_grid(args.C_grid),
        baseline=not args.no_baseline,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        seed=args.seed,
        data_options=data_options(args),
        progress=True,
        ensemble_masks=args.ensemble_masks,
    )
    print(format_report(report))
    print(f"wrote {paths['json']} and {paths['plot']}")
    return 0
