"""The run machinery of imagegpt.trainer, on a tiny model-agnostic module (it must work for any model)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from imagegpt import trainer
from imagegpt.errors import ArgumentError, CheckpointError
from imagegpt.trainer import (
    BatchOrder,
    MetricsLog,
    NonFiniteLossError,
    StopRequest,
    capture_state,
    cosine_lr,
    find_checkpoint,
    load_training_state,
    make_optimizer,
    optimizer_step,
    plot_metrics,
    prepare_run_dir,
    read_metrics,
    restore_state,
    save_checkpoint,
    set_lr,
)


class Regressor(nn.Module):
    """A small model with the save_pretrained / from_pretrained pair that the trainer relies on."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def save_pretrained(self, path, processor=None):
        os.makedirs(path, exist_ok=True)
        Path(path, "config.json").write_text(json.dumps({"kind": "regressor"}))
        save_file(self.state_dict(), os.path.join(path, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        model = cls(**kwargs)
        model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        return model


def regression_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)


def test_cosine_lr_warms_up_linearly_then_decays_to_zero():
    lrs = [cosine_lr(s, lr=1.0, warmup=10, total=100) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[9] == 1.0
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert cosine_lr(100, lr=1.0, warmup=10, total=100) == pytest.approx(0.0)
    assert 0 < lrs[-1] < 1e-2
    assert cosine_lr(0, lr=2.0, warmup=0, total=10) == 2.0  # no warmup: start at the peak


def test_optimizer_is_adamw_095_without_weight_decay_on_vectors():
    model = Regressor()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.dim() == 2}
    assert all(g["weight_decay"] == 0.0 for g in make_optimizer(model, lr=1e-3).param_groups)


def test_gradient_accumulation_equals_one_large_batch():
    x, y = regression_data(16)
    models = [Regressor(), Regressor()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, lr=1e-2) for m in models]

    def loss_fn(model):
        return lambda batch: ((model(batch[0]) - batch[1]) ** 2).mean()

    whole = optimizer_step(models[0], opts[0], [(x, y)], loss_fn(models[0]), clip=0)
    split = optimizer_step(models[1], opts[1], [(x[:8], y[:8]), (x[8:], y[8:])], loss_fn(models[1]), clip=0)
    assert split.loss == pytest.approx(whole.loss, rel=1e-6)
    assert split.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


def test_gradients_are_clipped_to_norm_one():
    x, y = regression_data(16)
    model = Regressor()
    opt = make_optimizer(model, lr=1e-3)
    result = optimizer_step(
        model, opt, [(x, y)], lambda b: 1000 * ((model(b[0]) - b[1]) ** 2).mean(), clip=1.0
    )
    assert result.grad_norm > 10  # reported before clipping
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_before_touching_the_weights(bad):
    x, y = regression_data(8)
    model = Regressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, lr=1e-2)
    with pytest.raises(NonFiniteLossError, match=f"loss became {bad}.*step 7"):
        optimizer_step(model, opt, [(x, y)], lambda b: ((model(b[0]) - b[1]) ** 2).mean() * bad, step=7)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_batch_order_covers_each_example_once_per_epoch_and_shards_by_rank():
    order = BatchOrder(n=10, global_batch=4, seed=3)
    epoch0 = np.concatenate([order.next(), order.next()])
    assert len(set(epoch0.tolist())) == 8  # the tail of 2 is skipped
    epoch1 = order.next()
    assert order.epoch == 1 and order.position == 4
    assert not np.array_equal(epoch0[:4], epoch1)  # a new permutation each epoch
    single = BatchOrder(n=50, global_batch=6, seed=1)
    ranks = [BatchOrder(n=50, global_batch=6, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(20):
        expected = single.next()
        shards = [r.next() for r in ranks]
        assert all(len(s) == 2 for s in shards)
        np.testing.assert_array_equal(np.concatenate(shards), expected)


def test_batch_order_resumes_exactly_and_rejects_other_data():
    a = BatchOrder(n=30, global_batch=7, seed=5)
    for _ in range(6):
        a.next()
    b = BatchOrder(n=30, global_batch=7, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        np.testing.assert_array_equal(a.next(), b.next())
    with pytest.raises(CheckpointError, match="same data and seed"):
        BatchOrder(n=31, global_batch=7, seed=5).load_state_dict(a.state_dict())
    with pytest.raises(ArgumentError, match="fewer than one batch"):
        BatchOrder(n=3, global_batch=7)
    with pytest.raises(ArgumentError, match="not divisible"):
        BatchOrder(n=30, global_batch=7, world_size=2)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = trainer.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save(state, tmp_path / "rng.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    trainer.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_run_dir_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ArgumentError, match="no run to resume"):
        prepare_run_dir(run, {"lr": 1}, resume=True)
    prepare_run_dir(run, {"lr": 1, "out": run})
    assert trainer.load_args(run) == {"lr": 1, "out": str(run)}
    with pytest.raises(ArgumentError, match="already holds a run.*--resume"):
        prepare_run_dir(run, {"lr": 2})
    prepare_run_dir(run, {"lr": 1}, resume=True)


def test_metrics_log_drops_steps_past_the_resumed_checkpoint_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "split": "train", "loss": 1.0 / step})
    log.write({"step": 4, "split": "val", "loss": 0.3})
    with open(path, "a") as f:
        f.write('{"step": 6, "spl')  # a crash mid-append
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 4]
    MetricsLog(path, resume_step=3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    png = plot_metrics(path, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_round_trip(tmp_path):
    model = Regressor()
    opt = make_optimizer(model, lr=1e-2)
    x, y = regression_data()
    optimizer_step(model, opt, [(x, y)], lambda b: ((model(b[0]) - b[1]) ** 2).mean())
    order = BatchOrder(64, 8, seed=0)
    order.next()
    assert find_checkpoint(tmp_path / "checkpoints") is None
    path = save_checkpoint(tmp_path / "checkpoints", model, capture_state(1, opt, order, best=0.5))
    assert find_checkpoint(tmp_path / "checkpoints") == path == tmp_path / "checkpoints" / "latest"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "training_state.pt"]
    state = load_training_state(path)
    assert state["step"] == 1 and state["best"] == 0.5 and state["data"]["position"] == 8
    restored = Regressor.from_pretrained(path)
    for a, b in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest"]


class CrashingRegressor(Regressor):
    """Writes half of its files, then fails, as a crash mid-write would leave them."""

    def save_pretrained(self, path, processor=None):
        Path(path, "config.json").write_text("{")
        raise OSError("disk full")


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    good = Regressor()
    opt = make_optimizer(good, lr=1e-2)
    save_checkpoint(tmp_path, good, capture_state(3, opt))
    bad = CrashingRegressor()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, bad, capture_state(4, opt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # the temporary directory is gone
    latest = find_checkpoint(tmp_path)
    assert load_training_state(latest)["step"] == 3
    torch.testing.assert_close(Regressor.from_pretrained(latest).state_dict(), good.state_dict())


def test_a_crash_between_the_two_renames_is_repaired(tmp_path, monkeypatch):
    model = Regressor()
    opt = make_optimizer(model, lr=1e-2)
    save_checkpoint(tmp_path, model, capture_state(3, opt))
    real_rename, calls = os.rename, []

    def rename_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # latest -> latest.old happened; the new one never moves in
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(trainer.os, "rename", rename_then_crash)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, model, capture_state(4, opt))
    monkeypatch.setattr(trainer.os, "rename", real_rename)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.old"]
    assert load_training_state(find_checkpoint(tmp_path))["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


@pytest.mark.slow  # a fresh Python process importing torch
def test_a_process_killed_mid_write_leaves_a_loadable_latest(tmp_path):
    """A real crash: the child dies (os._exit, no cleanup) after writing part of the new checkpoint."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_trainer import Regressor
        from imagegpt.trainer import capture_state, make_optimizer, save_checkpoint
        model = Regressor()
        opt = make_optimizer(model, lr=1e-2)
        save_checkpoint({str(tmp_path)!r}, model, capture_state(1, opt))
        def die(path, processor=None):
            open(os.path.join(path, "config.json"), "w").write("{{")
            os._exit(9)
        model.save_pretrained = die
        save_checkpoint({str(tmp_path)!r}, model, capture_state(2, opt))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert any(p.name.startswith(".latest.tmp-") for p in tmp_path.iterdir())  # the torn write is still there
    latest = find_checkpoint(tmp_path)
    assert load_training_state(latest)["step"] == 1
    Regressor.from_pretrained(latest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_find_checkpoint_rejects_a_directory_without_training_state(tmp_path):
    (tmp_path / "latest").mkdir()
    with pytest.raises(CheckpointError, match="training_state.pt"):
        find_checkpoint(tmp_path)


def test_stop_request_turns_sigterm_and_sigint_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C interrupts at once
            os.kill(os.getpid(), signal.SIGINT)


def run_regression(run_dir, steps, *, stop_at=None, dropout=0.1):
    """The loop a caller writes with the trainer's pieces: resumable, stoppable, checkpointed each step."""
    x, y = regression_data(64)
    torch.manual_seed(0)
    model = Regressor(dropout)
    opt = make_optimizer(model, lr=3e-2)
    order = BatchOrder(len(x), 8, seed=0)
    checkpoint = find_checkpoint(run_dir / "checkpoints")
    step = 0
    if checkpoint is not None:
        model = Regressor.from_pretrained(checkpoint, dropout=dropout)
        opt = make_optimizer(model, lr=3e-2)
        step = restore_state(load_training_state(checkpoint), opt, order)
    losses = []
    with StopRequest() as stop:
        while step < steps:
            if stop.requested:
                save_checkpoint(run_dir / "checkpoints", model, capture_state(step, opt, order))
                break
            set_lr(opt, cosine_lr(step, lr=3e-2, warmup=3, total=steps))
            idx = order.next()
            batches = [(x[idx[:4]], y[idx[:4]]), (x[idx[4:]], y[idx[4:]])]
            result = optimizer_step(model, opt, batches, lambda b: ((model(b[0]) - b[1]) ** 2).mean())
            losses.append(result.loss)
            step += 1
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a cluster's preemption would
    return losses


def test_an_interrupted_and_resumed_loop_gives_exactly_the_same_losses(tmp_path):
    """Dropout makes the loss depend on the torch RNG, the shuffle on the data position, the step on AdamW's
    moments and the schedule: all must be restored for the losses to be bitwise equal."""
    whole = run_regression(tmp_path / "a", 20)
    first = run_regression(tmp_path / "b", 20, stop_at=8)
    assert len(first) == 8
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # the resumed process starts elsewhere
    second = run_regression(tmp_path / "b", 20)
    assert first + second == whole


def test_latest_model_dir_leaves_hub_ids_to_from_pretrained(tmp_path, capsys):
    """A path that is not here goes on as given (a Hub id); every --model takes one, eval and probe too."""
    from imagegpt.cli import main

    assert trainer.latest_model_dir("openai/imagegpt-small") == "openai/imagegpt-small"
    with pytest.raises(CheckpointError, match="neither a model directory"):
        trainer.latest_model_dir(tmp_path)  # an existing directory with no model in it
    for command in ("eval", "probe"):
        args = [command, "--model", str(tmp_path / "missing" / "model"), "--data", "digits"]
        assert main(args + (["--out", str(tmp_path / "p")] if command == "probe" else [])) == 2
        err = capsys.readouterr().err.strip()
        assert "no such file or directory" in err and "\n" not in err
