"""`imagegpt train` under torchrun: two CPU processes (gloo), with DDP or FSDP, match one process with the
same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imagegpt import ImageGPT
from imagegpt.train import TrainOptions, train
from imagegpt.trainer import find_checkpoint, load_training_state, read_metrics

ARGS = dict(
    data="digits",
    resolution=4,
    clusters=8,
    palette_pixels=5000,
    steps=5,
    batch_size=16,
    lr=3e-3,
    warmup=2,
    eval_every=0,
    save_every=0,
    device="cpu",
    dtype="float32",
)
# Two ranks each average the loss of 8 images and DDP averages their gradients; one process averages 16 at
# once. Only the order of float32 additions differs, which grows to ~1e-6 relative over 5 steps.
TOLERANCE = 1e-5


def torchrun(*args: str) -> None:
    flags = []
    for key, value in ARGS.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "imagegpt", "train", *flags, "--no-progress", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(run_dir, split="train"):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the whole global batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainOptions(**ARGS, out=str(tmp_path_factory.mktemp("single")), progress=False))
    finally:
        torch.set_num_threads(threads)


def assert_same_run(run_dir, single):
    one, two = losses(single.run_dir), losses(run_dir)
    assert [s for s, _ in two] == [1, 2, 3, 4, 5]  # only rank 0 logs: no duplicates
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=TOLERANCE)
    np.testing.assert_allclose(losses(run_dir, "val")[-1][1], single.val_loss, rtol=TOLERANCE)
    # Weights agree to ~1e-6, except the key bias: its gradient is zero in exact arithmetic (it shifts every
    # score of a query equally), so Adam normalises rounding noise into updates of up to a few 1e-5.
    ours, reference = ImageGPT.from_pretrained(run_dir / "model"), ImageGPT.from_pretrained(single.model_dir)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        if name.endswith("attn.c_attn.bias"):
            C = a.numel() // 3
            torch.testing.assert_close(a[C : 2 * C], b[C : 2 * C], rtol=0, atol=1e-4, msg=name + " (keys)")
            a, b = torch.cat([a[:C], a[2 * C :]]), torch.cat([b[:C], b[2 * C :]])
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=name)


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path, single):
    torchrun("--out", str(tmp_path / "ddp"))
    assert_same_run(tmp_path / "ddp", single)


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process_and_resumes(tmp_path, single):
    """Sharded weights and AdamW state, interrupted after 3 steps and resumed: each rank gets its shard of the
    saved optimizer state and its own RNG state back."""
    torchrun("--out", str(tmp_path / "fsdp"), "--fsdp", "--stop-after", "3")
    state = load_training_state(find_checkpoint(tmp_path / "fsdp" / "checkpoints"))
    assert state["step"] == 3 and len(state["rng"]) == 2  # one RNG state per rank
    assert "transformer.h.0.attn.c_attn.weight" in state["optimizer"]["state"]  # gathered whole, by name
    torchrun("--resume", str(tmp_path / "fsdp"))
    assert json.loads((tmp_path / "fsdp" / "args.json").read_text())["fsdp"] is True
    assert_same_run(tmp_path / "fsdp", single)


@pytest.mark.slow
def test_bert_ddp_and_fsdp_on_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """The step's BERT masks are drawn for the global batch and each rank takes its rows, so two ranks train
    on exactly the masks of one process; validation masks belong to the images, whichever rank reads them.
    FSDP is interrupted and resumed: the masks of the resumed steps are those of the uninterrupted run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(TrainOptions(**ARGS, out=str(tmp_path / "single"), progress=False, objective="bert"))
    finally:
        torch.set_num_threads(threads)
    torchrun("--out", str(tmp_path / "ddp"), "--objective", "bert")
    assert ImageGPT.from_pretrained(tmp_path / "ddp" / "model").config.objective == "bert"
    assert_same_run(tmp_path / "ddp", single)
    torchrun("--out", str(tmp_path / "fsdp"), "--objective", "bert", "--fsdp", "--stop-after", "2")
    torchrun("--resume", str(tmp_path / "fsdp"))
    assert_same_run(tmp_path / "fsdp", single)
