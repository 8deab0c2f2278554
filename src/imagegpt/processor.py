"""Images of any common form <-> token ids: crop, resize, normalise to [-1, 1], quantise with the palette.

The pipeline reproduces transformers' ImageGPTImageProcessor (its PIL backend) bit for bit on RGB inputs: the
uint8 image is resized by Pillow (bilinear by default, as transformers does for uint8 arrays), mapped to
[-1, 1] as x * (1/255) then (x - 0.5) / 0.5 in float32, and each pixel takes its nearest palette centre.

How inputs become uint8 RGB, [H, W, 3]:
- file paths (str or Path): opened with Pillow, EXIF orientation applied (as transformers' load_image does);
- PIL images: RGB as is; L, 1, P, CMYK, YCbCr, ... converted to RGB; anything with alpha (RGBA, LA, PA, P or
  L with a transparent colour) composited onto white, as transformers' convert_to_rgb does; 16-bit grayscale
  (I;16*, and I, which is how Pillow opens some 16-bit files) scaled by 255/65535 (Pillow's own convert would
  clip every value above 255 to white); F (32-bit float) read like a float array;
- numpy arrays and torch tensors: 2-D is grayscale; 3-D is [H, W, C] or [C, H, W] with C in 1, 3 or 4 (4 is
  RGBA, composited onto white). When both ends could be channels, numpy arrays are read as [H, W, C] and torch
  tensors as [C, H, W], each library's convention. uint8 as is; bool as 0/255; uint16 is 16-bit (scaled by
  255/65535); other integers must lie in 0..255; floats must lie in [0, 1] (scaled by 255 and rounded, so a
  float image gives the tokens of the uint8 image it would be saved as).
- a batch: a list or tuple of any of these, of mixed sizes, or a 4-D array/tensor ([B, H, W, C] for numpy,
  [B, C, H, W] for torch, by the same rule).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ArgumentError, CheckpointError, ConfigError, ImageInputError
from .files import write_text_atomic
from .hub import fetch_error, hub_id, quiet
from .limits import check_memory
from .palette import UINT8_TO_UNIT, Palette
from .pixels import array_to_rgb, pil_to_rgb

PROCESSOR_NAME = "preprocessor_config.json"
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_CENTER_CROP_KEY = "imagegpt_center_crop"  # ours; transformers keeps it as an attribute and ignores it
# do_* switches of preprocessor_config.json we read; any other one switched on is refused. do_convert_rgb is
# honoured as far as it goes: every image becomes RGB here (RGB images are unchanged either way).
_SWITCHES = {
    "do_color_quantize",
    "do_resize",
    "do_rescale",
    "do_normalize",
    "do_center_crop",
    "do_convert_rgb",
}


class ImageProcessor:
    """Images <-> token ids for one palette and resolution.

    palette: a Palette (or anything Palette() takes: (K, 3) centres in [-1, 1]).
    size: the model's resolution, an int for square images or (height, width).
    center_crop: crop the central square before resizing (the paper's evaluation); off by default, as in
        transformers, which squashes non-square images to the target shape.
    resample: Pillow's filter for resizing, "bilinear" (transformers' default) or a name/number from RESAMPLE.
    """

    def __init__(
        self,
        palette: Palette,
        size: int | tuple[int, int],
        center_crop: bool = False,
        *,
        resample: str | int = "bilinear",
    ) -> None:
        self.palette = palette if isinstance(palette, Palette) else Palette(palette)
        self.height, self.width = _size(size)
        self.center_crop = bool(center_crop)
        self.resample = _resample(resample)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        crop = ", center_crop=True" if self.center_crop else ""
        return f"ImageProcessor({len(self.palette)} colours, {self.height}x{self.width}{crop})"

    # ---- images -> ids ----

    def to_rgb(self, images) -> np.ndarray:
        """Images in any accepted form -> uint8 [B, H, W, 3], cropped (if center_crop) and resized."""
        if (  # already a uint8 [B, H, W, 3] batch at the target size, and a crop would keep it whole
            isinstance(images, np.ndarray)
            and images.dtype == np.uint8
            and images.ndim == 4
            and images.shape[1:] == (self.height, self.width, 3)
            and len(images)
            and (not self.center_crop or self.height == self.width)
        ):
            return np.ascontiguousarray(images)
        items = _as_list(images)
        check_memory(
            len(items) * self.height * self.width * 3,
            f"{len(items)} images at the processor's {self.height}x{self.width}",
            "encode fewer images at a time",
        )
        out = np.empty((len(items), self.height, self.width, 3), dtype=np.uint8)
        for i, item in enumerate(items):
            what = f"image {i}" if len(items) > 1 else "image"
            out[i] = self._resize(_load_rgb(item, what))
        return out

    def to_pixels(self, images) -> np.ndarray:
        """Images -> float32 [B, H, W, 3] in [-1, 1], as the model's palette sees them."""
        return UINT8_TO_UNIT[self.to_rgb(images)]

    def encode(self, images) -> torch.Tensor:
        """Images -> token ids, torch.long [B, H*W] in raster order (no SOS)."""
        rgb = self.to_rgb(images)
        ids = self.palette.encode(rgb)  # (B, H, W), quantised over the whole batch at once
        return torch.from_numpy(ids).reshape(len(rgb), self.height * self.width)

    __call__ = encode

    def decode(self, ids) -> np.ndarray:
        """Token ids [B, H*W] or [B, H, W] (or one image's [H*W]) -> uint8 images [B, H, W, 3]."""
        array = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        pixels = self.height * self.width
        if array.ndim == 1 and array.shape[0] == pixels:
            array = array[None]
        if not (
            (array.ndim == 2 and array.shape[1] == pixels)
            or (array.ndim == 3 and array.shape[1:] == (self.height, self.width))
        ):
            raise ArgumentError(
                f"token ids of shape {tuple(array.shape)} do not fit {self.height}x{self.width} images: "
                f"expected [B, {pixels}] or [B, {self.height}, {self.width}] (without the SOS token)"
            )
        return self.palette.decode(array).reshape(len(array), self.height, self.width, 3)

    def _resize(self, rgb: np.ndarray) -> np.ndarray:
        if self.center_crop:
            h, w = rgb.shape[:2]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            rgb = rgb[top : top + side, left : left + side]
        if rgb.shape[:2] == (self.height, self.width):
            return rgb  # Pillow returns an unchanged copy at the same size
        # transformers' PIL backend: Image.fromarray(uint8 HWC).resize((W, H), resample), reducing_gap None
        image = Image.fromarray(np.ascontiguousarray(rgb))
        return np.asarray(image.resize((self.width, self.height), resample=self.resample))

    # ---- preprocessor_config.json ----

    def to_dict(self) -> dict:
        """The preprocessor_config.json fields, as transformers' ImageGPTImageProcessor writes them."""
        config = {
            "clusters": self.palette.to_list(),
            "do_color_quantize": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "ImageGPTImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "resample": self.resample,
            "rescale_factor": 1 / 255,
            "size": {"height": self.height, "width": self.width},
        }
        if self.center_crop:
            config[_CENTER_CROP_KEY] = True
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write directory/preprocessor_config.json, which transformers' ImageGPTImageProcessor also loads."""
        directory = Path(directory).expanduser()
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"{directory} is a file; save_pretrained writes a directory")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PROCESSOR_NAME
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, center_crop: bool | None = None) -> ImageProcessor:
        """Read preprocessor_config.json from a directory, the json file itself, or a Hub id (when online).

        center_crop: override the file's setting (transformers' files never set it: they do not crop).
        """
        file = _config_file(path)
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {file} as JSON: {e}") from e
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{file} holds a JSON {type(config).__name__}, not a processor config object"
            )
        processor = cls.from_dict(config, source=str(file))
        if center_crop is not None:
            processor.center_crop = bool(center_crop)
        return processor

    @classmethod
    def from_dict(cls, config: dict, source: str = "the processor config") -> ImageProcessor:
        """Build from preprocessor_config.json fields; refuse any setting that would change the tokens."""

        def refuse(reason: str) -> ConfigError:
            return ConfigError(f"{source}: {reason}; imagegpt's processor cannot honour it")

        def get(key: str, default):  # transformers reads a null field as its default
            value = config.get(key)
            return default if value is None else value

        if config.get("clusters") is None:
            raise refuse("no 'clusters' (the palette), so this is not an ImageGPT processor config")
        try:
            palette = Palette(np.asarray(config["clusters"], dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise refuse(f"bad 'clusters': {e}") from e
        if not get("do_color_quantize", True):
            raise refuse("do_color_quantize is false (it asks for pixel values, not tokens)")
        if not get("do_resize", True):
            raise refuse("do_resize is false (images would keep their own sizes and token counts)")
        if config.get("do_center_crop"):
            raise refuse("do_center_crop is true (transformers' ImageGPT backends disagree on it)")
        # The normalisation must be the released models': u8 * (1/255), then (x - 0.5) / 0.5, i.e. [-1, 1].
        rescale, factor = get("do_rescale", True), get("rescale_factor", 1 / 255)
        normalize, mean, std = get("do_normalize", True), get("image_mean", 0.5), get("image_std", 0.5)
        if not (rescale and _close(factor, 1 / 255) and normalize and _close(mean, 0.5) and _close(std, 0.5)):
            raise refuse(
                f"its normalisation (do_rescale={rescale}, rescale_factor={factor}, "
                f"do_normalize={normalize}, image_mean={mean}, image_std={std}) does not map pixels to "
                "[-1, 1] as the palette expects"
            )
        size = get("size", {"height": 256, "width": 256})  # transformers' default
        if isinstance(size, int) and config.get("default_to_square") is False:
            raise refuse(f"size {size} with default_to_square false resizes the shortest edge only")
        if isinstance(size, dict):
            given = {k: v for k, v in size.items() if v is not None}
            if set(given) != {"height", "width"}:
                raise refuse(f"size {size} is not a fixed height and width")
            size = (given["height"], given["width"])
        try:
            size = _size(size)
            resample = _resample(get("resample", 2))
        except ConfigError as e:
            raise refuse(str(e)) from e
        for key, value in config.items():
            if key.startswith("do_") and value and key not in _SWITCHES:
                raise refuse(f"{key} is true")
        return cls(palette, size, center_crop=bool(config.get(_CENTER_CROP_KEY, False)), resample=resample)


# ---- configuration helpers ----


def _size(size) -> tuple[int, int]:
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, tuple | list)
        or len(size) != 2
        or not all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        raise ConfigError(f"size must be a positive int or (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _resample(resample) -> int:
    if isinstance(resample, str) and resample.lower() in RESAMPLE:
        return RESAMPLE[resample.lower()]
    if (
        isinstance(resample, int | np.integer)
        and not isinstance(resample, bool)
        and resample in RESAMPLE.values()
    ):
        return int(resample)
    raise ConfigError(f"resample must be one of {', '.join(RESAMPLE)} (or Pillow's 0-5), got {resample!r}")


def _close(value, target: float) -> bool:
    values = value if isinstance(value, list | tuple) else [value] * 3
    return len(values) == 3 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and abs(v - target) <= 1e-9 * target
        for v in values
    )


def _config_file(path) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise ArgumentError(
            f"expected a directory, a preprocessor_config.json or a Hub id, got {type(path).__name__}"
        )
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / PROCESSOR_NAME).is_file():
            raise CheckpointError(
                f"{path} has no {PROCESSOR_NAME}; pass a model directory saved with a processor, or build "
                "one with ImageProcessor(palette, size)"
            )
        return local / PROCESSOR_NAME
    if local.is_file():
        return local
    name = hub_id(path, f"a directory holding {PROCESSOR_NAME}, or the json itself")
    from huggingface_hub import hf_hub_download

    try:
        with quiet():
            return Path(hf_hub_download(name, PROCESSOR_NAME))
    except Exception as e:  # any failure to fetch (offline, unknown id, no such file) is the user's to fix
        raise fetch_error(path, e) from e


# ---- reading images ----


def _as_list(images) -> list:
    """A single image, a list/tuple of images, or a 4-D batch -> a list of single images."""
    if isinstance(images, list | tuple):
        if len(images) == 0:
            raise ImageInputError("no images: got an empty list; pass at least one image")
        items = []
        for item in images:
            items.extend(_split_batch(item) if _is_batch(item) else [item])
        return items
    if _is_batch(images):
        return _split_batch(images)
    return [images]


def _is_batch(item) -> bool:
    return isinstance(item, np.ndarray | torch.Tensor) and item.ndim == 4


def _split_batch(batch) -> list:
    if len(batch) == 0:
        raise ImageInputError(f"no images: got an empty batch of shape {tuple(batch.shape)}")
    return list(batch)


def _load_rgb(item, what: str) -> np.ndarray:
    """One image in any accepted form -> contiguous uint8 [H, W, 3]."""
    if isinstance(item, str | os.PathLike):
        return _read_file(item, what)
    if isinstance(item, Image.Image):
        return pil_to_rgb(item, what)
    if isinstance(item, torch.Tensor):
        tensor = item.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return array_to_rgb(tensor.numpy(), what, channels_first=True)
    if isinstance(item, np.ndarray):
        return array_to_rgb(item, what, channels_first=False)
    raise ImageInputError(
        f"{what}: cannot read an image from a {type(item).__name__}; pass a file path, a PIL image, a numpy "
        "array or a torch tensor (or a list of them)"
    )


def _read_file(path: str | os.PathLike, what: str) -> np.ndarray:
    file = Path(path).expanduser()
    if not file.exists():
        raise ImageInputError(f"{what}: no such file: {path}")
    if file.is_dir():
        raise ImageInputError(
            f"{what}: {path} is a directory; pass image files (imagegpt.data.load_dataset reads folders)"
        )
    if not file.is_file():  # reading a pipe would wait for a writer forever
        raise ImageInputError(f"{what}: {path} is not a regular file (a device, pipe or socket)")
    try:
        with Image.open(file) as image:
            return pil_to_rgb(ImageOps.exif_transpose(image), what)
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageInputError(
            f"{what}: cannot read {path} as an image ({e}); is it a PNG, JPEG or similar?"
        ) from e
