"""MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST, ...), gzipped or raw.

Files are recognised by name: `{prefix}{train|t10k|test}-{images|labels}{-|.}idx{N}-ubyte[.gz]`, as the
official downloads and their common re-packagings name them. A folder, or any one of the files, can be given.

Splits, with both train and test files present: the official training images are cut into train and a seeded
val hold-out (val_fraction, default 10%); test is the official test set. With only one images file, it is cut
into a seeded train/val/test split (default 80/10/10). Labels are read when the matching labels file exists.
"""

from __future__ import annotations

import gzip
import math
import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..limits import check_memory
from .dataset import ImageDataset, check_labels, empty_split_error, split_indices, to_rgb_uint8

IDX_NAME = re.compile(
    r"^(?P<prefix>.*?)(?P<split>train|t10k|test)-(?P<kind>images|labels)[.-]idx(?P<ndim>\d)-ubyte(?P<gz>\.gz)?$"
)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag"]
FASHION_CLASSES.append("Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: 2 zero bytes, a dtype code, the number of dimensions, big-endian uint32 sizes.

    The header is read first and the data only as far as it promises, so a gzip that inflates past it (or a
    header promising more than memory holds) is refused without decompressing the rest."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
                raise DataError(
                    f"{path} is not an IDX file: its header {head.hex(' ')} should be 00 00, a dtype code"
                    f" ({', '.join(f'{c:02x}' for c in IDX_DTYPES)}) and the number of dimensions"
                )
            dtype, ndim = np.dtype(IDX_DTYPES[head[2]]), head[3]
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header ({4 + len(sizes)} bytes, {ndim} dimensions)")
            shape = tuple(int(d) for d in np.frombuffer(sizes, dtype=">u4"))
            expected = math.prod(shape) * dtype.itemsize
            check_memory(expected, f"{path} (shape {shape} of {dtype.name})", "is the header damaged?")
            raw = f.read(expected + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) != expected:
        raise DataError(
            f"{path}: the header promises shape {shape} of {dtype.name} ({expected} bytes of data) but the"
            f" file holds {'more' if len(raw) > expected else len(raw)}; it is truncated or damaged"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def idx_files(folder: Path) -> dict[tuple[str, str], Path]:
    """{(split, kind): path} of a folder's IDX files; split: 'train' or 'test', kind: 'images' or 'labels'."""
    found = {}
    for path in sorted(folder.iterdir()):
        match = IDX_NAME.match(path.name)
        if match and path.is_file():
            split = "train" if match["split"] == "train" else "test"
            found.setdefault((split, match["kind"]), path)
    return found


def is_idx(path: Path) -> bool:
    if path.is_dir():
        return any(kind == "images" for _, kind in idx_files(path))
    if IDX_NAME.match(path.name):
        return True
    try:  # a file named otherwise: sniff the header
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(4)
    except (OSError, EOFError):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in IDX_DTYPES and 1 <= head[3] <= 4


def _read_images(path: Path) -> np.ndarray:
    images = read_idx(path)
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: IDX images must have 3 dimensions (N, H, W), found shape {images.shape}")
    return to_rgb_uint8(images, str(path))


def _read_labels(path: Path | None, n: int) -> np.ndarray | None:
    if path is None:
        return None
    labels = read_idx(path)
    if labels.shape != (n,):
        raise DataError(f"{path}: {labels.shape} labels for {n} images; the labels file does not match")
    return check_labels(labels, str(path))


def load_idx(
    path: Path, split: str, seed: int, val_fraction: float, test_fraction: float, identity: str = ""
):
    """IDX images (and labels) from a folder or one of its files."""
    folder = path if path.is_dir() else path.parent
    files = idx_files(folder)
    match = None if path.is_dir() else IDX_NAME.match(path.name)
    if not path.is_dir() and (match is None or match["kind"] != "images"):
        if match is not None:  # a labels file: use its images
            raise DataError(f"{path} is a labels file; give the images file or the folder holding both")
        images = _read_images(path)  # an IDX images file with a name of its own: no labels, no official split
        index = split_indices(len(images), split, seed, val_fraction, test_fraction)
        name = f"idx:{path}{identity}(seed={seed},val_fraction={val_fraction},test_fraction={test_fraction})"
        return ImageDataset(images[index], None, None, f"{name}:{split}")
    if ("train", "images") not in files and ("test", "images") not in files:
        raise DataError(f"no IDX images files (train-images-idx3-ubyte[.gz], t10k-...) in {folder}")

    has_official_split = ("train", "images") in files and ("test", "images") in files
    parts = {}
    for part in ("train", "test"):
        if (part, "images") in files:
            x = _read_images(files[(part, "images")])
            parts[part] = (x, _read_labels(files.get((part, "labels")), len(x)))
    if has_official_split:
        (x, y), (x_test, y_test) = parts["train"], parts["test"]
        if (y is None) != (y_test is None):
            raise DataError(f"{folder}: labels for only one of train/test; add the missing labels file")
        chosen = []
        if split != "test":
            index = split_indices(len(x), split, seed, val_fraction, 0.0, True)
            chosen.append((x[index], None if y is None else y[index]))
        if split in ("test", "all"):
            chosen.append((x_test, y_test))
        images = np.concatenate([c[0] for c in chosen])
        labels = None if y is None else np.concatenate([c[1] for c in chosen])
        options = f"seed={seed},val_fraction={val_fraction}"
    else:
        ((x, y),) = parts.values()
        index = split_indices(len(x), split, seed, val_fraction, test_fraction)
        images, labels = x[index], None if y is None else y[index]
        options = f"seed={seed},val_fraction={val_fraction},test_fraction={test_fraction}"
    if len(images) == 0:
        raise empty_split_error(str(folder), split)
    class_names = None
    if labels is not None:  # named from every split's labels, so that all splits agree
        n_classes = max(int(y.max(initial=0)) for _, y in parts.values()) + 1
        fashion = "fashion" in str(folder.resolve()).lower() and n_classes <= 10
        class_names = list(FASHION_CLASSES) if fashion else [str(i) for i in range(n_classes)]
    return ImageDataset(images, labels, class_names, f"idx:{folder}{identity}({options}):{split}")
