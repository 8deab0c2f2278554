"""What the app's tests share: a tiny model they build themselves, and test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagegpt import ImageGPT, ImageGPTConfig, ImageProcessor, Palette

SIDE = 8
CLUSTERS = 16


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A random igpt-nano at 8x8, a 16-colour palette fitted to random pixels, saved with its processor."""
    return save_model(directory, "igpt-nano", SIDE, seed)


def save_model(directory: Path, preset: str, side: int, seed: int = 0) -> Path:
    """A random model of `preset` at side x side with a 16-colour palette, saved with its processor."""
    rng = np.random.default_rng(seed)
    palette = Palette.fit(rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), clusters=CLUSTERS, seed=seed)
    torch.manual_seed(seed)
    model = ImageGPT(ImageGPTConfig.from_preset(preset, resolution=side, clusters=CLUSTERS))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)  # the zero-initialised head would make every colour equal
    model.save_pretrained(directory, processor=ImageProcessor(palette, side))
    return directory


def write_photo(path: Path, size=(40, 30), seed: int = 1) -> Path:
    """A colourful RGB PNG (smooth gradients plus noise), so its quantised rows are not all one colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1)
    rgb = rgb + rng.integers(0, 40, (h, w, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)
    return path
