"""ImageProcessor: token parity with transformers, every input form, decoding, configs and errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imagegpt import ImageProcessor, Palette
from imagegpt.errors import ArgumentError, CheckpointError, ConfigError, ImageInputError
from imagegpt.palette import UINT8_TO_UNIT


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"numpy seed {seed}")  # shown on failure, to reproduce
    return np.random.default_rng(seed)


def random_palette(rng, k=32):
    return Palette(rng.uniform(-1, 1, (k, 3)))


def random_image(rng, h, w, channels=3):
    return rng.integers(0, 256, (h, w, channels) if channels else (h, w), dtype=np.uint8)


def transformers_processor(directory):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "ImageGPTImageProcessorPil", None) or transformers.ImageGPTImageProcessor
    return cls.from_pretrained(directory)


def transformers_ids(reference, images) -> np.ndarray:
    ids = reference(images=[Image.fromarray(im) for im in images], return_tensors="np")["input_ids"]
    return np.asarray(ids)


# ---- parity with transformers ----


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "nearest"])
def test_tokens_equal_transformers_on_rgb_images(tmp_path, rng, resample):
    """Random palette, random non-square target, images smaller and larger than it, of mixed sizes."""
    for trial in range(3):
        height, width = (int(v) for v in rng.integers(3, 24, 2))
        processor = ImageProcessor(
            random_palette(rng, int(rng.integers(2, 300))), (height, width), resample=resample
        )
        processor.save_pretrained(tmp_path / str(trial))
        reference = transformers_processor(tmp_path / str(trial))
        sizes = [(height, width), (1, 1), (2 * height + 1, width // 2 + 1)]
        sizes += [tuple(int(v) for v in rng.integers(1, 70, 2)) for _ in range(5)]
        images = [random_image(rng, h, w) for h, w in sizes]
        ours = processor.encode(images)
        assert ours.dtype == torch.long and ours.shape == (len(images), height * width)
        assert np.array_equal(ours.numpy(), transformers_ids(reference, images)), (trial, sizes)


def test_pixels_equal_transformers_pixel_values(tmp_path, rng):
    processor = ImageProcessor(random_palette(rng), (7, 9))
    processor.save_pretrained(tmp_path)
    reference = transformers_processor(tmp_path)
    images = [random_image(rng, 13, 5), random_image(rng, 7, 9)]
    expected = reference(images=images, do_color_quantize=False, return_tensors="np")["pixel_values"]
    pixels = processor.to_pixels(images)
    assert pixels.dtype == np.float32 and pixels.shape == (2, 7, 9, 3)
    assert np.array_equal(pixels, np.asarray(expected).transpose(0, 2, 3, 1))


def test_save_pretrained_loads_in_transformers_as_the_same_processor(tmp_path, rng):
    processor = ImageProcessor(random_palette(rng, 20), (6, 10))
    path = processor.save_pretrained(tmp_path / "new" / "dir")
    assert path.name == "preprocessor_config.json"
    reference = transformers_processor(path.parent)
    assert np.array_equal(
        np.asarray(reference.clusters, dtype=np.float64), np.array(processor.palette.to_list())
    )
    assert (reference.size["height"], reference.size["width"]) == (6, 10)
    assert reference.do_color_quantize and reference.do_resize and reference.do_normalize
    assert int(reference.resample) == 2
    assert ImageProcessor.from_pretrained(path.parent).to_dict() == processor.to_dict()


def test_from_pretrained_reads_what_transformers_writes(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "ImageGPTImageProcessorPil", None) or transformers.ImageGPTImageProcessor
    clusters = rng.uniform(-1, 1, (12, 3)).astype(np.float32)
    cls(clusters=clusters, size={"height": 5, "width": 8}).save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "preprocessor_config.json", str(tmp_path)):
        processor = ImageProcessor.from_pretrained(source)
        assert processor.size == (5, 8) and not processor.center_crop
        assert np.array_equal(processor.palette.centers, clusters)


def test_from_pretrained_reads_the_released_config_format(tmp_path, rng):
    """openai/imagegpt-* files predate do_rescale and give size as an int."""
    config = {
        "clusters": rng.uniform(-1, 1, (16, 3)).tolist(),
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ImageGPTFeatureExtractor",
        "resample": 2,
        "size": 32,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor.size == (32, 32) and len(processor.palette) == 16
    # a null field means transformers' default
    config.update({"do_rescale": None, "image_mean": None, "resample": None, "do_color_quantize": None})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert ImageProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"do_color_quantize": False}, "do_color_quantize is false"),
        ({"do_resize": False}, "do_resize is false"),
        ({"do_normalize": False}, "normalisation"),
        ({"do_rescale": False}, "normalisation"),
        ({"rescale_factor": 1 / 127.5}, "normalisation"),
        ({"image_mean": [0.5, 0.5, 0.4]}, "normalisation"),
        ({"image_std": [0.229, 0.224, 0.225]}, "normalisation"),
        ({"size": {"shortest_edge": 32}}, "not a fixed height and width"),
        ({"size": {"height": 0, "width": 4}}, "size must be"),
        ({"do_center_crop": True, "crop_size": {"height": 4, "width": 4}}, "do_center_crop"),
        ({"do_pad": True}, "do_pad is true"),
        ({"resample": 9}, "resample must be"),
        ({"clusters": None}, "no 'clusters'"),
        ({"clusters": [[0, 0], [1, 1]]}, "bad 'clusters'"),
    ],
)
def test_from_pretrained_refuses_configs_it_cannot_honour(tmp_path, rng, change, match):
    config = ImageProcessor(random_palette(rng, 4), 8).to_dict()
    config.update(change)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match):
        ImageProcessor.from_pretrained(tmp_path)


def test_from_pretrained_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        ImageProcessor.from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="has no preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="cannot read .* as JSON"):
        ImageProcessor.from_pretrained(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a processor config"):
        ImageProcessor.from_pretrained(tmp_path / "list.json")
    with pytest.raises(ArgumentError, match="expected a directory"):
        ImageProcessor.from_pretrained(42)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"pip install 'imagegpt\[hub\]'"):
        ImageProcessor.from_pretrained("someone/some-model")


@pytest.mark.slow
def test_hub_id_offline_is_a_clear_error(tmp_path):
    """In a fresh process so that HF_HUB_OFFLINE takes effect."""
    pytest.importorskip("huggingface_hub")
    code = (
        "from imagegpt import ImageProcessor\n"
        "try:\n    ImageProcessor.from_pretrained('openai/imagegpt-small')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.stdout.startswith("CheckpointError") and "HF_HUB_OFFLINE is set" in result.stdout, result


# ---- input forms ----


def test_every_form_of_an_rgb_image_gives_the_same_tokens(tmp_path, rng):
    processor = ImageProcessor(random_palette(rng), (6, 5))
    image = random_image(rng, 11, 17)
    Image.fromarray(image).save(tmp_path / "image.png")
    expected = processor.encode(image)
    forms = {
        "str path": str(tmp_path / "image.png"),
        "Path": tmp_path / "image.png",
        "PIL": Image.fromarray(image),
        "numpy HWC": image,
        "numpy CHW": np.ascontiguousarray(image.transpose(2, 0, 1)),
        "torch CHW": torch.from_numpy(image).permute(2, 0, 1),
        "torch HWC": torch.from_numpy(image),
        "float [0, 1]": image / 255.0,
        "float32 CHW": (image / 255.0).astype(np.float32).transpose(2, 0, 1),
        "torch float": torch.from_numpy(image / 255.0).permute(2, 0, 1).to(torch.float16),
        "int64": image.astype(np.int64),
        "uint16 (16-bit)": image.astype(np.uint16) * 257,
        "list of one": [image],
        "4-D numpy": image[None],
        "4-D torch": torch.from_numpy(image).permute(2, 0, 1)[None],
    }
    for name, form in forms.items():
        assert torch.equal(processor.encode(form), expected), name
    assert torch.equal(processor(image), expected)  # __call__


def test_batches_of_mixed_sizes_and_forms(tmp_path, rng):
    processor = ImageProcessor(random_palette(rng), 4)
    images = [random_image(rng, h, w) for h, w in [(4, 4), (9, 3), (2, 13)]]
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    singles = torch.cat([processor.encode(im) for im in images])
    mixed = processor.encode(
        [str(tmp_path / "a.png"), Image.fromarray(images[1]), torch.from_numpy(images[2])]
    )
    assert torch.equal(mixed, singles)
    batch = np.stack([random_image(rng, 5, 6) for _ in range(3)])
    assert torch.equal(processor.encode(batch), torch.cat([processor.encode(im) for im in batch]))
    chw = torch.from_numpy(batch).permute(0, 3, 1, 2)
    assert torch.equal(processor.encode(chw), processor.encode(batch))
    assert processor.encode([batch, images[0]]).shape == (4, 16)  # a list may hold a batch
    at_size = np.stack([random_image(rng, 4, 4) for _ in range(3)])  # nothing to resize
    assert np.array_equal(processor.to_rgb(at_size), at_size)
    assert torch.equal(processor.encode(at_size), torch.cat([processor.encode(im) for im in at_size]))


def test_grayscale_is_replicated_to_rgb(rng):
    processor = ImageProcessor(random_palette(rng), (5, 7))
    grey = random_image(rng, 9, 8, channels=0)
    expected = processor.encode(np.repeat(grey[..., None], 3, axis=-1))
    for form in (
        grey,
        grey[..., None],
        grey[None],
        Image.fromarray(grey),
        Image.fromarray(grey).convert("1"),
    ):
        if isinstance(form, Image.Image) and form.mode == "1":
            binary = np.asarray(form, dtype=np.uint8) * 255
            assert torch.equal(processor.encode(form), processor.encode(binary))
        else:
            assert torch.equal(processor.encode(form), expected)
    assert torch.equal(processor.encode(grey > 128), processor.encode((grey > 128).astype(np.uint8) * 255))


def test_alpha_is_composited_onto_white_as_transformers_does(rng):
    from transformers.image_transforms import convert_to_rgb

    processor = ImageProcessor(random_palette(rng), (6, 6))
    rgba = random_image(rng, 10, 12, channels=4)
    rgba[0, :, 3] = 0  # a fully transparent row becomes white
    pil = Image.fromarray(rgba, "RGBA")
    expected_rgb = convert_to_rgb(pil, return_numpy=True)
    assert np.array_equal(expected_rgb[0], np.full((12, 3), 255))
    expected = processor.encode(expected_rgb)
    for form in (pil, rgba, rgba.transpose(2, 0, 1), torch.from_numpy(rgba).permute(2, 0, 1)):
        assert torch.equal(processor.encode(form), expected)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert torch.equal(processor.encode(la), processor.encode(convert_to_rgb(la, return_numpy=True)))


def test_palette_mode_images(rng):
    processor = ImageProcessor(random_palette(rng), (5, 5))
    image = Image.fromarray(random_image(rng, 9, 9)).convert("P")
    assert torch.equal(processor.encode(image), processor.encode(np.asarray(image.convert("RGB"))))
    image.info["transparency"] = 0  # palette entry 0 transparent: those pixels become white
    expected = np.asarray(image.convert("RGB")).copy()
    expected[np.asarray(image) == 0] = 255
    assert torch.equal(processor.encode(image), processor.encode(expected))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, rng):
    processor = ImageProcessor(random_palette(rng), (4, 6))
    deep = rng.integers(0, 65536, (7, 9), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode == "I;16"
    expected = processor.encode(np.rint(deep / 257).astype(np.uint8))
    assert torch.equal(processor.encode(tmp_path / "deep.png"), expected)
    assert torch.equal(processor.encode(deep), expected)
    assert torch.equal(processor.encode(Image.fromarray(deep.astype(np.int32))), expected)  # mode I


def test_exif_orientation_of_files_is_applied(tmp_path, rng):
    processor = ImageProcessor(random_palette(rng), (5, 8))
    image = random_image(rng, 6, 10)
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    Image.fromarray(image).save(tmp_path / "rotated.png", exif=exif)
    assert torch.equal(processor.encode(tmp_path / "rotated.png"), processor.encode(image[::-1, ::-1]))


def test_center_crop_takes_the_central_square(tmp_path, rng):
    processor = ImageProcessor(random_palette(rng), 4, center_crop=True)
    wide, tall = random_image(rng, 6, 11), random_image(rng, 9, 4)
    plain = ImageProcessor(processor.palette, 4)
    assert torch.equal(processor.encode(wide), plain.encode(wide[:, 2:8]))
    assert torch.equal(processor.encode(tall), plain.encode(tall[2:6]))
    assert not torch.equal(processor.encode(wide), plain.encode(wide))
    # A batch already at a non-square target size is still cropped, as the same images one by one are.
    oblong = ImageProcessor(processor.palette, (4, 8), center_crop=True)
    batch = np.stack([random_image(rng, 4, 8) for _ in range(3)])
    assert torch.equal(oblong.encode(batch), oblong.encode(list(batch)))
    assert not torch.equal(oblong.encode(batch), ImageProcessor(processor.palette, (4, 8)).encode(batch))
    processor.save_pretrained(tmp_path)
    assert ImageProcessor.from_pretrained(tmp_path).center_crop
    assert not ImageProcessor.from_pretrained(tmp_path, center_crop=False).center_crop


# ---- decoding ----


def test_decode_round_trips_token_ids(rng):
    colours = np.unique(rng.integers(0, 256, (64, 3), dtype=np.uint8), axis=0)
    processor = ImageProcessor(Palette(colours / 127.5 - 1), (3, 5))
    ids = torch.from_numpy(rng.integers(0, len(colours), (4, 15)))
    images = processor.decode(ids)
    assert images.shape == (4, 3, 5, 3) and images.dtype == np.uint8
    assert np.array_equal(images.reshape(4, 15, 3), colours[ids.numpy()])
    assert torch.equal(processor.encode(images), ids)
    assert np.array_equal(processor.decode(ids.reshape(4, 3, 5)), images)
    assert np.array_equal(processor.decode(ids.numpy()[0]), images[:1])


def test_decode_rejects_ids_that_do_not_fit(rng):
    processor = ImageProcessor(random_palette(rng, 8), (3, 5))
    with pytest.raises(ArgumentError, match=r"do not fit 3x5 images: expected \[B, 15\]"):
        processor.decode(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ArgumentError, match="SOS"):
        processor.decode(torch.full((1, 15), 8))


# ---- errors ----


def test_unreadable_and_missing_files_are_clear_errors(tmp_path, rng):
    processor = ImageProcessor(random_palette(rng), 4)
    (tmp_path / "x.png").write_text("this is not an image")
    with pytest.raises(ImageInputError, match=r"cannot read .*x\.png as an image"):
        processor.encode(tmp_path / "x.png")
    with pytest.raises(ImageInputError, match=r"no such file: .*missing\.jpg"):
        processor.encode(str(tmp_path / "missing.jpg"))
    with pytest.raises(ImageInputError, match="is a directory"):
        processor.encode(tmp_path)
    Image.fromarray(random_image(rng, 4, 4)).save(tmp_path / "ok.png")
    with pytest.raises(ImageInputError, match=r"image 1: .*x\.png"):  # which image of a batch
        processor.encode([tmp_path / "ok.png", tmp_path / "x.png"])


@pytest.mark.parametrize(
    "images, match",
    [
        ([], "no images"),
        ((), "no images"),
        (np.zeros((0, 4, 4, 3), np.uint8), "empty batch"),
        (np.zeros((5, 5, 7), np.uint8), r"cannot tell the colour channels .* \(5, 5, 7\)"),
        (np.zeros((2, 5, 5, 5), np.uint8), r"cannot tell the colour channels .* \(5, 5, 5\)"),
        (np.zeros((2, 2, 4, 4, 3), np.uint8), r"2-D .* got shape \(2, 2, 4, 4, 3\)"),
        (np.zeros(5, np.uint8), r"got shape \(5,\)"),
        (np.zeros((0, 4, 3), np.uint8), "empty image"),
        (np.zeros((5, 6, 2), np.uint8), "cannot tell the colour channels"),
        (np.full((4, 4, 3), 2.0), r"float images must lie in \[0, 1\].*uint8"),
        (np.full((4, 4, 3), -0.5), r"float images must lie in \[0, 1\]"),
        (np.full((4, 4, 3), np.nan), "NaN"),
        (np.full((4, 4, 3), 300), r"0\.\.255, got 300\.\.300"),
        (np.full((4, 4, 3), 1j), "dtype complex"),
        (42, "cannot read an image from a int"),
        ([[1, 2], [3, 4]], "cannot read an image from a list"),
    ],
)
def test_impossible_inputs_are_clear_errors(rng, images, match):
    processor = ImageProcessor(random_palette(rng), 4)
    with pytest.raises(ImageInputError, match=match):
        processor.encode(images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 0}, "size must be"),
        ({"size": (4,)}, "size must be"),
        ({"size": "32"}, "size must be"),
        ({"size": (4, 2.5)}, "size must be"),
        ({"size": 4, "resample": "cubic"}, "resample must be"),
    ],
)
def test_constructor_rejects_bad_arguments(rng, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ImageProcessor(random_palette(rng), **kwargs)


def test_save_pretrained_onto_a_file_is_an_error(tmp_path, rng):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        ImageProcessor(random_palette(rng), 4).save_pretrained(tmp_path / "file")


def test_to_rgb_and_to_pixels_agree(rng):
    processor = ImageProcessor(random_palette(rng), (3, 4))
    images = [random_image(rng, 8, 2), random_image(rng, 3, 4)]
    rgb = processor.to_rgb(images)
    assert rgb.shape == (2, 3, 4, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[1], images[1])  # already the target size: untouched
    assert np.array_equal(processor.to_pixels(images), UINT8_TO_UNIT[rgb])
    assert np.abs(processor.to_pixels(images)).max() <= 1
