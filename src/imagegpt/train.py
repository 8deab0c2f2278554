"""Pretraining from pixels: fit a palette, tokenise once, train the next-pixel (or the BERT) objective.

`train(TrainOptions(...))` is a plain function around a plain loop; the run machinery (run directory,
checkpoints, resume, signals) is imagegpt.trainer's. The paper's recipe: AdamW (0.9, 0.95) without weight
decay, linear warmup then cosine decay to 0, gradient clipping at 1.0, bfloat16 autocast where supported, and
SOS handled as the original: the model reads [SOS, x0, ..., x_{n-2}] and predicts [x0, ..., x_{n-1}].
`objective="bert"` trains the paper's masked-pixel objective instead; imagegpt.objectives supplies each
objective's loss, masks and evaluation.

Under torchrun, the same function runs DistributedDataParallel (wrapped from outside the model): every rank
reads its own slice of each global batch from the token cache, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PRESETS, ImageGPTConfig
from .device import DTYPES, resolve_device, resolve_dtype
from .errors import ArgumentError, CheckpointError
from .evaluate import bits_per_dim, token_nll
from .files import check_output
from .limits import check_memory
from .model import ImageGPT, sos_inputs
from .objectives import check_mask_prob, check_objective, describe, objective_for
from .trainer import (
    ARGS_FILE,
    CHECKPOINTS_DIR,
    CURVE_FILE,
    METRICS_FILE,
    MODEL_DIR,
    STATE_FILE,
    BatchOrder,
    Distributed,
    MetricsLog,
    NonFiniteLossError,
    RunLock,
    StopRequest,
    capture_state,
    close_distributed,
    cosine_lr,
    damaged,
    find_checkpoint,
    full_state_dict,
    init_distributed,
    is_sharded,
    load_args,
    load_training_state,
    make_optimizer,
    optimizer_step,
    plot_metrics,
    prepare_run_dir,
    progress_bar,
    read_metrics,
    restore_state,
    save_checkpoint,
    set_lr,
    training_bytes,
    wrap_model,
)

PALETTE_FILE = "palette.json"
# Generated built-in datasets are drawn at the training resolution rather than resized to it.
GENERATED = ("shapes", "photos")


@dataclass
class TrainOptions:
    """Everything a pretraining run depends on; saved as the run's args.json.

    batch_size is the global batch: images per optimizer step, over all processes and accumulation steps.
    resolution None means the dataset's own image size. palette: a palette.json or preprocessor_config.json;
    None fits one with `clusters` colours on `palette_pixels` pixels of the training split.
    eval_every / save_every: steps between validations / checkpoints (0: only at the end). eval_images caps
    the validation images of the periodic evaluations (0: all); the final one uses the whole split.
    data_options go to imagegpt.data.load_dataset (n, limit, val_fraction, ...); data_seed fixes the split.
    fsdp: under torchrun, shard weights, gradients and optimizer state over the ranks (FSDP2) instead of DDP.
    keep_checkpoints: also keep the model at this many log-spaced steps (kept_steps), the last step among
    them, as checkpoints/step-NNNNNNN model directories: what `imagegpt study` probes.
    objective: "ar" (next-pixel prediction) or "bert" (masked-pixel prediction, each position masked with
    probability mask_prob; recorded in the model's config as bert_mask_prob).
    """

    data: str = "shapes"
    out: str = "runs/imagegpt"
    preset: str = "igpt-nano"
    resolution: int | None = None
    clusters: int = 16
    palette: str | None = None
    palette_pixels: int = 100_000
    steps: int = 1000
    batch_size: int = 32
    accumulate: int = 1
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    dropout: float = 0.0
    eval_every: int = 200
    eval_images: int = 512
    save_every: int = 500
    seed: int = 0
    data_seed: int = 0
    data_options: dict = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    cache_dir: str | None = None
    progress: bool = True
    stop_after: int | None = None
    keep_checkpoints: int = 0
    objective: str = "ar"
    mask_prob: float = 0.15

    def validate(self) -> None:
        """Every option checked before anything is created: a refused run leaves nothing behind, so the
        corrected command (or --resume) never meets a half-made run."""
        from .palette import check_clusters

        for name in ("steps", "batch_size", "accumulate", "palette_pixels"):
            _check_int(name, getattr(self, name), 1)
        counts = ("warmup", "eval_every", "save_every", "eval_images", "seed", "data_seed")
        for name in (*counts, "keep_checkpoints"):
            _check_int(name, getattr(self, name), 0)
        for name in ("resolution", "stop_after"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("lr", "weight_decay", "clip", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ArgumentError(f"{_flag(name)} must be a number, got {value!r}")
        if not self.lr > 0:
            raise ArgumentError(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.clip < 0:
            raise ArgumentError("--weight-decay and --clip must be >= 0 (--clip 0 turns clipping off)")
        if not 0 <= self.dropout < 1:
            raise ArgumentError(f"--dropout is a probability in [0, 1), got {self.dropout}")
        for name in ("data", "out", "preset", "device", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ArgumentError(f"{_flag(name)} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("palette", "cache_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str | Path):
                raise ArgumentError(f"{_flag(name)} must be a path, got {getattr(self, name)!r}")
        if not isinstance(self.data_options, dict) or not all(isinstance(k, str) for k in self.data_options):
            raise ArgumentError(f"data options must be a dict of KEY: VALUE, got {self.data_options!r}")
        for name in ("gradient_checkpointing", "fsdp", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{_flag(name)} must be true or false, got {getattr(self, name)!r}")
        check_objective(self.objective)
        check_mask_prob(self.mask_prob)
        if self.objective != "bert" and self.mask_prob != TrainOptions.mask_prob:
            raise ArgumentError("--mask-prob is the BERT objective's; give it with --objective bert")
        if self.palette is None:
            check_clusters(self.clusters)
        if self.preset not in PRESETS:
            raise ArgumentError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.dtype not in ("auto", *DTYPES):
            raise ArgumentError(f"unknown --dtype {self.dtype!r}; use one of auto, {', '.join(DTYPES)}")
        check_output(self.out, directory=True, what="--out")
        if self.cache_dir is not None:
            check_output(self.cache_dir, directory=True, what="--cache-dir")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ArgumentError(f"{_flag(name)} must be {kind}, got {value!r}")


# Options that may differ when a run is resumed: they change where and how it runs, not what it computes.
RESUME_OVERRIDABLE = ("device", "progress", "stop_after", "eval_every", "save_every", "cache_dir", "lr")


def resume_options(run_dir: str | Path, **overrides) -> TrainOptions:
    """The options of the run in run_dir (its args.json), with the few that may change on resume replaced."""
    saved = load_args(run_dir)
    known = {f.name for f in fields(TrainOptions)}
    options = TrainOptions(**{k: v for k, v in saved.items() if k in known})
    options.stop_after = None  # a limit for one session, not the run's
    options.out = str(run_dir)
    try:
        options.validate()
    except ArgumentError as e:
        raise damaged(Path(run_dir) / ARGS_FILE, f"its arguments are not valid ({e})") from e
    changed = {k: v for k, v in overrides.items() if v is not None and getattr(options, k) != v}
    refused = sorted(set(changed) - set(RESUME_OVERRIDABLE))
    if refused:
        detail = ", ".join(f"--{k.replace('_', '-')} ({getattr(options, k)!r} in the run)" for k in refused)
        raise ArgumentError(
            f"a resumed run keeps its arguments, but {detail} differ; drop them, or start a new run with "
            "--out. "
            f"Only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDABLE)} may change"
        )
    for k, v in changed.items():
        setattr(options, k, v)
    options.out = str(run_dir)
    return options


KEPT_PREFIX = "step-"


def kept_steps(total: int, count: int) -> list[int]:
    """`count` steps up to `total`, log-spaced from total/64 (fewer where they coincide), the last total."""
    if count < 2:
        return [total] * count
    first = max(1.0, total / 64)
    return sorted({int(round(s)) for s in np.geomspace(first, total, count)})


def kept_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """step -> model directory of the checkpoints a run kept (TrainOptions.keep_checkpoints), by step."""
    found = {}
    for path in (Path(run_dir) / CHECKPOINTS_DIR).glob(f"{KEPT_PREFIX}*"):
        step = path.name.removeprefix(KEPT_PREFIX)
        if step.isdigit() and (path / "config.json").is_file():
            found[int(step)] = path
    return dict(sorted(found.items()))


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    step: int
    stopped: bool  # True when a signal or stop_after ended the run before its last step
    train_loss: float | None
    val_loss: float | None  # nats per token on the validation split, at the last evaluation
    val_bits_per_dim: float | None
    tokens_per_second: float | None
    dtype: str | None = None  # the compute dtype the run's steps used ("float32", "bfloat16", ...)
    objective: str = "ar"  # "bert": the losses are of the masked tokens (not comparable to "ar" bits/dim)
    signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, if one did


def image_loss(model: nn.Module, ids: torch.Tensor, sos_id: int) -> torch.Tensor:
    """Mean next-token loss in nats over the batch, SOS handled. Calls model(...), so a DDP wrapper syncs.

    The next-pixel objective's loss; imagegpt.objectives has both objectives' (what `train` uses).
    """
    logits = model(sos_inputs(ids, sos_id)).logits  # (B, T, n_clusters)
    return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


def fit_palette(dataset, clusters: int, pixels: int = 100_000, seed: int = 0):
    """k-means on `pixels` pixels drawn at random from the dataset's images."""
    from .data import sample_pixels
    from .palette import Palette

    return Palette.fit(sample_pixels(dataset, pixels, seed=seed), clusters=clusters, seed=seed)


def _data_options(options: TrainOptions) -> dict:
    data_options = dict(options.data_options)
    if options.data in GENERATED and options.resolution is not None:
        data_options.setdefault("resolution", options.resolution)
    return data_options


def _resolution(options: TrainOptions, dataset) -> int | tuple[int, int]:
    if options.resolution is not None:
        return options.resolution
    if dataset.image_size is None:
        raise ArgumentError(f"the images of {options.data} differ in size; choose one with --resolution")
    height, width = dataset.image_size
    return height if height == width else (height, width)


def _finished(run_dir: Path, step: int, objective: str) -> TrainResult:
    records = read_metrics(run_dir / METRICS_FILE)
    last = {r.get("split"): r["loss"] for r in records if "loss" in r}  # the last record of each split
    return TrainResult(
        run_dir=run_dir,
        model_dir=run_dir / MODEL_DIR,
        step=step,
        stopped=False,
        train_loss=last.get("train"),
        val_loss=last.get("val"),
        val_bits_per_dim=None if "val" not in last else bits_per_dim(last["val"]),
        tokens_per_second=None,
        objective=objective,
    )


def _check_resume(options: TrainOptions, run_dir: Path) -> None:
    """Refuse to resume a run with arguments that change what it computes (see resume_options)."""
    saved = load_args(run_dir)
    skip = set(RESUME_OVERRIDABLE) | {"out", "progress", "stop_after"}
    if options.palette is not None:
        skip.add("clusters")  # the run records the palette's size
    if options.resolution is None:
        skip.add("resolution")  # the run records the dataset's size
    differ = [f.name for f in fields(TrainOptions) if f.name not in skip and f.name in saved]
    differ = [k for k in differ if getattr(options, k) != saved[k]]
    if differ:
        detail = ", ".join(f"{k} ({getattr(options, k)!r}, the run has {saved[k]!r})" for k in differ)
        raise ArgumentError(f"cannot resume {run_dir} with other arguments: {detail}")


def train(options: TrainOptions, *, resume: bool = False, on_step=None) -> TrainResult:
    """Pretrain an ImageGPT per `options` into the run directory options.out (resume: continue the run there).

    on_step(step, record, model), if given, is called after every optimizer step with the step's metrics.
    Under torchrun (WORLD_SIZE set) this runs DistributedDataParallel; call it from every rank.
    """
    options.validate()
    options = replace(options, data_options=dict(options.data_options))  # the caller's copy stays as given
    device = resolve_device(options.device)
    dist = init_distributed(device)
    try:
        with contextlib.ExitStack() as hold:  # the run's lock, taken once everything is checked
            return _train(options, resume, dist, on_step, hold)
    finally:
        close_distributed(dist)


def _train(options: TrainOptions, resume: bool, dist: Distributed, on_step, hold) -> TrainResult:
    from .data import load_dataset, token_cache
    from .palette import Palette, check_clusters
    from .processor import ImageProcessor

    device = dist.device
    resolve_dtype(options.dtype, device, training=True)  # refuse a dtype the device cannot run, early
    run_dir = Path(options.out)
    checkpoints = run_dir / CHECKPOINTS_DIR
    data_options = _data_options(options)

    # Everything is checked before anything is written: a refused run leaves the run directory as it was.
    prepare_run_dir(run_dir, {}, resume=resume, write=False)
    if resume:
        _check_resume(options, run_dir)
    train_set = load_dataset(options.data, split="train", seed=options.data_seed, **data_options)
    val_set = load_dataset(options.data, split="val", seed=options.data_seed, **data_options)
    resolution = _resolution(options, train_set)
    per_rank = options.batch_size // dist.world_size
    if options.batch_size % (dist.world_size * options.accumulate):
        raise ArgumentError(
            f"--batch-size {options.batch_size} must be divisible by the number of processes "
            f"({dist.world_size}) times --accumulate ({options.accumulate})"
        )
    BatchOrder(len(train_set), options.batch_size)  # does the data hold a batch?
    if options.resolution is None and isinstance(resolution, int):
        options.resolution = resolution

    # The palette: the run's own (fitted or copied at the start), so that a resumed run uses the same one.
    palette_path = run_dir / PALETTE_FILE
    palette = None
    if resume:
        if not palette_path.is_file():
            raise CheckpointError(f"{palette_path} is missing; the run cannot be resumed without its palette")
        palette = Palette.load(palette_path)
    elif options.palette is not None:
        palette = Palette.load(options.palette)
        check_clusters(len(palette), f"the number of colours in {options.palette}")
    elif dist.is_main:
        palette = fit_palette(train_set, options.clusters, options.palette_pixels, options.seed)
    config = ImageGPTConfig.from_preset(
        options.preset,
        resolution=resolution,
        clusters=options.clusters if palette is None else len(palette),
        resid_pdrop=options.dropout,
        embd_pdrop=options.dropout,
        attn_pdrop=options.dropout,
        objective=options.objective,
        bert_mask_prob=options.mask_prob,
    )
    what = f"training {options.preset} at {config.n_positions} positions"
    hint = "choose a smaller --preset, --resolution or --batch-size (or a larger --accumulate)"
    micro = per_rank // options.accumulate
    check_memory(training_bytes(config, micro), f"{what}, {micro} images a micro-batch,", hint, device)
    if device.type != "cpu":  # the model is built on the host first
        check_memory(4 * config.num_parameters(), f"building {options.preset}", hint)
    dist.barrier()

    hold.enter_context(RunLock(run_dir, enabled=dist.is_main))  # for the rest of the run
    if dist.is_main:  # again under the lock: another process may have started a run here meanwhile
        prepare_run_dir(run_dir, {}, resume=resume, write=False)
    latest = state = loaded = None
    if resume:
        if dist.is_main:
            find_checkpoint(checkpoints)  # rank 0 repairs what a crash left, so that ranks never race
        dist.barrier()
        latest = find_checkpoint(checkpoints, repair=False)
    if latest is not None:  # read and checked before anything of the run is written
        state = load_training_state(latest)
        loaded = ImageGPT.from_pretrained(latest)
        shape = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "objective", "bert_mask_prob")
        if any(getattr(loaded.config, k) != getattr(config, k) for k in shape):
            raise CheckpointError(
                f"{latest} holds a model of another shape than this run's arguments describe"
            )

    cache_dir = Path(options.cache_dir) if options.cache_dir else run_dir / "cache"
    if dist.is_main:  # rank 0 quantises, then writes the palette and args.json; the others open the cache
        processor = ImageProcessor(palette, resolution)
        train_tokens = token_cache(train_set, processor, cache_dir, progress=options.progress)
        val_tokens = token_cache(val_set, processor, cache_dir, progress=options.progress)
        if not resume:
            palette.save(palette_path)  # before args.json: a run with args.json always has its palette
            prepare_run_dir(run_dir, asdict(options) | {"clusters": len(palette)})
    dist.barrier()
    if not dist.is_main:
        palette = Palette.load(palette_path)
        processor = ImageProcessor(palette, resolution)
        train_tokens = token_cache(train_set, processor, cache_dir)
        val_tokens = token_cache(val_set, processor, cache_dir)
    options.clusters = len(palette)  # the run's palette decides (a --palette file, or a resumed run's)

    order = BatchOrder(len(train_tokens), options.batch_size, options.data_seed, dist.rank, dist.world_size)

    torch.manual_seed(options.seed)
    model = ImageGPT(config) if loaded is None else loaded
    dtype = resolve_dtype(options.dtype, device, training=True, width=config.n_embd)
    step = 0
    model.to(device)
    model.transformer.gradient_checkpointing = options.gradient_checkpointing
    parameters = model.num_parameters()
    # DDP wraps the model; FSDP shards it in place (then `ddp is model`). The optimizer comes after either.
    ddp = wrap_model(model, dist, fsdp_units=list(model.transformer.h) if options.fsdp else None)
    sharded = is_sharded(ddp)
    optimizer = make_optimizer(model, options.lr, options.weight_decay)
    if state is not None:
        step = restore_state(state, optimizer, order, dist, model=ddp, source=latest / STATE_FILE)
        if step >= options.steps and (run_dir / MODEL_DIR / "config.json").is_file():
            return _finished(run_dir, step, config.objective)  # resuming a finished run changes nothing
    if resume and dist.is_main:
        prepare_run_dir(run_dir, asdict(options), resume=True)  # records the overrides of this session
    model.train()
    schedule = {"lr": options.lr, "warmup": options.warmup, "total": options.steps}

    metrics = MetricsLog(run_dir / METRICS_FILE, enabled=dist.is_main, resume_step=step if resume else None)
    tokens_per_step = options.batch_size * config.n_positions
    objective = objective_for(config, options.seed)  # its loss (with each step's BERT masks)

    def validate(at_step: int, images: int) -> tuple[float, float]:
        ids = val_tokens if images == 0 else val_tokens[:images]
        shard = ids[dist.rank :: dist.world_size]  # each rank its share of the images
        indices = np.arange(len(ids))[dist.rank :: dist.world_size]  # which fix their BERT masks
        total, count = 0.0, 0
        for start in range(0, math.ceil(len(ids) / dist.world_size), per_rank):
            batch = shard[start : start + per_rank]
            if len(batch) == 0:
                if sharded:  # sharded weights: every rank must run as many forward passes as the others
                    token_nll(ddp, ids[:1], device=device, dtype=dtype)
                continue
            nats, tokens = token_nll(
                ddp if sharded else model,
                batch,
                batch_size=per_rank,
                device=device,
                dtype=dtype,
                indices=indices[start : start + per_rank],
            )
            total, count = total + nats, count + tokens
        if sharded:
            ddp.reshard()  # the root keeps its gathered weights after a forward; the optimizer needs shards
        sums = dist.mean(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
        nats = float(sums[0] / sums[1])
        metrics.write({"step": at_step, "split": "val", "loss": nats, "bits_per_dim": bits_per_dim(nats)})
        return nats, bits_per_dim(nats)

    def whole_model() -> nn.Module | None:
        """The model with all its weights, on rank 0 (gathered from the shards under FSDP; all ranks call)."""
        if not sharded:
            return model
        weights = full_state_dict(ddp)
        if not dist.is_main:
            return None
        with torch.device("meta"), torch.random.fork_rng(devices=[]):  # no memory, no RNG draws
            whole = ImageGPT(config)
        whole.load_state_dict(weights, assign=True)
        return whole

    def save(at_step: int) -> None:
        state = capture_state(at_step, optimizer, order, dist, model=ddp, schedule=schedule)
        whole = whole_model()
        if dist.is_main:
            save_checkpoint(checkpoints, whole, state, processor=processor)
            plot_metrics(run_dir / METRICS_FILE, run_dir / CURVE_FILE)
        dist.barrier()

    keep = set(kept_steps(options.steps, options.keep_checkpoints))

    def keep_model(at_step: int) -> None:
        whole = whole_model()
        if dist.is_main:
            name = f"{KEPT_PREFIX}{at_step:07d}"
            save_checkpoint(checkpoints, whole, None, processor=processor, name=name)
        dist.barrier()

    say = print if options.progress and dist.is_main else (lambda *a, **k: None)
    if not resume:
        say(
            f"imagegpt train: {options.preset} ({parameters / 1e6:.2f}M parameters, {describe(config)}) at "
            f"{processor.height}x{processor.width}, {len(palette)} colours, {len(train_tokens)} train / "
            f"{len(val_tokens)} val images, {dist.world_size} process(es){' with FSDP' * sharded} on "
            f"{device}, {str(dtype).split('.')[-1]}"
        )
    bar = progress_bar(options.steps, initial=step, enabled=options.progress and dist.is_main)
    train_loss = val_loss = val_bpd = rate = None
    stopped = False
    steps_this_session = 0
    try:
        with StopRequest() as stop:
            while step < options.steps:
                if dist.any(stop.requested):
                    stopped = True
                    break
                started = time.perf_counter()
                set_lr(optimizer, cosine_lr(step, **schedule))
                ids = torch.from_numpy(train_tokens[order.next()].astype(np.int64)).to(device)
                result = optimizer_step(
                    ddp,
                    optimizer,
                    objective.micro_batches(ids, step, dist.rank, dist.world_size, options.accumulate),
                    lambda batch: objective.loss(ddp, batch),
                    clip=options.clip,
                    device=device,
                    dtype=dtype,
                    dist=dist,
                    step=step + 1,
                )
                step += 1
                steps_this_session += 1
                elapsed = time.perf_counter() - started
                rate = (
                    tokens_per_step / elapsed
                    if rate is None
                    else 0.9 * rate + 0.1 * tokens_per_step / elapsed
                )
                train_loss = result.loss
                record = {
                    "step": step,
                    "split": "train",
                    "loss": result.loss,
                    "bits_per_dim": bits_per_dim(result.loss),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": result.grad_norm,
                    "tokens_per_s": tokens_per_step / elapsed,
                }
                metrics.write(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{result.loss:.3f}",
                    bpd=f"{bits_per_dim(result.loss):.3f}",
                    tok_s=f"{rate:,.0f}",
                    refresh=False,
                )
                if step in keep:
                    keep_model(step)
                if on_step is not None:
                    on_step(step, record, model)
                if options.eval_every and step % options.eval_every == 0 and step < options.steps:
                    val_loss, val_bpd = validate(step, options.eval_images)
                    if options.progress and dist.is_main:
                        what = "bits/dim" if config.is_causal else "masked-token bits/dim"
                        bar.write(f"step {step}: val loss {val_loss:.4f} nats/token, {val_bpd:.4f} {what}")
                if options.save_every and step % options.save_every == 0 and step < options.steps:
                    save(step)
                if options.stop_after is not None and steps_this_session >= options.stop_after:
                    stopped = step < options.steps
                    break
    except NonFiniteLossError as e:
        bar.close()
        last = find_checkpoint(checkpoints) if dist.is_main else None
        where = (
            f"the last good checkpoint is {last} (step {load_training_state(last)['step']}); resume it with "
            f"`imagegpt train --resume {run_dir} --lr SMALLER`"
            if last is not None
            else "no checkpoint was saved yet; start again with a smaller --lr or a longer --warmup"
        )
        if dist.is_main:
            plot_metrics(run_dir / METRICS_FILE, run_dir / CURVE_FILE)
        raise NonFiniteLossError(f"{e}. Training stopped; {where}") from None
    bar.close()
    if not stopped:
        val_loss, val_bpd = validate(step, 0)
    save(step)
    model_dir = checkpoints / "latest"
    if not stopped:
        model_dir = run_dir / MODEL_DIR
        whole = whole_model()
        if dist.is_main:
            save_checkpoint(run_dir, whole, None, processor=processor, name=MODEL_DIR)
        dist.barrier()
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        step=step,
        stopped=stopped,
        train_loss=train_loss,
        val_loss=val_loss,
        val_bits_per_dim=val_bpd,
        tokens_per_second=rate,
        dtype=str(dtype).removeprefix("torch."),
        signal=stop.signal if stopped else None,
        objective=config.objective,
    )
