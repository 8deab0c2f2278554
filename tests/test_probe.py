"""Feature extraction and linear probes (imagegpt.probe)."""

import json

import numpy as np
import pytest
import torch

from imagegpt import ImageGPT, ImageGPTClassifier, ImageGPTConfig
from imagegpt.errors import ArgumentError, DataError, ImageInputError
from imagegpt.model import sos_inputs
from imagegpt.probe import (
    DEFAULT_CS,
    extract_features,
    fit_probe,
    format_report,
    labels_per_class_subset,
    resolve_layers,
    run_probe,
    write_report,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(n_layer=3, seed=0, cls=ImageGPT):
    torch.manual_seed(seed)
    config = ImageGPTConfig.from_preset("igpt-nano", resolution=4, clusters=16, n_layer=n_layer)
    model = cls(config).eval()
    # Fresh models have a zero head and near-identity blocks; give every weight some size so layers differ.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def random_ids(n, config, seed=1):
    return torch.randint(
        0, config.n_clusters, (n, config.n_positions), generator=torch.Generator().manual_seed(seed)
    )


def count_block_calls(model):
    calls = [0] * len(model.transformer.h)
    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def toy_task(config, n, n_classes=3, seed=0):
    """Images whose colour histogram depends on the class: learnable from pooled features."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    probs = rng.dirichlet(np.full(config.n_clusters, 0.3), size=n_classes)
    ids = np.stack([rng.choice(config.n_clusters, config.n_positions, p=probs[y]) for y in labels])
    return torch.from_numpy(ids), labels


# ------------------------------------------------------------------------------------------------ layers


def test_resolve_layers():
    assert resolve_layers("all", 4) == [0, 1, 2, 3, 4]
    assert resolve_layers("middle", 4) == [2]
    assert resolve_layers("middle", 5) == [2]
    assert resolve_layers("3,0, 1", 4) == [0, 1, 3]
    assert resolve_layers([4, 4, 2], 4) == [2, 4]
    assert resolve_layers(1, 4) == [1]


@pytest.mark.parametrize("layers", [5, "0,5", [-1], "x", ""])
def test_resolve_layers_rejects_bad_layers(layers):
    with pytest.raises(ArgumentError, match="layer"):
        resolve_layers(layers, 4)


def test_out_of_range_layer_is_an_error_in_extract_features():
    model = tiny_model(n_layer=2)
    with pytest.raises(ArgumentError, match="out of range.*0 .*to 2"):
        extract_features(model, random_ids(2, model.config), layers=[3], dtype="float32")


# ------------------------------------------------------------------------------------------------ features


@pytest.mark.parametrize("cls", [ImageGPT, ImageGPTClassifier])
def test_features_equal_hand_computation_from_hidden_states(cls):
    model = tiny_model(n_layer=3, cls=cls)
    ids = random_ids(5, model.config)
    features = extract_features(model, ids, layers="all", batch_size=2, dtype="float32")
    assert sorted(features) == [0, 1, 2, 3]

    with torch.no_grad():
        hidden = model(sos_inputs(ids, model.config.sos_id), output_hidden_states=True).hidden_states
        expected = [model.transformer.h[i].ln_1(hidden[i]).mean(dim=1) for i in range(3)]
        expected.append(hidden[3].mean(dim=1))  # already after ln_f
    for layer in range(4):
        assert features[layer].dtype == np.float32 and features[layer].shape == (5, model.config.n_embd)
        np.testing.assert_allclose(features[layer], expected[layer].numpy(), rtol=1e-5, atol=1e-5)

    # Not the un-normed hidden state, and not the input without SOS: the two notebook mistakes differ.
    assert not np.allclose(features[1], hidden[1].mean(dim=1).numpy(), atol=1e-3)
    with torch.no_grad():
        no_sos = model(ids, output_hidden_states=True).hidden_states
    assert not np.allclose(features[3], no_sos[3].mean(dim=1).numpy(), atol=1e-3)


def test_concat_and_layer_selection():
    model = tiny_model(n_layer=3)
    ids = random_ids(4, model.config)
    by_layer = extract_features(model, ids, layers="all", dtype="float32")
    both = extract_features(model, ids, layers="2,1", concat=True, dtype="float32")
    np.testing.assert_allclose(both, np.concatenate([by_layer[1], by_layer[2]], axis=1), rtol=1e-6, atol=1e-6)
    middle = extract_features(model, ids, layers="middle", dtype="float32")
    assert list(middle) == [1]


def test_only_the_blocks_below_the_deepest_layer_run():
    model = tiny_model(n_layer=3)
    calls = count_block_calls(model)
    ids = random_ids(6, model.config)
    extract_features(model, ids, layers=[1], batch_size=3, dtype="float32")
    assert calls == [2, 0, 0]  # block 0 for each of 2 batches; blocks 1 and 2 never
    extract_features(model, ids, layers=[0], batch_size=3, dtype="float32")
    assert calls == [2, 0, 0]
    extract_features(model, ids, layers=[3], batch_size=6, dtype="float32")
    assert calls == [3, 1, 1]


def test_bfloat16_features_are_close_to_float32():
    model = tiny_model(n_layer=2)
    ids = random_ids(4, model.config)
    f32 = extract_features(model, ids, layers="all", dtype="float32")
    bf16 = extract_features(model, ids, layers="all", dtype=torch.bfloat16)
    for layer in f32:
        assert bf16[layer].dtype == np.float32
        np.testing.assert_allclose(bf16[layer], f32[layer], atol=0.1)


def test_features_are_cached_on_disk(tmp_path):
    model = tiny_model(n_layer=3)
    ids = random_ids(4, model.config)
    first = extract_features(model, ids, layers=[1, 3], dtype="float32", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    calls = count_block_calls(model)
    again = extract_features(model, ids, layers=[1, 3], dtype="float32", cache_dir=tmp_path)
    assert calls == [0, 0, 0]  # read back, not recomputed
    for layer in first:
        np.testing.assert_array_equal(again[layer], first[layer])
    # A layer not cached yet is computed; the cached one is reused.
    extract_features(model, ids, layers=[0, 1], dtype="float32", cache_dir=tmp_path)
    assert calls == [0, 0, 0] and len(list(tmp_path.glob("*.npy"))) == 3

    # Other data, or other weights, are other keys.
    extract_features(
        model, random_ids(4, model.config, seed=9), layers=[1], dtype="float32", cache_dir=tmp_path
    )
    assert calls == [1, 0, 0]
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    changed = extract_features(model, ids, layers=[1], dtype="float32", cache_dir=tmp_path)
    assert calls == [2, 0, 0]
    assert not np.allclose(changed[1], first[1])


def test_numpy_ids_and_memmap_like_uint16_are_accepted():
    model = tiny_model(n_layer=1)
    ids = random_ids(3, model.config)
    from_tensor = extract_features(model, ids, layers=[1], dtype="float32")
    from_numpy = extract_features(model, ids.numpy().astype(np.uint16), layers=[1], dtype="float32")
    np.testing.assert_array_equal(from_tensor[1], from_numpy[1])


def test_bad_feature_inputs():
    model = tiny_model(n_layer=1)
    config = model.config
    with pytest.raises(ImageInputError, match="positions"):
        extract_features(model, torch.zeros(2, config.n_positions + 1, dtype=torch.long))
    with pytest.raises(ImageInputError, match="palette indices"):
        extract_features(model, torch.full((2, config.n_positions), config.sos_id))
    with pytest.raises(ImageInputError, match="integers"):
        extract_features(model, np.zeros((2, config.n_positions), dtype=np.float32))
    with pytest.raises(ArgumentError, match="processor"):
        extract_features(model, np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ArgumentError, match="batch_size"):
        extract_features(model, random_ids(2, config), batch_size=0)


def test_extract_features_keeps_the_training_mode():
    model = tiny_model(n_layer=1).train()
    extract_features(model, random_ids(2, model.config), layers=[1], dtype="float32")
    assert model.training


# ------------------------------------------------------------------------------------------------ probes


def test_probe_beats_chance_on_a_learnable_task_and_not_on_shuffled_labels():
    model = tiny_model(n_layer=2)
    ids, labels = toy_task(model.config, 360, n_classes=3)
    train, val, test = (ids[:200], labels[:200]), (ids[200:280], labels[200:280]), (ids[280:], labels[280:])
    report = run_probe(model, None, train, val, test, layers="all", baseline=False, dtype="float32")
    assert report["chance"] == pytest.approx(1 / 3)
    best = max(row["test_accuracy"] for row in report["rows"])
    assert best > 0.8

    shuffled = np.random.default_rng(1).permutation(labels)
    train, val, test = (
        (ids[:200], shuffled[:200]),
        (ids[200:280], shuffled[200:280]),
        (ids[280:], shuffled[280:]),
    )
    report = run_probe(model, None, train, val, test, layers="all", baseline=False, dtype="float32")
    for row in report["rows"]:
        assert row["test_accuracy"] < 1 / 3 + 0.2


def test_fit_probe_chooses_C_on_validation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    y = (x[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int)
    result = fit_probe(x[:100], y[:100], x[100:200], y[100:200], x[200:], y[200:], Cs=(1e-4, 1e-2, 1.0))
    assert set(result.val_accuracies) == {1e-4, 1e-2, 1.0, *result.extended}
    assert result.val_accuracy == max(result.val_accuracies.values())
    assert min(c for c, acc in result.val_accuracies.items() if acc == result.val_accuracy) == result.C
    assert result.test_accuracy > 0.75


def test_the_grid_grows_past_an_end_that_wins():
    """A separable problem whose best C (1000) lies beyond the default grid (up to 100): the grid is extended
    upwards a decade at a time while validation improves, and stops at the first decade that does not."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(900, 30))
    y = (x @ rng.normal(size=30) > 0).astype(int)
    result = fit_probe(x[:300], y[:300], x[300:600], y[300:600], x[600:], y[600:])
    assert result.extended == pytest.approx([1e3, 1e4])
    assert pytest.approx(1e3) == result.C and result.val_accuracy > result.val_accuracies[100.0]
    assert sorted(result.val_accuracies) == sorted([*DEFAULT_CS, *result.extended])
    # at most GRID_EXTENSIONS decades: a narrow grid of strong regularisation grows by four and stops
    narrow = fit_probe(x[:300], y[:300], x[300:600], y[300:600], Cs=(1e-3, 1e-2))
    assert narrow.extended == pytest.approx([0.1, 1.0, 10.0, 100.0]) and pytest.approx(100.0) == narrow.C


def test_the_grid_grows_downwards_when_its_strongest_end_wins():
    """Labels that are noise with a majority class: the strongest regularisation wins (predict the majority),
    and the grid goes on below its weakest end. A one-C grid is the caller's choice and never grows."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 60))
    y = (rng.random(300) < 0.25).astype(int)
    result = fit_probe(x[:100], y[:100], x[100:200], y[100:200], Cs=(10.0, 100.0))
    assert result.C < 10.0 and result.extended[0] == pytest.approx(1.0)
    assert fit_probe(x[:100], y[:100], x[100:200], y[100:200], Cs=(100.0,)).extended == []


def test_the_report_says_where_the_grid_was_extended(tmp_path):
    model = tiny_model(n_layer=1)
    ids, labels = toy_task(model.config, 240, n_classes=2)
    splits = (ids[:120], labels[:120]), (ids[120:180], labels[120:180]), (ids[180:], labels[180:])
    report = run_probe(model, None, *splits, layers="all", baseline=False, dtype="float32", Cs=(1e-7, 1e-6))
    text = format_report(report)
    assert "the C grid (1e-07..1e-06) was extended where its end won: 0 to C=" in text
    assert json.loads(json.dumps(report))["rows"][0]["extended"]


def test_probe_without_labels_is_an_error():
    x = np.zeros((10, 3))
    with pytest.raises(DataError, match="no labels"):
        fit_probe(x, None, x, np.zeros(10))
    model = tiny_model(n_layer=1)
    ids = random_ids(6, model.config)
    with pytest.raises(DataError, match="training split has no labels|train split has no labels"):
        run_probe(model, None, (ids, None), (ids, np.zeros(6)), (ids, np.zeros(6)), baseline=False)


def test_probe_rejects_a_single_class_and_unseen_classes():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(DataError, match="single class"):
        fit_probe(x, np.zeros(10), x, np.zeros(10))
    model = tiny_model(n_layer=1)
    ids = random_ids(6, model.config)
    labels = np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(DataError, match="classes \\[2\\]"):
        run_probe(model, None, (ids, labels), (ids, labels + 1), (ids, labels), baseline=False)


def test_labels_per_class_subset():
    labels = np.repeat(np.arange(4), 10)
    subset = labels_per_class_subset(labels, 3, seed=0)
    assert np.bincount(labels[subset]).tolist() == [3, 3, 3, 3]
    np.testing.assert_array_equal(subset, labels_per_class_subset(labels, 3, seed=0))
    assert not np.array_equal(subset, labels_per_class_subset(labels, 3, seed=1))
    with pytest.raises(DataError, match="only 10"):
        labels_per_class_subset(labels, 11, seed=0)


def test_low_data_mode_reports_mean_and_std_over_seeds(tmp_path):
    model = tiny_model(n_layer=2)
    ids, labels = toy_task(model.config, 240, n_classes=3)
    splits = (ids[:120], labels[:120]), (ids[120:180], labels[120:180]), (ids[180:], labels[180:])
    report = run_probe(
        model,
        None,
        *splits,
        layers="0,2",
        labels_per_class=4,
        seeds=3,
        baseline=False,
        dtype="float32",
        concat=True,
    )
    assert report["labels_per_class"] == 4 and report["seeds"] == 3
    for row in [*report["rows"], report["concat"]]:
        assert len(row["runs"]) == 3
        tests = [run["test_accuracy"] for run in row["runs"]]
        assert row["test_accuracy"] == pytest.approx(np.mean(tests))
        assert row["test_accuracy_std"] == pytest.approx(np.std(tests))
    assert report["concat"]["layer"] == "0+2"
    table = format_report(report)
    assert "4 labels per class" in table and "±" in table
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["rows"][0]["layer"] == 0
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_images_are_encoded_with_the_processor():
    from imagegpt.palette import Palette
    from imagegpt.processor import ImageProcessor

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)  # resized to the model's 4x4
    processor = ImageProcessor(Palette.fit(images, clusters=16, seed=0), 4)
    model = tiny_model(n_layer=2)
    from_images = extract_features(
        model, images, layers="all", processor=processor, batch_size=2, dtype="float32"
    )
    # the same batches both ways: batches of another size may sum in another order (AVX2 GEMMs do)
    from_ids = extract_features(model, processor.encode(images), layers="all", batch_size=2, dtype="float32")
    for layer in from_ids:
        np.testing.assert_array_equal(from_images[layer], from_ids[layer])
    as_list = extract_features(
        model, list(images), layers=[1], processor=processor, batch_size=2, dtype="float32"
    )
    np.testing.assert_array_equal(as_list[1], from_ids[1])


def test_max_iter_reaches_every_fit_and_the_report(monkeypatch):
    """run_probe(max_iter=N) caps each L-BFGS fit at N iterations (the demo's faster probe) and says so."""
    from sklearn.linear_model import LogisticRegression

    seen = []
    fit = LogisticRegression.fit

    def spy(self, *args, **kwargs):
        seen.append(self.max_iter)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    rng = np.random.default_rng(3)
    model = tiny_model()
    ids = rng.integers(0, model.config.n_clusters, (30, model.config.n_positions))
    split = (ids, np.arange(30) % 2)
    report = run_probe(model, None, split, split, split, layers=[1, 2], baseline=False, Cs=(1.0,), max_iter=7)
    assert report["max_iter"] == 7 and seen and set(seen) == {7}
