"""The training loop that pretraining and fine-tuning share: step, log, evaluate, save, stop, resume, plot.

    run = Pretraining(...)       # what is trained: model, optimizer, data order, how checkpoints are written
    objective = NextPixel(...)   # what it learns: the loss of a batch, the score of the validation split
    outcome = train_loop(run, objective, Plan(steps=1000, lr=1e-3, warmup=100, eval_every=200))

Each step sets the learning rate (linear warmup, cosine to 0), takes one optimizer step over the run's
micro-batches (imagegpt.trainer.optimizer_step: autocast, clipping, a non-finite loss refused before the
weights change) and appends its record to metrics.jsonl. Every eval_every steps, and at the last, the
objective scores the validation split; every save_every steps, and whenever the loop ends, the run saves
checkpoints/latest and loss.png is redrawn. The loop ends at the last step, when the run ends itself
(fine-tuning's patience), on Ctrl-C or SIGTERM, or after stop_after steps of this session; a resumed run (the
run restores its step, the optimizer, the RNG states and the data position from the checkpoint) continues bit
for bit.

Nothing here knows which model, data or objective it trains: imagegpt.train (next-pixel pretraining) and
imagegpt.finetune (classification with the paper's L_gen) supply them, and another objective is one more
class with the three methods of Objective.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .trainer import (
    CHECKPOINTS_DIR,
    CURVE_FILE,
    METRICS_FILE,
    Distributed,
    MetricsLog,
    NonFiniteLossError,
    StepResult,
    StopRequest,
    cosine_lr,
    find_checkpoint,
    is_sharded,
    load_training_state,
    optimizer_step,
    plot_metrics,
    progress_bar,
    set_lr,
    unwrap,
)


class TrainingRun:
    """What the loop trains. Pretraining and fine-tuning each subclass it with their data and checkpoints.

    model: what the loss calls (DDP-wrapped or FSDP-sharded under torchrun; the plain model otherwise).
    step: optimizer steps already done (0, or the checkpoint's on resume). tokens_per_step: for the
    throughput in the records (0: none). Every method is called on every rank.
    """

    command = "train"  # `imagegpt COMMAND --resume RUN_DIR` continues it
    activity = "Training"  # how messages name it
    resume_advice = ""  # what else to change when resuming after a non-finite loss

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        run_dir: Path,
        metrics: MetricsLog,
        *,
        dist: Distributed | None = None,
        dtype: torch.dtype = torch.float32,
        step: int = 0,
        tokens_per_step: int = 0,
    ):
        self.model, self.optimizer, self.run_dir, self.metrics = model, optimizer, Path(run_dir), metrics
        self.dist = dist or Distributed(device=next(unwrap(model).parameters()).device)
        self.device, self.dtype = self.dist.device, dtype
        self.step, self.tokens_per_step = step, tokens_per_step

    def batches(self, step: int) -> Sequence[Any]:
        """The micro-batches of optimizer step `step` (0-based), this rank's share, on the device."""
        raise NotImplementedError

    def save(self, step: int, *, done: bool) -> None:
        """Write checkpoints/latest after `step` steps; done: the run is over (finished or ended itself)."""
        raise NotImplementedError

    def after_step(self, step: int, record: dict) -> None:
        """Called after every optimizer step with its record (kept checkpoints, callbacks)."""

    def after_evaluation(self, step: int, values: dict) -> bool:
        """Called after every evaluation with its values; True ends the run here, as done (patience)."""
        return False

    def finish(self, step: int) -> None:
        """Publish the finished run's model (after the last save)."""


class Objective(Protocol):
    """What a run learns and how it is scored: the loop calls these three methods and nothing else."""

    def loss(self, model: nn.Module, batch) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean loss of one micro-batch, or (loss, named parts to log); calls model(...) (DDP syncs)."""
        ...

    def train_metrics(self, result: StepResult) -> dict[str, float]:
        """What a step's record adds to its loss: bits/dim, the parts of a joint loss."""
        ...

    def evaluate(self, run: TrainingRun, final: bool) -> dict[str, float]:
        """The validation record's values; final: the run's last evaluation. Every rank calls it."""
        ...


@dataclass
class Plan:
    """How long a run trains and when it stops to evaluate and to save: the same for every objective."""

    steps: int  # optimizer steps in all (the cosine schedule reaches 0 there)
    lr: float  # the peak learning rate
    warmup: int  # linear warmup steps
    clip: float = 1.0  # gradient norm clipping; 0 turns it off
    eval_every: int = 0  # steps between evaluations; 0: only at the last step
    save_every: int = 0  # steps between checkpoints; 0: only when the loop ends
    stop_after: int | None = None  # end (resumably) after this many steps of this session
    progress: bool = True

    def evaluates(self, step: int) -> bool:
        return step == self.steps or bool(self.eval_every and step % self.eval_every == 0)

    def saves(self, step: int) -> bool:
        return bool(self.save_every and step % self.save_every == 0)


# How a loop ends. The first two are done: the run is complete and publishes its model.
FINISHED, EARLY, SIGNAL, STOPPED = "finished", "ended early", "signal", "stop_after"


@dataclass
class Outcome:
    step: int  # optimizer steps done
    end: str = FINISHED  # FINISHED, EARLY (the run ended itself), SIGNAL or STOPPED (resumable)
    signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, if one did
    train_loss: float | None = None  # the last step's, this session
    evaluation: dict | None = None  # the last evaluation's values, this session
    tokens_per_second: float | None = None  # a moving average over this session's steps

    @property
    def done(self) -> bool:
        return self.end in (FINISHED, EARLY)


def train_loop(run: TrainingRun, objective: Objective, plan: Plan) -> Outcome:
    """Train `run` on `objective` from run.step to plan.steps (or until stopped); every rank calls it."""
    outcome = Outcome(step=run.step)
    bar = progress_bar(
        plan.steps, initial=run.step, enabled=plan.progress and run.dist.is_main, desc=run.command
    )
    evaluated = None  # the step of this session's last evaluation
    end = FINISHED if run.step >= plan.steps else None
    try:
        with StopRequest() as stop:
            while end is None:
                record = train_step(run, objective, plan, outcome)
                step = outcome.step
                run.metrics.write(record)
                bar.update(1)
                bar.set_postfix(_postfix(record, outcome), refresh=False)
                run.after_step(step, record)
                if plan.evaluates(step):
                    outcome.evaluation = evaluate(run, objective, step, final=step == plan.steps, bar=bar)
                    evaluated = step
                    end = EARLY if run.after_evaluation(step, outcome.evaluation) else None
                end = end or _ending(run, plan, stop, step)
                if end is None and plan.saves(step):
                    save(run, step, done=False)
    except NonFiniteLossError as e:
        bar.close()
        raise _non_finite(e, run) from None
    bar.close()
    if end == FINISHED and evaluated != outcome.step:  # resumed at the last step, before it was published
        outcome.evaluation = evaluate(run, objective, outcome.step, final=True)
    outcome.end, outcome.signal = end, stop.signal if end in (SIGNAL, STOPPED) else None
    save(run, outcome.step, done=outcome.done)
    if outcome.done:
        run.finish(outcome.step)
    return outcome


def train_step(run: TrainingRun, objective: Objective, plan: Plan, outcome: Outcome) -> dict:
    """One optimizer step at outcome.step (then one more done); returns its record for metrics.jsonl."""
    started = time.perf_counter()
    set_lr(run.optimizer, cosine_lr(outcome.step, lr=plan.lr, warmup=plan.warmup, total=plan.steps))
    result = optimizer_step(
        run.model,
        run.optimizer,
        run.batches(outcome.step),
        lambda batch: objective.loss(run.model, batch),
        clip=plan.clip,
        device=run.device,
        dtype=run.dtype,
        dist=run.dist,
        step=outcome.step + 1,
    )
    outcome.step += 1
    outcome.train_loss = result.loss
    record = {"step": outcome.step, "split": "train", "loss": result.loss, **objective.train_metrics(result)}
    record.update(lr=run.optimizer.param_groups[0]["lr"], grad_norm=result.grad_norm)
    if run.tokens_per_step:
        rate = run.tokens_per_step / (time.perf_counter() - started)
        record["tokens_per_s"] = rate
        previous = outcome.tokens_per_second
        outcome.tokens_per_second = rate if previous is None else 0.9 * previous + 0.1 * rate
    return record


def evaluate(run: TrainingRun, objective: Objective, step: int, *, final: bool, bar=None) -> dict:
    """The objective's evaluation at `step`, written to metrics.jsonl (and, but for the last, to the bar)."""
    values = objective.evaluate(run, final)
    run.metrics.write({"step": step, "split": "val", **values})
    if bar is not None and not bar.disable and not final:
        bar.write(
            f"step {step}: validation "
            + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in values.items())
        )
    return values


def save(run: TrainingRun, step: int, *, done: bool) -> None:
    """The run's checkpoint, then the loss curve redrawn from metrics.jsonl."""
    run.save(step, done=done)
    if run.dist.is_main:
        plot_metrics(run.run_dir / METRICS_FILE, run.run_dir / CURVE_FILE)


def _ending(run: TrainingRun, plan: Plan, stop: StopRequest, step: int) -> str | None:
    if step >= plan.steps:
        return FINISHED
    if run.dist.any(stop.requested):  # every rank stops at the same step
        return SIGNAL
    if plan.stop_after is not None and step - run.step >= plan.stop_after:
        return STOPPED
    return None


def _postfix(record: dict, outcome: Outcome) -> dict[str, str]:
    shown = {k: f"{v:.3f}" for k, v in record.items() if k not in ("step", "split", "lr", "grad_norm")}
    shown.pop("tokens_per_s", None)
    if outcome.tokens_per_second is not None:
        shown["tok_s"] = f"{outcome.tokens_per_second:,.0f}"
    return shown


def _non_finite(error: NonFiniteLossError, run: TrainingRun) -> NonFiniteLossError:
    """The error a non-finite loss ends the run with: which checkpoint is still good, and how to go on."""
    last = find_checkpoint(run.run_dir / CHECKPOINTS_DIR) if run.dist.is_main else None
    if run.dist.is_main:
        plot_metrics(run.run_dir / METRICS_FILE, run.run_dir / CURVE_FILE)
    where = (
        f"the last good checkpoint is {last} (step {load_training_state(last)['step']}); resume it with "
        f"`imagegpt {run.command} --resume {run.run_dir}`{run.resume_advice}"
        if last is not None
        else "no checkpoint was saved yet; start again with a smaller --lr or a longer --warmup"
    )
    return NonFiniteLossError(f"{error}. {run.activity} stopped; {where}")


@torch.no_grad()  # not inference_mode: an FSDP model's gathered weights must stay usable for training
def evaluate_split(
    run: TrainingRun, data, score: Callable[[nn.Module, Any], tuple[float, int]], batch_size: int
) -> float:
    """sum / count of score(model, batch) -> (sum, count) over `data` (anything sliced by data[a:b:c]), in
    eval mode: each rank scores its share (data[rank::world_size]) and the sums are all-reduced."""
    dist, sharded = run.dist, is_sharded(run.model)
    model = run.model if sharded else unwrap(run.model)  # DDP's wrapper is for the backward pass
    share = data[dist.rank :: dist.world_size]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, math.ceil(len(data) / dist.world_size), batch_size):
            batch = share[start : start + batch_size]
            if len(batch) == 0:
                if sharded:  # sharded weights: every rank must run as many forward passes as the others
                    score(model, data[:1])
                continue
            value, n = score(model, batch)
            total, count = total + value, count + n
    finally:
        model.train(was_training)
    if sharded:
        model.reshard()  # the root keeps its gathered weights after a forward; the optimizer needs shards
    sums = dist.mean(torch.tensor([total, float(count)], dtype=torch.float64, device=run.device))
    return float(sums[0] / sums[1])
