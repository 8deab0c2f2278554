"""The colour palette: k-means clusters in the [-1, 1] RGB space the released models use.

A pixel's token is the index of its nearest cluster centre (squared Euclidean distance); decoding maps a
token back to its centre's colour, `rint(127.5 * (c + 1))` as uint8. Palettes save as JSON with a "clusters"
list of [r, g, b] floats, the field transformers' preprocessor_config.json uses, and load from either file
(or from the original release's kmeans_centers.npy).

Nearest-centre search is chunked over pixels: per chunk, one matmul writes ||c||^2 - 2 x.c into a reused
float32 buffer of 2 MiB (cache-sized) and numpy's SIMD argmin (about 10x torch's on CPU) picks the centre, so
memory beyond inputs and outputs stays at 2 MiB per thread whatever the number of pixels. `encode` is exact:
pixels whose best and second-best float32 distances are too close to call are re-decided in float64, so the
tokens equal a float64 nearest-centre search, which is what transformers' PIL processor does. Large uint8
batches also go through a memo of every colour seen, so a dataset costs one search per distinct colour.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import ArgumentError, CheckpointError
from .files import check_output, write_text_atomic

# The most clusters a command fits: token ids are stored as uint16 (imagegpt.data's cache), with room for SOS.
MAX_CLUSTERS = 65535
_BUFFER_ENTRIES = 1 << 19  # float32 distances per chunk: 2 MiB, small enough to stay in cache
_MEMO_PIXELS = 1 << 16  # uint8 batches this large use the colour memo

# uint8 -> [-1, 1] (x / 127.5 - 1) exactly as transformers computes it: x * (1/255) in float64, to float32,
# then (x - 0.5) / 0.5 in float32; our pixel values, and so our tokens, are bit-identical to its processor's.
UINT8_TO_UNIT = (
    (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)
) / np.float32(0.5)


def check_clusters(clusters, what: str = "--clusters") -> int:
    """The palette size every command accepts (train, demo, palette fit): an integer in [2, MAX_CLUSTERS].

    One colour is refused: every image would be the same tokens, and its bits/dim a meaningless 0.
    """
    if isinstance(clusters, bool) or not isinstance(clusters, int | np.integer):
        raise ArgumentError(f"{what} must be an integer in [2, {MAX_CLUSTERS}], got {clusters!r}")
    if not 2 <= clusters <= MAX_CLUSTERS:
        raise ArgumentError(
            f"{what} must be in [2, {MAX_CLUSTERS}], got {clusters}: a palette needs at least two colours "
            f"to tell anything apart, and token ids are stored as 16-bit integers"
        )
    return int(clusters)


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype in (torch.bfloat16, torch.float16):
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def _unit_pixels(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 colours or floats in [-1, 1], shape (..., 3) -> float32 (N, 3) in [-1, 1]."""
    if array.ndim == 0 or array.shape[-1] != 3:
        raise ArgumentError(
            f"{what} must have 3 colour channels in the last axis (shape (..., 3)), got shape {array.shape}"
        )
    array = array.reshape(-1, 3)
    if array.dtype == np.uint8:
        return UINT8_TO_UNIT[array]
    if not np.issubdtype(array.dtype, np.floating):
        raise ArgumentError(
            f"{what} has dtype {array.dtype}; pass uint8 colours (0-255) or floats in [-1, 1] (x / 127.5 - 1)"
        )
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ArgumentError(f"{what} contains NaN or infinite values; remove or fill them first")
    if array.size and (array.min() < -1 - 1e-4 or array.max() > 1 + 1e-4):
        raise ArgumentError(
            f"{what} holds floats in [{array.min():.3g}, {array.max():.3g}], outside [-1, 1]; pass uint8 "
            "colours, or map 0-255 values with x / 127.5 - 1 (and [0, 1] values with 2 * x - 1)"
        )
    return array


@contextlib.contextmanager
def _chunk_parallel():
    """Run torch single-threaded inside and yield how many threads it had, for our own pool over chunks.

    The distance chunks are small (2 MiB), so torch's intra-op parallelism spends more on barriers than it
    gains, and on a loaded machine its OpenMP threads wait on each other: 1M x 512 distances took 15 s with
    two intra-op threads against 0.5 s with one. Independent chunks in our own threads keep both cores busy
    without barriers. torch's thread count is process-wide: other threads' torch calls run single-threaded
    meanwhile.
    """
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield threads
        finally:
            torch.set_num_threads(threads)


_THREADS_LOCK = threading.Lock()


def _nearest(
    pixels: torch.Tensor,
    centres: torch.Tensor,
    centres64: torch.Tensor | None = None,
    workers: int = 1,
    with_second: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Nearest centre of each pixel: (N, 3) float32 pixels, (K, 3) float32 centres -> (N,) int64 ids, the
    (N,) float32 min_k ||c_k||^2 - 2 x.c_k (the squared distance less ||x||^2), and with `with_second` the
    runner-up's value likewise (inf when K = 1).

    With `centres64`, near ties (best and second-best within the float32 error bound) are re-decided in
    float64 against those centres, so the ids equal an exact nearest-centre search (ties: the lower index).
    Call inside `_chunk_parallel()`; `workers` threads each take a contiguous share of the chunks.
    """
    n, k = len(pixels), len(centres)
    minus_2ct = (-2 * centres).T.contiguous()  # (3, K)
    c2 = (centres * centres).sum(1)  # (K,)
    ids = np.empty(n, dtype=np.int64)
    best = np.empty(n, dtype=np.float32)
    second = np.full(n, np.inf, dtype=np.float32) if (with_second or centres64 is not None) else None
    chunk = max(16, _BUFFER_ENTRIES // k)

    def run(first: int, last: int) -> None:
        buffer = torch.empty(min(chunk, last - first), k)
        for start in range(first, last, chunk):
            stop = min(start + chunk, last)
            d = buffer[: stop - start]
            torch.addmm(c2, pixels[start:stop], minus_2ct, out=d)  # (chunk, K)
            d_np = d.numpy()
            np.argmin(d_np, axis=1, out=ids[start:stop])  # numpy's SIMD argmin: ~10x torch's on CPU
            rows = np.arange(stop - start)
            best[start:stop] = d_np[rows, ids[start:stop]]
            if second is not None and k > 1:
                d_np[rows, ids[start:stop]] = np.inf
                second[start:stop] = torch.amin(d, 1).numpy()

    n_chunks = -(-n // chunk)
    workers = max(1, min(workers, n_chunks))
    if workers == 1:
        run(0, n)
    else:
        bounds = [min(n, chunk * (n_chunks * i // workers)) for i in range(workers + 1)]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, bounds[:-1], bounds[1:]))
    if centres64 is not None and k > 1:
        # float32 error of d is a few ulps of its largest term; re-decide gaps under 100x that bound
        scale = float(c2.max()) + 2 * float(pixels.abs().max()) * float(centres.abs().sum(1).max()) + 1
        close = np.flatnonzero(second - best <= 1e-5 * scale)
        for start in range(0, len(close), chunk):
            rows = close[start : start + chunk]
            x = pixels[torch.from_numpy(rows)].double()
            exact = sum((x[:, j, None] - centres64[None, :, j]) ** 2 for j in range(3))  # (chunk, K) float64
            ids[rows] = exact.argmin(1).numpy()  # the first minimum: lower index wins ties
    return ids, best, second


class Palette:
    """K colour cluster centres in [-1, 1] RGB; `len(palette)` is K.

    centers: (K, 3) float32, read-only. Centres given as float64 (a loaded file, say) keep those values for
    encoding, saving and the fingerprint, so a transformers palette encodes exactly as transformers does.
    """

    def __init__(self, centers) -> None:
        centers64 = _as_numpy(centers).astype(np.float64)
        if centers64.ndim != 2 or centers64.shape[1] != 3 or len(centers64) < 1:
            raise ArgumentError(
                f"palette centres must have shape (K, 3) with K >= 1, got shape {centers64.shape}"
            )
        if not np.isfinite(centers64).all():
            raise ArgumentError("palette centres contain NaN or infinite values")
        if np.abs(centers64).max() > 1 + 1e-4:
            raise ArgumentError(
                f"palette centres must lie in [-1, 1] RGB, got values in [{centers64.min():.3g}, "
                f"{centers64.max():.3g}]; a palette in 0-255 units maps with c / 127.5 - 1"
            )
        distinct, first = np.unique(centers64, axis=0, return_index=True)
        if len(distinct) < len(centers64):
            repeated = int(np.setdiff1d(np.arange(len(centers64)), first)[0])
            original = int(np.flatnonzero((centers64 == centers64[repeated]).all(axis=1))[0])
            duplicates = len(centers64) - len(distinct)
            raise ArgumentError(
                f"palette centre {repeated} repeats centre {original}: {duplicates} of the {len(centers64)} "
                "centres are duplicates, whose tokens could never occur; remove them or fit the palette again"
            )
        self._centers64 = np.ascontiguousarray(centers64)
        self._centers32 = self._centers64.astype(np.float32)
        self._torch32 = torch.from_numpy(self._centers32.copy())
        self._torch64 = torch.from_numpy(self._centers64.copy())
        lut = np.rint(127.5 * (self._centers64 + 1))
        self._colours = np.clip(lut, 0, 255).astype(np.uint8)  # (K, 3)
        self._memo: np.ndarray | None = None  # id of every uint8 colour met so far, -1 if not yet

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_memo": None}  # the 32 MiB memo is a cache: do not pickle it

    @property
    def centers(self) -> np.ndarray:
        view = self._centers32.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._centers32)

    def __repr__(self) -> str:
        return f"Palette(clusters={len(self)}, fingerprint={self.fingerprint()!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Palette) and np.array_equal(self._centers64, other._centers64)

    # ---- fitting ----

    @classmethod
    def fit(
        cls,
        pixels,
        clusters: int = 512,
        seed: int = 0,
        max_pixels: int = 1_000_000,
        iterations: int = 20,
        tolerance: float = 1e-4,
        init_pixels: int | None = None,
        init=None,
    ) -> Palette:
        """k-means in [-1, 1] RGB: k-means++ seeding, then Lloyd iterations. Deterministic for a seed.

        pixels: uint8 colours (..., 3), read as x / 127.5 - 1 (so images [N, H, W, 3] work as they are);
            floats (..., 3) in [-1, 1]; a torch tensor of either; or a list of such arrays (images of mixed
            sizes).
        max_pixels: fit on a random subsample of this many pixels (chosen with `seed`).
        iterations: at most this many Lloyd updates; fewer once no centre moves more than `tolerance`.
        init_pixels: k-means++ seeds from a subsample of this many pixels (default max(65536, 64 * clusters)).
        init: (clusters, 3) starting centres in [-1, 1] instead of k-means++ seeding.

        No cluster ends empty: a cluster that loses all its pixels is re-seeded at the pixel farthest from
        every centre, and the loop runs until the last assignment leaves every cluster at least one pixel.
        Fewer distinct colours than `clusters` raises ArgumentError rather than returning duplicate centres
        (tokens that could never occur).

        Speed and memory: 1M pixels x 512 clusters, 20 passes, on the 2-core dev CPU shared with other jobs
        (load average 7-8): 3.9-4.6 s for pixels of photographs (~200k distinct colours), 20-24 s for
        uniformly random colours (all distinct); see benchmarks/bench_palette.py. Memory is about 40 bytes
        per distinct colour (1M: 40 MB) plus a 2 MiB distance buffer per thread. The result does not depend
        on the number of threads.
        """
        if not isinstance(clusters, int | np.integer) or isinstance(clusters, bool) or clusters < 1:
            raise ArgumentError(f"clusters must be a positive integer, got {clusters!r}")
        if not isinstance(max_pixels, int | np.integer) or max_pixels < 1:
            raise ArgumentError(f"max_pixels must be a positive integer, got {max_pixels!r}")
        if not isinstance(iterations, int | np.integer) or iterations < 0:
            raise ArgumentError(f"iterations must be a non-negative integer, got {iterations!r}")
        if not tolerance >= 0:
            raise ArgumentError(f"tolerance must be >= 0, got {tolerance!r}")
        rng = np.random.default_rng(seed)
        x, weights = _sample_pixels(pixels, max_pixels, rng)
        if len(x) == 0:
            raise ArgumentError("no pixels to fit a palette on: pass at least one pixel per cluster")
        if len(x) < clusters:
            kind = "distinct colours" if x.dtype == np.uint8 else "pixels"
            raise ArgumentError(
                f"the pixels hold only {len(x)} {kind}, fewer than clusters={clusters}; fit at most "
                f"{len(x)} clusters or pass more varied pixels"
            )
        x = np.ascontiguousarray(_unit_pixels(x, "pixels"))
        if init is not None:
            init = _unit_pixels(_as_numpy(init), "init")
            if init.shape != (clusters, 3):
                raise ArgumentError(f"init must hold clusters={clusters} centres, shape ({clusters}, 3)")
        with _chunk_parallel() as workers:
            centres = _lloyd(x, weights, clusters, rng, iterations, tolerance, init_pixels, init, workers)
        return cls(centres)

    # ---- encoding and decoding ----

    def encode(self, pixels) -> np.ndarray:
        """Nearest centre of each pixel: (..., 3) floats in [-1, 1] (or uint8 colours; numpy or torch) ->
        (...) int64 ids. Exact: equal to a float64 search, ties going to the lower index.

        uint8 colours in batches of at least 65536 pixels go through a memo of every colour met so far (a
        32 MiB table over the 2^24 colours, made on first use): each distinct colour is searched once, so
        tokenising a dataset costs about one search per distinct colour rather than per pixel.
        """
        array = _as_numpy(pixels)
        shape = array.shape[:-1]
        if array.dtype == np.uint8 and array.ndim and array.shape[-1] == 3 and array.size >= 3 * _MEMO_PIXELS:
            return self._encode_colours(array.reshape(-1, 3)).reshape(shape)
        x = torch.from_numpy(np.ascontiguousarray(_unit_pixels(array, "pixels")))
        if len(x) == 0:
            return np.zeros(shape, dtype=np.int64)
        with _chunk_parallel() as workers:
            ids, _, _ = _nearest(x, self._torch32, self._torch64, workers)
        return ids.reshape(shape)

    def _encode_colours(self, colours: np.ndarray) -> np.ndarray:
        """(N, 3) uint8 -> (N,) int64 ids through the colour memo."""
        if self._memo is None:
            self._memo = np.full(1 << 24, -1, dtype=np.int16 if len(self) < 2**15 else np.int32)
        packed = _pack(colours)
        ids = self._memo[packed]
        missing = ids < 0
        if missing.any():
            new, _ = _unique_counts(packed[missing])
            x = torch.from_numpy(np.ascontiguousarray(UINT8_TO_UNIT[_unpack(new)]))
            with _chunk_parallel() as workers:
                found, _, _ = _nearest(x, self._torch32, self._torch64, workers)
            self._memo[new] = found
            ids[missing] = self._memo[packed[missing]]
        return ids.astype(np.int64)

    def decode(self, ids) -> np.ndarray:
        """(...) palette ids (numpy or torch) -> (..., 3) uint8 colours, rint(127.5 * (c + 1))."""
        ids = _as_numpy(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ArgumentError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids.max() if ids.max() >= len(self) else ids.min()
            hint = " (that is the SOS id; strip it before decoding)" if bad == len(self) else ""
            raise ArgumentError(f"token id {int(bad)} is not a palette index 0..{len(self) - 1}{hint}")
        return self._colours[ids]

    # ---- persistence ----

    def fingerprint(self) -> str:
        """16 hex digits identifying the centres (their float64 values), for cache keys."""
        digest = hashlib.sha256(f"{self._centers64.shape}".encode())
        digest.update(self._centers64.astype("<f8").tobytes())
        return digest.hexdigest()[:16]

    def to_list(self) -> list[list[float]]:
        """The centres as the [[r, g, b], ...] list preprocessor_config.json stores under "clusters"."""
        return self._centers64.tolist()

    def save(self, path: str | os.PathLike) -> Path:
        """Write {"clusters": [[r, g, b], ...]} to a JSON file (floats round-trip exactly)."""
        path = check_output(path, what="palette file")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"clusters": self.to_list()}) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Palette:
        """Read a palette JSON, a preprocessor_config.json, a directory holding one, or a (K, 3) .npy file."""
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        if not path.is_file():
            raise CheckpointError(
                f"palette file {path} does not exist; pass a palette .json, a preprocessor_config.json or a "
                "directory that holds one"
            )
        if path.suffix == ".npy":
            try:
                centres = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot read {path} as a .npy array of (K, 3) centres: {e}") from e
            return _palette_from(centres, path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {path} as JSON: {e}") from e
        if not isinstance(data, dict) or data.get("clusters") is None:
            raise CheckpointError(
                f"{path} has no 'clusters' list; a palette file or preprocessor_config.json stores the "
                'centres as "clusters": [[r, g, b], ...]'
            )
        return _palette_from(data["clusters"], path)


def _palette_from(centres, path: Path) -> Palette:
    try:
        array = np.asarray(centres, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the clusters in {path} are not a list of [r, g, b] numbers: {e}") from e
    try:
        return Palette(array)
    except ArgumentError as e:
        raise CheckpointError(f"bad palette in {path}: {e}") from e


def _sample_pixels(pixels, max_pixels: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """At most max_pixels of the input's pixels, chosen with rng, as (colours (U, 3), weights (U,)).

    uint8 pixels come back as their distinct colours (sorted) and how often each was drawn: natural images
    repeat colours (1M pixels of photographs hold about 200k colours), and k-means on weighted distinct
    colours makes the same assignments and means as on every pixel, several times faster. Float pixels come
    back as they are, each with weight 1.
    """
    if isinstance(pixels, list | tuple) and pixels and not np.isscalar(pixels[0]):
        parts = [_as_numpy(p) for p in pixels]
        for p in parts:
            if p.ndim == 0 or p.shape[-1] != 3:
                raise ArgumentError(f"each array of pixels must have shape (..., 3), got shape {p.shape}")
        if all(p.dtype == np.uint8 for p in parts):
            array = np.concatenate([p.reshape(-1, 3) for p in parts])
        else:
            array = np.concatenate([_unit_pixels(p, "pixels") for p in parts])
    else:
        array = _as_numpy(pixels)
        if array.ndim == 0 or array.shape[-1] != 3:
            raise ArgumentError(f"pixels must have shape (..., 3) (RGB in the last axis), got {array.shape}")
        array = array.reshape(-1, 3)
    if len(array) > max_pixels:
        array = array[np.sort(rng.choice(len(array), size=max_pixels, replace=False))]
    if array.dtype != np.uint8:
        array = np.ascontiguousarray(_unit_pixels(array, "pixels"))
        return array, np.ones(len(array))
    colours, counts = _unique_counts(_pack(array))
    return _unpack(colours), counts.astype(np.float64)


def _pack(colours: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 -> (N,) int32 r << 16 | g << 8 | b."""
    packed = (colours[:, 0].astype(np.int32) << 16) | (colours[:, 1].astype(np.int32) << 8)
    packed |= colours[:, 2]
    return packed


def _unpack(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], 1).astype(np.uint8)


def _unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and their counts. Sorting does it in 30 ms for 1M int32s, where numpy 2.4's
    hash-based np.unique took 3 s."""
    ordered = np.sort(values)
    if len(ordered) == 0:
        return ordered, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return ordered[starts], np.diff(np.append(starts, len(ordered)))


def _lloyd(
    x: np.ndarray,
    weights: np.ndarray,
    clusters: int,
    rng: np.random.Generator,
    iterations: int,
    tolerance: float,
    init_pixels: int | None,
    init: np.ndarray | None,
    workers: int,
) -> np.ndarray:
    """Weighted k-means on (N, 3) float32 colours: k-means++ seeding (or `init`), then Lloyd passes."""
    n = len(x)
    init_n = init_pixels or max(65536, 64 * clusters)
    if init is not None:
        centres = init.astype(np.float32)
    elif n > init_n:  # seed from a subsample drawn in proportion to the weights
        drawn, counts = _unique_counts(rng.choice(n, size=init_n, p=weights / weights.sum()))
        centres = _kmeans_plus_plus(x[drawn], counts.astype(np.float64), clusters, rng)
        if centres is None:  # the subsample ran out of distinct colours: seed from them all
            centres = _kmeans_plus_plus(x, weights, clusters, rng)
    else:
        centres = _kmeans_plus_plus(x, weights, clusters, rng)
    if centres is None:
        raise _too_few_colours(x, clusters)

    xt = torch.from_numpy(x)
    columns = np.ascontiguousarray(x.T)  # (3, N)
    weighted = columns * weights  # (3, N)
    converged = False
    # Each pass assigns, then stops if enough updates were made and no cluster is empty, else updates.
    # Passes past `iterations` happen only to re-seed empty clusters.
    for step in range(iterations + 100):
        ids, _, _ = _nearest(xt, torch.from_numpy(centres), workers=workers)
        mass = np.bincount(ids, weights=weights, minlength=clusters)
        empty = np.flatnonzero(mass == 0)
        if (step >= iterations or converged) and len(empty) == 0:
            return centres
        sums = np.stack([np.bincount(ids, weights=weighted[j], minlength=clusters) for j in range(3)], 1)
        new = (sums / np.maximum(mass, 1e-300)[:, None]).astype(np.float32)
        if len(empty):
            # exact squared distances to the assigned centres: a colour on its centre must read 0
            distance = sum((columns[j] - centres[ids, j]) ** 2 for j in range(3))
            new[empty] = _farthest_first(x, distance, len(empty), clusters)
        converged = float(np.sqrt(((new - centres) ** 2).sum(1).max())) <= tolerance
        centres = new
    raise RuntimeError(f"k-means still had {len(empty)} empty clusters after {step + 1} passes")


def _squared_distances(columns: np.ndarray, point: np.ndarray) -> np.ndarray:
    """(3, N) colour columns, a (3,) point -> (N,) squared distances (column by column: a sum over an axis
    of length 3 is several times slower)."""
    d = np.square(columns[0] - point[0])
    d += np.square(columns[1] - point[1])
    d += np.square(columns[2] - point[2])
    return d


def _kmeans_plus_plus(
    x: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray | None:
    """k-means++ seeding (Arthur and Vassilvitskii 2007) of weighted colours: each next centre is drawn with
    probability proportional to weight x squared distance to the nearest centre so far. None if x holds
    fewer than k distinct colours."""
    columns = np.ascontiguousarray(x.T)  # (3, N)
    centres = np.empty((k, 3), dtype=np.float32)
    cumulative = np.cumsum(weights)
    centres[0] = x[
        min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(x) - 1)
    ]
    distance = _squared_distances(columns, centres[0])  # (N,) to the nearest chosen centre
    for i in range(1, k):
        cumulative = np.cumsum(weights * distance)
        if cumulative[-1] <= 0:
            return None
        # side="right" skips colours at distance 0, so a colour is never chosen twice
        j = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(x) - 1)
        centres[i] = x[j]
        np.minimum(distance, _squared_distances(columns, centres[i]), out=distance)
    return centres


def _farthest_first(x: np.ndarray, distance: np.ndarray, count: int, clusters: int) -> np.ndarray:
    """`count` new centres for empty clusters: repeatedly the pixel farthest from every centre so far."""
    columns = np.ascontiguousarray(x.T)
    distance = distance.copy()
    chosen = np.empty((count, 3), dtype=np.float32)
    for i in range(count):
        j = int(np.argmax(distance))
        if distance[j] <= 0:
            raise _too_few_colours(x, clusters)
        chosen[i] = x[j]
        np.minimum(distance, _squared_distances(columns, x[j]), out=distance)
    return chosen


def _too_few_colours(x: np.ndarray, clusters: int) -> ArgumentError:
    distinct = len(np.unique(x, axis=0))
    return ArgumentError(
        f"the pixels hold only {distinct} distinct colours, fewer than clusters={clusters}; "
        f"fit at most {distinct} clusters or pass more varied pixels"
    )
