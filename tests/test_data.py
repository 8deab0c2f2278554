"""Dataset readers: built-in sets, CIFAR (and its unpickler's refusals), IDX, folders, arrays, splits."""

import gzip
import io
import os
import pickle
import struct
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from imagegpt.data import ImageDataset, ImageFiles, load_dataset
from imagegpt.data.builtin import (
    MIN_CONTRAST,
    SHAPE_NAMES,
    TILES,
    crop_boxes,
    generate_shapes,
    render_shapes,
    shape_parameters,
    tile_splits,
)
from imagegpt.errors import ArgumentError, DataError, ImageGPTError

SPLITS = ("train", "val", "test")


def check_partition(spec, **options):
    """The three splits are disjoint and together make up 'all' (images identified by their labels)."""
    parts = {s: load_dataset(spec, split=s, **options) for s in (*SPLITS, "all")}
    ids = {s: set(parts[s].labels.tolist()) for s in parts}
    assert sum(len(parts[s]) for s in SPLITS) == len(parts["all"])
    assert ids["train"] | ids["val"] | ids["test"] == ids["all"]
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    return parts


def indexed_images(n, size=4, channels=None):
    """n images whose pixels all equal their index (mod 256), so a split can be traced back to its sources."""
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    return (np.arange(n, dtype=np.int64) % 256).reshape(-1, *[1] * (len(shape) - 1)) * np.ones(
        shape, np.uint8
    )


# ---------------------------------------------------------------------------------------------- built-in sets


def test_digits_are_sklearn_digits_scaled_to_uint8_rgb():
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = load_dataset("digits", split="all")
    assert data.images.shape == (1797, 8, 8, 3) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.class_names == [str(d) for d in range(10)]
    np.testing.assert_array_equal(data.images[..., 0], np.rint(digits.images * 255 / 16))
    np.testing.assert_array_equal(data.images[..., 0], data.images[..., 2])
    np.testing.assert_array_equal(data.labels, digits.target)
    train, val, test = (load_dataset("digits", split=s) for s in SPLITS)
    assert (len(train), len(val), len(test)) == (1437, 180, 180)


def test_shapes_are_deterministic_balanced_and_independent_of_chunking():
    a, labels = generate_shapes(60, 16, seed=3)
    b, _ = generate_shapes(60, 16, seed=3, chunk=7)
    np.testing.assert_array_equal(a, b)
    c, _ = generate_shapes(60, 16, seed=4)
    assert not np.array_equal(a, c)
    assert a.shape == (60, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [10] * len(SHAPE_NAMES))


def test_shapes_draw_a_visible_shape_of_the_labelled_kind():
    params = shape_parameters(300, 32, seed=0)
    images = render_shapes(params, 32).astype(np.float32)
    labels, fore = params["labels"], params["foreground"]
    # Shape pixels have the shape's colour; background pixels are at least MIN_CONTRAST away from it.
    distance = np.linalg.norm(images - fore[:, None, None], axis=-1)
    assert distance.max(axis=(1, 2)).min() > MIN_CONTRAST - 2  # the background shows in every image
    # A pixel more than half covered by the shape is nearer its colour than half the background's distance.
    area = (distance < distance.max(axis=(1, 2), keepdims=True) / 2).mean(axis=(1, 2))
    assert area.min() > 0.01 and area.max() < 0.6  # a shape in every image, none filling the frame
    centre = distance[np.arange(300), params["cy"].astype(int), params["cx"].astype(int)]
    for name, hollow in (("circle", False), ("square", False), ("cross", False), ("ring", True)):
        is_shape = centre[labels == SHAPE_NAMES.index(name)] < 2
        assert is_shape.all() if not hollow else not is_shape.any(), name
    # Each class covers its shape's area (in units of radius^2): the labels name what is drawn.
    expected = {
        "circle": np.pi,
        "ring": np.pi * (1 - 0.55**2),
        "square": 1.5**2,
        "triangle": 3 * 3**0.5 / 4,
        "cross": 2 * 0.56 * 1.84 - 0.56**2,
        "star": np.pi * (0.68**2 + 0.32**2 / 2),
    }
    relative = area * 32 * 32 / params["radius"] ** 2
    for i, name in enumerate(SHAPE_NAMES):
        assert relative[labels == i].mean() == pytest.approx(expected[name], rel=0.07), name
    assert len(np.unique(images.reshape(-1, 3), axis=0)) > 5000  # colours vary: a palette has work to do


def test_shapes_options_splits_and_determinism():
    parts = {s: load_dataset("shapes", split=s, n=50, resolution=12, seed=1) for s in (*SPLITS, "all")}
    assert [len(parts[s]) for s in SPLITS] == [40, 5, 5]
    assert parts["train"].images.shape[1:] == (12, 12, 3) and parts["train"].class_names == SHAPE_NAMES
    everything = parts["all"].images.reshape(50, -1)
    rows = {
        s: {everything.tolist().index(im) for im in parts[s].images.reshape(len(parts[s]), -1).tolist()}
        for s in SPLITS
    }
    assert set.union(*rows.values()) == set(range(50)) and sum(map(len, rows.values())) == 50
    again = load_dataset("shapes", split="val", n=50, resolution=12, seed=1)
    np.testing.assert_array_equal(again.images, parts["val"].images)
    assert again.name == parts["val"].name
    other = load_dataset("shapes", split="val", n=50, resolution=12, seed=2)
    assert other.name != again.name and not np.array_equal(other.images, again.images)


def test_photos_tiles_keep_splits_apart_and_crops_inside_them():
    codes = tile_splits(10, seed=0, val_fraction=0.1, test_fraction=0.1)
    assert codes.shape == (10, TILES * TILES)
    assert all(np.bincount(row, minlength=3).tolist() == [12, 2, 2] for row in codes)
    sizes = [(300 + 10 * p, 450 - 10 * p) for p in range(10)]
    for split_code in (0, 1, 2):
        labels, boxes, _ = crop_boxes(sizes, codes, split_code, 200, seed=0)
        for p, (left, top, right, bottom) in zip(labels, boxes):
            rows, cols = (np.arange(TILES + 1) * size // TILES for size in sizes[p])  # tile edges
            ty, tx = np.searchsorted(rows, top, "right") - 1, np.searchsorted(cols, left, "right") - 1
            assert codes[p, ty * TILES + tx] == split_code  # the box's tile belongs to this split
            assert bottom <= rows[ty + 1] + 1e-6 and right <= cols[tx + 1] + 1e-6  # and it stays inside
            assert right - left == pytest.approx(bottom - top)


def test_photos_are_labelled_crops_of_the_bundled_photos():
    data = load_dataset("photos", split="val", n=200, resolution=16)
    assert len(data) == 20 and data.images.shape == (20, 16, 16, 3)
    assert "astronaut" in data.class_names and "china" in data.class_names
    assert set(data.labels.tolist()) <= set(range(len(data.class_names)))
    again = load_dataset("photos", split="val", n=200, resolution=16)
    np.testing.assert_array_equal(data.images, again.images)
    assert data.images.std() > 10  # natural images, not blank


# ------------------------------------------------------------------------------------------------------ CIFAR


def cifar10_files(per_batch=3, protocol=2):
    rng = np.random.default_rng(0)
    files, count = {}, 0
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(count + i) % 10 for i in range(per_batch)]
        count += per_batch
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * 3,
        }
        files[name] = pickle.dumps(batch, protocol=protocol)
    names = [
        n.encode()
        for n in ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    ]
    files["batches.meta"] = pickle.dumps({b"label_names": names, b"num_cases_per_batch": per_batch}, protocol)
    return files


def write_tar(path, folder, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_archive_official_split_and_class_names(tmp_path, protocol):
    files = cifar10_files(protocol=protocol)
    archive = write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    train = load_dataset(archive, split="train", val_fraction=0.2)
    val = load_dataset(archive, split="val", val_fraction=0.2)
    test = load_dataset(archive, split="test")
    assert (len(train), len(val), len(test)) == (12, 3, 3)
    assert train.class_names[:2] == ["airplane", "car"]
    first = pickle.loads(files["data_batch_1"])
    expected = first[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)  # planes -> HWC
    everything = load_dataset(archive, split="all", val_fraction=0.2)
    np.testing.assert_array_equal(everything.images[0], expected)
    np.testing.assert_array_equal(test.labels, pickle.loads(files["test_batch"])[b"labels"])
    official = [y for i in range(1, 6) for y in pickle.loads(files[f"data_batch_{i}"])[b"labels"]]
    assert sorted(train.labels.tolist() + val.labels.tolist()) == sorted(official)
    assert not set(map(bytes, train.images)) & set(map(bytes, val.images))
    assert test.name != train.name and "cifar10" in train.name


def test_cifar10_extracted_folder_and_its_parent_read_the_same(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, data in cifar10_files().items():
        (folder / name).write_bytes(data)
    (folder / "readme.html").write_text("<html/>")
    a, b = load_dataset(folder, split="test"), load_dataset(tmp_path, split="test")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (3, 32, 32, 3)


def test_cifar100_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(1)
    files = {}
    for name, n in (("train", 10), ("test", 4)):
        files[name] = pickle.dumps(
            {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": list(range(n)),
                b"coarse_labels": [i % 2 for i in range(n)],
                b"batch_label": b"x",
            }
        )
    meta = {
        b"fine_label_names": [f"f{i}".encode() for i in range(100)],
        b"coarse_label_names": [b"c0", b"c1"],
    }
    files["meta"] = pickle.dumps(meta)
    archive = write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", files)
    fine = load_dataset(archive, split="test")
    coarse = load_dataset(archive, split="test", labels="coarse")
    assert fine.labels.tolist() == [0, 1, 2, 3] and len(fine.class_names) == 100
    assert coarse.labels.tolist() == [0, 1, 0, 1] and coarse.class_names == ["c0", "c1"]
    assert fine.name != coarse.name
    with pytest.raises(ArgumentError, match="fine"):
        load_dataset(archive, labels="medium")


class Exploit:
    """A pickle payload: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_archive_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    files = cifar10_files()
    files["data_batch_3"] = pickle.dumps({b"data": Exploit(marker), b"labels": [0]})
    archive = write_tar(tmp_path / "evil.tar.gz", "cifar-10-batches-py", files)
    with pytest.raises(DataError, match=r"refusing to load .*data_batch_3.* import (os|posix)\.system"):
        load_dataset(archive)
    assert not marker.exists()
    # Any other global is refused too, even a harmless-looking one.
    files["data_batch_3"] = pickle.dumps(
        {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": print}
    )
    with pytest.raises(DataError, match="builtins.print"):
        load_dataset(write_tar(tmp_path / "evil2.tar.gz", "cifar-10-batches-py", files))


class Decompress:
    """A payload through the one allowed function, _codecs.encode, with a codec other than latin-1."""

    def __reduce__(self):
        import codecs

        return (codecs.encode, (b"x" * 10, "zlib"))


def test_cifar_unpickler_allows_codecs_only_for_latin1(tmp_path):
    files = cifar10_files(protocol=2)  # Python 3 writes bytes in protocol 2 via _codecs.encode(..., "latin1")
    assert b"_codecs" in files["batches.meta"]
    files["test_batch"] = pickle.dumps({b"data": Decompress(), b"labels": [0]}, protocol=2)
    with pytest.raises(DataError, match="zlib"):
        load_dataset(write_tar(tmp_path / "c.tar.gz", "cifar-10-batches-py", files), split="test")


def test_cifar_damaged_or_foreign_archives_are_clear_errors(tmp_path):
    files = cifar10_files()
    files["test_batch"] = files["test_batch"][:100]
    with pytest.raises(DataError, match="damaged"):
        load_dataset(write_tar(tmp_path / "cut.tar.gz", "cifar-10-batches-py", files), split="test")
    with pytest.raises(DataError, match="not a CIFAR python archive"):
        load_dataset(write_tar(tmp_path / "other.tar.gz", "stuff", {"a.txt": b"hello"}))
    files = cifar10_files()
    files["test_batch"] = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="3072"):
        load_dataset(write_tar(tmp_path / "shape.tar.gz", "cifar-10-batches-py", files), split="test")


# -------------------------------------------------------------------------------------------------------- IDX


def idx_bytes(array, code=0x08):
    array = np.asarray(array)
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_mnist(folder, n_train=20, n_test=5, gz=True, separator="-"):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = indexed_images(n, 6)
        labels = np.arange(n) % 10
        for kind, data in (("images", idx_bytes(images)), ("labels", idx_bytes(labels))):
            ndim = 3 if kind == "images" else 1
            path = folder / f"{split}-{kind}{separator}idx{ndim}-ubyte{suffix}"
            path.write_bytes(gzip.compress(data) if gz else data)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_official_split(tmp_path, gz):
    folder = write_mnist(tmp_path / "mnist", gz=gz)
    train = load_dataset(folder, split="train")
    val = load_dataset(folder, split="val")
    test = load_dataset(folder, split="test")
    assert (len(train), len(val), len(test)) == (18, 2, 5)
    assert train.images.shape == (18, 6, 6, 3) and train.images.dtype == np.uint8
    # pixel value = index in the official file: labels follow their images through the split
    np.testing.assert_array_equal(train.images[:, 0, 0, 0] % 10, train.labels)
    assert not set(train.images[:, 0, 0, 0].tolist()) & set(val.images[:, 0, 0, 0].tolist())
    np.testing.assert_array_equal(test.images[:, 0, 0, 0], np.arange(5))
    assert train.class_names == [str(i) for i in range(10)]
    # an images file stands for its folder
    same = load_dataset(folder / ("train-images-idx3-ubyte" + (".gz" if gz else "")), split="val")
    np.testing.assert_array_equal(same.images, val.images)


def test_idx_fashion_names_dot_separator_and_other_dtypes(tmp_path):
    folder = write_mnist(tmp_path / "fashion-mnist", separator=".")
    assert load_dataset(folder, split="test").class_names[0] == "T-shirt/top"
    single = tmp_path / "scans.idx"
    single.write_bytes(idx_bytes(np.linspace(0, 1, 10 * 16).reshape(10, 4, 4), code=0x0D))
    data = load_dataset(single, split="all")
    assert data.labels is None and data.images.shape == (10, 4, 4, 3) and data.images.max() == 255


def test_idx_bad_files_are_clear_errors(tmp_path):
    folder = write_mnist(tmp_path / "m", gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated or damaged"):
        load_dataset(folder)
    path.write_bytes(b"\x00\x00\x42\x03" + bytes(30))
    with pytest.raises(DataError, match="not an IDX file"):
        load_dataset(folder)
    folder = write_mnist(tmp_path / "n", gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(3)))
    with pytest.raises(DataError, match="does not match"):
        load_dataset(folder, split="test")
    with pytest.raises(DataError, match="labels file"):
        load_dataset(folder / "train-labels-idx1-ubyte")


# ---------------------------------------------------------------------------------------------- image folders


def save_image(path, value, size=(5, 7), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(array).convert(mode).save(path)


def test_class_folders_become_sorted_labels_and_junk_is_skipped_with_one_warning(tmp_path):
    for i in range(6):
        save_image(tmp_path / "zebra" / f"{i}.png", 10 + i, size=(5 + i, 7))
        save_image(tmp_path / "apple" / "nested" / f"{i}.jpg", 200)
    save_image(tmp_path / "mango" / "g.png", 100, mode="L")
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    (tmp_path / "apple" / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "zebra" / ".DS_Store").write_bytes(b"\0\1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(tmp_path, split="all")
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 file(s)" in messages[0]
    assert data.class_names == ["apple", "mango", "zebra"] and len(data) == 13
    assert isinstance(data.images, ImageFiles) and data.image_size is None
    image, label = data[data.labels.tolist().index(1)]
    assert image.shape == (7, 5, 3) and image.dtype == np.uint8 and (image == 100).all()  # grey -> RGB
    for image, label in (data[i] for i in range(len(data))):
        assert (label == 0) == (image[0, 0, 0] == 200)
    sizes = {data[i][0].shape for i in range(len(data))}
    assert len(sizes) > 1  # images keep their own sizes
    batch = data.batch(0, len(data))
    assert isinstance(batch, list) and len(batch) == 13
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = {s: load_dataset(tmp_path, split=s) for s in SPLITS}
    paths = [set(parts[s].images.paths) for s in SPLITS]
    assert sum(map(len, paths)) == 13 and len(set.union(*paths)) == 13


def test_folder_resolution_option_crops_and_resizes(tmp_path):
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, 8:52] = 255  # white around the centre square (the resampling filter reaches a little outside)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "b.jpg", quality=95)
    save_image(tmp_path / "c.png", 9, size=(8, 8))
    data = load_dataset(tmp_path, split="all", resolution=4)
    assert data.image_size == (4, 4) and data.labels is None
    batch = data.batch(0, 3)
    assert batch.shape == (3, 4, 4, 3)
    assert batch[0].min() == 255 and batch[1].min() > 240  # the centre crop is the white square
    assert data.name != load_dataset(tmp_path, split="all").name


def test_folder_with_train_test_subfolders_uses_them(tmp_path):
    for split, n in (("train", 10), ("test", 3)):
        for c in ("cat", "dog"):
            for i in range(n):
                save_image(tmp_path / split / c / f"{i}.png", 50 if c == "cat" else 150)
    train, val, test = (load_dataset(tmp_path, split=s, val_fraction=0.25) for s in SPLITS)
    assert (len(train), len(val), len(test)) == (15, 5, 6)
    assert all("test" in str(p) for p in test.images.paths)
    assert not set(train.images.paths) & set(val.images.paths)
    assert test.class_names == ["cat", "dog"] and sorted(test.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # a lone train/ folder: its subfolders are the classes, and val and test are held out of it
    only_train = tmp_path / "only"
    for c in ("cat", "dog"):
        for i in range(10):
            save_image(only_train / "train" / c / f"{i}.png", 7)
    parts = [load_dataset(only_train, split=s) for s in SPLITS]
    assert [len(p) for p in parts] == [16, 2, 2] and parts[0].class_names == ["cat", "dog"]


def test_folder_name_changes_when_a_file_changes(tmp_path):
    for i in range(4):
        save_image(tmp_path / f"{i}.png", i)
    before = load_dataset(tmp_path, split="all").name
    save_image(tmp_path / "4.png", 4)
    assert load_dataset(tmp_path, split="all").name != before


def test_unreadable_image_at_read_time_is_an_image_error(tmp_path):
    save_image(tmp_path / "a.png", 1)
    data = load_dataset(tmp_path, split="all")
    (tmp_path / "a.png").write_bytes(b"gone bad")
    with pytest.raises(ImageGPTError, match="a.png"):
        data[0]


# ----------------------------------------------------------------------------------------------------- arrays


@pytest.mark.parametrize(
    "layout",
    ["nhwc", "nhw", "nchw", "float", "nhw1", "nhwc4", "int64"],
)
def test_npy_layouts_become_uint8_rgb(tmp_path, layout):
    base = indexed_images(10, 4, channels=3)  # (10, 4, 4, 3) uint8
    array = {
        "nhwc": base,
        "nhw": base[..., 0],
        "nchw": base.transpose(0, 3, 1, 2),
        "float": base / 255.0,
        "nhw1": base[..., :1],
        "nhwc4": np.concatenate([base, np.full_like(base[..., :1], 255)], axis=-1),  # opaque alpha
        "int64": base.astype(np.int64),
    }[layout]
    np.save(tmp_path / "x.npy", array)
    data = load_dataset(tmp_path / "x.npy", split="all")
    assert data.images.dtype == np.uint8 and data.labels is None
    np.testing.assert_array_equal(data.images, base)


def test_npz_images_labels_class_names_and_splits(tmp_path):
    np.savez(
        tmp_path / "d.npz", x=indexed_images(30), y=np.arange(30) % 3, class_names=np.array(["a", "b", "c"])
    )
    np.savez(tmp_path / "e.npz", images=indexed_images(30), labels=np.arange(30))
    parts = check_partition(tmp_path / "e.npz", seed=5)
    assert [len(parts[s]) for s in SPLITS] == [24, 3, 3]
    np.testing.assert_array_equal(parts["val"].images[:, 0, 0, 0], parts["val"].labels)
    d = load_dataset(tmp_path / "d.npz", split="all")
    assert d.class_names == ["a", "b", "c"] and d.labels.tolist()[:4] == [0, 1, 2, 0]


def test_npz_with_keras_style_splits(tmp_path):
    np.savez(
        tmp_path / "k.npz",
        x_train=indexed_images(20),
        y_train=np.arange(20),
        x_test=indexed_images(4) + 100,
        y_test=np.arange(4) + 100,
    )
    train, val, test = (load_dataset(tmp_path / "k.npz", split=s) for s in SPLITS)
    assert (len(train), len(val), len(test)) == (18, 2, 4)
    assert test.labels.tolist() == [100, 101, 102, 103] and (test.images[:, 0, 0, 0] == test.labels).all()
    assert not set(train.labels.tolist()) & set(val.labels.tolist())


def test_bad_arrays_are_clear_errors(tmp_path):
    np.save(tmp_path / "f.npy", np.full((2, 4, 4), 3.0))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_dataset(tmp_path / "f.npy")
    np.save(tmp_path / "s.npy", np.zeros((2, 5, 5, 7), np.uint8))
    with pytest.raises(DataError, match="shape"):
        load_dataset(tmp_path / "s.npy")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickle"):
        load_dataset(tmp_path / "o.npy")
    np.savez(tmp_path / "l.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.arange(2))
    with pytest.raises(DataError, match="labels must be N=3"):
        load_dataset(tmp_path / "l.npz")
    np.savez(tmp_path / "k.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(DataError, match="'images' or 'x'"):
        load_dataset(tmp_path / "k.npz")


# ----------------------------------------------------------------------------------- splits, indexing, errors


def test_splits_are_seeded_disjoint_and_cover_everything(tmp_path):
    np.savez(tmp_path / "d.npz", images=indexed_images(101), labels=np.arange(101))
    a = check_partition(tmp_path / "d.npz", seed=0, val_fraction=0.2, test_fraction=0.15)
    assert [len(a[s]) for s in SPLITS] == [66, 20, 15]
    b = check_partition(tmp_path / "d.npz", seed=0, val_fraction=0.2, test_fraction=0.15)
    c = check_partition(tmp_path / "d.npz", seed=1, val_fraction=0.2, test_fraction=0.15)
    assert a["val"].labels.tolist() == b["val"].labels.tolist() != c["val"].labels.tolist()
    assert a["val"].name == b["val"].name != c["val"].name
    assert all(np.all(np.diff(a[s].labels) > 0) for s in SPLITS)  # each split keeps the source order


def test_limit_takes_a_seeded_subset_of_the_split():
    full = load_dataset("digits", split="train")
    small = load_dataset("digits", split="train", limit=100)
    assert len(small) == 100 and small.name != full.name and "limit=100" in small.name
    assert set(map(bytes, small.images)) <= set(map(bytes, full.images))
    np.testing.assert_array_equal(small.labels, load_dataset("digits", split="train", limit=100).labels)
    assert len(set(small.labels.tolist())) == 10  # random, not the first 100 of a sorted list


def test_dataset_indexing_and_rank_shards():
    data = load_dataset("shapes", split="train", n=40, resolution=8)
    image, label = data[3]
    assert image.shape == (8, 8, 3) and label == data.labels[3] and isinstance(label, int)
    shards = [data[rank::3] for rank in range(3)]
    assert sum(len(s) for s in shards) == len(data) and len({s.name for s in shards}) == 3
    np.testing.assert_array_equal(shards[1].images, data.images[1::3])
    picked = data[np.array([5, 1])]
    assert picked.labels.tolist() == [data.labels[5], data.labels[1]] and picked.name != data.name
    assert data.num_classes == 6 and data.image_size == (8, 8)
    with pytest.raises(ValueError):
        ImageDataset(data.images, data.labels[:3], None, "x")


@pytest.mark.parametrize(
    "spec, options, error, match",
    [
        ("no/such/place", {}, DataError, "no such file or folder"),
        ("shapes", {"color": 3}, ArgumentError, "does not take option"),
        ("shapes", {"colour": "red"}, ArgumentError, "colour must be one of random, mono"),
        ("shapes", {"n": 0}, ArgumentError, "n must be an integer >= 1"),
        ("digits", {"val_fraction": 1.5}, ArgumentError, "val_fraction"),
        ("digits", {"limit": -1}, ArgumentError, "limit"),
        ("digits", {"split": "holdout"}, ArgumentError, "unknown split"),
        ("shapes", {"n": 2, "split": "val"}, DataError, "empty"),
    ],
)
def test_bad_arguments_are_clear_errors(spec, options, error, match):
    with pytest.raises(error, match=match):
        load_dataset(spec, **options)


def test_unknown_formats_and_empty_folders_say_what_is_supported(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="cannot tell the format.*CIFAR"):
        load_dataset(tmp_path / "table.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no readable images in .*empty"):
        load_dataset(empty)
    save_image(tmp_path / "one.png", 3)
    with pytest.raises(DataError, match="single image"):
        load_dataset(tmp_path / "one.png")


def test_files_and_arrays_read_as_the_processor_reads_them(tmp_path):
    """RGBA arrays and files, and 16-bit files, give the same pixels through the data readers as through the
    processor (and PIL's compositing)."""
    from imagegpt.data.dataset import read_image, to_rgb_uint8
    from imagegpt.pixels import over_white
    from imagegpt.processor import _load_rgb

    colour, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")  # every (value, alpha) pair
    rgba = np.stack([colour, colour[::-1], colour, alpha], axis=-1).astype(np.uint8)
    white = Image.new("RGBA", (256, 256), "white")
    pil = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB"))
    np.testing.assert_array_equal(over_white(rgba), pil)
    np.testing.assert_array_equal(to_rgb_uint8(rgba[None], "test")[0], pil)
    np.testing.assert_array_equal(_load_rgb(rgba, "test"), pil)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), pil)  # image folders
    np.testing.assert_array_equal(_load_rgb(str(tmp_path / "rgba.png"), "test"), pil)
    grey16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)  # a 16-bit PNG: scaled, not clipped
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png"), _load_rgb(grey16, "test"))
    assert read_image(tmp_path / "grey16.png")[1, 0, 0] == round(8000 / 257)
    np.save(tmp_path / "rgba.npy", np.stack([rgba[:8, :8]] * 3))
    data = load_dataset(tmp_path / "rgba.npy", split="all")
    np.testing.assert_array_equal(data.images[0], pil[:8, :8])
