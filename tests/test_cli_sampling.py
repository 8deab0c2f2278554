"""`imagegpt sample` and `imagegpt complete` end to end on a tiny checkpoint directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagegpt import ImageGPT, ImageGPTConfig
from imagegpt.cli import main
from imagegpt.grid import upscale_factor
from imagegpt.palette import Palette
from imagegpt.processor import ImageProcessor

SIDE, CLUSTERS = 8, 16
COMMON = ["--device", "cpu", "--dtype", "float32", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint directory as imagegpt writes it: config.json, model.safetensors and the palette."""
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig.from_preset("igpt-nano", resolution=SIDE, clusters=CLUSTERS))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)  # a zero head would sample uniformly
    processor = ImageProcessor(Palette(np.random.default_rng(0).uniform(-1, 1, (CLUSTERS, 3))), SIDE)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory, processor=processor)
    return directory, processor


def grid_size(rows: int, columns: int, gutter: int = 4) -> tuple[int, int]:
    size = SIDE * upscale_factor(SIDE, SIDE)
    return gutter + columns * (size + gutter), gutter + rows * (size + gutter)  # PIL's (width, height)


def test_sample_writes_a_png_grid_and_npz_reproducibly(checkpoint, tmp_path, capsys):
    directory, processor = checkpoint
    out, npz = tmp_path / "samples.png", tmp_path / "samples.npz"
    args = ["sample", "--model", str(directory), "-n", "5", "--out", str(out), "--seed", "7", "--top-k", "8"]
    assert main([*args, "--save-npz", str(npz), *COMMON]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == grid_size(2, 3)
    saved = np.load(npz)
    tokens, images = saved["tokens"], saved["images"]
    assert tokens.shape == (5, SIDE * SIDE) and images.shape == (5, SIDE, SIDE, 3)
    assert np.array_equal(images, processor.decode(tokens))
    assert json.loads(str(saved["args"]))["seed"] == 7
    again = tmp_path / "again.npz"
    assert main([*args, "--out", str(tmp_path / "again.png"), "--save-npz", str(again), *COMMON]) == 0
    assert np.array_equal(np.load(again)["tokens"], tokens)


def test_cache_dtype_reaches_the_sampler(checkpoint, tmp_path, monkeypatch):
    directory, _ = checkpoint
    seen = []
    import imagegpt.sampling

    real = imagegpt.sampling.generate
    monkeypatch.setattr(imagegpt.sampling, "generate", lambda *a, **kw: seen.append(a[2]) or real(*a, **kw))
    out = tmp_path / "s.png"
    args = ["sample", "--model", str(directory), "-n", "2", "--out", str(out), "--seed", "1", *COMMON]
    assert main([*args, "--cache-dtype", "bfloat16"]) == 0
    assert seen[-1].cache_dtype == "bfloat16" and out.is_file()  # generate's SamplingOptions
    assert main(args) == 0
    assert seen[-1].cache_dtype is None  # the default: the compute dtype's, exact
    assert seen[-1].weight_dtype is None
    if __import__("imagegpt").cpu.available():
        assert main([*args, "--weight-dtype", "int8"]) == 0
        assert seen[-1].weight_dtype == "int8"


def test_complete_writes_rows_of_occluded_completions_original(checkpoint, tmp_path, capsys):
    directory, processor = checkpoint
    rng = np.random.default_rng(1)
    files = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(files[0])
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(files[1])
    out, npz = tmp_path / "completions.png", tmp_path / "completions.npz"
    args = ["complete", "--model", str(directory), *map(str, files), "--keep", "0.5", "-n", "3"]
    assert main([*args, "--out", str(out), "--save-npz", str(npz), "--seed", "1", *COMMON]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == grid_size(2, 1 + 3 + 1)
    saved = np.load(npz)
    originals = processor.encode([str(f) for f in files])
    assert np.array_equal(saved["original_tokens"], originals.numpy())
    assert saved["tokens"].shape == (6, SIDE * SIDE) and int(saved["keep_rows"]) == SIDE // 2
    prefix = originals[:, : SIDE * SIDE // 2].repeat_interleave(3, dim=0).numpy()
    assert np.array_equal(saved["tokens"][:, : SIDE * SIDE // 2], prefix)
    # --keep as a whole number of rows
    assert (
        main([*args[:-4], "--keep", "2", "-n", "1", "--out", str(out), "--save-npz", str(npz), *COMMON]) == 0
    )
    assert int(np.load(npz)["keep_rows"]) == 2


def test_progress_bar_shows_tokens_per_second(checkpoint, tmp_path, capsys):
    directory, _ = checkpoint
    out = tmp_path / "s.png"
    assert main(["sample", "--model", str(directory), "-n", "2", "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "tok/s" in err and "128/128" in err and "seed" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "-n", "0"], "n must be a positive integer"),
        (["sample", "--temperature", "-1"], "temperature"),
        (["sample", "--top-p", "0"], "top_p"),
        (["sample", "--top-k", "-2"], "top_k"),
        (["complete", "IMAGE", "--keep", "1.5"], r"outside \[0, 1\]"),
        (["complete", "IMAGE", "--keep", "9"], "outside 0..8"),
        (["complete", "IMAGE", "--keep", "half"], "neither a number of rows"),
        (["complete", "missing.png"], "missing.png"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(checkpoint, tmp_path, capsys, args, message):
    directory, _ = checkpoint
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    args = [str(image) if a == "IMAGE" else a for a in args]
    out = tmp_path / "out.png"
    assert main([*args, "--model", str(directory), "--out", str(out), *COMMON]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"imagegpt {args[0]}: error:")
    assert __import__("re").search(message, err)
    assert not out.exists()


def test_a_checkpoint_without_palette_exits_2(tmp_path, capsys):
    model = ImageGPT(ImageGPTConfig.from_preset("igpt-nano", resolution=4, clusters=4))
    model.save_pretrained(tmp_path / "bare")
    assert main(["sample", "--model", str(tmp_path / "bare"), "--out", str(tmp_path / "s.png"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "preprocessor_config.json" in err and len(err.strip().splitlines()) == 1
    assert main(["sample", "--model", str(tmp_path / "nowhere"), *COMMON]) == 2
