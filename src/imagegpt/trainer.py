"""Run machinery shared by pretraining and fine-tuning: small functions and classes, not a framework.

A run directory holds everything a run needs to continue exactly where it stopped:

    RUN_DIR/
      args.json                     the run's full arguments (resume reads them back)
      metrics.jsonl                 one JSON record per line: {"step", "split", "loss", ...}
      loss.png                      the loss curve, redrawn from metrics.jsonl
      checkpoints/latest/           a transformers-format model directory (config.json, model.safetensors,
                                    preprocessor_config.json) plus training_state.pt: optimizer, schedule,
                                    step, RNG states and data position
      model/                        the finished run's model (save_checkpoint with state=None), when it ends
      .lock                         held (fcntl.flock) by the process working in the run: RunLock

A checkpoint is written into a temporary directory beside `latest`, fsynced, then swapped in with two renames;
`find_checkpoint` (imagegpt.checkpoint, where readers of runs find it) repairs the one window a crash can
leave (between the renames), so `latest` is never half written. The loop that uses these pieces is
imagegpt.loop's, which pretraining (train.py) and fine-tuning (finetune.py) share.

A run directory is worked in by one process at a time: RunLock holds a lock on RUN_DIR/.lock for the run's
lifetime (the kernel releases it when the process dies, however it dies), so a second `train --resume` of the
same run is refused before it touches a file. Files read back on resume (args.json, training_state.pt) are
checked when read: a damaged one is a CheckpointError naming it, and nothing in the run is written before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

# The run directory's layout and its readers live in checkpoint (below training); they are this module's too.
from .checkpoint import CHECKPOINTS_DIR, MODEL_DIR, STATE_FILE, find_checkpoint, latest_model_dir  # noqa: F401
from .device import autocast
from .errors import ArgumentError, CheckpointError, ImageGPTError
from .files import fsync_dir, fsync_tree, write_errors, write_text_atomic

ARGS_FILE = "args.json"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss.png"
LOCK_FILE = ".lock"


class NonFiniteLossError(ImageGPTError):
    """The loss or the gradient norm became NaN or infinite; the last good checkpoint is kept."""


# The run directory


def prepare_run_dir(
    directory: str | os.PathLike, args: dict, *, resume: bool = False, write: bool = True
) -> Path:
    """Create (or, with resume, reopen) a run directory and save the run's arguments to args.json.

    A fresh run refuses a directory that already holds one, so that a typo never overwrites a run.
    write=False (ranks other than 0) only checks.
    """
    directory = Path(directory)
    has_run = (directory / ARGS_FILE).exists() or (directory / CHECKPOINTS_DIR).exists()
    if resume and not has_run:
        raise ArgumentError(f"{directory} holds no run to resume (no {ARGS_FILE}); start it without --resume")
    if not resume and has_run:
        raise ArgumentError(
            f"{directory} already holds a run; continue it with --resume {directory}, or choose another --out"
        )
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            directory / ARGS_FILE, json.dumps(args, indent=2, sort_keys=True, default=str) + "\n"
        )
    return directory


def load_args(directory: str | os.PathLike) -> dict:
    """The arguments a run was started with (its args.json); a CheckpointError if the file is damaged."""
    path = Path(directory) / ARGS_FILE
    if not path.is_file():
        raise ArgumentError(f"{directory} is not a run directory: {ARGS_FILE} is missing")
    try:
        args = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, f"it is not readable JSON ({e})") from e
    if not isinstance(args, dict):
        raise damaged(path, f"it holds a JSON {type(args).__name__}, not the run's arguments as an object")
    return args


def damaged(path: Path, reason: str) -> CheckpointError:
    """The error for a run file that cannot be used: which file, why, and what to do."""
    return CheckpointError(
        f"{path} is damaged or was not written by imagegpt: {reason}. The run cannot continue from it; "
        "restore the file from a copy, or start a new run with another --out. Nothing in the run was changed"
    )


class RunLock:
    """`with RunLock(run_dir):` holds an exclusive lock on RUN_DIR/.lock (fcntl.flock), so that one process
    at a time works in a run; another one is refused with an ArgumentError naming the holder's pid.

    The kernel drops the lock when the holder exits, however it exits (kill -9 included): a lock is never
    left behind. The file itself stays (deleting it would let two processes lock two different files).
    Creates run_dir. enabled=False (ranks other than 0) holds nothing. Where fcntl is missing (Windows)
    nothing is locked.
    """

    def __init__(self, directory: str | os.PathLike, *, enabled: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        try:
            import fcntl
        except ImportError:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ArgumentError(
                f"{self.directory} is in use by another imagegpt process (pid {holder}); wait for it to "
                "finish or stop it (Ctrl-C or kill saves its checkpoint), then try again"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


# Metrics: JSONL and a loss curve


class MetricsLog:
    """Appends one JSON record per line. On resume, records past the checkpoint's step are dropped, since the
    resumed run will log those steps again."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if _step(r) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl; a torn last line (a crash mid-append), or any line that is not a
    record with an integer step, is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and _step(record) >= 0:
                records.append(record)
    return records


def _step(record: dict) -> int:
    """A record's step; -1 when it has none that is an integer."""
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else -1


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike, key: str = "loss") -> Path:
    """Draw `key` against step for every split in metrics.jsonl (train as a line, others as markers)."""
    # matplotlib takes 0.3 s to import: only a command that draws pays for it. The Agg canvas: no display,
    # no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_split: dict[str, list[tuple[int, float]]] = {}
    for r in read_metrics(metrics_path):
        if isinstance(r.get(key), int | float) and not isinstance(r[key], bool):
            by_split.setdefault(r.get("split", "train"), []).append((r["step"], r[key]))
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for split, points in sorted(by_split.items()):
        steps, values = zip(*points)
        style = {"linewidth": 1} if split == "train" else {"marker": "o", "linestyle": "--"}
        ax.plot(steps, values, label=split, **style)
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " ") + (" (nats)" if key == "loss" else ""))
    ax.grid(alpha=0.3)
    if by_split:
        ax.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path)
    return png_path


# Optimizer, schedule and one optimizer step


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW as in the paper: betas (0.9, 0.95); weight decay (0 by default) only on matrices, not on norms,
    biases or vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def training_bytes(config, micro_batch: int) -> int:
    """A lower bound on the memory training `config` takes: float32 weights, gradients and AdamW's two
    moments (16 bytes a parameter), and every block's input kept for the backward pass at 2 bytes a value
    (bfloat16; gradient checkpointing keeps exactly these). Used to refuse what cannot fit, never to size."""
    activations = micro_batch * config.n_positions * config.n_embd * config.n_layer * 2
    return 16 * config.num_parameters() + activations


def cosine_lr(step: int, *, lr: float, warmup: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr, then cosine decay reaching 0 at
    step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping
    parts: dict[str, float] = field(default_factory=dict)  # the named parts loss_fn returned, averaged alike


LossFn = Callable[[Any], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Any],
    loss_fn: LossFn,
    *,
    clip: float = 1.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    dist: Distributed | None = None,
    step: int | None = None,
) -> StepResult:
    """One optimizer step over equal-sized micro-batches (gradient accumulation), under autocast.

    `loss_fn(batch)` returns the mean loss of one micro-batch, or (loss, {name: part}) with parts to log
    (the two terms of a joint loss, say); it calls `model` (DDP-wrapped or not). Gradients are all-reduced
    once, on the last micro-batch. The loss (and its parts, in the same all-reduce) is averaged over ranks
    before the finiteness check, so every rank stops together; a NaN or infinite loss or gradient norm raises
    NonFiniteLossError before the weights are touched.
    """
    device = device or next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}  # "loss" first, then the parts, each summed over micro-batches
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, dtype):
                loss = loss_fn(batch)
                loss, parts = loss if isinstance(loss, tuple) else (loss, {})
            (loss / n).backward()
        for name, value in {"loss": loss, **parts}.items():
            sums[name] = sums.get(name, torch.zeros((), device=device)) + value.detach().float()
    total = torch.stack(list(sums.values()))
    means = {k: v / n for k, v in zip(sums, (dist.mean(total) if dist is not None else total).tolist())}
    loss_value = means.pop("loss")
    where = f" at step {step}" if step is not None else ""
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"the loss became {loss_value}{where}; the weights were not updated with it. Lower the learning "
            "rate or lengthen the warmup, then resume from the last good checkpoint"
        )
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"the gradient norm became {grad_norm}{where}; the weights were not updated with it. Lower the "
            "learning rate or lengthen the warmup, then resume from the last good checkpoint"
        )
    optimizer.step()
    return StepResult(loss=loss_value, grad_norm=grad_norm, parts=means)


# Data order: seeded, resumable, sharded


class BatchOrder:
    """Which examples each step reads: a seeded permutation per epoch, consumed a global batch at a time.

    Every rank computes the same permutation and takes its own slice of each global batch, so N ranks see
    exactly the examples one process would. The state is (epoch, position): saving it resumes the order
    exactly.
    An epoch's tail smaller than a global batch is skipped (every step sees a full batch).
    """

    def __init__(self, n: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ArgumentError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        if n < global_batch:
            raise ArgumentError(
                f"the dataset has {n} examples, fewer than one batch of {global_batch}; lower --batch-size"
            )
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._permutation = self._make_permutation()

    def _make_permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> np.ndarray:
        """This rank's indices for the next step: global_batch // world_size of them."""
        if self.position + self.global_batch > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._permutation = self._make_permutation()
        batch = self._permutation[self.position : self.position + self.global_batch]
        self.position += self.global_batch
        per_rank = self.global_batch // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise CheckpointError(
                f"the checkpoint's data order was for {state['n']} examples with seed {state['seed']}, but "
                f"this run has {self.n} examples with seed {self.seed}; resume with the same data and seed"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._permutation = self._make_permutation()


# RNG states


def rng_state() -> dict:
    """torch (and CUDA), numpy and python RNG states, in types torch.load(weights_only=True) accepts."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Checkpoints


def capture_state(
    step: int,
    optimizer: torch.optim.Optimizer,
    data: BatchOrder | None = None,
    dist: Distributed | None = None,
    *,
    model: nn.Module | None = None,
    **extra,
) -> dict:
    """The training state to save beside the model: step, optimizer, RNG states of every rank, data position,
    and anything else the caller passes (the schedule's parameters, the best validation score, ...).

    With an FSDP-sharded `model`, pass it: the optimizer state is gathered whole (all ranks must call).
    """
    rng = rng_state()
    ranks = dist.all_gather_object(rng) if dist is not None and dist.world_size > 1 else [rng]
    state = {"step": step, "optimizer": optimizer_state_dict(optimizer, model), "rng": ranks, **extra}
    if data is not None:
        state["data"] = data.state_dict()
    return state


def restore_state(
    state: dict,
    optimizer: torch.optim.Optimizer,
    data: BatchOrder | None = None,
    dist: Distributed | None = None,
    *,
    model: nn.Module | None = None,
    source: str | os.PathLike = STATE_FILE,
) -> int:
    """Load optimizer, data position and this rank's RNG states from a saved state; returns the next step.

    With an FSDP-sharded `model`, pass it: each rank takes its shard of the whole optimizer state. A state
    that does not fit this optimizer or data (another model's, say) is a CheckpointError naming `source`.
    """
    try:
        load_optimizer_state_dict(optimizer, state["optimizer"], model)
        if not is_sharded(model):
            _check_moments(optimizer)
        if data is not None and "data" in state:
            data.load_state_dict(state["data"])
        ranks = state["rng"]
        rank = dist.rank if dist is not None else 0
        set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise damaged(Path(source), f"its state does not fit this run ({type(e).__name__}: {e})") from e
    return int(state["step"])


def _check_moments(optimizer: torch.optim.Optimizer) -> None:
    """Every saved moment has its parameter's shape (load_state_dict checks counts, not shapes)."""
    for parameter, moments in optimizer.state.items():
        for name, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != parameter.shape:
                raise ValueError(
                    f"optimizer moment {name} of shape {tuple(value.shape)} for a parameter of shape "
                    f"{tuple(parameter.shape)}"
                )


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    model: nn.Module,
    state: dict | None,
    *,
    processor=None,
    name: str = "latest",
) -> Path:
    """Write model (its save_pretrained) and state (training_state.pt) as checkpoints_dir/name, atomically.

    state None writes the model directory alone (a run's final RUN_DIR/model, say) with the same guarantee.

    Steps: write everything into a temporary sibling directory and fsync it; rename the old checkpoint to
    name.old; rename the new one into place; fsync the parent; delete name.old. A crash at any point leaves
    either the old or the new checkpoint complete, and find_checkpoint finds it.
    """
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target, old = checkpoints_dir / name, checkpoints_dir / f"{name}.old"
    tmp = Path(tempfile.mkdtemp(dir=checkpoints_dir, prefix=f".{name}.tmp-"))
    try:
        model = unwrap(model)
        if processor is not None:
            model.save_pretrained(tmp, processor=processor)
        else:
            model.save_pretrained(tmp)
        with write_errors(target):  # a full disk: one line, and the previous checkpoint stays whole
            if state is not None:
                try:
                    torch.save(state, tmp / STATE_FILE)
                except RuntimeError as e:  # torch says a failed write (a full disk) with a RuntimeError
                    raise OSError(errno.EIO, (str(e).splitlines() or ["write failed"])[0]) from e
            fsync_tree(tmp)
        if target.exists():
            if old.exists():  # left by an earlier crash after the new checkpoint was in place
                shutil.rmtree(old)
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def load_training_state(checkpoint_dir: str | os.PathLike) -> dict:
    """training_state.pt of a checkpoint, loaded with weights_only=True (tensors and plain containers), its
    structure checked: a damaged or foreign file is a CheckpointError naming it, never a traceback."""
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; pass a checkpoint directory written by imagegpt training")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = "it holds objects other than tensors (torch.load(weights_only=True) refused them)"
        raise damaged(path, f"{reason}, or is not a PyTorch file") from e
    except Exception as e:  # a truncated or foreign file fails inside torch in many ways; none is our bug
        reason = (str(e).splitlines() or [""])[0]
        raise damaged(path, f"it cannot be read ({type(e).__name__}: {reason})") from e
    problem = _state_problem(state)
    if problem:
        raise damaged(path, problem)
    return state


def _state_problem(state) -> str | None:
    """What is missing from a loaded training state, or None when it has the shape capture_state gives."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not the training state"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"its step is {step!r}, not a count of optimizer steps"
    optimizer = state.get("optimizer")
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
    ):
        return "it has no optimizer state"
    rng = state.get("rng")
    if not (rng and isinstance(rng, list) and all(isinstance(r, dict) for r in rng)):
        return "it has no random number generator states"
    if "data" in state and not (
        isinstance(state["data"], dict) and {"epoch", "position", "seed", "n"} <= set(state["data"])
    ):
        return "its data position is incomplete"
    return None


# Stopping cleanly on Ctrl-C and SIGTERM


class StopRequest:
    """Within `with StopRequest() as stop:`, SIGINT and SIGTERM set `stop.requested` instead of killing the
    process, so the loop can save a checkpoint at the next step boundary and exit. A second Ctrl-C interrupts
    at once. Outside the main thread (where handlers cannot be installed) it only holds the flag."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self.signal: int | None = None  # the signal's number: a command stopped by it exits 128 + signal
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self.signal = int(signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


# Progress


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    """A tqdm bar over optimizer steps; its remaining time is the ETA. Set the rest with set_postfix."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


# Distribution, applied from outside the model


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        value = value.detach().clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)  # gloo has no AVG
        return value / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (so that all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def init_distributed(device: torch.device) -> Distributed:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK, if any: nccl on CUDA (one GPU per
    local rank), gloo on CPU. Without those variables, a single process on `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_distributed(dist: Distributed) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap_model(
    model: nn.Module, dist: Distributed, fsdp_units: Sequence[nn.Module] | None = None
) -> nn.Module:
    """Distribute a model under torchrun, from outside it: DistributedDataParallel by default (a full copy of
    the weights and optimizer state on every rank), or, given fsdp_units (e.g. the transformer blocks),
    FSDP2: each unit and then the root sharded over the ranks with fully_shard, so that each holds
    1/world_size of the weights, gradients and AdamW moments. Create the optimizer after this call.
    """
    if not dist.enabled:
        return model
    if fsdp_units is not None:
        # Here and below, FSDP is imported where it is used: 0.7 s to import, and only --fsdp needs it.
        from torch.distributed.fsdp import fully_shard

        for unit in fsdp_units:
            fully_shard(unit)
        fully_shard(model)
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP (or torch.compile) wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def is_sharded(model: nn.Module | None) -> bool:
    """True for a model sharded by wrap_model(..., fsdp_units=...)."""
    if model is None or "torch.distributed.fsdp" not in sys.modules:
        return False  # nothing was sharded: FSDP (0.7 s to import) was never loaded
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's weights on the CPU. For a sharded model this is a collective (every rank calls) and
    only rank 0 receives the weights (the others get {})."""
    if not is_sharded(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> dict:
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict, model: nn.Module | None = None):
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
