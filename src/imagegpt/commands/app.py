"""`imagegpt app`: a local web app to complete and sample images in the browser."""

from __future__ import annotations

import torch

from ..app.core import load_served
from ..errors import ArgumentError
from ._options import AUTO_SAMPLING, add_device_options

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "app",
        help="a web app to complete and sample images in the browser",
        description=(
            "Serve a page (gradio) where you give the model the top of a picture and watch it invent the "
            "rest, sample new pictures, and see the model's size and palette. Needs the app extra: "
            "pip install 'imagegpt[app]'."
        ),
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a model directory, an imagegpt train run directory, or a Hub id (online); default: the model "
        "`imagegpt demo` wrote in this folder",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for generation (default: 1 for models under 10M parameters, such as the demo's, "
        "whose steps are too small to share; PyTorch's default otherwise)",
    )
    add_device_options(parser, auto=AUTO_SAMPLING)
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        from ..app import page  # gradio: an optional extra, imported only to serve
    except ImportError as e:
        if "gradio" not in str(e):
            raise
        raise ArgumentError("the app needs gradio: pip install 'imagegpt[app]'") from e
    if not 0 < args.port < 65536:
        raise ArgumentError(f"--port must be in 1..65535, got {args.port}")
    served = load_served(args.model, device=args.device, dtype=args.dtype)
    threads = generation_threads(served.model, args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        blocks = page.build(served)
        url = page.launch(blocks, args.host, args.port)
    except OSError as e:
        raise ArgumentError(f"cannot listen on {args.host}:{args.port} ({e}); choose another --port") from e
    print(f"imagegpt app: serving {served.directory} on {url} (Ctrl-C to stop)", flush=True)
    if args.host not in LOOPBACK:
        print(
            f"imagegpt app: warning: listening on {args.host}, not loopback: anyone who can reach this "
            f"machine on port {args.port} can use the app",
            flush=True,
        )
    blocks.block_thread()  # until Ctrl-C
    return 0


SMALL_MODEL = 10_000_000  # parameters: below this a decode step is too small to split between threads


def generation_threads(model, threads: int | None) -> int | None:
    """The threads to set for generation: `threads` when given, 1 for a small model, else None (keep
    PyTorch's)."""
    if threads is not None:
        if threads < 1:
            raise ArgumentError(f"--threads must be at least 1, got {threads}")
        return threads
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL else None
