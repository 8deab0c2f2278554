"""`imagegpt complete`: complete the bottom of images from their top rows, written as a PNG grid."""

from __future__ import annotations

import time

from ..errors import ArgumentError
from ..grid import completion_grid, save_image
from ..sampling import complete, keep_rows, load_for_sampling
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
        "complete",
        help="complete images from their top rows",
        description=(
            "Keep the top rows of each image and sample the rest, N times: the paper's completion figure. "
            "Each row of the PNG grid is the occluded input (the kept rows, the rest grey), "
            "the N completions, "
            "then the original (as the model sees it: resized and quantised to the palette)."
        ),
    )
    add_model_argument(parser)
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...), resized to the model's size")
    parser.add_argument(
        "--keep",
        default="0.5",
        help="how much to keep: a fraction of the height with a decimal point (0.5 = the top half, "
        "1.0 = all) "
        "or a whole number of rows (16); default 0.5",
    )
    parser.add_argument(
        "-n", "--num", dest="n", type=int, default=4, help="completions per image (default 4)"
    )
    add_output_argument(
        parser,
        "--out",
        kind="image",
        default="completions.png",
        help="the image grid to write: PNG, or the format its suffix names (default completions.png)",
    )
    add_sampling_options(parser)
    add_device_options(parser, auto=AUTO_SAMPLING)
    parser.set_defaults(func=run)


def parse_keep(text: str) -> int | float:
    """'16' -> 16 rows; '0.5' or '1e-1' -> a fraction of the height."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ArgumentError(
            f"--keep {text!r} is neither a number of rows (16) nor a fraction of the height (0.5)"
        ) from None


def run(args) -> int:
    keep = parse_keep(args.keep)
    model, processor = load_for_sampling(args.model)
    rows = keep_rows(keep, processor.height)
    originals = processor.encode(args.images)
    seed = choose_seed(args)
    start = time.perf_counter()
    ids = complete(
        model,
        originals,
        keep,
        n=args.n,
        processor=processor,
        **sampling_kwargs(args, seed),
        progress=False if args.no_progress else "completing",
    )
    seconds = time.perf_counter() - start
    images, original_images = processor.decode(ids), processor.decode(originals)
    out = save_image(completion_grid(original_images, images, rows), args.out)
    npz = None
    if args.save_npz:
        npz = save_npz(
            args.save_npz,
            args,
            seed,
            tokens=ids.numpy(),
            images=images,
            original_tokens=originals.numpy(),
            originals=original_images,
            keep_rows=rows,
        )
    generated = len(ids) * (processor.height - rows) * processor.width
    report("completions", out, len(ids), generated, seconds, seed, npz)
    return 0
