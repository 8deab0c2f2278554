"""CIFAR-10 and CIFAR-100 in their official python format: a .tar.gz archive or the extracted folder.

The batches are pickles, and a pickle can run any code when loaded. They are read with an unpickler that
admits only what numpy arrays and basic containers need, so a tampered archive is refused before anything
runs. Archives are read member by member in memory: nothing is extracted to disk.

Splits: the official 50,000 training images are cut into train and a seeded val hold-out (val_fraction,
default 10%: 45,000/5,000); test is the official 10,000 test images; all is train + val + test.
"""

from __future__ import annotations

import builtins
import codecs
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ..errors import ArgumentError, DataError
from .dataset import ImageDataset, empty_split_error, split_indices

CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_FILES = {*CIFAR10_TRAIN, "test_batch", "batches.meta"}
CIFAR100_FILES = {"train", "test", "meta"}
MAX_MEMBER_BYTES = 1 << 30  # the largest official file (CIFAR-100 train) is 155 MB


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):  # other codecs (zlib, bz2, ...) have no place in a CIFAR batch
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The callables a pickled numpy array (protocols 0-5, numpy 1.x or 2.x, Python 2 or 3) may name."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric

    allowed = {}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for name in (
        "bytes",
        "bytearray",
        "str",
        "int",
        "float",
        "complex",
        "bool",
        "list",
        "tuple",
        "dict",
        "set",
    ):
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)  # Py 3 / Py 2
    allowed[("builtins", "frozenset")] = frozenset
    allowed[("_codecs", "encode")] = _latin1_encode  # how Python 3 writes bytes in protocol 2
    return allowed


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and basic containers, and refuses to import anything else."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")  # the official files were written by Python 2
        self.source = source
        self.allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {self.source}: the file tries to import {module}.{name}; CIFAR archives"
                " contain only arrays, so this file is not a genuine CIFAR batch and may run code"
            ) from None

    def persistent_load(self, pid):
        raise DataError(
            f"refusing to load {self.source}: it uses persistent ids, which CIFAR batches never do"
        )


def safe_unpickle(data: bytes, source: str):
    try:
        return ArrayUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as e:  # truncated or corrupt pickles raise all sorts of things
        raise DataError(f"cannot read {source}: {type(e).__name__}: {e}; the file looks damaged") from e


def _get(batch: dict, key: str, source: str):
    value = batch.get(key.encode(), batch.get(key))
    if value is None:
        raise DataError(f"{source} has no {key!r} entry; found {sorted(map(repr, batch))}")
    return value


def _decode_batch(batch, source: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(batch, dict):
        raise DataError(f"{source} holds a {type(batch).__name__}, not a CIFAR batch dict")
    data = np.asarray(_get(batch, "data", source))
    labels = np.asarray(_get(batch, label_key, source), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"{source}: expected uint8 data of shape (N, 3072) and N labels, got {data.dtype} {data.shape}"
            f" and {len(labels)} labels"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel planes -> [N, 32, 32, 3]
    return images, labels


def _names(meta, key: str, source: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, key, source)]


def _read_files(path: Path, wanted: set[str]) -> tuple[set[str], dict[str, object]]:
    """(every file name, {name: unpickled object} for the wanted names) of a CIFAR folder or tar archive.

    An archive is read in one pass as a stream, each wanted member unpickled from memory as it goes by; links,
    devices and folders inside it are never followed, and nothing is written to disk.
    """
    names, objects = set(), {}

    def take(name: str, size: int, read) -> None:
        names.add(name)
        if name in wanted:
            if size > MAX_MEMBER_BYTES:
                raise DataError(f"{path}: {name} is {size} bytes, far larger than any CIFAR batch")
            objects[name] = safe_unpickle(read(), f"{path}:{name}" if path.is_file() else str(path / name))

    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.is_file():
                take(child.name, child.stat().st_size, child.read_bytes)
        return names, objects
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile():
                    name = member.name.rsplit("/", 1)[-1]
                    take(name, member.size, lambda m=member: tar.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {path} as a tar archive: {e}") from e
    return names, objects


def cifar_kind(names: set[str]) -> str | None:
    """'cifar10', 'cifar100' or None from the file names found in an archive or folder."""
    if names >= CIFAR10_FILES:
        return "cifar10"
    if names >= CIFAR100_FILES:
        return "cifar100"
    return None


def is_cifar(path: Path) -> bool:
    """A folder holding the CIFAR-10 or CIFAR-100 python files."""
    return path.is_dir() and cifar_kind({p.name for p in path.iterdir() if p.is_file()}) is not None


def load_cifar(
    path: Path, split: str, seed: int, val_fraction: float, labels: str | None = None, identity: str = ""
) -> ImageDataset:
    """A CIFAR-10/100 archive or folder.

    labels: CIFAR-100 only, 'fine' (100 classes, the default) or 'coarse' (20 superclasses).
    identity: a fingerprint of the file(s), for the dataset's name.
    """
    meta = {"batches.meta", "meta"}
    test = {"test_batch", "test"}
    train = set(CIFAR10_TRAIN) | {"train"}
    wanted = meta | (test if split == "test" else train if split in ("train", "val") else test | train)
    names, files = _read_files(path, wanted)
    kind = cifar_kind(names)
    if kind is None:
        raise DataError(
            f"{path} is not a CIFAR python archive: expected {sorted(CIFAR10_FILES)} (CIFAR-10) or"
            f" {sorted(CIFAR100_FILES)} (CIFAR-100), found {sorted(names)[:12]}"
        )
    if kind == "cifar10":
        if labels is not None:
            raise ArgumentError(f"{path} is CIFAR-10, which has one kind of label; drop the labels option")
        train_files, test_files, label_key = CIFAR10_TRAIN, ["test_batch"], "labels"
        class_names = _names(files["batches.meta"], "label_names", "batches.meta")
    else:
        labels = labels or "fine"
        if labels not in ("fine", "coarse"):
            raise ArgumentError(f"CIFAR-100 labels must be 'fine' or 'coarse', got {labels!r}")
        train_files, test_files, label_key = ["train"], ["test"], f"{labels}_labels"
        class_names = _names(files["meta"], f"{labels}_label_names", "meta")

    def read(names):
        parts = [_decode_batch(files.pop(n), f"{path}:{n}", label_key) for n in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    images, targets = [], []
    if split != "test":
        x, y = read(train_files)
        index = split_indices(len(x), split, seed, val_fraction, 0.0, has_test=True)
        images.append(x if split == "all" else x[index])
        targets.append(y if split == "all" else y[index])
        del x
    if split in ("test", "all"):
        x, y = read(test_files)
        images.append(x)
        targets.append(y)
    images = images[0] if len(images) == 1 else np.concatenate(images)  # contiguous either way
    targets = np.concatenate(targets)
    if len(images) == 0:
        raise empty_split_error(str(path), split)
    if targets.min() < 0 or targets.max() >= len(class_names):
        raise DataError(f"{path}: labels outside 0..{len(class_names) - 1}")
    options = f"seed={seed},val_fraction={val_fraction}" + (f",labels={labels}" if kind == "cifar100" else "")
    return ImageDataset(images, targets, class_names, f"{kind}:{path}{identity}({options}):{split}")
