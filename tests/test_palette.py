"""Palette: k-means fit, exact nearest-centre encoding, decoding, saving and loading."""

import json

import numpy as np
import pytest
import torch

from imagegpt import Palette
from imagegpt.errors import ArgumentError, CheckpointError, ImageGPTError
from imagegpt.palette import UINT8_TO_UNIT, check_clusters


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"numpy seed {seed}")  # shown on failure, to reproduce
    return np.random.default_rng(seed)


def brute_force_nearest(pixels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """float64 nearest centre by direct differences; the lowest index wins an exact tie."""
    diff = pixels.astype(np.float64)[:, None, :] - centres.astype(np.float64)[None]
    return (diff**2).sum(-1).argmin(1)


def blobs(rng, k, per_blob, spread=0.01):
    """k well-separated colour blobs: centres at least 0.3 apart in [-0.8, 0.8]^3."""
    centres = []
    while len(centres) < k:
        c = rng.uniform(-0.8, 0.8, 3)
        if all(np.linalg.norm(c - o) > 0.3 for o in centres):
            centres.append(c)
    centres = np.array(centres, dtype=np.float32)
    points = centres[:, None, :] + rng.normal(0, spread, (k, per_blob, 3)).astype(np.float32)
    return centres, points.reshape(-1, 3)


# ---- fitting ----


def test_fit_finds_well_separated_clusters(rng):
    true, pixels = blobs(rng, 8, 500)
    palette = Palette.fit(pixels, clusters=8, seed=int(rng.integers(1000)))
    assert palette.centers.shape == (8, 3) and palette.centers.dtype == np.float32
    # every true centre has a fitted centre within the blob's spread, and vice versa
    d = np.linalg.norm(true[:, None] - palette.centers[None], axis=-1)
    assert d.min(1).max() < 0.01 and d.min(0).max() < 0.01


def test_fit_is_deterministic_for_a_seed(rng):
    pixels = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    first = Palette.fit(pixels, clusters=16, seed=3, max_pixels=3000)
    again = Palette.fit(pixels, clusters=16, seed=3, max_pixels=3000)
    other = Palette.fit(pixels, clusters=16, seed=4, max_pixels=3000)
    assert np.array_equal(first.centers, again.centers) and first.fingerprint() == again.fingerprint()
    assert not np.array_equal(first.centers, other.centers)


def test_fit_does_not_depend_on_the_thread_count(rng):
    pixels = rng.uniform(-1, 1, (100_000, 3)).astype(np.float32)  # 4 chunks of 16 clusters' distances
    threads = torch.get_num_threads()
    try:
        fits = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            fits.append(Palette.fit(pixels, clusters=16, iterations=4))
    finally:
        torch.set_num_threads(threads)
    assert fits[0] == fits[1] == fits[2]


def test_fit_leaves_no_cluster_empty_even_from_a_bad_start(rng):
    _, pixels = blobs(rng, 6, 200, spread=0.05)
    pixels = np.clip(pixels, -1, 1)
    # three centres far from every pixel, two of them identical: all three start empty
    init = np.concatenate([pixels[:3], np.full((3, 3), 1.0, np.float32)])
    init[4] = init[5]
    palette = Palette.fit(pixels, clusters=6, init=init, iterations=3)
    counts = np.bincount(palette.encode(pixels), minlength=6)
    assert counts.min() >= 1, counts
    assert len(np.unique(palette.centers, axis=0)) == 6


def test_fit_on_real_looking_pixels_uses_every_cluster(rng):
    # skewed data: most pixels one colour, a long tail of others
    common = np.tile(rng.integers(0, 256, (1, 3), dtype=np.uint8), (5000, 1))
    tail = rng.integers(0, 256, (300, 3), dtype=np.uint8)
    pixels = np.concatenate([common, tail])
    palette = Palette.fit(pixels, clusters=64, seed=1)
    assert np.bincount(palette.encode(pixels), minlength=64).min() >= 1


def test_fit_with_exactly_as_many_colours_as_clusters_returns_them(rng):
    colours = np.unique(rng.integers(0, 256, (7, 3), dtype=np.uint8), axis=0)
    pixels = colours[rng.integers(0, len(colours), 2000)]
    palette = Palette.fit(pixels, clusters=len(colours))
    assert {tuple(c) for c in palette.decode(np.arange(len(colours)))} == {tuple(c) for c in colours}


@pytest.mark.parametrize("as_float", [False, True])
def test_fit_refuses_fewer_distinct_colours_than_clusters(rng, as_float):
    colours = np.array([[0, 0, 0], [255, 255, 255], [10, 200, 30], [1, 2, 3], [90, 90, 90]], np.uint8)
    pixels = colours[rng.integers(0, 5, 1000)]
    if as_float:
        pixels = UINT8_TO_UNIT[pixels]
    with pytest.raises(ArgumentError, match="only 5 distinct colours, fewer than clusters=6"):
        Palette.fit(pixels, clusters=6)


def test_fit_accepts_images_lists_tensors_and_floats(rng):
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(5, 7), (9, 4), (6, 6)]]
    flat = np.concatenate([im.reshape(-1, 3) for im in images])
    from_list = Palette.fit(images, clusters=8, seed=2)
    assert from_list == Palette.fit(flat, clusters=8, seed=2)
    assert from_list == Palette.fit(torch.from_numpy(flat), clusters=8, seed=2)
    batch = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    assert len(Palette.fit(batch, clusters=8)) == 8
    floats = Palette.fit(UINT8_TO_UNIT[flat], clusters=8)
    assert floats.centers.shape == (8, 3) and np.abs(floats.centers).max() <= 1


def test_fit_subsamples_to_max_pixels(rng):
    pixels = rng.uniform(-1, 1, (5000, 3)).astype(np.float32)
    # with max_pixels below the number of clusters, the subsample itself is too small
    with pytest.raises(ArgumentError, match="only 10 pixels"):
        Palette.fit(pixels, clusters=16, max_pixels=10)
    assert len(Palette.fit(pixels, clusters=16, max_pixels=100)) == 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clusters": 0}, "clusters must be a positive integer"),
        ({"clusters": -3}, "clusters must be a positive integer"),
        ({"clusters": 2.5}, "clusters must be a positive integer"),
        ({"clusters": True}, "clusters must be a positive integer"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"iterations": -1}, "iterations"),
        ({"init": np.zeros((3, 3))}, r"init must hold clusters=4 centres"),
    ],
)
def test_fit_rejects_bad_arguments(rng, kwargs, match):
    pixels = rng.uniform(-1, 1, (100, 3))
    with pytest.raises(ArgumentError, match=match):
        Palette.fit(pixels, **{"clusters": 4, **kwargs})


@pytest.mark.parametrize(
    "pixels, match",
    [
        (np.zeros((10, 4)), r"shape \(\.\.\., 3\)"),
        (np.zeros(3), None),  # a single colour: one pixel, fewer than the clusters
        (np.full((10, 3), np.nan), "NaN"),
        (np.full((10, 3), 200.0), r"outside \[-1, 1\].*x / 127.5 - 1"),
        (np.zeros((10, 3), dtype=np.int64), "dtype int64"),
        ([np.zeros((4, 3), np.uint8), np.zeros((4, 2), np.uint8)], r"shape \(\.\.\., 3\)"),
    ],
)
def test_fit_rejects_bad_pixels(pixels, match):
    with pytest.raises(ArgumentError, match=match):
        Palette.fit(pixels, clusters=4)


# ---- encoding and decoding ----


def test_encode_is_the_exact_nearest_centre(rng):
    palette = Palette(rng.uniform(-1, 1, (200, 3)))
    floats = rng.uniform(-1, 1, (5000, 3)).astype(np.float32)
    assert np.array_equal(palette.encode(floats), brute_force_nearest(floats, np.array(palette.to_list())))
    colours = rng.integers(0, 256, (3000, 3), dtype=np.uint8)
    assert np.array_equal(
        palette.encode(colours), brute_force_nearest(UINT8_TO_UNIT[colours], np.array(palette.to_list()))
    )


def test_encode_decides_near_ties_exactly(rng):
    """Pixels a hair either side of the plane between two centres: float32 distances cannot tell which side
    they are on; encode must still agree with a float64 search."""
    centres = rng.uniform(-0.9, 0.9, (64, 3))
    palette = Palette(centres)
    a, b = palette.centers[rng.integers(0, 64, 4000)], palette.centers[rng.integers(0, 64, 4000)]
    keep = np.abs(a - b).sum(1) > 0
    a, b = a[keep], b[keep]
    offset = rng.uniform(-3e-7, 3e-7, (len(a), 1)).astype(np.float32)
    pixels = ((a + b) / 2 + offset * (b - a)).astype(np.float32)
    ours = palette.encode(pixels)
    assert np.array_equal(ours, brute_force_nearest(pixels, np.array(palette.to_list())))


def test_large_uint8_batches_go_through_the_colour_memo_exactly(rng):
    palette = Palette(rng.uniform(-1, 1, (64, 3)))
    reference = np.array(palette.to_list())
    colours = rng.integers(0, 256, (40000, 3), dtype=np.uint8)
    first = colours[rng.integers(0, len(colours), 70000)]  # repeated colours, over the memo threshold
    assert np.array_equal(palette.encode(first), brute_force_nearest(UINT8_TO_UNIT[first], reference))
    assert palette._memo is not None and (palette._memo >= 0).sum() == len(np.unique(first, axis=0))
    # a second batch: some colours memoised, some new
    second = np.concatenate([first[:35000], rng.integers(0, 256, (35000, 3), dtype=np.uint8)])
    assert np.array_equal(palette.encode(second), brute_force_nearest(UINT8_TO_UNIT[second], reference))
    assert np.array_equal(palette.encode(second[:100]), palette.encode(second)[:100])  # small: direct search


def test_encode_breaks_exact_ties_towards_the_lower_index():
    palette = Palette(np.array([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    # on the plane x = 0 the first two centres are equally near; below y = 0.25 they beat the third
    pixels = np.array([[0.0, 0.0, 0.0], [0.0, -0.5, 0.25], [0.0, -0.1, -1.0]], np.float32)
    assert palette.encode(pixels).tolist() == [0, 0, 0]
    assert Palette(palette.centers[[1, 0, 2]]).encode(pixels).tolist() == [0, 0, 0]


def test_duplicate_centres_are_refused_wherever_a_palette_is_made(tmp_path, rng):
    centres = rng.uniform(-1, 1, (5, 3))
    with pytest.raises(ArgumentError, match="centre 5 repeats centre 2: 2 of the 7"):
        Palette(np.concatenate([centres, centres[2:4]]))
    (tmp_path / "twice.json").write_text(json.dumps({"clusters": [[0.1, 0.2, 0.3]] * 2}))
    with pytest.raises(CheckpointError, match="repeats centre 0"):
        Palette.load(tmp_path / "twice.json")


def test_fit_refuses_no_pixels_and_one_cluster_commands_refuse():
    for empty in (np.zeros((0, 3), np.uint8), np.zeros((0, 3), np.float32)):
        with pytest.raises(ArgumentError, match="no pixels"):
            Palette.fit(empty, clusters=2)
    for bad in (1, 0, 65536, 2.5, True):
        with pytest.raises(ArgumentError, match="--clusters must be"):
            check_clusters(bad)
    assert check_clusters(2) == 2 and check_clusters(np.int64(65535)) == 65535


def test_encode_accepts_any_leading_shape_and_torch(rng):
    palette = Palette(rng.uniform(-1, 1, (16, 3)))
    pixels = rng.uniform(-1, 1, (2, 3, 4, 3)).astype(np.float32)
    ids = palette.encode(pixels)
    assert ids.shape == (2, 3, 4) and ids.dtype == np.int64
    assert np.array_equal(palette.encode(torch.from_numpy(pixels)), ids)
    assert palette.encode(np.zeros((0, 3), np.float32)).shape == (0,)


@pytest.mark.parametrize(
    "pixels, match",
    [
        (np.zeros((4, 2)), r"\(\.\.\., 3\)"),
        (np.array([[0.0, np.inf, 0.0]]), "NaN or infinite"),
        (np.array([[0.0, 1.5, 0.0]]), r"outside \[-1, 1\]"),
        (np.array([["a", "b", "c"]]), "dtype"),
    ],
)
def test_encode_rejects_bad_pixels(pixels, match):
    with pytest.raises(ArgumentError, match=match):
        Palette(np.linspace(-1, 1, 6).reshape(2, 3)).encode(pixels)


def test_decode_maps_ids_to_rounded_colours(rng):
    centres = rng.uniform(-1, 1, (32, 3))
    palette = Palette(centres)
    ids = rng.integers(0, 32, (3, 5))
    colours = palette.decode(ids)
    assert colours.shape == (3, 5, 3) and colours.dtype == np.uint8
    assert np.array_equal(colours, np.clip(np.rint(127.5 * (centres[ids] + 1)), 0, 255).astype(np.uint8))
    assert np.array_equal(palette.decode(torch.from_numpy(ids)), colours)
    assert np.array_equal(palette.decode(ids.astype(np.uint16)), colours)


def test_decode_then_encode_is_the_identity_for_distinct_colours(rng):
    colours = np.unique(rng.integers(0, 256, (100, 3), dtype=np.uint8), axis=0)
    palette = Palette(colours / 127.5 - 1)
    ids = rng.integers(0, len(palette), 1000)
    assert np.array_equal(palette.encode(palette.decode(ids)), ids)


def test_decode_rejects_ids_outside_the_palette():
    palette = Palette(np.linspace(-1, 1, 24).reshape(8, 3))
    with pytest.raises(ArgumentError, match="token id 8 .*SOS"):
        palette.decode(np.array([0, 8]))
    with pytest.raises(ArgumentError, match="token id -1"):
        palette.decode(np.array([-1]))
    with pytest.raises(ArgumentError, match="integers"):
        palette.decode(np.array([0.5]))


# ---- construction, persistence ----


@pytest.mark.parametrize(
    "centres, match",
    [
        (np.zeros((4, 2)), r"shape \(K, 3\)"),
        (np.zeros((0, 3)), "K >= 1"),
        (np.zeros(3), r"shape \(K, 3\)"),
        (np.array([[0, np.nan, 0]]), "NaN"),
        (np.array([[0, 128, 255]]), r"\[-1, 1\].*c / 127.5 - 1"),
    ],
)
def test_palette_rejects_bad_centres(centres, match):
    with pytest.raises(ArgumentError, match=match):
        Palette(centres)


def test_palette_pickles_without_its_memo(rng):
    import pickle

    palette = Palette(rng.uniform(-1, 1, (8, 3)))
    colours = rng.integers(0, 256, (70000, 3), dtype=np.uint8)
    ids = palette.encode(colours)
    data = pickle.dumps(palette)
    assert len(data) < 10_000  # not the 32 MiB memo
    copy = pickle.loads(data)
    assert copy == palette and copy._memo is None and np.array_equal(copy.encode(colours), ids)
    with pytest.raises(ValueError):
        copy.centers[0, 0] = 1.0


def test_centres_are_read_only():
    palette = Palette(np.linspace(-1, 1, 6).reshape(2, 3))
    with pytest.raises(ValueError):
        palette.centers[0, 0] = 1.0


def test_save_and_load_round_trip_exactly(tmp_path, rng):
    palette = Palette.fit(rng.uniform(-1, 1, (2000, 3)), clusters=12)
    path = palette.save(tmp_path / "sub" / "palette.json")
    data = json.loads(path.read_text())
    assert list(data) == ["clusters"] and len(data["clusters"]) == 12 and len(data["clusters"][0]) == 3
    loaded = Palette.load(path)
    assert loaded == palette and loaded.fingerprint() == palette.fingerprint()
    assert np.array_equal(loaded.centers, palette.centers)


def test_float64_centres_survive_saving(tmp_path, rng):
    centres = rng.uniform(-1, 1, (6, 3))  # float64, not representable in float32
    loaded = Palette.load(Palette(centres).save(tmp_path / "p.json"))
    assert np.array_equal(np.array(loaded.to_list()), centres)
    assert loaded.centers.dtype == np.float32


def test_load_reads_transformers_preprocessor_config(tmp_path, rng):
    from transformers import ImageGPTImageProcessorPil

    clusters = rng.uniform(-1, 1, (10, 3)).astype(np.float32)
    ImageGPTImageProcessorPil(clusters=clusters, size={"height": 4, "width": 4}).save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "preprocessor_config.json"):
        assert np.array_equal(Palette.load(source).centers, clusters)


def test_load_reads_the_original_npy(tmp_path, rng):
    centres = rng.uniform(-1, 1, (9, 3)).astype(np.float32)
    np.save(tmp_path / "kmeans_centers.npy", centres)
    assert np.array_equal(Palette.load(tmp_path / "kmeans_centers.npy").centers, centres)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Palette.load(tmp_path / "missing.json")
    with pytest.raises(CheckpointError, match="does not exist"):
        Palette.load(tmp_path)  # a directory without preprocessor_config.json
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .* as JSON"):
        Palette.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"size": 32}')
    with pytest.raises(CheckpointError, match="no 'clusters'"):
        Palette.load(tmp_path / "other.json")
    (tmp_path / "shape.json").write_text('{"clusters": [[0, 0], [1, 1]]}')
    with pytest.raises(CheckpointError, match=r"shape \(K, 3\)"):
        Palette.load(tmp_path / "shape.json")
    (tmp_path / "ragged.json").write_text('{"clusters": [[0, 0, 0], [1]]}')
    with pytest.raises(CheckpointError, match="not a list of"):
        Palette.load(tmp_path / "ragged.json")
    with pytest.raises(ImageGPTError, match="is a folder"):
        Palette(np.linspace(-1, 1, 6).reshape(2, 3)).save(tmp_path)


def test_fingerprint_is_short_stable_and_sensitive():
    palette = Palette(np.array([[0.0, 0.5, -1.0], [1.0, 0.25, 0.0]]))
    # pinned: cache keys computed by an earlier run must stay valid
    assert palette.fingerprint() == Palette(palette.to_list()).fingerprint() == "57a1f34b713e9e16"
    nudged = Palette(np.array([[0.0, 0.5, -1.0], [1.0, 0.25, 1e-9]]))
    assert nudged.fingerprint() != palette.fingerprint()
    assert len(palette) == 2 and "fingerprint" in repr(palette)
