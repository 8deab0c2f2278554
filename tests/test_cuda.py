"""The CUDA paths: parity with transformers in float32, bfloat16 autocast, KV-cached sampling with and
without compile, and a short training run from the command line.

Each test runs on the CPU too (the `cpu` case), so that CI checks the test itself on every machine; the
`cuda` cases are marked `cuda` and skipped without a GPU. scripts/gpu-check.sh runs them with the benchmarks.
"""

from __future__ import annotations

import json

import pytest
import torch

from imagegpt import ImageGPT, ImageGPTConfig
from imagegpt.cli import main
from imagegpt.model import sos_inputs
from imagegpt.sampling import sample

transformers = pytest.importorskip("transformers")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]
CUDA_ONLY = [pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]


def random_model(seed: int = 0, side: int = 6, clusters: int = 12) -> ImageGPT:
    """igpt-nano with every weight random (the zero-initialised head would make all logits equal)."""
    torch.manual_seed(seed)
    model = ImageGPT(ImageGPTConfig.from_preset("igpt-nano", resolution=side, clusters=clusters))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" not in name:
                p.normal_(0.0, 0.3)
    return model.eval()


def random_ids(model: ImageGPT, rows: int, seed: int) -> torch.Tensor:
    c = model.config
    return torch.randint(
        0, c.n_clusters, (rows, c.n_positions), generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_float32_logits_and_loss_equal_transformers(tmp_path, device):
    ours = random_model(1)
    ours.save_pretrained(tmp_path)
    theirs = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path).eval().to(device)
    ours.to(device)
    inputs = sos_inputs(random_ids(ours, 3, seed=torch.seed() % 2**31), ours.config.sos_id).to(device)
    with torch.no_grad():
        a, b = ours(inputs, labels=inputs), theirs(inputs, labels=inputs)
    torch.testing.assert_close(a.logits, b.logits[..., : a.logits.size(-1)], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_forward_and_a_training_step(device):
    model = random_model(2).to(device)
    ids = random_ids(model, 4, seed=3).to(device)
    with torch.no_grad():
        reference = model.loss_per_image(ids)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(sos_inputs(ids, model.config.sos_id)).logits
            half = model.loss_per_image(ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, rtol=2e-2, atol=0)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model.loss_per_image(ids).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        assert model.loss_per_image(ids).mean() < loss  # one step down the gradient lowers this batch's loss


def greedy_is_the_full_forward_argmax(model: ImageGPT, device: str, compile) -> torch.Tensor:
    """Greedy sampling through the KV cache gives at every position the argmax of the uncached forward."""
    ids = sample(model, 3, temperature=0, device=device, dtype="float32", compile=compile, seed=0)
    with torch.no_grad():
        logits = model(sos_inputs(ids.to(device), model.config.sos_id)).logits
    assert torch.equal(logits.argmax(-1).cpu(), ids)
    return ids


@pytest.mark.parametrize("device", DEVICES)
def test_cached_sampling_equals_the_full_forward(device):
    greedy_is_the_full_forward_argmax(random_model(4), device, compile=False)


@pytest.mark.slow
@pytest.mark.parametrize("device", CUDA_ONLY)  # compiled on the CPU: tests/test_sampling.py
def test_compiled_static_sampling_equals_the_full_forward_and_eager(device):
    model = random_model(5)
    compiled = greedy_is_the_full_forward_argmax(model, device, compile=True)
    assert torch.equal(compiled, greedy_is_the_full_forward_argmax(model, device, compile=False))
    options = dict(top_k=5, seed=7, device=device, dtype="float32")
    assert torch.equal(sample(model, 2, **options, compile=True), sample(model, 2, **options))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_short_training_run_from_the_command_line(tmp_path, device, capsys):
    run = tmp_path / "run"
    command = ["train", "--data", "digits", "--resolution", "4", "--clusters", "8", "--steps", "6",
               "--batch-size", "16", "--lr", "3e-3", "--warmup", "1", "--eval-every", "3",
               "--device", device, "--out", str(run), "--no-progress"]  # fmt: skip
    assert main(command) == 0
    assert "bits/dim" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 6 and all(map(lambda x: x == x and x < 10, losses))
    model = ImageGPT.from_pretrained(run / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
