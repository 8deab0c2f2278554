"""The token cache (tokenise once, uint16 memmap, keyed by data + resolution + palette) and pixel sampling."""

import os

import numpy as np
import pytest
from PIL import Image

from imagegpt.data import load_dataset, sample_pixels, token_cache
from imagegpt.data.cache import cache_path
from imagegpt.errors import ConfigError
from imagegpt.palette import Palette
from imagegpt.processor import ImageProcessor


class CountingProcessor(ImageProcessor):
    """The real processor, counting the images it is asked to encode."""

    def __init__(self, *args, fail_after=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.fail_after = [], fail_after

    def encode(self, images):
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.batches.append(len(images))
        return super().encode(images)


def palette(k=8, seed=0):
    data = load_dataset("shapes", split="all", n=60, resolution=8, seed=seed)
    return Palette.fit(sample_pixels(data, 4000, seed=0) / 127.5 - 1, clusters=k, seed=0)


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("shapes", split="train", n=50, resolution=8)


def test_cache_holds_the_processors_ids_and_a_rerun_does_not_quantise_again(tmp_path, shapes):
    processor = CountingProcessor(palette(), 6)
    tokens = token_cache(shapes, processor, tmp_path, batch_size=16)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.shape == (40, 36)
    assert processor.batches == [16, 16, 8]  # tokenised in bounded batches
    np.testing.assert_array_equal(tokens, processor.encode(shapes.images).numpy())
    again = CountingProcessor(processor.palette, 6)
    np.testing.assert_array_equal(token_cache(shapes, again, tmp_path), tokens)
    assert again.batches == []
    assert [p.name for p in tmp_path.iterdir()] == [cache_path(shapes, processor, tmp_path).name]


def test_cache_key_changes_with_palette_resolution_and_data(tmp_path, shapes):
    base = cache_path(shapes, ImageProcessor(palette(), 6), tmp_path)
    assert base == cache_path(shapes, ImageProcessor(palette(), 6), tmp_path)  # deterministic palette fit
    assert cache_path(shapes, ImageProcessor(palette(seed=1), 6), tmp_path) != base
    assert cache_path(shapes, ImageProcessor(palette(), 4), tmp_path) != base
    assert cache_path(shapes, ImageProcessor(palette(), 6, center_crop=True), tmp_path) != base
    assert cache_path(shapes, ImageProcessor(palette(), 6, resample="nearest"), tmp_path) != base
    val = load_dataset("shapes", split="val", n=50, resolution=8)
    assert cache_path(val, ImageProcessor(palette(), 6), tmp_path) != base
    other = CountingProcessor(palette(), 4)
    tokens = token_cache(shapes, other, tmp_path)
    assert tokens.shape == (40, 16) and other.batches == [40]


def test_interrupted_tokenising_leaves_no_cache_behind(tmp_path, shapes):
    processor = CountingProcessor(palette(), 6, fail_after=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        token_cache(shapes, processor, tmp_path, batch_size=16)
    assert os.listdir(tmp_path) == []  # neither a partial cache nor its temporary file
    processor.fail_after = None
    assert token_cache(shapes, processor, tmp_path).shape == (40, 36)


def test_damaged_cache_file_is_rebuilt(tmp_path, shapes):
    processor = CountingProcessor(palette(), 6)
    path = cache_path(shapes, processor, tmp_path)
    path.write_bytes(b"not an array")
    tokens = token_cache(shapes, processor, tmp_path)
    assert processor.batches and tokens.shape == (40, 36)


def test_cache_refuses_palettes_beyond_uint16(tmp_path, shapes):
    big = Palette(np.random.default_rng(0).uniform(-1, 1, (65536, 3)).astype(np.float32))
    with pytest.raises(ConfigError, match="65535"):
        token_cache(shapes, ImageProcessor(big, 6), tmp_path)


def test_cache_of_a_folder_of_images_of_different_sizes(tmp_path):
    for i, size in enumerate([(5, 9), (12, 7), (8, 8)]):
        Image.fromarray(np.full((*size, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = load_dataset(tmp_path, split="all")
    processor = CountingProcessor(palette(), 4)
    tokens = token_cache(data, processor, tmp_path / "cache")
    expected = np.concatenate([processor.encode([data[i][0]]).numpy() for i in range(3)])
    np.testing.assert_array_equal(tokens, expected)


def test_sample_pixels_is_seeded_and_uniform_over_pixels():
    images = np.zeros((10, 4, 4, 3), np.uint8)
    images[:3] = 255  # 30% of the pixels are white
    images[9, 0, 0] = (1, 2, 3)  # one pixel in 160
    data = load_dataset_from(images)
    pixels = sample_pixels(data, 20000, seed=0)
    assert pixels.shape == (20000, 3) and pixels.dtype == np.uint8
    assert (pixels[:, 0] == 255).mean() == pytest.approx(0.3, abs=0.02)
    assert ((pixels == (1, 2, 3)).all(1)).mean() == pytest.approx(1 / 160, abs=0.003)
    np.testing.assert_array_equal(pixels, sample_pixels(data, 20000, seed=0))
    assert not np.array_equal(pixels, sample_pixels(data, 20000, seed=1))
    strided = data[::3]  # a view, not a copy: sampling must still read the right images
    assert (sample_pixels(strided, 4000, seed=0)[:, 0] == 255).mean() == pytest.approx(0.25, abs=0.03)


def test_sample_pixels_from_a_folder_of_images(tmp_path):
    for i in range(6):
        Image.fromarray(np.full((4 + i, 6, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = load_dataset(tmp_path, split="all")
    pixels = sample_pixels(data, 600, seed=0)
    assert pixels.shape == (600, 3)
    assert set(pixels[:, 0].tolist()) == {0, 40, 80, 120, 160, 200}
    assert set(sample_pixels(data, 50, seed=0, max_images=2)[:, 0].tolist()) <= {0, 40, 80, 120, 160, 200}
    assert len(set(sample_pixels(data, 50, seed=0, max_images=2)[:, 0].tolist())) <= 2


def load_dataset_from(images):
    from imagegpt.data import ImageDataset

    return ImageDataset(images, None, None, "test-images")
