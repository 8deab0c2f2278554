"""The token cache (tokenise a dataset once, keep the ids as a uint16 memmap); pixel sampling for palettes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ArgumentError, ConfigError, DataError
from ..files import check_output
from ..limits import check_disk
from ..palette import MAX_CLUSTERS, Palette
from .dataset import ImageDataset, ImageFiles, check_positive_int

CACHE_VERSION = 1


def cache_path(dataset: ImageDataset, processor, cache_dir: str | Path) -> Path:
    """Where token_cache keeps this dataset's ids for this processor (resolution, palette, crop, filter)."""
    key = {
        "version": CACHE_VERSION,
        "dataset": dataset.name,
        "size": [int(processor.height), int(processor.width)],
        "palette": processor.palette.fingerprint(),
        "center_crop": bool(getattr(processor, "center_crop", False)),
        "resample": getattr(processor, "resample", None),
        "n": len(dataset),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", dataset.name.split("(")[0]).strip("_")[-48:]
    return Path(cache_dir) / f"{slug}-{processor.height}x{processor.width}-{digest}.npy"


def _default_batch_size(dataset: ImageDataset, pixels: int) -> int:
    if isinstance(dataset.images, ImageFiles) and dataset.images.resolution is None:
        return 32  # images at their own sizes: a few megapixels each before the processor resizes them
    return max(1, min(4096, 2**20 // pixels))  # 1M pixels a batch: 12 MB as float32 RGB


def token_cache(
    dataset: ImageDataset,
    processor,
    cache_dir: str | Path,
    batch_size: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The dataset's token ids as a read-only uint16 memmap [N, H*W], tokenised once and cached on disk.

    The cache file is keyed by dataset.name (which includes the source, options, seed and split), the
    processor's resolution, cropping and resampling filter, and palette.fingerprint(): a re-run with the same
    data and palette reads the file instead of quantising again. The file is written to a temporary name and
    renamed into place, so an interrupted run never leaves a partial cache behind.
    """
    clusters = len(processor.palette)
    if clusters > MAX_CLUSTERS:
        raise ConfigError(
            f"the token cache stores uint16 ids: at most {MAX_CLUSTERS} clusters, got {clusters}"
        )
    pixels = int(processor.height) * int(processor.width)
    check_output(cache_dir, directory=True, what="the token cache folder")
    path = cache_path(dataset, processor, cache_dir)
    if path.exists():
        try:
            tokens = np.load(path, mmap_mode="r")
            if tokens.dtype == np.uint16 and tokens.shape == (len(dataset), pixels):
                return tokens
        except (OSError, ValueError):
            pass  # unreadable: rebuilt below
    batch_size = batch_size or _default_batch_size(dataset, pixels)
    batch_size = check_positive_int("batch_size", batch_size)
    check_disk(
        len(dataset) * pixels * 2,
        path.parent,
        f"the token ids of {len(dataset)} images of {pixels} tokens",
        "free some space, or give another --cache-dir",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tokens = np.lib.format.open_memmap(
            temporary, mode="w+", dtype=np.uint16, shape=(len(dataset), pixels)
        )
        starts = range(0, len(dataset), batch_size)
        if progress:
            starts = tqdm(starts, desc=f"tokenising {dataset.name}", unit="batch")
        for start in starts:
            stop = min(start + batch_size, len(dataset))
            ids = processor.encode(dataset.batch(start, stop))
            ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
            if ids.shape != (stop - start, pixels):
                raise ValueError(f"processor.encode returned {ids.shape}, expected {(stop - start, pixels)}")
            if ids.size and (ids.min() < 0 or ids.max() >= clusters):
                raise ValueError(f"processor.encode returned ids outside [0, {clusters})")
            tokens[start:stop] = ids
        tokens.flush()
        del tokens
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return np.load(path, mmap_mode="r")


def sample_pixels(dataset: ImageDataset, n: int, seed: int = 0, max_images: int = 512) -> np.ndarray:
    """n pixels (n, 3) uint8 drawn uniformly, with replacement, from the dataset's images: to fit a palette.

    Pixels come from the images as stored (their native resolution), not resized as the processor would: for
    the built-in sets, which are generated at the training resolution, the two are the same. For an image
    folder at native sizes, pixels come from at most max_images images chosen at random, an equal share from
    each.
    """
    n = check_positive_int("n", n)
    if len(dataset) == 0:
        raise DataError(f"cannot sample pixels from the empty dataset {dataset.name}")
    rng = np.random.default_rng(seed)
    images = dataset.images
    if isinstance(images, np.ndarray):
        N, H, W, _ = images.shape
        flat = rng.integers(0, N * H * W, n)
        index, rest = np.divmod(flat, H * W)
        order = np.argsort(index, kind="stable")  # read a memmap in file order
        pixels = np.empty((n, 3), dtype=np.uint8)
        pixels[order] = images[index[order], rest[order] // W, rest[order] % W]
        return pixels
    if max_images < 1:
        raise ArgumentError(f"max_images must be >= 1, got {max_images}")
    chosen = rng.choice(len(images), size=min(len(images), max_images), replace=False)
    share = -(-n // len(chosen))  # ceil
    parts = []
    for i in chosen:
        image = images[int(i)]
        flat = rng.integers(0, image.shape[0] * image.shape[1], share)
        parts.append(image.reshape(-1, 3)[flat])
    pixels = np.concatenate(parts)
    return pixels[rng.permutation(len(pixels))[:n]]


def fit_palette(dataset: ImageDataset, clusters: int, pixels: int = 100_000, seed: int = 0) -> Palette:
    """k-means on `pixels` pixels drawn at random from the dataset's images (palette fit, train, demo)."""
    return Palette.fit(sample_pixels(dataset, pixels, seed=seed), clusters=clusters, seed=seed)
