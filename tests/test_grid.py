"""PNG grids: nearest-neighbour upscaling, gutters, the completion row layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagegpt.errors import ArgumentError, OutputError
from imagegpt.grid import (
    BACKGROUND,
    OCCLUDED,
    completion_grid,
    make_grid,
    occlude,
    sample_grid,
    save_image,
    upscale_factor,
)


def images(count: int, height: int = 8, width: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def cell(grid: np.ndarray, row: int, col: int, size: int, gutter: int) -> np.ndarray:
    top, left = gutter + row * (size + gutter), gutter + col * (size + gutter)
    return grid[top : top + size, left : left + size]


def test_upscale_factor_makes_small_images_visible():
    assert upscale_factor(32, 32) == 4
    assert upscale_factor(8, 8) == 16
    assert upscale_factor(20, 30, min_cell=128) == 5  # the longer side reaches 150 >= 128
    assert upscale_factor(256, 256) == 1


def test_cells_are_nearest_neighbour_upscaled_between_gutters():
    a, b, c = images(3, 32, 32)
    grid = make_grid([[a, b], [c, None]], gutter=4)
    assert grid.shape == (4 + 2 * (128 + 4), 4 + 2 * (128 + 4), 3) and grid.dtype == np.uint8
    for (row, col), image in (((0, 0), a), ((0, 1), b), ((1, 0), c)):
        big = cell(grid, row, col, 128, 4)
        assert np.array_equal(big, np.kron(image, np.ones((4, 4, 1), np.uint8)))
    assert (cell(grid, 1, 1, 128, 4) == BACKGROUND).all()  # an empty cell
    assert (grid[:4] == BACKGROUND).all() and (grid[:, 132:136] == BACKGROUND).all()  # margin and gutter


def test_sample_grid_is_near_square():
    grid = sample_grid(images(5), gutter=2)
    size = 8 * 16
    assert grid.shape == (2 + 2 * (size + 2), 2 + 3 * (size + 2), 3)  # 3 columns, 2 rows
    assert (cell(grid, 1, 2, size, 2) == BACKGROUND).all()


def test_completion_rows_are_occluded_input_completions_original():
    originals, completions = images(2, seed=1), images(6, seed=2)
    grid = completion_grid(originals, completions, keep_rows=3, gutter=2)
    size, scale = 8 * 16, 16
    assert grid.shape == (2 + 2 * (size + 2), 2 + 5 * (size + 2), 3)
    for i in range(2):
        shown = cell(grid, i, 0, size, 2)[::scale, ::scale]
        assert np.array_equal(shown[:3], originals[i, :3]) and (shown[3:] == OCCLUDED).all()
        for j in range(3):
            assert np.array_equal(cell(grid, i, 1 + j, size, 2)[::scale, ::scale], completions[i * 3 + j])
        assert np.array_equal(cell(grid, i, 4, size, 2)[::scale, ::scale], originals[i])


def test_occlude_copies():
    original = images(1)
    occluded = occlude(original, 5)
    assert (occluded[:, 5:] == OCCLUDED).all() and np.array_equal(occluded[:, :5], original[:, :5])
    assert not (original[:, 5:] == OCCLUDED).all()


def test_png_round_trip(tmp_path):
    grid = sample_grid(images(4))
    path = save_image(grid, tmp_path / "sub" / "grid.png")
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    with pytest.raises(OutputError, match="is a folder"):
        save_image(grid, tmp_path)


@pytest.mark.parametrize("name, format", [("g.jpg", "JPEG"), ("g.JPEG", "JPEG"), ("g.bmp", "BMP"),
                                          ("g.tiff", "TIFF"), ("g.gif", "GIF")])  # fmt: skip
def test_an_image_file_holds_the_format_its_name_asks_for(tmp_path, name, format):
    path = save_image(sample_grid(images(4)), tmp_path / name)
    assert Image.open(path).format == format


@pytest.mark.parametrize("name", ["grid", "grid.pdf", "grid.txt", "grid.png.bak"])
def test_an_image_file_name_without_a_known_format_is_refused_before_writing(tmp_path, name):
    with pytest.raises(OutputError, match="give a name ending in one of .png"):
        save_image(sample_grid(images(4)), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_bad_grids_are_refused():
    with pytest.raises(ArgumentError, match="at least one image"):
        make_grid([[None]])
    with pytest.raises(ArgumentError, match="one size"):
        make_grid([[images(1)[0], images(1, 4, 4)[0]]])
    with pytest.raises(ArgumentError, match="uint8"):
        sample_grid(images(2).astype(np.float32))
    with pytest.raises(ArgumentError, match="divide evenly"):
        completion_grid(images(2), images(3), 4)
