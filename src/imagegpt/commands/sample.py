"""`imagegpt sample`: unconditional samples from a model, written as a PNG grid (and optionally an .npz)."""

from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path

from ._options import add_device_options, add_output_argument


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
    add_device_options(parser)
    parser.set_defaults(func=run)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a model directory (config.json, model.safetensors, preprocessor_config.json), an imagegpt "
        "train "
        "run directory, or a Hugging Face Hub id such as openai/imagegpt-small (needs huggingface_hub)",
    )


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `sample` and `complete`."""
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)"
    )
    parser.add_argument(
        "--top-k", type=int, default=40, help="keep the k most likely colours; 0 = off (default 40)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off (default 1)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images generated at once (default: as many as fit 2 GiB of KV cache)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (CUDA graphs on CUDA; on a CPU where imagegpt's native kernels "
        "run, compiled steps cannot use them and are about 2x slower than the default)",
    )
    parser.add_argument(
        "--cache-dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "int8"],
        help="KV cache storage (default: the compute dtype's; float32 sampling is exact). bfloat16 or "
        "float16 halve its memory and, on x86 CPUs with AVX2, make long images faster to sample; int8 "
        "(scaled per row) quarters it, faster still there and coarser",
    )
    parser.add_argument(
        "--weight-dtype",
        default=None,
        choices=["float32", "int8"],
        help="the decode steps' weights (default float32, exact). int8 (per output column, inputs per row) "
        "is faster on x86 CPUs with AVX2, where it runs (CPU, float32, no --compile, batches <= 64), and "
        "coarser",
    )
    add_output_argument(
        parser, "--save-npz", metavar="PATH", help="also save the tokens and decoded images as a .npz file"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sampling_kwargs(args, seed: int) -> dict:
    return {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": seed,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
        "cache_dtype": args.cache_dtype,
        "weight_dtype": args.weight_dtype,
    }


def choose_seed(args) -> int:
    return args.seed if args.seed is not None else secrets.randbelow(2**31)


def save_npz(path, args, seed: int, **arrays) -> Path:
    """Arrays plus the run's arguments (as JSON) in one compressed .npz."""
    import numpy as np

    from ..files import atomic_open, check_output

    path = check_output(path, what="--save-npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "output_options")}
    settings["seed"] = seed
    with atomic_open(path, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez_compressed(f, args=np.array(json.dumps(settings)), **arrays)
    return path


def report(
    what: str, out: Path, count: int, tokens: int, seconds: float, seed: int, npz: Path | None
) -> None:
    extra = f" and {npz}" if npz is not None else ""
    print(
        f"wrote {out}{extra}: {count} {what}, {tokens} tokens in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):.0f} tokens/s), seed {seed}"
    )


def run(args) -> int:
    from ..grid import sample_grid, save_image
    from ..sampling import load_for_sampling, sample

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
