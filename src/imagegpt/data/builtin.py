"""Built-in datasets that need no download: `digits`, `shapes` and `photos`.

- digits: scikit-learn's 1,797 handwritten digits, 8x8, labels 0-9 (grey levels 0..16 scaled to 0..255, white
  ink on black). No official split: a seeded 80/10/10 train/val/test split.
- shapes: procedurally generated shapes (circle, ring, square, triangle, cross, star) with random position,
  size, rotation and colour on a gradient background; label = shape. `n` images in all (default 6000) at
  `resolution` (default 32), cut into a seeded 80/10/10 split. Deterministic for a seed.
- photos: square crops of the ten natural colour photos bundled with scikit-image and scikit-learn, resized to
  `resolution`; label = the photo the crop came from. Each photo is cut into a 4x4 grid of tiles and the tiles
  are dealt to train/val/test (12/2/2 with the default fractions), and every crop lies inside one tile, so no
  val or test crop shares a pixel with a training crop. `n` crops in all (default 6000), 80/10/10.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from ..errors import ArgumentError, DataError
from ..limits import check_memory
from .dataset import (
    GENERATE_STREAM,
    ImageDataset,
    check_positive_int,
    empty_split_error,
    format_options,
    split_indices,
    split_sizes,
)

BUILTINS = ("digits", "shapes", "photos")
GENERATED = ("shapes", "photos")  # drawn at the resolution asked for (an option), rather than resized to it


def check_generated(source: str, n: int, resolution: int) -> None:
    """Refuse, before drawing anything, a generated set whose n images cannot fit in memory."""
    check_memory(
        n * resolution * resolution * 3,
        f"{source} with n={n} at resolution={resolution}",
        "lower n or resolution (--data-option)",
    )


def _name(source: str, options: dict, split: str) -> str:
    return f"{source}({format_options(options)}):{split}"


# ----------------------------------------------------------------------------------------------------- digits


def load_digits(split: str, seed: int, val_fraction: float, test_fraction: float) -> ImageDataset:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), values 0..16
    images = np.repeat(grey[..., None], 3, axis=-1)
    index = split_indices(len(images), split, seed, val_fraction, test_fraction)
    options = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    return ImageDataset(
        images=images[index],
        labels=digits.target[index].astype(np.int64),
        class_names=[str(d) for d in range(10)],
        name=_name("digits", options, split),
    )


# ----------------------------------------------------------------------------------------------------- shapes

SHAPE_NAMES = ["circle", "ring", "square", "triangle", "cross", "star"]


def _shape_distance(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the shape's edge in units of its radius (negative inside).

    u, v are coordinates in the shape's rotated frame, scaled so that every shape fits the unit circle.
    """
    if shape in (0, 1, 5):
        rho = np.sqrt(u * u + v * v)
        if shape == 0:  # circle
            return rho - 1.0
        if shape == 1:  # ring
            return np.maximum(rho - 1.0, 0.55 - rho)
        # star with five smooth points: rho = 0.68 + 0.32 cos(5 phi), cos(5 phi) as a polynomial in cos(phi)
        c = u / np.maximum(rho, 1e-6)
        c2 = c * c
        return rho - (0.68 + 0.32 * c * (16 * c2 * c2 - 20 * c2 + 5))
    if shape == 2:  # square
        return np.maximum(np.abs(u), np.abs(v)) - 0.75
    if shape == 3:  # equilateral triangle with circumradius 1
        h = 0.8660254 * u
        return np.maximum(np.maximum(-v, h + 0.5 * v), -h + 0.5 * v) - 0.5
    # cross: the union of two bars
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.28, av - 0.92), np.maximum(au - 0.92, av - 0.28))


def shape_parameters(n: int, resolution: int, seed: int) -> dict[str, np.ndarray]:
    """Every random choice behind n shape images, drawn up front (so rendering in chunks changes nothing)."""
    rng = np.random.default_rng([seed, GENERATE_STREAM])
    R = resolution
    radius = rng.uniform(0.16, 0.42, n) * R
    p = {
        "labels": rng.permutation(np.arange(n) % len(SHAPE_NAMES)).astype(np.int64),  # balanced classes
        "radius": radius,
        "cx": rng.uniform(radius, R - radius),
        "cy": rng.uniform(radius, R - radius),
        "angle": rng.uniform(0, 2 * np.pi, n),
        "near": rng.uniform(0, 255, (n, 3)),  # background colour at one end of a gentle gradient...
        "gradient_angle": rng.uniform(0, 2 * np.pi, n),
        "foreground": rng.uniform(0, 255, (n, 3)),
    }
    p["far"] = np.clip(p["near"] + rng.uniform(-70, 70, (n, 3)), 0, 255)  # ...and at the other
    for _ in range(1000):  # redraw foregrounds too close to any background colour, so every shape is visible
        close = _distance_to_segment(p["foreground"], p["near"], p["far"]) < MIN_CONTRAST
        if not close.any():
            break
        p["foreground"][close] = rng.uniform(0, 255, (int(close.sum()), 3))
    return p


MIN_CONTRAST = 100.0  # RGB distance between a shape's colour and every colour of its background


def _distance_to_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((points - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-9), 0, 1)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


SHAPE_COLOURS = ("random", "mono")


def mono_colours(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The same shapes in light grey on a dark, gently graded grey background: a task about form alone."""
    rng = np.random.default_rng([seed, GENERATE_STREAM, 1])
    n = len(params["labels"])
    near = rng.uniform(0, 60, (n, 1))
    far = np.clip(near + rng.uniform(-30, 30, (n, 1)), 0, 255)
    grey = {"foreground": np.full((n, 3), 235.0), "near": near.repeat(3, 1), "far": far.repeat(3, 1)}
    return {**params, **grey}


def generate_shapes(
    n: int, resolution: int, seed: int, chunk: int = 1024, colour: str = "random"
) -> tuple[np.ndarray, np.ndarray]:
    """n images uint8 [n, R, R, 3] and their shape labels int64 [n]; deterministic for a seed.

    colour: "random" (random colours on a random gradient) or "mono" (mono_colours; positions, sizes and
    rotations are the same as with "random")."""
    params = shape_parameters(n, resolution, seed)
    if colour == "mono":
        params = mono_colours(params, seed)
    return render_shapes(params, resolution, chunk), params["labels"]


def render_shapes(params: dict[str, np.ndarray], resolution: int, chunk: int = 1024) -> np.ndarray:
    """Draw shape_parameters() as uint8 [n, R, R, 3]: an antialiased shape on a linear-gradient background."""
    R, n = resolution, len(params["labels"])
    labels, radius, cx, cy, angle = (params[k] for k in ("labels", "radius", "cx", "cy", "angle"))
    background, background_far = params["near"], params["far"]
    gradient_angle, foreground = params["gradient_angle"], params["foreground"]

    grid = np.arange(R, dtype=np.float32) + 0.5  # pixel centres
    images = np.empty((n, R, R, 3), dtype=np.uint8)
    for start in range(0, n, chunk):
        s = slice(start, min(start + chunk, n))
        B = s.stop - s.start
        dx = grid[None, None, :] - cx[s, None, None].astype(np.float32)  # (B, 1, R)
        dy = grid[None, :, None] - cy[s, None, None].astype(np.float32)  # (B, R, 1)
        cos = np.cos(angle[s]).astype(np.float32)[:, None, None]
        sin = np.sin(angle[s]).astype(np.float32)[:, None, None]
        r = radius[s].astype(np.float32)[:, None, None]
        u = (dx * cos + dy * sin) / r  # (B, R, R)
        v = (dy * cos - dx * sin) / r
        distance = np.empty((B, R, R), dtype=np.float32)
        chunk_labels = labels[s]
        for shape in range(len(SHAPE_NAMES)):
            mask = chunk_labels == shape
            if mask.any():
                distance[mask] = _shape_distance(shape, u[mask], v[mask]) * r[mask]  # in pixels
        # Colours are blended channels-first, (B, 3, R, R): numpy is slow on a trailing axis of length 3.
        g_cos = np.cos(gradient_angle[s]).astype(np.float32)[:, None, None]
        g_sin = np.sin(gradient_angle[s]).astype(np.float32)[:, None, None]
        t = ((grid[None, None, :] - R / 2) * g_cos + (grid[None, :, None] - R / 2) * g_sin) / R + 0.5
        t = np.clip(t, 0, 1)[:, None]  # (B, 1, R, R)
        alpha = np.clip(0.5 - distance, 0, 1)[:, None]  # antialiased coverage, (B, 1, R, R)
        near = background[s, :, None, None].astype(np.float32)  # (B, 3, 1, 1)
        far = background_far[s, :, None, None].astype(np.float32)
        fore = foreground[s, :, None, None].astype(np.float32)
        pixels = near + (far - near) * t
        pixels += (fore - pixels) * alpha
        pixels += 0.5  # round half up, then truncate: values are in [0, 255]
        images[s] = pixels.astype(np.uint8).transpose(0, 2, 3, 1)
    return images


def load_shapes(
    split: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    n: int = 6000,
    resolution: int = 32,
    colour: str = "random",
) -> ImageDataset:
    n = check_positive_int("shapes option n", n)
    resolution = check_positive_int("shapes option resolution", resolution, minimum=4)
    if colour not in SHAPE_COLOURS:
        raise ArgumentError(f"shapes option colour must be one of {', '.join(SHAPE_COLOURS)}, got {colour!r}")
    check_generated("shapes", n, resolution)
    images, labels = generate_shapes(n, resolution, seed, colour=colour)
    index = split_indices(n, split, seed, val_fraction, test_fraction)
    if len(index) == 0:
        raise empty_split_error(f"shapes(n={n})", split)
    options = {"n": n, "resolution": resolution, "seed": seed, "val_fraction": val_fraction}
    options["test_fraction"] = test_fraction
    if colour != "random":  # the default keeps the names (and token caches) of earlier versions
        options["colour"] = colour
    return ImageDataset(images[index], labels[index], list(SHAPE_NAMES), _name("shapes", options, split))


# ----------------------------------------------------------------------------------------------------- photos

# (name, loader) for the natural colour photos that ship inside the packages (no pooch download). Excluded:
# skimage's cat (the same photo as chelsea), logo and colorwheel (synthetic), and the grey-level images.
PHOTO_SOURCES = [
    ("astronaut", "skimage", "astronaut"),
    ("chelsea", "skimage", "chelsea"),
    ("coffee", "skimage", "coffee"),
    ("rocket", "skimage", "rocket"),
    ("hubble_deep_field", "skimage", "hubble_deep_field"),
    ("immunohistochemistry", "skimage", "immunohistochemistry"),
    ("retina", "skimage", "retina"),
    ("motorcycle", "skimage", "stereo_motorcycle"),
    ("china", "sklearn", "china.jpg"),
    ("flower", "sklearn", "flower.jpg"),
]
TILES = 4  # each photo is cut into TILES x TILES tiles, dealt to the splits


def load_photos_sources() -> tuple[list[str], list[np.ndarray]]:
    """The bundled photos as uint8 [H, W, 3]; a photo missing from this installation is skipped (warning)."""
    names, photos, missing = [], [], []
    sklearn_images = None
    for name, package, key in PHOTO_SOURCES:
        try:
            if package == "skimage":
                import skimage.data

                photo = getattr(skimage.data, key)()
                photo = photo[0] if isinstance(photo, tuple) else photo
            else:
                if sklearn_images is None:
                    from sklearn.datasets import load_sample_images

                    bunch = load_sample_images()
                    sklearn_images = {
                        f.rsplit("/", 1)[-1]: im for f, im in zip(bunch.filenames, bunch.images)
                    }
                photo = sklearn_images[key]
        except Exception as e:  # an optional data file not installed here (skimage would need a download)
            missing.append(f"{name} ({type(e).__name__})")
            continue
        names.append(name)
        photos.append(np.asarray(photo, dtype=np.uint8)[..., :3])
    if missing:
        warnings.warn(
            f"photos: {len(missing)} bundled photos unavailable: {', '.join(missing)}", stacklevel=3
        )
    if not photos:
        raise DataError("photos: none of the photos bundled with scikit-image/scikit-learn could be loaded")
    return names, photos


def tile_splits(n_photos: int, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """(n_photos, TILES*TILES) split codes 0=train, 1=val, 2=test: a seeded deal of each photo's tiles."""
    n_tiles = TILES * TILES
    _, n_val, n_test = split_sizes(n_tiles, val_fraction, test_fraction)
    rng = np.random.default_rng([seed, GENERATE_STREAM, 1])
    codes = np.zeros((n_photos, n_tiles), dtype=np.int64)
    for p in range(n_photos):
        order = rng.permutation(n_tiles)
        codes[p, order[:n_val]] = 1
        codes[p, order[n_val : n_val + n_test]] = 2
    return codes


def crop_boxes(sizes: list[tuple[int, int]], codes: np.ndarray, split_code: int, count: int, seed: int):
    """Labels (photo index, balanced), boxes (left, top, right, bottom) and flips of count crops of one split.

    sizes: each photo's (H, W). Every box is a square inside one tile whose code is split_code.
    """
    rng = np.random.default_rng([seed, GENERATE_STREAM, 2, split_code])
    labels = rng.permutation(np.arange(count) % len(sizes)).astype(np.int64)
    tile_choice, side_fraction = rng.random(count), rng.uniform(0.35, 1.0, count)
    top_fraction, left_fraction, flips = rng.random(count), rng.random(count), rng.random(count) < 0.5
    boxes = np.empty((count, 4))
    tiles = [np.flatnonzero(c == split_code) for c in codes]
    for i, p in enumerate(labels):
        H, W = sizes[p]
        tile = tiles[p][int(tile_choice[i] * len(tiles[p]))]
        ty, tx = divmod(int(tile), TILES)
        y0, y1 = ty * H // TILES, (ty + 1) * H // TILES
        x0, x1 = tx * W // TILES, (tx + 1) * W // TILES
        side = side_fraction[i] * min(y1 - y0, x1 - x0)
        top = y0 + top_fraction[i] * (y1 - y0 - side)
        left = x0 + left_fraction[i] * (x1 - x0 - side)
        boxes[i] = (left, top, left + side, top + side)
    return labels, boxes, flips


def _crops(photos, codes, split_code: int, count: int, resolution: int, seed: int):
    labels, boxes, flips = crop_boxes([p.shape[:2] for p in photos], codes, split_code, count, seed)
    pil = [Image.fromarray(photo) for photo in photos]
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    for i, p in enumerate(labels):
        size = (resolution, resolution)
        crop = np.asarray(
            pil[p].resize(size, Image.Resampling.BICUBIC, box=tuple(boxes[i]), reducing_gap=3.0)
        )
        images[i] = crop[:, ::-1] if flips[i] else crop
    return images, labels


def load_photos(
    split: str, seed: int, val_fraction: float, test_fraction: float, n: int = 6000, resolution: int = 32
) -> ImageDataset:
    n = check_positive_int("photos option n", n)
    resolution = check_positive_int("photos option resolution", resolution, minimum=2)
    check_generated("photos", n, resolution)
    names, photos = load_photos_sources()
    codes = tile_splits(len(photos), seed, val_fraction, test_fraction)
    sizes = dict(zip(("train", "val", "test"), split_sizes(n, val_fraction, test_fraction)))
    parts = ["train", "val", "test"] if split == "all" else [split]
    if sum(sizes[part] for part in parts) == 0:
        raise empty_split_error(f"photos(n={n})", split)
    images, labels = [], []
    for part in parts:
        code = ("train", "val", "test").index(part)
        if sizes[part]:
            x, y = _crops(photos, codes, code, sizes[part], resolution, seed)
            images.append(x)
            labels.append(y)
    options = {"n": n, "resolution": resolution, "seed": seed, "val_fraction": val_fraction}
    options["test_fraction"] = test_fraction
    if len(names) != len(PHOTO_SOURCES):
        options["photos"] = "+".join(names)
    return ImageDataset(
        np.concatenate(images), np.concatenate(labels), names, _name("photos", options, split)
    )
