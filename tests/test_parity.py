"""Parity with transformers' ImageGPT in float32, both directions, on the same random weights.

Every parameter (norm weights and biases included) is drawn at random, so that a transposed, swapped or
ignored tensor shows up in the outputs.
"""

import pytest
import torch

from imagegpt import ImageGPT, ImageGPTClassifier, ImageGPTConfig

transformers = pytest.importorskip("transformers")

TOL = 1e-4

# (vocab_size, n_positions, n_embd, n_layer, n_head, n_inner, layer_norm_epsilon)
CONFIGS = {
    "nano-8x8": dict(vocab_size=17, n_positions=64, n_embd=32, n_layer=2, n_head=2),
    "n_inner-palette4-6x4": dict(vocab_size=5, n_positions=24, n_embd=24, n_layer=3, n_head=3, n_inner=40),
    "eps-5x7": dict(vocab_size=33, n_positions=35, n_embd=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-6),
}


def tf_config(**values):
    values = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **values}
    return transformers.ImageGPTConfig(**values)


def randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith("ln_1.weight") or "ln_" in name else 0.2
            centre = 1.0 if "ln_" in name else 0.0
            p.copy_(centre + scale * torch.randn(p.shape, generator=generator))
    return model.eval()


def random_ids(config, batch=3, seed=0):
    """Palette ids with SOS in front, as the released models read them (SOS is only ever an input, so the
    shifted labels of `labels=ids` never contain it)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size - 1, (batch, config.n_positions), generator=generator)
    ids[:, 0] = config.vocab_size - 1
    return ids


def assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, what
    error = (ours.float() - theirs.float()).abs().max().item()
    assert error < TOL, f"{what}: max abs error {error:.2e}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_causal_lm_loads_into_ours(tmp_path, name):
    config = tf_config(**CONFIGS[name])
    theirs = randomise(transformers.ImageGPTForCausalImageModeling(config), seed=1)
    theirs.save_pretrained(tmp_path)
    ours = ImageGPT.from_pretrained(tmp_path)
    ids = random_ids(config, seed=2)
    with torch.no_grad():
        a = theirs(ids, labels=ids, output_hidden_states=True)
        b = ours(ids, labels=ids, output_hidden_states=True)
    assert_close(b.logits, a.logits, "logits")
    assert_close(b.loss, a.loss, "loss")
    assert len(b.hidden_states) == len(a.hidden_states) == config.n_layer + 1
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        assert_close(x, y, f"hidden state {i}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_classifier_loads_into_ours(tmp_path, name):
    config = tf_config(**CONFIGS[name], num_labels=5)
    theirs = randomise(transformers.ImageGPTForImageClassification(config), seed=3)
    theirs.save_pretrained(tmp_path)
    ours = ImageGPTClassifier.from_pretrained(tmp_path)
    assert ours.config.num_labels == 5
    ids = random_ids(config, seed=4)
    labels = torch.randint(0, 5, (ids.size(0),))
    with torch.no_grad():
        a = theirs(ids, labels=labels, output_hidden_states=True)
        b = ours(ids, labels=labels, output_hidden_states=True)
    assert_close(b.logits, a.logits, "classification logits")
    assert_close(b.loss, a.loss, "classification loss")
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        assert_close(x, y, f"hidden state {i}")


def ours_random(cls, seed, **values):
    torch.manual_seed(seed)
    config = ImageGPTConfig(**values)
    return randomise(cls(config), seed=seed)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_saved_loads_into_transformers_with_no_missing_keys(tmp_path, name):
    ours = ours_random(ImageGPT, 5, **CONFIGS[name])
    ours.save_pretrained(tmp_path / "model")
    theirs, info = transformers.ImageGPTForCausalImageModeling.from_pretrained(
        tmp_path / "model", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    theirs.eval()
    ids = random_ids(ours.config, seed=6)
    with torch.no_grad():
        a = theirs(ids, labels=ids, output_hidden_states=True)
        b = ours(ids, labels=ids, output_hidden_states=True)
    assert_close(b.logits, a.logits, "logits")
    assert_close(b.loss, a.loss, "loss")
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        assert_close(x, y, f"hidden state {i}")


def test_ours_classifier_saved_loads_into_transformers(tmp_path):
    ours = ours_random(ImageGPTClassifier, 7, **CONFIGS["n_inner-palette4-6x4"], num_labels=3)
    ours.config.id2label = {0: "cat", 1: "dog", 2: "bird"}
    ours.save_pretrained(tmp_path)
    cls = transformers.ImageGPTForImageClassification
    theirs, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert theirs.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    ids = random_ids(ours.config, seed=8)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs.eval()(ids).logits, "classification logits")


def test_pytorch_model_bin_with_mask_buffers(tmp_path):
    """The released checkpoints: pytorch_model.bin holding the attn.bias / attn.masked_bias buffers."""
    config = tf_config(**CONFIGS["nano-8x8"])
    theirs = randomise(transformers.ImageGPTForCausalImageModeling(config), seed=9)
    state = dict(theirs.state_dict())
    n = config.n_positions
    for i in range(config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    config.save_pretrained(tmp_path)
    ours = ImageGPT.from_pretrained(tmp_path)
    ids = random_ids(config, seed=10)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, "logits")


def test_sharded_safetensors(tmp_path):
    config = tf_config(**CONFIGS["eps-5x7"])
    theirs = randomise(transformers.ImageGPTForCausalImageModeling(config), seed=11)
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = ImageGPT.from_pretrained(tmp_path)
    ids = random_ids(config, seed=12)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, "logits")


def test_classifier_from_causal_lm_gets_backbone_and_fresh_head(tmp_path):
    config = tf_config(**CONFIGS["nano-8x8"])
    theirs = randomise(transformers.ImageGPTForCausalImageModeling(config), seed=13)
    theirs.save_pretrained(tmp_path)
    classifier = ImageGPTClassifier.from_pretrained(tmp_path, num_labels=7)
    assert classifier.config.num_labels == 7 and classifier.score.weight.shape == (7, config.n_embd)
    assert torch.count_nonzero(classifier.score.weight) == 0
    ids = random_ids(config, seed=14)
    with torch.no_grad():
        hidden = classifier(ids, output_hidden_states=True).hidden_states
        for x, y in zip(hidden, theirs(ids, output_hidden_states=True).hidden_states):
            assert_close(x, y, "backbone hidden state")


def test_backbone_only_directory(tmp_path):
    """transformers' ImageGPTModel saves keys without the `transformer.` prefix and no head."""
    from imagegpt.errors import CheckpointError

    config = tf_config(**CONFIGS["nano-8x8"])
    backbone = randomise(transformers.ImageGPTModel(config), seed=15)
    backbone.save_pretrained(tmp_path)
    classifier = ImageGPTClassifier.from_pretrained(tmp_path, num_labels=3)
    ids = random_ids(config, seed=16)
    with torch.no_grad():
        features = classifier(ids, output_hidden_states=True).hidden_states[-1]
        assert_close(features, backbone(ids).last_hidden_state, "features")
    with pytest.raises(CheckpointError, match="only the backbone"):
        ImageGPT.from_pretrained(tmp_path)
