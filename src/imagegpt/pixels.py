"""Pixels from any source -> uint8 RGB: one set of rules for the image processor and the data readers."""

from __future__ import annotations

import numpy as np

from .errors import ImageInputError


def over_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [..., 4] RGBA composited onto white -> uint8 [..., 3]: exactly PIL's alpha_composite over an
    opaque white image, which is what transformers' convert_to_rgb does."""
    rgb, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def pil_to_rgb(image, what: str) -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3]: 16-bit and float modes scaled, transparency over white."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)  # native byte order for I;16B
        return array_to_rgb(values, what, channels_first=False, sixteen_bit=True)
    if mode == "F":
        return array_to_rgb(np.asarray(image), what, channels_first=False)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        return over_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image if mode == "RGB" else image.convert("RGB"))


def array_to_rgb(array: np.ndarray, what: str, channels_first: bool, sixteen_bit: bool = False) -> np.ndarray:
    """2-D grayscale or 3-D [H, W, C] / [C, H, W] (C in 1, 3, 4) of any numeric dtype -> uint8 [H, W, 3]."""
    shape = tuple(array.shape)
    if array.ndim == 3:
        first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ImageInputError(
                f"{what}: cannot tell the colour channels of an array of shape {shape}; expected [H, W, C] "
                "or [C, H, W] with C = 1 (grey), 3 (RGB) or 4 (RGBA)"
            )
    elif array.ndim != 2:
        raise ImageInputError(
            f"{what}: an image array must be 2-D [H, W] or 3-D [H, W, C] / [C, H, W] (a batch 4-D), got "
            f"shape {shape}"
        )
    if 0 in array.shape:
        raise ImageInputError(f"{what}: an empty image (shape {shape})")
    array = to_uint8(array, what, sixteen_bit or array.dtype == np.uint16)
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        return over_white(array)
    return np.ascontiguousarray(array)


def to_uint8(array: np.ndarray, what: str, sixteen_bit: bool) -> np.ndarray:
    """Pixel values of any dtype -> uint8: booleans 0/255, integers 0..255 (0..65535 if sixteen_bit), floats
    in [0, 1]; an ImageInputError naming `what` otherwise."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        top = 65535 if sixteen_bit else 255
        if low < 0 or high > top:
            raise ImageInputError(
                f"{what}: integer pixel values must lie in 0..{top}, got {low}..{high}"
                + ("" if sixteen_bit else "; pass uint16 for 16-bit images")
            )
        return np.rint(array / 257).astype(np.uint8) if sixteen_bit else array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError(f"{what}: the image contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -1 / 510 or high > 1 + 1 / 510:  # half a uint8 level of slack for rounding noise
            raise ImageInputError(
                f"{what}: float images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; for 0-255 "
                "values pass uint8 (x.astype(np.uint8)), for [-1, 1] pass (x + 1) / 2"
            )
        return np.rint(np.clip(array.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    raise ImageInputError(
        f"{what}: images of dtype {array.dtype} are not supported; pass uint8 or floats in [0, 1]"
    )
