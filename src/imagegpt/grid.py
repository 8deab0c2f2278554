"""Image grids for image files (PNG, or the format the name asks for): cells upscaled with nearest-neighbour
(so a 32x32 image is visible), small gutters.

`sample_grid` lays n samples out in a near-square grid; `completion_grid` gives each image one row: the
occluded input (the rows kept, the rest grey), its completions, then the original.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, features

from .errors import ArgumentError, OutputError
from .files import atomic_open, check_output

OCCLUDED = 128  # the grey of the rows a completion has to fill
BACKGROUND = 255  # gutters and empty cells


def upscale_factor(height: int, width: int, min_cell: int = 128) -> int:
    """The smallest integer factor that makes the longer side of a cell at least min_cell pixels."""
    return max(1, math.ceil(min_cell / max(height, width)))


def _as_images(images, what: str) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ArgumentError(
            f"{what} must be uint8 images [B, H, W, 3], got {array.dtype} of shape {tuple(array.shape)}"
        )
    return array


def make_grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    *,
    min_cell: int = 128,
    gutter: int = 4,
    background: int = BACKGROUND,
) -> np.ndarray:
    """Rows of uint8 images [H, W, 3] (all the same size; None leaves a cell empty) -> one uint8 image.

    Each cell is upscaled by an integer factor with nearest-neighbour until its longer side is >= min_cell
    pixels; cells are `gutter` pixels apart, with the same margin around the grid.
    """
    cells = [image for row in rows for image in row if image is not None]
    if not cells:
        raise ArgumentError("a grid needs at least one image")
    shape = np.asarray(cells[0]).shape
    for image in cells:
        image = np.asarray(image)
        if image.shape != shape or image.ndim != 3 or shape[-1] != 3 or image.dtype != np.uint8:
            raise ArgumentError(
                f"grid cells must be uint8 images [H, W, 3] of one size, got {image.dtype} {image.shape} "
                f"beside {shape}"
            )
    height, width = shape[:2]
    factor = upscale_factor(height, width, min_cell)
    cell_h, cell_w = height * factor, width * factor
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    grid = np.full(
        (gutter + n_rows * (cell_h + gutter), gutter + n_cols * (cell_w + gutter), 3), background, np.uint8
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            if image is None:
                continue
            top, left = gutter + r * (cell_h + gutter), gutter + c * (cell_w + gutter)
            big = np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)
            grid[top : top + cell_h, left : left + cell_w] = big
    return grid


def sample_grid(images, columns: int | None = None, **options) -> np.ndarray:
    """n images [n, H, W, 3] in a near-square grid (columns = ceil(sqrt(n)) unless given), row by row."""
    images = _as_images(images, "samples")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = [list(images[i : i + columns]) for i in range(0, len(images), columns)]
    return make_grid(rows, **options)


def occlude(images, keep_rows: int, fill: int = OCCLUDED) -> np.ndarray:
    """A copy of images [B, H, W, 3] with every row from keep_rows down grey: what the model was shown."""
    occluded = _as_images(images, "images").copy()
    occluded[:, keep_rows:] = fill
    return occluded


def completion_grid(originals, completions, keep_rows: int, **options) -> np.ndarray:
    """One row per original [B, H, W, 3]: occluded input, its completions ([B * n, H, W, 3], image-major as
    imagegpt.sampling.complete returns them), then the original."""
    originals = _as_images(originals, "originals")
    completions = _as_images(completions, "completions")
    if len(completions) % len(originals):
        raise ArgumentError(
            f"{len(completions)} completions do not divide evenly among {len(originals)} originals"
        )
    n = len(completions) // len(originals)
    occluded = occlude(originals, keep_rows)
    rows = [[occluded[i], *completions[i * n : (i + 1) * n], originals[i]] for i in range(len(originals))]
    return make_grid(rows, **options)


# The formats an image grid is written in, by the file's suffix (lossless first, as messages list them).
IMAGE_FORMATS = {
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".ppm": "PPM",
    ".gif": "GIF",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
}


def image_format(path: str | os.PathLike, what: str = "image file") -> str:
    """Pillow's format for the file's suffix (.png -> PNG, .jpg -> JPEG); an OutputError for any other name,
    so that a file never holds another format than its name says."""
    suffix = Path(path).suffix.lower()
    name = IMAGE_FORMATS.get(suffix)
    if name is None or (name == "WEBP" and not features.check("webp")):
        known = ", ".join(s for s, f in IMAGE_FORMATS.items() if f != "WEBP" or features.check("webp"))
        said = f"ends in {suffix}" if suffix else "has no suffix"
        raise OutputError(f"{what} {path} {said}; give a name ending in one of {known}")
    return name


def save_image(grid: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 image [H, W, 3] in the format its suffix names (PNG for .png, JPEG for .jpg, ...),
    atomically, creating the parent directory."""
    path = check_output(path, what="image file")
    format = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        Image.fromarray(grid).save(f, format=format)
    return path
