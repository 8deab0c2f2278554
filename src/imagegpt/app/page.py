"""The web page: Complete, Sample and Model tabs, built with gradio over imagegpt.app.core.

Each handler is a plain function of the page's values; the generation handlers are generators that yield the
growing grid once per decoded row. One generation runs at a time per model (a queue shared by both tabs, of
QUEUE_SIZE waiting requests at most); a user's mistake becomes a message in the page, never a traceback.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry and no version check: the app stays local

import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..errors import ArgumentError, ImageGPTError  # noqa: E402
from ..grid import save_image  # noqa: E402
from ..sampling import complete, keep_rows, sample  # noqa: E402
from . import core  # noqa: E402

QUEUE_SIZE = 16  # requests waiting for the model; one more gets "the queue is full"
LOCAL_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # the default theme would fetch web fonts


# How long Stop waits for a running generation to show how far it got before gradio cancels the event (which
# also drops a generation still queued behind another visitor's).
STOP_GRACE_SECONDS = 5.0


class StopFlag(threading.Event):
    """A generation's stop flag, and `ended`: set once the generation has shown its last status."""

    def __init__(self):
        super().__init__()
        self.ended = threading.Event()


class Stops:
    """A stop flag per (browser session, tab): the Stop button sets the one its tab's generation reads."""

    def __init__(self):
        self._flags: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()

    def new(self, session: str, tab: str) -> StopFlag:
        with self._lock:
            flag = self._flags[session, tab] = StopFlag()
        return flag

    def stop(self, session: str, tab: str) -> None:
        """Set the flag, then wait (at most STOP_GRACE_SECONDS) until its generation has said so in the page:
        the Stop event cancels the generation's event when this returns, and a cancelled generation can no
        longer update its status."""
        with self._lock:
            flag = self._flags.pop((session, tab), None)
        if flag is not None:
            flag.set()
            flag.ended.wait(STOP_GRACE_SECONDS)


class Handlers:
    """What the page's events call, bound to one served model."""

    def __init__(self, served: core.Served, out_dir: str | None = None, uploads: list[str] | None = None):
        """out_dir: where finished grids are written for download; uploads: the folders files are read
        from (default: gradio's upload folder, where the page's uploads and chosen examples land)."""
        self.served = served
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="imagegpt-app-"))
        self.uploads = uploads or [gr.utils.get_upload_folder()]
        self.stops = Stops()

    def _read(self, image) -> tuple:
        path = image.get("path") if isinstance(image, dict) else None
        return core.model_input(self.served, core.read_upload(path, self.uploads))

    def view(self, image, keep):
        """The input as the model sees it, and a status line (the message, when the image is refused)."""
        if not image:
            return None, ""
        try:
            original, quantised = self._read(image)
        except ImageGPTError as e:
            return None, f"**Cannot use this image:** {e}"
        keep = keep_rows(int(keep), self.served.height)
        return core.model_view(quantised, keep), (
            f"The model sees {self.served.height}x{self.served.width} pixels in "
            f"{len(self.served.processor.palette)} colours; the top {keep} rows are kept "
            "(above the red line)."
        )

    def example(self, evt: gr.SelectData):
        return self.served.examples[evt.index][1]

    def complete(self, image, keep, n, temperature, top_k, top_p, seed, request: gr.Request):
        """Yields (grid, status, download) as the completions grow."""
        stop = self.stops.new(_session(request), "complete")
        try:
            original, quantised = self._read(image)
            keep = keep_rows(int(keep), self.served.height)
            n = _count(n)
            ids = self.served.processor.encode(original[None])
        except ImageGPTError as e:
            yield None, f"**Cannot complete:** {e}", _no_download()
            return
        run = partial(
            complete, self.served.model, ids, keep, n=n, processor=self.served.processor,
            **self._sampling(temperature, top_k, top_p, seed),
        )  # fmt: skip
        prefixes = ids[:, : keep * self.served.width].repeat_interleave(n, dim=0)
        figure = lambda tokens: core.completion_figure(
            original, quantised, keep, core.partial_images(self.served, tokens)
        )
        yield from self._stream(prefixes, run, stop, figure, "complete")

    def sample(self, n, temperature, top_k, top_p, seed, request: gr.Request):
        """Yields (grid, status, download) as the samples grow."""
        stop = self.stops.new(_session(request), "sample")
        try:
            n = _count(n)
        except ImageGPTError as e:
            yield None, f"**Cannot sample:** {e}", _no_download()
            return
        run = partial(sample, self.served.model, n, **self._sampling(temperature, top_k, top_p, seed))
        prefixes = torch.empty(n, 0, dtype=torch.long)
        figure = lambda tokens: core.samples_figure(core.partial_images(self.served, tokens))
        yield from self._stream(prefixes, run, stop, figure, "sample")

    def stopper(self, tab: str):
        """The Stop button's handler for a tab: sets the flag of this browser session's generation there."""

        def stop(request: gr.Request) -> None:
            self.stops.stop(_session(request), tab)

        return stop

    def _sampling(self, temperature, top_k, top_p, seed) -> dict:
        return {
            "temperature": float(temperature),
            "top_k": int(top_k),
            "top_p": float(top_p),
            "seed": None if seed is None or seed == "" else int(seed),
            "device": self.served.device,
            "dtype": self.served.dtype,
        }

    def _stream(self, prefixes, run, stop: StopFlag, figure, what: str):
        try:
            yield from self._grow(prefixes, run, stop, figure, what)
        finally:
            stop.ended.set()

    def _grow(self, prefixes, run, stop, figure, what: str):
        """Yields (grid, status, download) as the tokens grow; a grid the page already shows is sent as
        gr.skip(). gradio writes each image it is sent to a file named by its bytes, so sending the same
        grid again rewrites the file the browser may be reading: the image then never shows."""
        start = time.perf_counter()
        grid = shown = None
        try:
            for tokens, fraction in core.stream(self.served, prefixes, run, stop, self.served.width):
                grid = figure(tokens)
                rows = int(fraction * (self.served.height - prefixes.size(1) // self.served.width))
                seconds = time.perf_counter() - start
                status = f"{progress_bar(fraction)} · {rows} rows decoded · {seconds:.1f} s"
                yield _unless_shown(grid, shown), status, _no_download()
                shown = grid
        except core.Stopped:
            yield (
                _unless_shown(grid, shown),
                f"Stopped after {time.perf_counter() - start:.1f} s.",
                _no_download(),
            )
            return
        except ImageGPTError as e:
            yield _unless_shown(grid, shown), f"**Cannot {what}:** {e}", _no_download()
            return
        path = save_image(grid, self.out_dir / f"{what}-{uuid.uuid4().hex[:8]}.png")
        done = f"Done in {time.perf_counter() - start:.1f} s."
        yield (
            _unless_shown(grid, shown),
            done,
            gr.DownloadButton("Download PNG", value=str(path), interactive=True),
        )


def _unless_shown(grid, shown):
    """grid, or gr.skip() when it is the grid the page shows already (see Handlers._grow)."""
    return gr.skip() if grid is not None and shown is not None and np.array_equal(grid, shown) else grid


def progress_bar(fraction: float, width: int = 24) -> str:
    """A text progress bar for the status line, e.g. `██████░░░░░░` 50%."""
    filled = round(fraction * width)
    return f"`{'█' * filled}{'░' * (width - filled)}` {100 * fraction:.0f}%"


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def _count(n) -> int:
    n = int(n)
    if not 1 <= n <= core.MAX_IMAGES:
        raise ArgumentError(f"between 1 and {core.MAX_IMAGES} images, got {n}")
    return n


def _no_download():
    return gr.DownloadButton("Download PNG", value=None, interactive=False)


def _sampling_controls(served: core.Served) -> list:
    clusters = len(served.processor.palette)
    return [
        gr.Slider(0, 2, value=1.0, step=0.05, label="temperature (0 = greedy)", elem_id="temperature"),
        gr.Slider(0, clusters, value=0, step=1, label="top-k (0 = off)", elem_id="top-k"),
        gr.Slider(0.05, 1, value=1.0, step=0.05, label="top-p (1 = off)", elem_id="top-p"),
        gr.Number(value=0, precision=0, label="seed (the same seed gives the same images)", elem_id="seed"),
    ]


def _outputs(tab: str) -> tuple:
    image = gr.Image(
        label="result", type="numpy", format="png", interactive=False, elem_id=f"{tab}-result",
        buttons=["download", "fullscreen"],
    )  # fmt: skip
    status = gr.Markdown(elem_id=f"{tab}-status")
    download = gr.DownloadButton("Download PNG", interactive=False, elem_id=f"{tab}-download")
    return image, status, download


def _generation_events(button, stop_button, handler, inputs, outputs, handlers: Handlers, tab: str):
    event = button.click(
        handler, inputs, outputs, preprocess=False, concurrency_id="generation", concurrency_limit=1,
        show_progress="minimal",
    )  # fmt: skip
    stop_button.click(handlers.stopper(tab), None, None, cancels=[event], queue=False)


def build(served: core.Served, handlers: Handlers | None = None) -> gr.Blocks:
    """The page for one served model."""
    handlers = handlers or Handlers(served)
    h = served.height
    with gr.Blocks(title="ImageGPT") as page:
        gr.Markdown(
            "# ImageGPT\nGive the model the top of a picture and watch it invent the rest, or let it "
            "dream up pictures of its own."
        )
        with gr.Tab("Complete", elem_id="tab-complete"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(
                        label="your image (upload, paste or drop)", type="filepath",
                        sources=["upload", "clipboard"], elem_id="complete-input", height=280,
                    )  # fmt: skip
                    gr.Gallery(
                        [(picture, caption) for caption, picture in served.examples], label="examples",
                        columns=6, height=170, allow_preview=False, elem_id="examples",
                    ).select(handlers.example, None, image)  # fmt: skip
                with gr.Column():
                    view = gr.Image(
                        label="what the model sees", interactive=False, format="png", elem_id="model-view",
                        height=280,
                    )  # fmt: skip
                    view_status = gr.Markdown(elem_id="view-status")
            keep = gr.Slider(0, h, value=h // 2, step=1, label=f"rows kept (of {h})", elem_id="keep")
            n = gr.Slider(1, core.MAX_IMAGES, value=4, step=1, label="completions", elem_id="completions")
            controls = _sampling_controls(served)
            with gr.Row():
                go = gr.Button("Complete", variant="primary", elem_id="complete-button")
                halt = gr.Button("Stop", variant="stop", elem_id="complete-stop")
            outputs = _outputs("complete")
            for trigger in (image.change, keep.change):
                trigger(handlers.view, [image, keep], [view, view_status], preprocess=False, queue=False)
            _generation_events(
                go, halt, handlers.complete, [image, keep, n, *controls], list(outputs), handlers, "complete"
            )
        with gr.Tab("Sample", elem_id="tab-sample"):
            n = gr.Slider(1, core.MAX_IMAGES, value=4, step=1, label="samples", elem_id="samples")
            controls = _sampling_controls(served)
            with gr.Row():
                go = gr.Button("Sample", variant="primary", elem_id="sample-button")
                halt = gr.Button("Stop", variant="stop", elem_id="sample-stop")
            outputs = _outputs("sample")
            _generation_events(go, halt, handlers.sample, [n, *controls], list(outputs), handlers, "sample")
        with gr.Tab("Model", elem_id="tab-model"):
            facts = "\n".join(f"| {name} | {value} |" for name, value in core.model_facts(served))
            gr.Markdown("| | |\n|---|---|\n" + facts, elem_id="model-facts")
            gr.Image(
                core.palette_swatch(served.processor.palette), label="palette", interactive=False,
                format="png", elem_id="palette",
            )  # fmt: skip
    page.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return page


def launch(page: gr.Blocks, host: str, port: int, *, block: bool = True) -> str:
    """Serve the page on host:port (no share link, uploads capped at core.MAX_UPLOAD_BYTES); its URL."""
    page.launch(
        server_name=host, server_port=port, share=False, quiet=True, show_error=False,
        max_file_size=core.MAX_UPLOAD_BYTES, prevent_thread_lock=True, inbrowser=False,
        theme=gr.themes.Default(font=LOCAL_FONTS, font_mono=["ui-monospace", "monospace"]),
    )  # fmt: skip
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    return url
