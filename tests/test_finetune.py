"""Classification fine-tuning (imagegpt.finetune): the joint model, augmentation, training and evaluation."""

import numpy as np
import pytest
import torch

from imagegpt import ImageGPT, ImageGPTConfig
from imagegpt.errors import ArgumentError
from imagegpt.finetune import (
    FinetuneModel,
    augment_pixels,
    confusion_matrix,
    default_pad,
    format_confusion,
    joint_loss,
    plot_confusion,
    predict,
)
from imagegpt.model import sos_inputs
from imagegpt.probe import extract_features


def pretrained_model(n_layer=3, seed=0, resolution=4, clusters=16):
    torch.manual_seed(seed)
    config = ImageGPTConfig.from_preset(
        "igpt-nano", resolution=resolution, clusters=clusters, n_layer=n_layer
    )
    model = ImageGPT(config).eval()
    with torch.no_grad():  # give the zero-initialised head and norms some size
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def random_ids(n, config, seed=1):
    return torch.randint(
        0, config.n_clusters, (n, config.n_positions), generator=torch.Generator().manual_seed(seed)
    )


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("layer", [None, 1, 2])
def test_classifier_starts_from_the_probe_feature_of_its_layer(layer):
    pretrained = pretrained_model(n_layer=3)
    model = FinetuneModel(pretrained, num_labels=4, layer=layer).eval()
    expected_layer = 3 if layer is None else layer
    assert model.classifier.config.n_layer == expected_layer
    assert model.classifier.config.num_labels == 4
    ids = random_ids(5, pretrained.config)
    probe = extract_features(pretrained, ids, layers=[expected_layer], dtype="float32")[expected_layer]
    with torch.no_grad():
        _, pooled = None, None
        x, _ = model.classifier.transformer(sos_inputs(ids, pretrained.config.sos_id))
        pooled = x.mean(dim=1).numpy()
    np.testing.assert_allclose(pooled, probe, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [None, 2])
def test_generative_loss_is_the_pretrained_models_and_the_joint_loss_adds_it(layer):
    pretrained = pretrained_model(n_layer=3)
    model = FinetuneModel(pretrained, num_labels=3, layer=layer).eval()
    ids = random_ids(4, pretrained.config)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        logits, clf_loss, gen_loss = model(ids, labels, gen_weight=0.5)
        expected_logits = model.classifier(sos_inputs(ids, pretrained.config.sos_id)).logits
        torch.testing.assert_close(gen_loss, pretrained.image_loss(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clf_loss, torch.nn.functional.cross_entropy(expected_logits, labels))
    torch.testing.assert_close(joint_loss(clf_loss, gen_loss, 0.5), clf_loss + 0.5 * gen_loss)
    assert joint_loss(clf_loss, None, 0.0) is clf_loss
    _, _, none = model(ids, labels, gen_weight=0.0)
    assert none is None


def test_generative_parts_are_not_kept_without_a_generative_loss():
    pretrained = pretrained_model(n_layer=3)
    model = FinetuneModel(pretrained, num_labels=3, layer=1, generative=False)
    assert model.gen_blocks is None and model.lm_head is None
    assert all(name.startswith("classifier.") for name, _ in model.named_parameters())
    with pytest.raises(ArgumentError, match="generative=False"):
        model(random_ids(2, pretrained.config), gen_weight=1.0)


def test_finetune_model_does_not_share_weights_with_the_pretrained_model():
    pretrained = pretrained_model(n_layer=2)
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    model = FinetuneModel(pretrained, num_labels=2)
    ids = random_ids(3, pretrained.config)
    _, clf_loss, gen_loss = model(ids, torch.tensor([0, 1, 0]), gen_weight=1.0)
    (clf_loss + gen_loss).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(p.grad)
    for k, v in pretrained.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("layer", [0, 4, -1])
def test_layer_out_of_range_is_an_error(layer):
    with pytest.raises(ArgumentError, match="out of range"):
        FinetuneModel(pretrained_model(n_layer=3), num_labels=2, layer=layer)


def test_a_single_class_is_an_error():
    with pytest.raises(ArgumentError, match="at least 2 classes"):
        FinetuneModel(pretrained_model(n_layer=1), num_labels=1)


# -------------------------------------------------------------------------------------------- augmentation


def test_augmentation_crops_from_reflect_padding_and_flips():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, size=(64, 8, 8, 3)).astype(np.float32)
    out = augment_pixels(pixels, np.random.default_rng(1), pad=2)
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    padded = np.pad(pixels, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    flipped = 0
    for i in range(len(pixels)):
        candidates = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if np.array_equal(
                out[i], (lambda c, f=f: c[:, ::-1] if f else c)(padded[i, dy : dy + 8, dx : dx + 8])
            )
        ]
        assert candidates, "every output is a (possibly flipped) crop of the reflect-padded image"
        flipped += candidates[0][2]
    assert 10 < flipped < 54  # about half flipped
    assert not np.array_equal(out, pixels)
    np.testing.assert_array_equal(out, augment_pixels(pixels, np.random.default_rng(1), pad=2))  # seeded


def test_augmentation_without_padding_or_flip_is_the_identity():
    pixels = np.random.default_rng(0).uniform(-1, 1, size=(4, 6, 6, 3))
    np.testing.assert_array_equal(augment_pixels(pixels, np.random.default_rng(0), pad=0, flip=False), pixels)
    with pytest.raises(ArgumentError, match="padding"):
        augment_pixels(pixels, np.random.default_rng(0), pad=6)


def test_default_pad_is_four_pixels_at_32():
    assert default_pad(32) == 4 and default_pad(16) == 2 and default_pad(8) == 1 and default_pad(64) == 8


# -------------------------------------------------------------------------------------------- evaluation


def test_predict_feeds_sos_and_batches():
    model = FinetuneModel(pretrained_model(n_layer=2), num_labels=3).classifier
    with torch.no_grad():
        model.score.weight.normal_()
    ids = random_ids(5, model.config)
    logits = predict(model, ids, batch_size=2, dtype="float32")
    with torch.no_grad():
        expected = model(sos_inputs(ids, model.config.sos_id)).logits.numpy()
    assert logits.dtype == np.float32 and logits.shape == (5, 3)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(model, ids.numpy(), dtype="float32"), expected, rtol=1e-5, atol=1e-5)


def test_confusion_matrix_and_its_renderings(tmp_path):
    matrix = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    text = format_confusion(matrix, ["cat", "dog", "bird"])
    assert text.splitlines()[3].split() == ["bird", "1", "0", "2"]
    plot_confusion(matrix, ["cat", "dog", "bird"], tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
