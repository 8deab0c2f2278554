"""Folders of image files (anything Pillow reads: PNG, JPEG, BMP, GIF, TIFF, WebP, ...).

Layouts:
- `root/CLASS/.../*.png`: one subfolder per class (files at any depth below it); the labels are the class
  folders' names, sorted.
- `root/*.png`: a flat folder, unlabelled.
- `root/{train,val,test}/...`: official splits, each laid out as above (class names are the union over
  splits). A missing val (or test) split is held out of train.

Without official splits: a seeded train/val/test split (default 80/10/10). Files that are not readable images
are skipped and counted in one warning; hidden files and folders (names starting with '.') are ignored, and
so are symbolic links that lead out of the root folder (a dataset never makes a command read other files).

Images are decoded lazily (ImageDataset.images is an ImageFiles sequence), at their own sizes; the
`resolution` option resizes the shorter side to it and centre-crops a square, as each image is read.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..limits import check_memory
from .dataset import ImageDataset, ImageFiles, check_positive_int, empty_split_error, split_indices

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _visible(names):
    return sorted(n for n in names if not n.startswith("."))


def _inside(path: Path, root: Path) -> bool:
    """True when path, its symlinks resolved, lies within root (resolved): a link that leads out of the
    dataset is never read, so a dataset folder cannot make a command read files elsewhere."""
    return Path(os.path.realpath(path)).is_relative_to(root)


def _walk(folder: Path, root: Path) -> list[Path]:
    """Every visible file below folder, in a stable order (links out of root included: _scan skips them)."""
    files = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = [d for d in _visible(subdirs) if _inside(Path(directory) / d, root)]
        files.extend(Path(directory) / n for n in _visible(names))
    return files


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size[0] > 0 and image.size[1] > 0
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


def _scan(folder: Path, root: Path) -> tuple[list[Path], list[str] | None, list[Path]]:
    """(image files, their class names or None, skipped files) of one split folder; entries whose links lead
    out of root are skipped."""
    entries = [folder / n for n in _visible(os.listdir(folder))]
    outside = [p for p in entries if not _inside(p, root)]
    entries = [p for p in entries if _inside(p, root)]
    classes = [p for p in entries if p.is_dir()]
    outside += [p for p in entries if not p.is_dir() and not p.is_file()]  # pipes, sockets, devices
    loose = [p for p in entries if p.is_file()]
    if classes:
        files, names, skipped = [], [], outside + loose  # loose files beside class folders have no class
        for class_folder in classes:
            for path in _walk(class_folder, root):
                if not _inside(path, root) or not path.is_file():  # a pipe would block its reader
                    skipped.append(path)
                elif _is_image(path):
                    files.append(path)
                    names.append(class_folder.name)
                else:
                    skipped.append(path)
        return files, names, skipped
    readable = [_is_image(p) for p in loose]
    skipped = outside + [p for p, ok in zip(loose, readable) if not ok]
    return [p for p, ok in zip(loose, readable) if ok], None, skipped


def _fingerprint(paths: list[Path], root: Path) -> str:
    """Changes when a file is added, removed, renamed or rewritten: token caches keyed by it stay valid."""
    digest = hashlib.sha1()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def load_folder(
    root: Path,
    split: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    resolution: int | None = None,
) -> ImageDataset:
    if resolution is not None:
        resolution = check_positive_int("folder option resolution", resolution)
        check_memory(resolution * resolution * 3, f"an image at resolution={resolution}", "lower resolution")
    root = root.resolve()
    subfolders = [n for n in _visible(os.listdir(root)) if (root / n).is_dir() and _inside(root / n, root)]
    split_folders = {SPLIT_FOLDERS[n.lower()]: root / n for n in subfolders if n.lower() in SPLIT_FOLDERS}
    official = "train" in split_folders and len(split_folders) == len(subfolders)

    scans = (
        {part: _scan(folder, root) for part, folder in split_folders.items()}
        if official
        else {"all": _scan(root, root)}
    )
    skipped = [p for _, _, s in scans.values() for p in s]
    if skipped:
        examples = ", ".join(str(p.relative_to(root)) for p in skipped[:5])
        warnings.warn(
            f"{root}: skipped {len(skipped)} file(s) that are not readable images, lie outside the class"
            f" folders, or link out of {root} (e.g. {examples})",
            stacklevel=3,
        )
    labelled = {names is not None for files, names, _ in scans.values() if files}
    if len(labelled) > 1:
        raise DataError(f"{root}: some split folders have class subfolders and some do not; use one layout")
    all_names = sorted({n for _, names, _ in scans.values() for n in (names or [])})
    n_images = sum(len(files) for files, _, _ in scans.values())
    if n_images == 0:
        raise DataError(
            f"no readable images in {root} ({len(skipped)} other file(s)); supported: a folder of image"
            " files, one subfolder per class, optionally under train/val/test folders"
        )

    label_of = {name: i for i, name in enumerate(all_names)}

    def part(scan, index=None):
        files, names, _ = scan
        index = np.arange(len(files)) if index is None else index
        labels = None if names is None else np.array([label_of[names[i]] for i in index], np.int64)
        return [files[i] for i in index], labels

    if official:
        chosen = []
        has_val, has_test = "val" in scans, "test" in scans
        for name in ("train", "val", "test") if split == "all" else (split,):
            if name in scans and (name != "train" or (has_val and has_test)):
                chosen.append(part(scans[name]))
            else:  # held out of the train folder
                train = scans["train"]
                cut = split_indices(
                    len(train[0]),
                    name,
                    seed,
                    0.0 if has_val else val_fraction,
                    0.0 if has_test else test_fraction,
                )
                chosen.append(part(train, cut))
    else:
        chosen = [part(scans["all"], split_indices(n_images, split, seed, val_fraction, test_fraction))]
    files = [f for c in chosen for f in c[0]]
    labels = None if not all_names else np.concatenate([c[1] for c in chosen])
    if not files:
        raise empty_split_error(str(root), split)
    all_files = [f for files_, _, _ in scans.values() for f in files_]
    options = f"seed={seed},val_fraction={val_fraction},test_fraction={test_fraction},resolution={resolution}"
    name = f"folder:{root}#{_fingerprint(all_files, root)}({options}):{split}"
    return ImageDataset(ImageFiles(files, resolution), labels, all_names or None, name)
