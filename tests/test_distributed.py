"""`imagegpt train` under torchrun: two CPU processes (gloo) match one process with the same global batch."""

from __future__ import annotations

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


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch_and_resume(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(TrainOptions(**ARGS, out=str(tmp_path / "single"), progress=False))
    finally:
        torch.set_num_threads(threads)

    # two ranks, interrupted after 3 steps and resumed: also checks that each rank's state comes back
    torchrun("--out", str(tmp_path / "ddp"), "--stop-after", "3")
    state = load_training_state(find_checkpoint(tmp_path / "ddp" / "checkpoints"))
    assert state["step"] == 3 and len(state["rng"]) == 2  # one RNG state per rank
    torchrun("--resume", str(tmp_path / "ddp"))

    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert [s for s, _ in two] == [1, 2, 3, 4, 5]  # only rank 0 logs: no duplicates
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=TOLERANCE)
    np.testing.assert_allclose(losses(tmp_path / "ddp", "val")[-1][1], single.val_loss, rtol=TOLERANCE)
    ddp_model = ImageGPT.from_pretrained(tmp_path / "ddp" / "model")
    one_model = ImageGPT.from_pretrained(single.model_dir)
    # Weights agree to ~1e-7, except the key bias: its gradient is zero in exact arithmetic (it shifts every
    # score of a query equally), so Adam normalises rounding noise into updates of up to ~1e-5.
    for (name, a), b in zip(ddp_model.state_dict().items(), one_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=name)
