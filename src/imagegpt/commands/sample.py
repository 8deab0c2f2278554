"""`imagegpt sample`: unconditional samples from a model, written as a PNG grid (and optionally an .npz)."""

from __future__ import annotations

import time

from ..grid import sample_grid, save_image
from ..sampling import load_for_sampling, sample
from ._options import (
    AUTO_SAMPLING,
    add_device_options,
    add_model_argument,
    add_output_argument,
    add_sampling_options,
    choose_seed,
    report,
    sampling_kwargs,
    save_npz,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="sample images from a model",
        description=(
            "Generate images from [SOS] with the KV-cached sampler and write them as a PNG grid, each image "
            "upscaled with nearest-neighbour. The same --seed and settings give the same images on the same "
            "machine."
        ),
    )
    add_model_argument(parser)
    parser.add_argument("-n", "--num", dest="n", type=int, default=16, help="images to sample (default 16)")
    add_output_argument(
        parser,
        "--out",
        kind="image",
        default="samples.png",
        help="the image grid to write: PNG, or the format its suffix names (default samples.png)",
    )
    add_sampling_options(parser)
    add_device_options(parser, auto=AUTO_SAMPLING)
    parser.set_defaults(func=run)


def run(args) -> int:
    model, processor = load_for_sampling(args.model)
    seed = choose_seed(args)
    start = time.perf_counter()
    ids = sample(
        model, args.n, **sampling_kwargs(args, seed), progress=False if args.no_progress else "sampling"
    )
    seconds = time.perf_counter() - start
    images = processor.decode(ids)
    out = save_image(sample_grid(images), args.out)
    npz = None
    if args.save_npz:
        npz = save_npz(args.save_npz, args, seed, tokens=ids.numpy(), images=images)
    report("samples", out, len(ids), ids.numel(), seconds, seed, npz)
    return 0
