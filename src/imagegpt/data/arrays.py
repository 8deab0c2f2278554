"""Images stored as numpy arrays: `.npy` (images only) or `.npz` (images, labels, optionally splits).

Images may be (N, H, W, 3), (N, H, W) grey, or (N, 3, H, W); uint8 (or any integers in 0..255), booleans, or
floats in [0, 1]. A fourth (alpha) channel is composited onto white, as the image processor does.

`.npz` keys:
- `images` or `x` (also `X`, `data`), with optional `labels` or `y` (also `Y`, `targets`) and `class_names`:
  one unsplit set, cut into a seeded train/val/test split (default 80/10/10);
- or official splits, Keras-style: `x_train`/`y_train`, `x_test`/`y_test`, optionally `x_val`/`y_val`
  (`images_train`/`labels_train`, ... also work). A missing val split is held out of train.
- an archive with a single array uses it as the images.

Arrays are loaded with allow_pickle=False, so an .npy/.npz cannot run code. An .npz is read member by
member, each header first: an array of Python objects is refused as in an .npy, and an array too large for
memory before it is decompressed.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..limits import check_memory
from .dataset import ImageDataset, check_labels, empty_split_error, split_indices, to_rgb_uint8

IMAGE_KEYS, LABEL_KEYS = ("images", "x", "X", "data"), ("labels", "y", "Y", "targets")


def _load(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """An .npy as a memory-mapped array, an .npz as {key: array}."""
    try:
        if zipfile.is_zipfile(path):
            return _read_npz(path)
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"cannot load {path} without pickle ({e}); save plain numeric arrays") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                    version, np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(f)
                if dtype.hasobject:
                    raise DataError(
                        f"cannot load {path} without pickle (array {key!r} holds Python objects); save plain "
                        "numeric arrays"
                    )
                size = math.prod(shape) * dtype.itemsize
                check_memory(size, f"array {key!r} of {path} ({shape}, {dtype})", "save smaller arrays")
            with archive.open(info) as f:
                try:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
                except ValueError as e:
                    raise DataError(f"array {key!r} of {path} is truncated or damaged ({e})") from e
    return arrays


def _labels(array, n: int, what: str) -> np.ndarray:
    labels = np.asarray(array).reshape(-1) if np.ndim(array) == 2 and min(np.shape(array)) == 1 else array
    labels = np.asarray(labels)
    if labels.shape != (n,) or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"{what}: labels must be N={n} integers, got {labels.dtype} of shape {labels.shape}")
    return check_labels(labels, what)


def _split_key(keys, stems, split: str) -> str | None:
    for stem in stems:
        for key in (f"{stem}_{split}", f"{split}_{stem}"):
            if key in keys:
                return key
    return None


def load_arrays(
    path: Path, split: str, seed: int, val_fraction: float, test_fraction: float, identity: str = ""
):
    data = _load(path)
    class_names = None
    if isinstance(data, np.ndarray):  # .npy
        x, y, official = data, None, None
    else:
        keys = set(data)
        if "class_names" in keys:
            class_names = [str(n) for n in data["class_names"].reshape(-1)]
        image_key = next((k for k in IMAGE_KEYS if k in keys), None)
        label_key = next((k for k in LABEL_KEYS if k in keys), None)
        splits = {s: _split_key(keys, ("x", "images"), s) for s in ("train", "val", "test")}
        official = None
        if image_key is None and splits["train"] and (splits["test"] or splits["val"]):
            official = {}
            for s, key in splits.items():
                if key is not None:
                    labels_key = _split_key(keys, ("y", "labels"), s)
                    official[s] = (data[key], None if labels_key is None else data[labels_key])
            x = y = None
        elif image_key is None and len(keys - {"class_names"}) == 1:
            x, y = data[next(iter(keys - {"class_names"}))], None
        elif image_key is None:
            raise DataError(
                f"{path} has arrays {sorted(keys)}; name the images 'images' or 'x' (labels 'labels' or"
                " 'y'), or give splits as x_train/y_train and x_test/y_test"
            )
        else:
            x, y = data[image_key], None if label_key is None else data[label_key]

    if official is None:
        images = to_rgb_uint8(x, str(path))
        all_labels = None if y is None else _labels(y, len(images), str(path))
        index = split_indices(len(images), split, seed, val_fraction, test_fraction)
        images, labels = images[index], None if all_labels is None else all_labels[index]
        every_label = [all_labels]
    else:
        parts = {}
        for s, (xs, ys) in official.items():
            xs = to_rgb_uint8(xs, f"{path} ({s})")
            parts[s] = (xs, None if ys is None else _labels(ys, len(xs), f"{path} ({s})"))
        if len({y is None for _, y in parts.values()}) > 1:
            raise DataError(f"{path}: labels for some splits but not all; give y_SPLIT for each x_SPLIT")
        if len({x.shape[1:] for x, _ in parts.values()}) > 1:
            raise DataError(f"{path}: splits of different image sizes {[x.shape for x, _ in parts.values()]}")
        chosen = []
        for s in ("train", "val", "test") if split == "all" else (split,):
            if s in parts and (s != "train" or len(parts) == 3):
                chosen.append(parts[s])
            else:  # held out of train
                x, y = parts["train"]
                fractions = (
                    0.0 if "val" in parts else val_fraction,
                    0.0 if "test" in parts else test_fraction,
                )
                index = split_indices(len(x), s, seed, *fractions)
                chosen.append((x[index], None if y is None else y[index]))
        images = np.concatenate([c[0] for c in chosen])
        labels = None if chosen[0][1] is None else np.concatenate([c[1] for c in chosen])
        every_label = [y for _, y in parts.values()]
    if len(images) == 0:
        raise empty_split_error(str(path), split)
    if labels is None:
        class_names = None
    elif class_names is None:  # named from every split's labels, so that all splits agree
        class_names = [str(i) for i in range(max(int(v.max(initial=0)) for v in every_label) + 1)]
    elif max(int(v.max(initial=0)) for v in every_label) >= len(class_names):
        raise DataError(
            f"{path}: labels reach {labels.max()} but there are only {len(class_names)} class_names"
        )
    options = f"seed={seed},val_fraction={val_fraction},test_fraction={test_fraction}"
    return ImageDataset(images, labels, class_names, f"arrays:{path}{identity}({options}):{split}")
