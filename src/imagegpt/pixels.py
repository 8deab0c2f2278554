"""Pixel helpers shared by the data readers and the image processor."""

from __future__ import annotations

import numpy as np


def over_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [..., 4] RGBA composited onto white -> uint8 [..., 3]: exactly PIL's alpha_composite over an
    opaque white image, which is what transformers' convert_to_rgb does."""
    rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
