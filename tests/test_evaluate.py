"""Bits per dimension: units, SOS handling, baselines, and parity with transformers' own loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imagegpt import ImageGPT, ImageGPTConfig
from imagegpt.cli import main
from imagegpt.evaluate import Evaluation, bits_per_dim, evaluate, token_nll, unigram_entropy


def trained_looking(config: ImageGPTConfig, seed: int = 0) -> ImageGPT:
    """A model whose head is not all zeros (init_weights zeroes lm_head), so logits depend on the input."""
    torch.manual_seed(seed)
    model = ImageGPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_units():
    assert bits_per_dim(math.log(2) * 3) == pytest.approx(1.0)
    e = Evaluation.from_nll("val", images=2, total_nats=10 * math.log(2), tokens=10, clusters=16)
    assert e.nats_per_token == pytest.approx(math.log(2))
    assert e.bits_per_token == pytest.approx(1.0)
    assert e.bits_per_dim == pytest.approx(1 / 3)
    assert e.uniform_bits_per_dim == pytest.approx(4 / 3)  # log2 16 / 3
    assert "bits per dim" in e.summary() and "uniform baseline" in e.summary()


def test_an_untrained_model_scores_the_uniform_baseline():
    """init_weights zeroes the head: every colour gets probability 1/K, so the loss is ln K exactly."""
    config = ImageGPTConfig.from_preset("igpt-nano", resolution=4, clusters=16)
    ids = torch.randint(0, 16, (5, 16))
    total, count = token_nll(ImageGPT(config), ids, batch_size=2)
    assert count == 80
    assert bits_per_dim(total / count) == pytest.approx(math.log2(16) / 3, rel=1e-6)


def test_token_nll_predicts_every_token_from_sos():
    config = ImageGPTConfig.from_preset("igpt-nano", resolution=4, clusters=16)
    model = trained_looking(config)
    ids = torch.randint(0, 16, (3, 16))
    total, count = token_nll(model, ids.numpy().astype(np.uint16), batch_size=2)  # a uint16 cache works too
    sos = torch.full((3, 1), config.sos_id)
    logits = model(torch.cat([sos, ids[:, :-1]], 1)).logits
    expected = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")
    assert count == 48
    assert total == pytest.approx(expected.item(), rel=1e-5)
    assert total / count == pytest.approx(model.loss_per_image(ids).mean().item(), rel=1e-5)


def test_unigram_entropy():
    ids = np.array([[0, 0, 1, 1], [2, 2, 2, 2]], dtype=np.uint16)  # p = 1/4, 1/4, 1/2
    assert unigram_entropy(ids, 4) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert unigram_entropy(np.zeros((3, 5), dtype=np.uint16), 8) == 0.0


def test_matches_the_loss_transformers_computes(tmp_path):
    """transformers' ImageGPTForCausalImageModeling loss on [SOS, x0..x_{n-1}] with the same ids as labels
    predicts x0..x_{n-1}: exactly what imagegpt's evaluation averages. (One spare position lets transformers
    read the SOS-prepended sequence whole.)"""
    transformers = pytest.importorskip("transformers")
    config = ImageGPTConfig(vocab_size=17, n_positions=17, n_embd=32, n_layer=2, n_head=2)
    model = trained_looking(config, seed=1)
    model.save_pretrained(tmp_path / "m")
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 16, (4, 16))
    sequence = torch.cat([torch.full((4, 1), config.sos_id), ids], 1)
    with torch.no_grad():
        hf_loss = hf(sequence, labels=sequence).loss.item()
    total, count = token_nll(ImageGPT.from_pretrained(tmp_path / "m"), ids, batch_size=3)
    assert total / count == pytest.approx(hf_loss, rel=1e-5)


def make_model_dir(path, resolution=4, clusters=8, seed=0):
    """A model directory with a palette fitted on the digits dataset, as `imagegpt train` writes it."""
    from imagegpt.data import load_dataset, sample_pixels
    from imagegpt.palette import Palette
    from imagegpt.processor import ImageProcessor

    train = load_dataset("digits", split="train")
    palette = Palette.fit(sample_pixels(train, 5000, seed=seed), clusters=clusters, seed=seed)
    config = ImageGPTConfig.from_preset("igpt-nano", resolution=resolution, clusters=clusters)
    trained_looking(config, seed).save_pretrained(path, processor=ImageProcessor(palette, resolution))
    return path


def test_evaluate_a_model_directory_on_a_dataset_split(tmp_path):
    transformers = pytest.importorskip("transformers")
    from imagegpt.data import load_dataset
    from imagegpt.processor import ImageProcessor

    model_dir = make_model_dir(tmp_path / "model")
    result = evaluate(model_dir, "digits", "val", device="cpu", dtype="float32", cache_dir=tmp_path / "cache")
    val = load_dataset("digits", split="val")
    assert result.images == len(val) and result.tokens == len(val) * 16 and result.clusters == 8

    ids = ImageProcessor.from_pretrained(model_dir).encode(val.images)
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = hf(torch.cat([torch.full((len(ids), 1), 8), ids[:, :-1]], 1)).logits
    assert result.nats_per_token == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).item(), rel=1e-5
    )
    assert result.bits_per_dim == pytest.approx(result.nats_per_token / math.log(2) / 3)

    train_ids = ImageProcessor.from_pretrained(model_dir).encode(load_dataset("digits", split="train").images)
    assert result.unigram_bits_per_dim == pytest.approx(bits_per_dim(unigram_entropy(train_ids.numpy(), 8)))
    assert result.uniform_bits_per_dim == pytest.approx(1.0)  # log2 8 / 3

    cached = evaluate(model_dir, "digits", "val", device="cpu", dtype="float32", cache_dir=tmp_path / "cache")
    assert cached.nats_per_token == result.nats_per_token


def test_eval_command_prints_the_numbers_and_writes_json(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    code = main(
        ["eval", "--model", str(model_dir), "--data", "digits", "--split", "test", "--limit", "50",
         "--device", "cpu", "--dtype", "float32", "--json", str(tmp_path / "eval.json")]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    for words in ("nats per token", "bits per token", "bits per dim", "unigram baseline", "uniform baseline"):
        assert words in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["images"] == 50 and report["split"] == "test"
    assert report["bits_per_dim"] == pytest.approx(report["nats_per_token"] / math.log(2) / 3)


def test_eval_command_reports_a_missing_model_as_a_user_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--data", "digits"]) == 2
    assert "error" in capsys.readouterr().err
