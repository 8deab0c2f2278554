"""What the web app's page calls, without the page: the model it serves, uploads read within limits, the views
it shows, and generation that streams its tokens as they are decoded.

Nothing here imports gradio, so every function is tested without a browser; imagegpt.app.page wires them to
the page. Only the public library is used: sampling's load_for_sampling/complete/sample, the processor, the
palette and the grid helpers.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..checkpoint import latest_model_dir
from ..data import BUILTINS, GENERATED, load_dataset
from ..data.builtin import load_photos_sources
from ..errors import ArgumentError, CheckpointError, ImageInputError
from ..grid import OCCLUDED, make_grid, occlude, upscale_factor
from ..sampling import load_for_sampling

MAX_UPLOAD_BYTES = 20 * 1024**2
MAX_UPLOAD_PIXELS = 40_000_000  # about 7700 x 5200; more is refused before decoding (decompression bombs)
MAX_IMAGES = 8  # completions of one image, or samples, per request
VIEW_SIDE = 256  # the longer side of the "what the model sees" view, in screen pixels
DEMO_FOLDER = "imagegpt-demo"  # where `imagegpt demo` writes by default
EXAMPLES_PER_SOURCE = 6
MARK = np.array([230, 30, 30], np.uint8)  # the line under the kept rows


# ---- the model the app serves ----


@dataclass
class Served:
    """A model, its processor, what the Model tab shows and the examples; `lock` lets one generation run
    at a time on it, whoever asks."""

    model: object
    processor: object
    directory: str
    device: str = "auto"
    dtype: str = "auto"
    run: dict = field(default_factory=dict)  # the training run's args.json, where the model came from one
    bits_per_dim: tuple[float, str] | None = None  # (held-out bits/dim, which split and step)
    examples: list[tuple[str, np.ndarray]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def height(self) -> int:
        return self.processor.height

    @property
    def width(self) -> int:
        return self.processor.width


def default_model(folder: str | Path = ".") -> Path:
    """The model `imagegpt demo` wrote under folder/imagegpt-demo; ArgumentError saying what to run if
    none."""
    run = Path(folder) / DEMO_FOLDER / "run"
    try:
        if run.is_dir():
            return Path(latest_model_dir(run))
    except CheckpointError:
        pass
    raise ArgumentError(
        f"no model given and no demo model in {Path(folder).resolve() / DEMO_FOLDER}: run `imagegpt demo` "
        "here first, or pass --model DIR (a model or run directory)"
    )


def load_served(model=None, *, device: str = "auto", dtype: str = "auto", folder=".") -> Served:
    """The model at `model` (anything --model takes; None: the demo's in `folder`), ready to serve."""
    source = default_model(folder) if model is None else model
    directory = latest_model_dir(source)
    net, processor = load_for_sampling(directory)
    net.eval()
    run_dir = find_run(directory)
    run = _read_json(run_dir / "args.json") if run_dir else {}
    served = Served(net, processor, str(directory), device, dtype, run or {})
    served.bits_per_dim = recorded_bits_per_dim(run_dir) if run_dir else None
    served.examples = example_images(served)
    return served


def find_run(directory) -> Path | None:
    """The training run a model directory belongs to (its own folder or one of the two above it holding
    args.json and metrics.jsonl: run/model, run/checkpoints/NAME), or None."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        return None  # a Hub id
    for candidate in (path, *list(path.resolve().parents)[:2]):
        if (candidate / "args.json").is_file() and (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def recorded_bits_per_dim(run_dir: Path) -> tuple[float, str] | None:
    """The last held-out (validation) bits/dim of a run's metrics.jsonl, with its step; None if none."""
    last = None
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by an interrupted run
        if isinstance(record, dict) and record.get("split") == "val" and "bits_per_dim" in record:
            last = record
    if last is None:
        return None
    return float(last["bits_per_dim"]), f"validation split, step {last.get('step')}"


def example_images(served: Served) -> list[tuple[str, np.ndarray]]:
    """(caption, uint8 image) examples: held-out (test split) images of the model's built-in data set,
    when it was trained on one, then the photos bundled with scikit-image and scikit-learn."""
    examples = []
    data = served.run.get("data")
    if data in BUILTINS:
        options = dict(served.run.get("data_options") or {})
        if data in GENERATED and served.run.get("resolution"):
            options.setdefault("resolution", served.run["resolution"])
        test = load_dataset(data, split="test", seed=served.run.get("data_seed", 0), **options)
        count = min(EXAMPLES_PER_SOURCE, len(test))
        pick = np.linspace(0, len(test) - 1, count).astype(int)
        images = test.batch(0, len(test))[pick]
        examples += [(f"held-out {data} #{int(i)}", image) for i, image in zip(pick, images)]
    names, photos = load_photos_sources()
    for name, photo in list(zip(names, photos))[:EXAMPLES_PER_SOURCE]:
        thumbnail = Image.fromarray(photo)
        thumbnail.thumbnail((VIEW_SIDE, VIEW_SIDE))
        examples.append((f"photo: {name}", np.asarray(thumbnail)))
    return examples


def model_facts(served: Served) -> list[tuple[str, str]]:
    """(name, value) rows for the Model tab."""
    c = served.model.config
    parameters = sum(p.numel() for p in served.model.parameters())
    rows = [
        ("model", served.directory),
        ("size", f"{c.n_layer} layers, {c.n_head} heads, width {c.n_embd}"),
        ("parameters", f"{parameters:,} ({parameters / 1e6:.2f}M)"),
        ("resolution", f"{served.height}x{served.width} ({c.n_positions} tokens per image)"),
        ("palette", f"{len(served.processor.palette)} colours"),
    ]
    if served.run.get("data"):
        rows.append(("trained on", str(served.run["data"])))
    if served.bits_per_dim is not None:
        value, where = served.bits_per_dim
        rows.append(("held-out bits/dim", f"{value:.3f} ({where})"))
    else:
        rows.append(("held-out bits/dim", "not recorded with this model"))
    return rows


def palette_swatch(palette, columns: int = 16, cell: int = 24) -> np.ndarray:
    """The palette's colours as uint8 squares of `cell` pixels, `columns` to a row (white after the last)."""
    colours = palette.decode(np.arange(len(palette)))  # (K, 3)
    rows = -(-len(colours) // columns)
    swatch = np.full((rows * columns, 3), 255, np.uint8)
    swatch[: len(colours)] = colours
    swatch = swatch.reshape(rows, columns, 3)
    return np.repeat(np.repeat(swatch, cell, axis=0), cell, axis=1)


# ---- uploads ----


def read_upload(path, allowed_roots) -> Image.Image:
    """An uploaded file as a loaded PIL image (the first frame of an animation), within the size and pixel
    limits; ImageInputError with a message for the page otherwise.

    Only files under allowed_roots (the page's upload folder) are opened: a path typed or forged into a
    request is refused without being touched.
    """
    if not isinstance(path, str) or not path:
        raise ImageInputError("no image: upload one, paste one, or pick an example")
    file = Path(path).resolve()
    if not any(file.is_relative_to(Path(root).resolve()) for root in allowed_roots):
        raise ImageInputError("only images uploaded through the page are read")
    if not file.is_file():
        raise ImageInputError("the uploaded image is gone; upload it again")
    size = file.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise ImageInputError(
            f"the file is {size / 2**20:.1f} MB; images up to {MAX_UPLOAD_BYTES // 2**20} MB are accepted"
        )
    try:
        with Image.open(file) as image:
            pixels = image.width * image.height
            if pixels > MAX_UPLOAD_PIXELS:
                raise ImageInputError(
                    f"the image is {image.width}x{image.height} ({pixels / 1e6:.0f} megapixels); images up "
                    f"to {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels are accepted"
                )
            image.seek(0)
            image.load()
            return ImageOps.exif_transpose(image)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"the image has too many pixels to open safely ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        reason = " ".join(str(e).replace(repr(str(file)), "").replace(str(file), "").split())
        raise ImageInputError(
            f"this file is not an image that can be read ({reason}); upload a PNG, JPEG, GIF, BMP or WebP"
        ) from e


def model_input(served: Served, image) -> tuple[np.ndarray, np.ndarray]:
    """(the image resized to the model's size, the same quantised to the palette), uint8 [H, W, 3] each."""
    original = served.processor.to_rgb(image)[:1]
    quantised = served.processor.decode(served.processor.encode(original))
    return original[0], quantised[0]


def model_view(quantised: np.ndarray, keep: int) -> np.ndarray:
    """What the model sees, upscaled with nearest-neighbour to about VIEW_SIDE pixels: the kept rows as they
    are, the rows it will invent dimmed, and a red line between them."""
    height, width = quantised.shape[:2]
    factor = upscale_factor(height, width, VIEW_SIDE)
    view = np.repeat(np.repeat(quantised, factor, axis=0), factor, axis=1)
    cut = keep * factor
    view[cut:] = (view[cut:].astype(np.uint16) + 2 * OCCLUDED) // 3  # faded toward grey
    line = max(1, factor // 4)
    if 0 < keep < height:
        view[max(0, cut - line // 2) : cut - line // 2 + line] = MARK
    return view


# ---- grids of images that are still being decoded ----


def partial_images(served: Served, tokens: torch.Tensor) -> np.ndarray:
    """Token ids (R, n_positions) with -1 where not yet drawn -> uint8 images (R, H, W, 3), grey there."""
    ids = tokens.numpy()
    pixels = np.full((*ids.shape, 3), OCCLUDED, np.uint8)
    drawn = ids >= 0
    pixels[drawn] = served.processor.palette.decode(ids[drawn])
    return pixels.reshape(len(ids), served.height, served.width, 3)


def completion_figure(original, quantised, keep: int, completions) -> np.ndarray:
    """One row, as in the blog's figures: the original | the quantised input (the kept rows, the rest
    grey) | the completions."""
    given = occlude(quantised, keep)[0]
    return make_grid([[original, given, *completions]])


def samples_figure(images) -> np.ndarray:
    """Samples in one row of up to 4 images per row."""
    images = list(images)
    return make_grid([images[i : i + 4] for i in range(0, len(images), 4)])


# ---- generation that streams ----


class Stopped(Exception):
    """Raised inside generation when the page asks it to stop."""


def stream(
    served: Served,
    prefixes: torch.Tensor,
    run: Callable[..., torch.Tensor],
    stop: threading.Event,
    every: int,
) -> Iterator[tuple[torch.Tensor, float]]:
    """Run `run(callback=...)` (a call of sampling.complete or sampling.sample) in a thread and yield
    (tokens so far (R, n_positions), -1 where not drawn yet; the fraction done) each time `every` more tokens
    of each row are drawn, and at the end.

    Setting `stop` ends the work within a token; so does closing this generator. One generation runs at a
    time on a model (served.lock).
    """
    rows, n_positions = prefixes.size(0), served.model.config.n_positions
    tokens = torch.full((rows, n_positions), -1, dtype=torch.long)
    tokens[:, : prefixes.size(1)] = prefixes
    todo = rows * (n_positions - prefixes.size(1))
    updates: queue.Queue = queue.Queue()
    done = [0]

    def on_token(start: int, new: torch.Tensor) -> None:
        if stop.is_set():
            raise Stopped
        k = new.size(1)
        row_done, batch_done = k % every == 0, prefixes.size(1) + k == n_positions
        if (row_done or batch_done) and not (batch_done and start + len(new) == rows):  # the end: "done"
            tokens[start : start + len(new), prefixes.size(1) : prefixes.size(1) + k] = new.cpu()
            done[0] = sum(int((tokens[i] >= 0).sum()) for i in range(rows)) - prefixes.numel()
            updates.put(("tokens", tokens.clone(), done[0] / max(todo, 1)))

    def work() -> None:
        try:
            with served.lock:
                updates.put(("done", run(callback=on_token), 1.0))
        except BaseException as e:  # handed to the page's thread, which re-raises it
            updates.put(("error", e, 0.0))

    worker = threading.Thread(target=work, name="imagegpt-app-generation", daemon=True)
    worker.start()
    try:
        while True:
            kind, value, fraction = updates.get()  # every row: at most the image's height of them
            if kind == "error":
                raise value
            yield value, fraction
            if kind == "done":
                return
    finally:
        stop.set()
        worker.join()
