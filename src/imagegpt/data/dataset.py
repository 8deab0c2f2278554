"""ImageDataset, the lazy image-file sequence behind folders, and the pieces every reader shares: arrays to
uint8 RGB, seeded splits, and option checking."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ArgumentError, DataError, ImageInputError
from ..limits import check_memory
from ..pixels import over_white, pil_to_rgb, to_uint8

SPLITS = ("train", "val", "test", "all")
# Labels are class numbers 0..K-1; a label past this is a damaged file, not a dataset (class names for every
# number below it would be built).
MAX_CLASSES = 1_000_000
# Separate random streams for generating data and for splitting it, so that one never shifts the other.
GENERATE_STREAM, SPLIT_STREAM, LIMIT_STREAM = 0, 1, 2


class ImageFiles(Sequence):
    """Images decoded from files on access: a folder of 50k photos costs file names, not gigabytes.

    Each item is a uint8 [H, W, 3] RGB array; with `resolution`, the shorter side is resized to it and the
    centre cropped to a square, otherwise images keep their own sizes (the processor resizes them).
    """

    def __init__(self, paths: Sequence[str | Path], resolution: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ImageFiles(self.paths[index], self.resolution)
        if isinstance(index, (int, np.integer)):
            return read_image(self.paths[index], self.resolution)
        return ImageFiles([self.paths[i] for i in np.asarray(index).reshape(-1)], self.resolution)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, resolution={self.resolution})"


def read_image(path: Path, resolution: int | None = None) -> np.ndarray:
    """One image file -> uint8 [H, W, 3] RGB; EXIF rotation applied, transparency composited onto white."""
    try:
        with Image.open(path) as image:
            if resolution is not None and image.format == "JPEG":
                image.draft("RGB", (resolution, resolution))  # decode at a reduced DCT scale: much faster
            image = ImageOps.exif_transpose(image)
            rgb = pil_to_rgb(image, str(path))  # as the processor reads it: 16-bit, float, transparency
            if resolution is None:
                return rgb
            image = ImageOps.fit(Image.fromarray(rgb), (resolution, resolution), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"cannot read image {path}: {e}; remove or replace the file") from e


@dataclass(eq=False)
class ImageDataset:
    """Images with optional labels.

    images: uint8 [N, H, W, 3] RGB, or an ImageFiles sequence of uint8 [H, W, 3] arrays (image folders).
    labels: int64 [N] in [0, len(class_names)), or None for unlabelled data.
    class_names: one name per label, or None.
    name: a stable identifier of source, options, seed and split; token caches are keyed by it.

    `dataset[i]` is (image, label or None); `dataset[slice or indices]` is a sub-dataset whose name records
    the selection, so `dataset[rank::world_size]` is one rank's shard.
    """

    images: np.ndarray | ImageFiles
    labels: np.ndarray | None
    class_names: list[str] | None
    name: str

    def __post_init__(self):
        if isinstance(self.images, np.ndarray):
            if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
                raise ValueError(
                    f"images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}"
                )
        elif not isinstance(self.images, ImageFiles):
            raise TypeError(f"images must be a numpy array or ImageFiles, got {type(self.images).__name__}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.images),):
                raise ValueError(f"{len(self.images)} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            label = None if self.labels is None else int(self.labels[index])
            return self.images[index], label
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            selection = f"[{start}:{stop}:{step}]"
        else:
            index = np.asarray(index, dtype=np.int64).reshape(-1)
            selection = "[" + hashlib.sha1(index.tobytes()).hexdigest()[:12] + "]"
        return ImageDataset(
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            class_names=self.class_names,
            name=self.name + selection,
        )

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names is not None else int(self.labels.max(initial=-1)) + 1

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) when every image has the same size, None for a folder of images of their own sizes."""
        if isinstance(self.images, np.ndarray):
            return tuple(self.images.shape[1:3])
        if self.images.resolution is not None:
            return (self.images.resolution, self.images.resolution)
        return None

    def batch(self, start: int, stop: int) -> np.ndarray | list[np.ndarray]:
        """Images start..stop as one uint8 [B, H, W, 3] array, or a list when their sizes differ."""
        if isinstance(self.images, np.ndarray):
            return np.ascontiguousarray(self.images[start:stop])
        images = [self.images[i] for i in range(start, min(stop, len(self)))]
        if images and all(im.shape == images[0].shape for im in images):
            return np.stack(images)
        return images

    def __repr__(self) -> str:
        size = "x".join(map(str, self.image_size)) if self.image_size else "variable size"
        labels = "unlabelled" if self.labels is None else f"{self.num_classes} classes"
        return f"ImageDataset({self.name!r}, {len(self)} images, {size}, {labels})"


def to_rgb_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Images as [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1, 3, 4 -> uint8 [N, H, W, 3].

    Integers must lie in 0..255 and floats in [0, 1] (scaled by 255); booleans become 0/255; an alpha channel
    is composited onto white, as image files and the processor do.
    """
    array = np.asarray(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataError(f"{what}: images have dtype {array.dtype}; expected uint8, or floats in [0, 1]")
    if array.ndim == 4:  # channels first -> channels last; 3 channels decide first, then 1 or 4
        last, first = array.shape[-1], array.shape[1]
        if (last != 3 and first == 3) or (last not in (1, 3, 4) and first in (1, 4)):
            array = array.transpose(0, 2, 3, 1)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{what}: images of shape {array.shape}; expected (N, H, W), (N, H, W, 3) or (N, 3, H, W)"
            " (1 or 4 channels also work)"
        )
    if array.shape[0] == 0:
        raise DataError(f"{what}: contains no images (shape {array.shape})")
    n, height, width = array.shape[:3]
    check_memory(n * height * width * 3, f"{what}: {n} images of {height}x{width}", "use fewer images")
    try:  # the processor's rules for pixel values
        array = to_uint8(array, what, sixteen_bit=False)
    except ImageInputError as e:
        raise DataError(str(e)) from e
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        array = over_white(array)
    return np.ascontiguousarray(array)


def check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    """Integer labels in [0, MAX_CLASSES) as int64; a DataError naming `what` otherwise."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= MAX_CLASSES):
        low, high = int(labels.min()), int(labels.max())
        raise DataError(
            f"{what}: labels must be class numbers 0..K-1 (K <= {MAX_CLASSES:,}), found {low}..{high}; the "
            "labels file is damaged or holds something else"
        )
    return labels.astype(np.int64)


def split_sizes(n: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, int, int]:
    """(train, val, test) sizes of n items; a positive fraction gets at least one item when n allows."""
    sizes = []
    for fraction in (val_fraction, test_fraction):
        size = int(round(n * fraction))
        sizes.append(max(size, 1) if fraction > 0 and n >= 3 else size)
    n_val, n_test = sizes
    if n - n_val - n_test < 1:
        raise DataError(
            f"cannot split {n} images with val_fraction={val_fraction}, test_fraction={test_fraction}:"
            " nothing is left for training; use smaller fractions or more images"
        )
    return n - n_val - n_test, n_val, n_test


def split_indices(
    n: int, split: str, seed: int, val_fraction: float, test_fraction: float, has_test: bool = False
) -> np.ndarray:
    """Sorted indices of one split of n items under a seeded permutation.

    Without an official test set (has_test=False) the n items are cut into train/val/test; with one, n counts
    the official training items only and are cut into train/val (the test split is then the official one, read
    by the caller).
    """
    _, n_val, n_test = split_sizes(n, val_fraction, 0.0 if has_test else test_fraction)
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    if split == "all":
        return np.arange(n)
    return np.sort(parts[split])


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ArgumentError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def check_fraction(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"{name} must be a number in [0, 1), got {value!r}") from e
    if not 0 <= value < 1:
        raise ArgumentError(f"{name} must be in [0, 1), got {value}")
    return value


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_options(source: str, options: dict, allowed: dict) -> dict:
    """Fill defaults and refuse options this source does not take."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        names = ", ".join(sorted(allowed)) or "none"
        raise ArgumentError(
            f"{source} does not take option(s) {', '.join(unknown)}; its options are: {names}"
        )
    return {**allowed, **options}


def format_options(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(options.items()) if v is not None)


def empty_split_error(name: str, split: str) -> DataError:
    return DataError(
        f"the {split} split of {name} is empty; use more images or a larger val_fraction/test_fraction"
    )
