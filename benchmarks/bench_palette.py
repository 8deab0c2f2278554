"""Palette fitting and image-processor throughput, with transformers' ImageGPTImageProcessor side by side.

    python benchmarks/bench_palette.py           # 1M pixels x 512 clusters; processor on 1024 images
    python benchmarks/bench_palette.py --quick   # a smoke test: 100k pixels x 64 clusters, 64 images

Cases:
- Palette.fit, 20 Lloyd passes: on pixels of photographs (scikit-image's sample images, about one in five
  distinct) and on uniformly random colours (all distinct, the worst case for the colour de-duplication).
- Palette.encode of random float pixels (exact nearest centre).
- ImageProcessor.encode against transformers' processor loaded from the same preprocessor_config.json, on
  random 32x32 images, 32x32 tiles of photographs and 256x256 photographs resized to 32x32; tokens are
  checked equal. Ours is timed on a new palette (empty colour memo) and again on the same images (every
  colour memoised, as when a dataset's colours recur).

The machine's load average is printed: other processes make timings noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def photos() -> list[np.ndarray]:
    import skimage.data

    return [getattr(skimage.data, name)()[..., :3] for name in PHOTOS]


def tiles(image: np.ndarray) -> np.ndarray:
    """A photograph shrunk to 256 pixels high and cut into 32x32 tiles: natural CIFAR-sized images."""
    from PIL import Image

    width = 256 * image.shape[1] // image.shape[0] // 32 * 32
    small = np.asarray(Image.fromarray(image).resize((width, 256), Image.BILINEAR))
    return small.reshape(8, 32, width // 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 32, 32, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = parser.parse_args()
    from imagegpt import ImageProcessor, Palette

    pixels, clusters, n_images = (100_000, 64, 64) if args.quick else (1_000_000, 512, 1024)
    rng = np.random.default_rng(0)
    from imagegpt.device import describe_cpu

    print(f"CPU: {describe_cpu()}; load average {os.getloadavg()[0]:.1f}")

    pictures = photos()
    photo_pixels = np.concatenate([image.reshape(-1, 3) for image in pictures])
    random_colours = rng.integers(0, 256, (pixels, 3), dtype=np.uint8)
    for name, source in (("photographs", photo_pixels), ("random colours", random_colours)):
        seconds = timed(lambda s=source: Palette.fit(s, clusters, max_pixels=pixels, iterations=20))
        print(f"Palette.fit {pixels:,} pixels x {clusters} clusters, 20 passes, {name}: {seconds:.2f} s")

    palette = Palette.fit(photo_pixels, clusters, max_pixels=pixels, iterations=5)
    floats = rng.uniform(-1, 1, (pixels, 3)).astype(np.float32)
    seconds = min(timed(lambda: palette.encode(floats)) for _ in range(3))
    print(f"Palette.encode {pixels:,} float pixels x {clusters} clusters: {seconds:.2f} s")

    warnings.filterwarnings("ignore")
    import transformers

    reference_cls = (
        getattr(transformers, "ImageGPTImageProcessorPil", None) or transformers.ImageGPTImageProcessor
    )
    natural = np.concatenate([tiles(image) for image in pictures])
    cases = {
        "random 32x32 images (every colour new)": rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8),
        "32x32 tiles of photographs": natural[rng.integers(0, len(natural), n_images)],
        "photographs 256x256 -> 32x32": np.stack([pictures[i % 7][:256, :256] for i in range(n_images // 4)]),
    }
    with tempfile.TemporaryDirectory() as directory:
        ImageProcessor(palette, 32).save_pretrained(directory)
        reference = reference_cls.from_pretrained(directory)
        for name, batch in cases.items():
            processor = ImageProcessor.from_pretrained(directory)  # a new palette: its colour memo is empty
            new = timed(lambda b=batch, p=processor: p.encode(b))
            repeated = timed(lambda b=batch, p=processor: p.encode(b))
            subset = list(batch[: max(8, len(batch) // 8)])  # transformers is slow: time a share, scale up
            theirs = (
                timed(lambda s=subset: reference(images=s, return_tensors="np")) * len(batch) / len(subset)
            )
            expected = reference(images=subset, return_tensors="np")["input_ids"]
            same = np.array_equal(ImageProcessor.from_pretrained(directory).encode(subset).numpy(), expected)
            print(
                f"ImageProcessor.encode, {len(batch)} {name}: {len(batch) / new:,.0f} images/s on a new "
                f"palette, {len(batch) / repeated:,.0f} repeated; transformers {len(batch) / theirs:,.1f} "
                f"images/s ({theirs / new:.0f}x the time); tokens equal: {same}"
            )
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
