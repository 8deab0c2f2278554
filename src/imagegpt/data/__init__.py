"""Datasets: built-in ones that need no download, users' data detected from a path, and the token cache.

    from imagegpt.data import load_dataset
    train = load_dataset("shapes", split="train", n=100, resolution=16)
    train.images.shape, train.labels.shape, train.class_names[:2]  # (80, 16, 16, 3) (80,) ['circle', 'ring']

`load_dataset(spec, split, seed, **options)`: spec is a built-in name or a path (a built-in name wins over a
folder of the same name; write ./digits for the folder). Formats (details in each reader's module):

| spec | what | official split | labels |
|---|---|---|---|
| `digits` | scikit-learn's 8x8 digits (1,797) | no | digit 0-9 |
| `shapes` | generated; options n=6000, resolution=32 | no | shape (6) |
| `photos` | crops of 10 bundled photos; n=6000, resolution=32 | by tile | photo |
| `*.tar.gz`, `cifar-10-batches-py/`, `cifar-100-python/` | CIFAR; labels=fine/coarse | train/test | class |
| `train-images-idx3-ubyte[.gz]` & co., or their folder | MNIST-style IDX | train/test | class |
| a folder of images | class subfolders, or flat; resolution=None | train/val/test folders | subfolder |
| `*.npy`, `*.npz` | arrays (imagegpt.data.arrays) | x_train/x_test keys | y, labels |

Splits: "train", "val", "test", or "all" (everything). With an official train/test split, val is a seeded
hold-out of the official training set (val_fraction of it, default 0.1) and test is the official test set.
Without one, the data is cut by a seeded permutation into train/val/test (val_fraction, test_fraction, default
0.1 each: 80/10/10). The same seed always gives the same, disjoint splits; `seed` also seeds generated data.

Options every source takes: val_fraction, test_fraction, and limit (a seeded random subset of the split, at
most `limit` images, in the split's order). An option given as None counts as not given.

Images are uint8 [N, H, W, 3] RGB (grey levels repeated over 3 channels), except for image folders, whose
images are decoded lazily at their own sizes (ImageFiles; the processor resizes them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, DataError
from .arrays import load_arrays
from .builtin import BUILTINS, GENERATED, load_digits, load_photos, load_shapes
from .cache import fit_palette, sample_pixels, token_cache
from .cifar import is_cifar, load_cifar
from .dataset import (
    LIMIT_STREAM,
    SPLITS,
    ImageDataset,
    ImageFiles,
    check_fraction,
    check_options,
    check_positive_int,
    check_split,
)
from .folder import load_folder
from .idx import is_idx, load_idx

__all__ = [
    "BUILTINS",
    "GENERATED",
    "SPLITS",
    "ImageDataset",
    "ImageFiles",
    "detect_format",
    "fit_palette",
    "load_dataset",
    "sample_pixels",
    "token_cache",
]

SUPPORTED = (
    "a built-in name (digits, shapes, photos), a CIFAR python archive (.tar.gz) or folder, MNIST-style IDX"
    " files (or their folder), a folder of images (one subfolder per class, or flat), or a .npy/.npz file"
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def detect_format(path: Path) -> str:
    """'cifar', 'idx', 'folder' or 'arrays' for an existing path; DataError when it is none of them."""
    name = path.name.lower()
    if path.is_dir():
        if is_cifar(path):
            return "cifar"
        for sub in ("cifar-10-batches-py", "cifar-100-python"):  # the folder the archive was extracted into
            if (path / sub).is_dir() and is_cifar(path / sub):
                return "cifar"
        if is_idx(path):
            return "idx"
        return "folder"
    if name.endswith((".npy", ".npz")):
        return "arrays"
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "cifar"
    if is_idx(path):
        return "idx"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise DataError(f"{path} is a single image; put the images in a folder and give the folder")
    raise DataError(f"cannot tell the format of {path}; supported: {SUPPORTED}")


def _identity(path: Path) -> str:
    """A short fingerprint of a file's size and modification time, so that caches notice a replaced file."""
    stats = [path.stat()] if path.is_file() else [p.stat() for p in sorted(path.iterdir()) if p.is_file()]
    key = ";".join(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)
    return "#" + hashlib.sha1(key.encode()).hexdigest()[:12]


def load_dataset(spec: str | Path, split: str = "train", seed: int = 0, **options) -> ImageDataset:
    """A dataset from a built-in name or a path; see the module docstring for formats, splits and options."""
    check_split(split)
    seed = check_positive_int("seed", seed, minimum=0)
    options = {k: v for k, v in options.items() if v is not None}
    val_fraction = check_fraction("val_fraction", options.pop("val_fraction", 0.1))
    test_fraction = check_fraction("test_fraction", options.pop("test_fraction", 0.1))
    limit = options.pop("limit", None)
    if limit is not None:
        limit = check_positive_int("limit", limit)
    common = dict(split=split, seed=seed, val_fraction=val_fraction)

    if isinstance(spec, str) and spec in BUILTINS:
        loader = {"digits": load_digits, "shapes": load_shapes, "photos": load_photos}[spec]
        allowed = {"digits": {}, "photos": {"n": 6000, "resolution": 32}}.get(
            spec, {"n": 6000, "resolution": 32, "colour": "random"}
        )
        dataset = loader(test_fraction=test_fraction, **common, **check_options(spec, options, allowed))
    else:
        if not isinstance(spec, (str, Path)):
            raise ArgumentError(f"a dataset is a built-in name or a path, got {type(spec).__name__}")
        path = Path(spec).expanduser()
        if not path.exists():
            raise DataError(f"no such file or folder: {spec}; give {SUPPORTED}")
        if not path.is_dir() and not path.is_file():  # reading a pipe would wait for a writer forever
            raise DataError(f"{spec} is not a regular file or a folder (a device, a pipe); give {SUPPORTED}")
        path = path.resolve()
        kind = detect_format(path)
        if kind == "cifar":
            if path.is_dir() and not is_cifar(path):
                path = next(
                    path / s for s in ("cifar-10-batches-py", "cifar-100-python") if is_cifar(path / s)
                )
            options = check_options("a CIFAR dataset", options, {"labels": None})
            dataset = load_cifar(path, identity=_identity(path), **common, **options)
        elif kind == "idx":
            check_options("an IDX dataset", options, {})
            identity = _identity(path.parent if path.is_file() else path)  # the images file and its labels
            dataset = load_idx(path, test_fraction=test_fraction, identity=identity, **common)
        elif kind == "arrays":
            check_options("an array file", options, {})
            dataset = load_arrays(path, test_fraction=test_fraction, identity=_identity(path), **common)
        else:
            options = check_options("an image folder", options, {"resolution": None})
            dataset = load_folder(path, test_fraction=test_fraction, **common, **options)

    if limit is not None and limit < len(dataset):
        rng = np.random.default_rng([seed, LIMIT_STREAM])
        index = np.sort(rng.choice(len(dataset), size=limit, replace=False))
        subset = dataset[index]
        dataset = ImageDataset(
            subset.images, subset.labels, subset.class_names, f"{dataset.name}[limit={limit}]"
        )
    return dataset
