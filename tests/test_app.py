"""The web app's functions, without a browser: the model it serves, uploads within limits, the views,
streaming generation and the page's handlers (tests/test_app_browser.py drives the page itself)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from app_helpers import SIDE, save_tiny_model, write_photo
from imagegpt.app import core
from imagegpt.cli import main
from imagegpt.errors import ArgumentError, ImageInputError
from imagegpt.grid import OCCLUDED
from imagegpt.sampling import complete, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return core.load_served(save_tiny_model(tmp_path_factory.mktemp("app") / "model"))


# ---- which model ----


def test_without_a_model_the_app_says_on_one_line_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentError, match="run `imagegpt demo`"):
        core.default_model(tmp_path)
    assert main(["app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imagegpt app: error: no model given")


def test_the_demo_model_of_the_folder_is_the_default_and_its_run_is_read(tmp_path):
    run = tmp_path / core.DEMO_FOLDER / "run"
    model = save_tiny_model(run / "model")
    (run / "args.json").write_text(
        json.dumps({"data": "shapes", "resolution": SIDE, "data_seed": 0, "data_options": {"n": 200}})
    )
    records = [
        {"step": 5, "split": "val", "bits_per_dim": 1.5},
        {"step": 9, "split": "val", "bits_per_dim": 1.25},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut short')
    assert core.default_model(tmp_path) == model
    served = core.load_served(folder=tmp_path)
    assert served.bits_per_dim == (1.25, "validation split, step 9")
    facts = dict(core.model_facts(served))
    assert facts["held-out bits/dim"].startswith("1.250") and facts["resolution"].startswith("8x8")
    assert facts["trained on"] == "shapes"
    captions = [caption for caption, _ in served.examples]
    assert captions[0].startswith("held-out shapes") and any(c.startswith("photo:") for c in captions)
    assert served.examples[0][1].shape == (SIDE, SIDE, 3)  # the data set's own test images


def test_the_palette_swatch_shows_every_colour(served):
    swatch = core.palette_swatch(served.processor.palette, columns=4, cell=3)
    colours = served.processor.palette.decode(np.arange(16))
    assert swatch.shape == (12, 12, 3)
    assert np.array_equal(swatch[::3, ::3].reshape(16, 3), colours)


# ---- uploads ----


def test_only_files_under_the_upload_folder_are_opened(tmp_path):
    outside = write_photo(tmp_path / "outside.png")
    (tmp_path / "uploads").mkdir()
    for path in (str(outside), str(tmp_path / "uploads" / ".." / "outside.png"), "/etc/passwd"):
        with pytest.raises(ImageInputError, match="only images uploaded through the page"):
            core.read_upload(path, [tmp_path / "uploads"])
    with pytest.raises(ImageInputError, match="no image"):
        core.read_upload(None, [tmp_path])


def test_files_over_the_size_or_pixel_limit_are_refused(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 6000)).save(bomb)  # 48 megapixels in a few kilobytes
    with pytest.raises(ImageInputError, match="8000x6000 .* megapixels are accepted"):
        core.read_upload(str(bomb), [tmp_path])
    photo = write_photo(tmp_path / "photo.png")
    monkeypatch.setattr(core, "MAX_UPLOAD_BYTES", photo.stat().st_size - 1)
    with pytest.raises(ImageInputError, match="MB are accepted"):
        core.read_upload(str(photo), [tmp_path])


def test_unreadable_files_get_a_message_without_the_server_path(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cut = tmp_path / "cut.png"
    cut.write_bytes(write_photo(tmp_path / "whole.png").read_bytes()[:200])
    for bad in (text, cut):
        with pytest.raises(ImageInputError, match="not an image that can be read") as error:
            core.read_upload(str(bad), [tmp_path])
        assert str(tmp_path) not in str(error.value)


def odd_images(folder):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    images = {
        "sixteen-bit.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "alpha.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
    }
    paths = []
    for name, image in images.items():
        image.save(folder / name)
        paths.append(folder / name)
    frames = [Image.fromarray(np.full((12, 10, 3), value, np.uint8)) for value in (30, 200)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    return [*paths, folder / "animated.gif"]


def test_odd_modes_are_read_as_imagegpt_complete_reads_them(served, tmp_path):
    for path in odd_images(tmp_path):
        original, quantised = core.model_input(served, core.read_upload(str(path), [tmp_path]))
        expected = served.processor.to_rgb(str(path))  # what `imagegpt complete FILE` encodes
        assert np.array_equal(original, expected[0]), path.name
        assert np.array_equal(quantised, served.processor.decode(served.processor.encode(expected))[0])


# ---- views ----


def test_the_model_view_is_upscaled_with_the_kept_rows_as_they_are_and_a_line_under_them(served):
    quantised = served.processor.decode(torch.arange(64) % 16)[0]
    view = core.model_view(quantised, 3)
    factor = 256 // SIDE
    assert view.shape == (256, 256, 3)
    big = np.repeat(np.repeat(quantised, factor, 0), factor, 1)
    line = factor // 4
    assert np.array_equal(view[: 3 * factor - line // 2], big[: 3 * factor - line // 2])
    assert (view[3 * factor] == core.MARK).all()
    assert not np.array_equal(view[3 * factor + line :], big[3 * factor + line :])  # the rest is faded


def test_partial_images_are_grey_where_no_token_is_drawn_yet(served):
    tokens = torch.full((2, 64), -1)
    tokens[0, :10] = 3
    images = core.partial_images(served, tokens)
    colour = served.processor.palette.decode(np.array([3]))[0]
    assert (images[0].reshape(64, 3)[:10] == colour).all()
    assert (images[0].reshape(64, 3)[10:] == OCCLUDED).all() and (images[1] == OCCLUDED).all()


# ---- streaming ----


def test_streaming_yields_each_decoded_row_and_ends_with_completes_tokens(served):
    ids = served.processor.encode(np.zeros((1, SIDE, SIDE, 3), np.uint8))
    run = lambda **hook: complete(served.model, ids, 2, n=3, seed=4, **hook)
    prefixes = ids[:, : 2 * SIDE].repeat_interleave(3, dim=0)
    updates = list(core.stream(served, prefixes, run, threading.Event(), every=SIDE))
    last, fraction = updates[-1]
    assert fraction == 1.0 and torch.equal(last, complete(served.model, ids, 2, n=3, seed=4))
    drawn = [int((tokens >= 0).sum()) for tokens, _ in updates]
    assert drawn == list(range(3 * 2 * SIDE + 3 * SIDE, 3 * 64 + 1, 3 * SIDE))  # a row at a time


def test_the_stop_flag_ends_the_work_within_a_token(served):
    stop = threading.Event()
    seen = []

    def run(callback):
        def counting(start, new):
            seen.append(new.size(1))
            callback(start, new)
            if new.size(1) == SIDE:  # hold after the first row until the page asks to stop
                stop.wait(30)

        return sample(served.model, 2, seed=0, callback=counting)

    updates = core.stream(served, torch.empty(2, 0, dtype=torch.long), run, stop, every=SIDE)
    next(updates)  # the first row
    stop.set()
    with pytest.raises(core.Stopped):
        list(updates)
    assert seen == list(range(1, SIDE + 2)) and not served.lock.locked()


# ---- the page's handlers (no browser) ----


@pytest.fixture(scope="module")
def handlers(served, tmp_path_factory):
    from imagegpt.app.page import Handlers

    folder = tmp_path_factory.mktemp("page")
    (folder / "uploads").mkdir()
    return Handlers(served, out_dir=folder / "out", uploads=[folder / "uploads"])


def test_the_complete_handler_grows_the_grid_and_offers_the_png(handlers, served):
    import gradio as gr

    photo = write_photo(handlers.uploads[0] / "photo.png")
    outputs = list(handlers.complete({"path": str(photo)}, 3, 2, 1.0, 0, 1.0, 7, None))
    # the page is never sent a grid it already shows: gradio would rewrite the file the browser is reading
    grids = [grid for grid, _, _ in outputs if isinstance(grid, np.ndarray)]
    assert all(not np.array_equal(a, b) for a, b in zip(grids, grids[1:]))
    assert len(grids) >= 2 and all(grid.shape == grids[-1].shape for grid in grids)
    last, status, download = outputs[-1]
    assert isinstance(last, type(gr.skip())) and status.startswith("Done")
    grid = grids[-1]
    assert download.value["path"].endswith(".png")
    assert np.array_equal(np.asarray(Image.open(download.value["path"])), grid)
    original, quantised = core.model_input(served, Image.open(photo))
    ids = complete(served.model, served.processor.encode(original[None]), 3, n=2, seed=7)
    expected = core.completion_figure(original, quantised, 3, served.processor.decode(ids))
    assert np.array_equal(grid, expected)
    assert (grids[0] == OCCLUDED).sum() > (grid == OCCLUDED).sum()  # rows still to decode are grey


def test_handlers_put_mistakes_in_the_status_line(handlers):
    grid, status, _ = next(handlers.complete({"path": "/etc/passwd"}, 3, 2, 1.0, 0, 1.0, 0, None))
    assert grid is None and "only images uploaded through the page" in status
    view, status = handlers.view({"path": "/etc/passwd"}, 3)
    assert view is None and "Cannot use this image" in status
    photo = write_photo(handlers.uploads[0] / "second.png")
    outputs = list(handlers.complete({"path": str(photo)}, 3, 2, 1.0, 0, 0.0, 0, None))
    assert "top_p must be in (0, 1]" in outputs[-1][1]
    assert "between 1 and 8" in next(handlers.sample(9, 1.0, 0, 1.0, 0, None))[1]


def test_the_sample_handler_draws_samples(handlers, served):
    outputs = list(handlers.sample(3, 1.0, 0, 1.0, 5, None))
    assert outputs[-1][1].startswith("Done")
    grid = [grid for grid, _, _ in outputs if isinstance(grid, np.ndarray)][-1]
    assert np.array_equal(grid, core.samples_figure(served.processor.decode(sample(served.model, 3, seed=5))))


def test_one_generation_at_a_time_in_a_bounded_queue_shared_by_both_tabs(served):
    from imagegpt.app.page import QUEUE_SIZE, build

    page = build(served)
    generating = [fn for fn in page.fns.values() if fn.name in ("complete", "sample")]
    assert len(generating) == 2
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in generating} == {("generation", 1)}
    assert page._queue.max_size == QUEUE_SIZE


def test_small_models_generate_on_one_thread_unless_told(served):
    from imagegpt.commands.app import generation_threads

    assert generation_threads(served.model, None) == 1
    assert generation_threads(served.model, 3) == 3
    big = torch.nn.Linear(4000, 3000)  # 12M parameters
    assert generation_threads(big, None) is None
    with pytest.raises(ArgumentError, match="--threads"):
        generation_threads(served.model, 0)


def test_the_status_line_shows_a_progress_bar():
    from imagegpt.app.page import progress_bar

    assert progress_bar(0.5, width=4) == "`██░░` 50%"
    assert progress_bar(1.0, width=4) == "`████` 100%"


def test_stop_returns_only_once_the_generation_has_shown_that_it_stopped():
    # The Stop event cancels the generation's event when the handler returns: it must first let the
    # generation show "Stopped after ..." (flag.ended), or the page keeps the last progress line.
    import threading

    from imagegpt.app.page import Stops

    stops = Stops()
    flag = stops.new("visitor", "sample")
    threading.Timer(0.3, flag.ended.set).start()  # the generation, reading the flag at its next token
    stops.stop("visitor", "sample")
    assert flag.is_set() and flag.ended.is_set()
    stops.stop("visitor", "sample")  # nothing running any more: returns at once, raises nothing
