"""imagegpt.loop on a tiny regression: the loop knows no model, data or objective but what a run and an
objective give it, so a new objective (here mean squared error) plugs in with three methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegpt.loop import EARLY, FINISHED, STOPPED, Plan, TrainingRun, evaluate_split, train_loop
from imagegpt.trainer import (
    BatchOrder,
    MetricsLog,
    NonFiniteLossError,
    capture_state,
    find_checkpoint,
    load_training_state,
    make_optimizer,
    optimizer_step,
    read_metrics,
    restore_state,
    save_checkpoint,
)
from test_trainer import Regressor, regression_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SquaredError:
    """An objective: mean squared error, with the mean absolute error as a logged part."""

    def __init__(self, val):
        self.val = val

    def loss(self, model, batch):
        x, y = batch
        error = model(x) - y
        return (error**2).mean(), {"abs_error": error.abs().mean()}

    def train_metrics(self, result):
        return {"abs_error": result.parts["abs_error"]}

    def evaluate(self, run, final):
        def score(model, batch):
            return float(((model(batch.x) - batch.y) ** 2).sum()), len(batch)

        return {"loss": evaluate_split(run, self.val, score, batch_size=8)}


class Pairs:
    """(x, y) rows sliced together, as evaluate_split slices its data."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index: slice):
        return Pairs(self.x[index], self.y[index])


class Regression(TrainingRun):
    """A run: batches of 8 rows in a seeded order; checkpoints with the optimizer, data order, RNG states."""

    command = "regress"

    def __init__(self, run_dir, *, resume=False, patience=None, dropout=0.1):
        run_dir.mkdir(exist_ok=True)
        torch.manual_seed(0)
        self.x, self.y = regression_data(64)
        self.order = BatchOrder(64, 8, seed=0)
        model = Regressor(dropout=dropout)
        optimizer = make_optimizer(model, lr=1e-2)
        step = 0
        latest = find_checkpoint(run_dir / "checkpoints") if resume else None
        if latest is not None:
            model = Regressor.from_pretrained(latest, dropout=dropout)
            optimizer = make_optimizer(model, lr=1e-2)
            step = restore_state(load_training_state(latest), optimizer, self.order)
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume else None)
        super().__init__(model, optimizer, run_dir, metrics, step=step)
        self.patience, self.evaluations, self.finished = patience, 0, None

    def batches(self, step):
        index = self.order.next()
        return [(self.x[index], self.y[index])]

    def save(self, step, *, done):
        state = capture_state(step, self.optimizer, self.order, done=done)
        save_checkpoint(self.run_dir / "checkpoints", self.model, state)

    def after_evaluation(self, step, values):
        self.evaluations += 1
        return self.patience is not None and self.evaluations >= self.patience

    def finish(self, step):
        self.finished = step


def validation():
    x, y = regression_data(24, seed=1)
    return SquaredError(Pairs(x, y))


def records(run_dir, split):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split]


def test_a_plugged_in_objective_trains_evaluates_saves_and_publishes(tmp_path):
    run = Regression(tmp_path)
    plan = Plan(steps=40, lr=5e-2, warmup=2, eval_every=16, save_every=5, progress=False)
    outcome = train_loop(run, validation(), plan)
    assert outcome.end == FINISHED and outcome.done and outcome.step == 40 and run.finished == 40
    train = records(tmp_path, "train")
    assert [r["step"] for r in train] == list(range(1, 41))
    assert all(set(r) == {"step", "split", "loss", "abs_error", "lr", "grad_norm"} for r in train)
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]]) / 2  # it learns
    assert [r["step"] for r in records(tmp_path, "val")] == [16, 32, 40]  # every 16 steps, and at the last
    assert outcome.evaluation == {"loss": records(tmp_path, "val")[-1]["loss"]}
    assert load_training_state(find_checkpoint(tmp_path / "checkpoints"))["done"] is True
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_stopped_and_resumed_it_computes_the_same_losses_bit_for_bit(tmp_path):
    plan = dict(steps=12, lr=1e-2, warmup=2, eval_every=4, progress=False)
    train_loop(Regression(tmp_path / "whole"), validation(), Plan(**plan))
    stopped = train_loop(Regression(tmp_path / "parts"), validation(), Plan(**plan, stop_after=5))
    assert stopped.end == STOPPED and not stopped.done and stopped.step == 5
    assert load_training_state(find_checkpoint(tmp_path / "parts" / "checkpoints"))["done"] is False
    torch.manual_seed(1234)  # dropout: the resumed session's RNG comes from the checkpoint, not from here
    resumed = train_loop(Regression(tmp_path / "parts", resume=True), validation(), Plan(**plan))
    assert resumed.step == 12 and resumed.done
    for split in ("train", "val"):
        assert records(tmp_path / "parts", split) == records(tmp_path / "whole", split)


def test_a_run_resumed_at_its_last_step_is_evaluated_and_published_once(tmp_path):
    """A crash between the last checkpoint and publishing the model: the resumed loop trains nothing, but
    evaluates and publishes."""
    plan = Plan(steps=6, lr=1e-2, warmup=1, progress=False)
    train_loop(Regression(tmp_path), validation(), plan)
    run = Regression(tmp_path, resume=True)
    assert run.step == 6
    outcome = train_loop(run, validation(), plan)
    assert outcome.done and run.finished == 6 and outcome.train_loss is None
    assert [r["step"] for r in records(tmp_path, "val")] == [6, 6]  # the first session's and this one's
    assert len(records(tmp_path, "train")) == 6


def test_the_run_can_end_itself_as_done(tmp_path):
    run = Regression(tmp_path, patience=2)
    outcome = train_loop(run, validation(), Plan(steps=50, lr=1e-2, warmup=1, eval_every=3, progress=False))
    assert outcome.end == EARLY and outcome.done and outcome.step == 6 and run.finished == 6
    assert load_training_state(find_checkpoint(tmp_path / "checkpoints"))["done"] is True


def test_a_non_finite_loss_names_the_last_good_checkpoint_and_how_to_resume(tmp_path):
    run = Regression(tmp_path)
    run.after_step = lambda step, record: step == 5 and run.model.net[0].weight.data.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 6.*Training stopped.*\(step 4\).*regress --resume"):
        train_loop(run, validation(), Plan(steps=10, lr=1e-2, warmup=1, save_every=4, progress=False))
    assert load_training_state(find_checkpoint(tmp_path / "checkpoints"))["step"] == 4


def test_the_parts_of_a_loss_are_averaged_over_micro_batches_like_the_loss():
    x, y = regression_data(16)
    model = Regressor()
    optimizer = make_optimizer(model, lr=1e-3)

    def loss_fn(batch):
        return (model(batch[0]) - batch[1]).pow(2).mean(), {"first": batch[1][0], "count": torch.tensor(1.0)}

    result = optimizer_step(model, optimizer, [(x[:8], y[:8]), (x[8:], y[8:])], loss_fn, clip=0)
    assert result.parts["first"] == pytest.approx(float((y[0] + y[8]) / 2))
    assert result.parts["count"] == 1.0
    assert np.isfinite(result.loss)
