"""What several subcommands share: their common options (device, data, sampling), the outputs every command
checks before its work starts, and the small helpers that read those options back."""

from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path

import numpy as np

from ..errors import ArgumentError
from ..files import atomic_open, check_output
from ..grid import image_format
from ..sampling import SamplingOptions

AUTO_TRAINING = "bfloat16 where the device has bfloat16 units (CUDA, AVX512-BF16/AMX CPUs), else float32"
AUTO_FORWARD = "float32 (exact, the same on every machine)"
AUTO_SAMPLING = (
    "float32 arithmetic; where imagegpt's native CPU engine decodes (x86-64 with AVX2, batches <= 64) on "
    "bfloat16 weights and KV cache, half the bytes; float32 = all float32, exact"
)

# Every command's exit statuses; `imagegpt --help` and the training commands' --help print this.
EXIT_STATUS = """exit status:
  0    done (a run stopped by --stop-after too: it stopped where it was asked to)
  1    a bug: a traceback is printed (please report it)
  2    refused or failed with a one-line message: a bad argument or input file, an output that cannot be
       written, a size that does not fit in memory or on disk
  130  stopped by Ctrl-C (SIGINT); a training run saved a checkpoint first: continue it with --resume
  143  stopped by SIGTERM; likewise"""

# How an output option is checked: a file (any name), an image file (its suffix picks the format), a folder.
OUTPUT_KINDS = ("file", "image", "folder")


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


def add_output_argument(parser, *flags: str, kind: str = "file", **kwargs) -> argparse.Action:
    """parser.add_argument for an option naming an output; the CLI checks it (check_outputs) before the
    command's work starts. kind: one of OUTPUT_KINDS."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    action = parser.add_argument(*flags, **kwargs)
    outputs = parser.get_default("output_options") or ()
    parser.set_defaults(output_options=(*outputs, (action.dest, action.option_strings[0], kind)))
    return action


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, every output option of the command that could not be written."""
    for dest, flag, kind in getattr(args, "output_options", ()):
        value = getattr(args, dest, None)
        if value is None:
            continue
        check_output(value, directory=kind == "folder", what=flag)
        if kind == "image":
            image_format(value, what=flag)


# Data: which dataset and how it is split


def parse_data_options(pairs: list[str] | None) -> dict:
    """['n=2000', 'resolution=16'] -> {'n': 2000, 'resolution': 16}: integers and floats are converted."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ArgumentError(f"--data-option takes KEY=VALUE, got {pair!r} (for example n=2000)")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[key.strip()] = value
    return options


def parse_grid(text: str) -> list[float]:
    """'0.01,0.1,1' -> [0.01, 0.1, 1.0]: the probes' C grid, every value positive."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ArgumentError(f"--C-grid takes comma-separated numbers like 0.01,0.1,1, got {text!r}") from e
    if not values or any(v <= 0 for v in values):
        raise ArgumentError(f"--C-grid needs positive regularisation strengths, got {text!r}")
    return values


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--data, --seed, --limit and --data-option: which dataset, split how; data_options(args) reads them."""
    parser.add_argument(
        "--data", required=required, help="a built-in dataset (digits, shapes, photos) or a path"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the dataset's splits (and generated data)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use at most N images of each split")
    parser.add_argument(
        "--data-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the dataset, e.g. n=2000 or resolution=16 for shapes (repeatable)",
    )


def data_options(args) -> dict:
    """load_dataset's options from add_data_arguments' arguments."""
    options = parse_data_options(args.data_option)
    if args.limit is not None:
        options["limit"] = args.limit
    return options


# Sampling: the options of `sample` and `complete`, and what they write


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
        help="KV cache storage (default: the compute dtype's, bfloat16 on the native CPU engine; --dtype "
        "float32 is exact). bfloat16 or "
        "float16 halve its memory and, on x86 CPUs with AVX2, make long images faster to sample; int8 "
        "(scaled per row) quarters it, faster still there and coarser",
    )
    parser.add_argument(
        "--weight-dtype",
        default=None,
        choices=["float32", "bfloat16", "int8"],
        help="the decode steps' weights (default float32, bfloat16 on the native CPU engine; --dtype float32 "
        "is exact). bfloat16 (rounded, float32 arithmetic) and "
        "int8 (per output column, inputs per row) are faster on x86 CPUs with AVX2, where they run (CPU, "
        "float32, no --compile, batches <= 64), and coarser",
    )
    add_output_argument(
        parser, "--save-npz", metavar="PATH", help="also save the tokens and decoded images as a .npz file"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sampling_kwargs(args, seed: int) -> dict:
    """sample()'s and complete()'s keywords from add_sampling_options' arguments: the SamplingOptions (checked
    here, before any model is loaded) and the device."""
    options = SamplingOptions(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
        batch_size=args.batch_size, dtype=args.dtype, compile=args.compile, cache_dtype=args.cache_dtype,
        weight_dtype=args.weight_dtype,
    )  # fmt: skip
    return {"options": options, "device": args.device}


def choose_seed(args) -> int:
    """--seed, or a fresh one (which the command prints, so that the images can be made again)."""
    return args.seed if args.seed is not None else secrets.randbelow(2**31)


def save_npz(path, args, seed: int, **arrays) -> Path:
    """Arrays plus the run's arguments (as JSON) in one compressed .npz."""
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
    """The line a sampling command ends with: what it wrote, how fast, and the seed."""
    extra = f" and {npz}" if npz is not None else ""
    print(
        f"wrote {out}{extra}: {count} {what}, {tokens} tokens in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):.0f} tokens/s), seed {seed}"
    )
