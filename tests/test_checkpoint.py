"""Reading and writing transformers-format directories: round trips, refused options and clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from imagegpt import ImageGPT, ImageGPTClassifier, ImageGPTConfig
from imagegpt.checkpoint import config_from_transformers, config_to_transformers, read_config
from imagegpt.errors import ArgumentError, CheckpointError, ConfigError
from model_helpers import randomised


def nano(**overrides):
    return ImageGPTConfig.from_preset("igpt-nano", resolution=(4, 6), clusters=16, **overrides)


@pytest.fixture
def saved(tmp_path):
    model = randomised(ImageGPT(nano()))
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def rewrite_config(directory, **changes):
    path = directory / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    for key, value in changes.items():
        if value is None:
            values.pop(key)
    path.write_text(json.dumps(values))


def test_round_trip_keeps_weights_config_and_eval_mode(saved):
    model, directory = saved
    loaded = ImageGPT.from_pretrained(directory)
    assert loaded.config == model.config
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_saved_directory_is_transformers_format(saved):
    model, directory = saved
    values = json.loads((directory / "config.json").read_text())
    assert values["model_type"] == "imagegpt"
    assert values["architectures"] == ["ImageGPTForCausalImageModeling"]
    assert values["n_positions"] == 24 and values["vocab_size"] == 17 and values["n_inner"] is None
    assert values["activation_function"] == "quick_gelu" and values["tie_word_embeddings"] is False
    weights = load_file(directory / "model.safetensors")
    # Conv1D layout: [in, out].
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    assert torch.equal(weights["transformer.h.0.mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight.t())
    assert weights["lm_head.weight"].shape == (16, 64)
    assert not [f for f in directory.iterdir() if f.name.startswith(".")], "temporary files left behind"


def test_saving_over_an_existing_directory_keeps_other_files(saved, tmp_path):
    _, directory = saved
    (directory / "training_state.pt").write_bytes(b"kept")
    other = randomised(ImageGPT(nano()), seed=1)
    other.save_pretrained(directory)
    assert (directory / "training_state.pt").read_bytes() == b"kept"
    assert not [f for f in directory.iterdir() if f.name.startswith(".")]
    loaded = ImageGPT.from_pretrained(directory)
    assert torch.equal(loaded.lm_head.weight, other.lm_head.weight)


def test_save_into_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        ImageGPT(nano()).save_pretrained(tmp_path / "file")


def test_classifier_round_trip_with_labels(tmp_path):
    config = nano(num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"})
    model = randomised(ImageGPTClassifier(config))
    model.save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    assert values["architectures"] == ["ImageGPTForImageClassification"]
    assert values["id2label"] == {"0": "cat", "1": "dog", "2": "bird"} and values["label2id"]["dog"] == 1
    loaded = ImageGPTClassifier.from_pretrained(tmp_path)
    assert loaded.config == config
    assert torch.equal(loaded.score.weight, model.score.weight)


def test_placeholder_labels_read_as_a_plain_count(tmp_path):
    ImageGPTClassifier(nano(num_labels=4)).save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert config.num_labels == 4 and config.id2label is None


def test_classifier_directory_into_imagegpt_is_refused(tmp_path):
    ImageGPTClassifier(nano()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="ImageGPTClassifier.from_pretrained"):
        ImageGPT.from_pretrained(tmp_path)


def test_classifier_label_count_mismatch_is_refused(tmp_path):
    ImageGPTClassifier(nano(num_labels=3)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="3 labels, but 5"):
        ImageGPTClassifier.from_pretrained(tmp_path, num_labels=5)


def test_keyword_overrides(saved):
    _, directory = saved
    model = ImageGPT.from_pretrained(directory, resid_pdrop=0.25, dtype=torch.float64)
    assert model.config.resid_pdrop == 0.25
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with pytest.raises(ArgumentError, match="n_layer"):
        ImageGPT.from_pretrained(directory, n_layer=3)
    with pytest.raises(ArgumentError, match="dtype"):
        ImageGPT.from_pretrained(directory, dtype=torch.int64)


def test_dropout_values_are_kept(tmp_path):
    ImageGPT(nano(resid_pdrop=0.1, embd_pdrop=0.2, attn_pdrop=0.3)).save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.1, 0.2, 0.3)


REFUSED = [
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("add_cross_attention", True),
    ("scale_attn_weights", False),
    ("activation_function", "gelu_new"),
    ("tie_word_embeddings", True),
    ("is_encoder_decoder", True),
    ("pruned_heads", {"0": [1]}),
    ("quantization_config", {"quant_method": "bitsandbytes"}),
]


@pytest.mark.parametrize(("key", "value"), REFUSED)
def test_unimplemented_options_are_refused(saved, key, value):
    _, directory = saved
    rewrite_config(directory, **{key: value})
    with pytest.raises(ConfigError, match=key):
        ImageGPT.from_pretrained(directory)


def test_every_transformers_option_is_known():
    """Every option of transformers' config is classified: implemented, harmless or refused; none ignored."""
    transformers = pytest.importorskip("transformers")
    values = transformers.ImageGPTConfig().to_dict()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_transformers(values)


def test_unknown_keys_warn(saved):
    _, directory = saved
    rewrite_config(directory, rotary_dim=16)
    with pytest.warns(UserWarning, match="rotary_dim"):
        ImageGPT.from_pretrained(directory)


def test_regression_classifier_is_refused(tmp_path):
    ImageGPTClassifier(nano(num_labels=1)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="regression"):
        ImageGPTClassifier.from_pretrained(tmp_path)
    rewrite_config(tmp_path, problem_type="multi_label_classification")
    with pytest.raises(ConfigError, match="multi_label"):
        ImageGPTClassifier.from_pretrained(tmp_path)


def test_wrong_model_type(saved):
    _, directory = saved
    rewrite_config(directory, model_type="gpt2")
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        ImageGPT.from_pretrained(directory)


def test_missing_files(saved, tmp_path):
    _, directory = saved
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        ImageGPT.from_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ImageGPT.from_pretrained(directory)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        ImageGPT.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is a file"):
        ImageGPT.from_pretrained(__file__)


def test_damaged_files(saved):
    _, directory = saved
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        ImageGPT.from_pretrained(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not JSON"):
        ImageGPT.from_pretrained(directory)


def test_missing_and_unexpected_keys_are_named(saved):
    _, directory = saved
    weights = load_file(directory / "model.safetensors")
    del weights["transformer.h.1.ln_2.weight"]
    weights["transformer.h.0.attn.extra"] = torch.zeros(3)
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing transformer\.h\.1\.ln_2\.weight.*unexpected"):
        ImageGPT.from_pretrained(directory)


def test_shape_mismatch_is_named(saved):
    _, directory = saved
    rewrite_config(directory, vocab_size=33)
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight \(17, 64\)"):
        ImageGPT.from_pretrained(directory)


def test_pickled_objects_are_never_loaded(saved):
    _, directory = saved
    (directory / "model.safetensors").unlink()
    payload = {"lm_head.weight": torch.zeros(1), "payload": ArgumentError("x")}
    torch.save(payload, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        ImageGPT.from_pretrained(directory)


@pytest.mark.slow
def test_hub_id_offline_is_a_clear_error(tmp_path):
    """Not a directory and the Hub unreachable: run in a fresh process so HF_HUB_OFFLINE takes effect."""
    pytest.importorskip("huggingface_hub")
    code = (
        "from imagegpt import ImageGPT\n"
        "from imagegpt.errors import CheckpointError\n"
        "try:\n"
        "    ImageGPT.from_pretrained('openai/imagegpt-small')\n"
        "except CheckpointError as e:\n"
        "    print('CheckpointError:', e)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    expected = "openai/imagegpt-small is not a local path, and the Hugging Face Hub cannot be reached"
    assert expected in result.stdout, result.stderr
    assert "(HF_HUB_OFFLINE is set)" in result.stdout and "pass a directory holding" in result.stdout


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"pip install 'imagegpt\[hub\]'"):
        ImageGPT.from_pretrained("openai/imagegpt-small")


def test_config_dict_round_trip():
    config = ImageGPTConfig(vocab_size=9, n_positions=12, n_embd=16, n_layer=1, n_head=4, n_inner=20)
    assert config_from_transformers(config_to_transformers(config)) == config


def test_processor_is_saved_beside_the_weights(tmp_path):
    processor_module = pytest.importorskip("imagegpt.processor")
    palette_module = pytest.importorskip("imagegpt.palette")
    import numpy as np

    centers = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    palette = palette_module.Palette(centers)
    processor = processor_module.ImageProcessor(palette, (4, 6))
    ImageGPT(nano()).save_pretrained(tmp_path, processor=processor)
    values = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert np.allclose(np.asarray(values["clusters"]), centers)
    assert processor_module.ImageProcessor.from_pretrained(tmp_path).palette.centers.shape == (16, 3)


def test_sharded_pytorch_bin(saved):
    model, directory = saved
    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: weights[k] for k in keys}, directory / file)
        weight_map.update(dict.fromkeys(keys, file))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = ImageGPT.from_pretrained(directory)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    (directory / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="which is missing"):
        ImageGPT.from_pretrained(directory)
