"""Pretraining from pixels: fit a palette, tokenise once, train the next-pixel (or the BERT) objective.

`train(TrainOptions(...))` sets a run up and hands it to imagegpt.loop's train_loop, the loop fine-tuning
shares: `Pretraining` is what the loop trains (the token cache a global batch at a time, checkpoints that
carry the run's palette), `NextPixel` what it learns (the loss, and bits/dim on the validation split). The
paper's recipe: AdamW (0.9, 0.95) without weight decay, linear warmup then cosine decay to 0, gradient
clipping at 1.0, bfloat16 autocast where supported, and SOS handled as the original: the model reads
[SOS, x0, ..., x_{n-2}] and predicts [x0, ..., x_{n-1}]. `objective="bert"` trains the paper's masked-pixel
objective instead (`MaskedPixels`, with imagegpt.objectives' seeded masks).

Under torchrun, the same function runs DistributedDataParallel (or FSDP), applied from outside the model:
every rank reads its own slice of each global batch from the token cache, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PRESETS, ImageGPTConfig
from .data import GENERATED, fit_palette, load_dataset, token_cache
from .device import DTYPES, resolve_device, resolve_dtype
from .errors import ArgumentError, CheckpointError
from .evaluate import bits_per_dim, image_nll
from .files import check_output
from .limits import check_memory
from .loop import Outcome, Plan, TrainingRun, evaluate_split, train_loop
from .model import ImageGPT, bert_loss_per_image, sos_inputs
from .objectives import bert_micro_batches, check_mask_prob, check_objective, describe
from .palette import Palette, check_clusters
from .processor import ImageProcessor
from .trainer import (
    ARGS_FILE,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    MODEL_DIR,
    STATE_FILE,
    BatchOrder,
    Distributed,
    MetricsLog,
    RunLock,
    StepResult,
    capture_state,
    close_distributed,
    damaged,
    find_checkpoint,
    full_state_dict,
    init_distributed,
    is_sharded,
    load_args,
    load_training_state,
    make_optimizer,
    prepare_run_dir,
    read_metrics,
    restore_state,
    save_checkpoint,
    training_bytes,
    wrap_model,
)

PALETTE_FILE = "palette.json"


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

    def dataset_options(self) -> dict:
        """load_dataset's options for this run: data_options, and the resolution for generated data."""
        options = dict(self.data_options)
        if self.data in GENERATED and self.resolution is not None:
            options.setdefault("resolution", self.resolution)
        return options


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
    signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, if one did
    objective: str = "ar"  # "bert": the losses are of the masked tokens (not comparable to "ar" bits/dim)


# What the loop trains, and on what


class NextPixel:
    """The pretraining objective, the paper's L_AR: every pixel predicted from those before it, SOS first.

    Scored by the mean loss in nats per token on the validation split (and so bits per dimension): periodic
    evaluations on its first eval_images images (0: all), the final one on all of them. Another pretraining
    objective is a class with the same three methods (imagegpt.loop.Objective), chosen in
    pretraining_objective.
    """

    def __init__(self, sos_id: int, val_tokens, eval_images: int = 0, batch_size: int = 64):
        self.sos_id, self.val_tokens = sos_id, val_tokens
        self.eval_images, self.batch_size = eval_images, batch_size

    def micro_batches(self, ids: torch.Tensor, step: int, dist: Distributed, chunks: int) -> Sequence:
        """What loss() takes: this rank's share of step `step`'s global batch, in `chunks` micro-batches."""
        return ids.chunk(chunks)

    def loss(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return image_loss(model, ids, self.sos_id)

    def train_metrics(self, result: StepResult) -> dict[str, float]:
        return {"bits_per_dim": bits_per_dim(result.loss)}

    def evaluate(self, run: TrainingRun, final: bool) -> dict[str, float]:
        tokens = self.val_tokens if final or not self.eval_images else self.val_tokens[: self.eval_images]

        def score(model, ids):
            return image_nll(model, ids, device=run.device, dtype=run.dtype)

        nats = evaluate_split(run, tokens, score, self.batch_size)
        return {"loss": nats, "bits_per_dim": bits_per_dim(nats)}


class MaskedPixels(NextPixel):
    """The paper's L_BERT (imagegpt.objectives): the masked tokens predicted from all the others.

    Each step's micro-batches carry the step's training masks, drawn for the global batch with the run's seed
    (so a resumed run and any number of processes draw the same ones); the loss is each image's mean over its
    masked tokens, averaged over the batch. Scored like NextPixel, on the masked tokens of the images' fixed
    evaluation masks (one per image) instead of every token: not comparable to a next-pixel run's numbers.
    """

    def __init__(self, config: ImageGPTConfig, seed: int, val_tokens, eval_images: int = 0, batch_size=64):
        super().__init__(config.sos_id, val_tokens, eval_images, batch_size)
        self.config, self.seed = config, seed

    def micro_batches(self, ids, step, dist, chunks):
        return bert_micro_batches(self.config, self.seed, step, ids, dist.rank, dist.world_size, chunks)

    def loss(self, model, batch):
        ids, mask = batch
        return bert_loss_per_image(model(ids, mask=mask).logits, ids, mask).mean()

    def evaluate(self, run, final):
        n = (
            len(self.val_tokens)
            if final or not self.eval_images
            else min(self.eval_images, len(self.val_tokens))
        )

        def score(model, indices):  # each image under its own evaluation mask, whichever rank reads it
            ids = self.val_tokens[indices]
            return image_nll(model, ids, device=run.device, dtype=run.dtype, indices=indices)

        nats = evaluate_split(run, np.arange(n), score, self.batch_size)
        return {"loss": nats, "bits_per_dim": bits_per_dim(nats)}


def pretraining_objective(
    config: ImageGPTConfig, val_tokens, eval_images: int, batch_size: int, seed: int = 0
) -> NextPixel:
    """The objective a pretraining run of `config` learns: the one place that chooses it (seed: the BERT
    training masks')."""
    if not config.is_causal:
        return MaskedPixels(config, seed, val_tokens, eval_images, batch_size)
    return NextPixel(config.sos_id, val_tokens, eval_images, batch_size)


def image_loss(model: nn.Module, ids: torch.Tensor, sos_id: int) -> torch.Tensor:
    """Mean next-token loss in nats over the batch, SOS handled. Calls model(...), so a DDP wrapper syncs."""
    logits = model(sos_inputs(ids, sos_id)).logits  # (B, T, n_clusters)
    return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


class Pretraining(TrainingRun):
    """A pretraining run for the loop: the token cache a global batch at a time (each rank its slice),
    checkpoints with the run's processor, the models keep_checkpoints keeps, and model/ when it finishes."""

    command, activity, resume_advice = "train", "Training", " --lr SMALLER"

    def __init__(
        self,
        options: TrainOptions,
        model: ImageGPT,
        ddp: nn.Module,
        optimizer,
        order: BatchOrder,
        tokens,
        processor: ImageProcessor,
        metrics: MetricsLog,
        *,
        dist: Distributed,
        dtype: torch.dtype,
        step: int,
        on_step=None,
        objective: NextPixel,
    ):
        super().__init__(
            ddp,
            optimizer,
            Path(options.out),
            metrics,
            dist=dist,
            dtype=dtype,
            step=step,
            tokens_per_step=options.batch_size * model.config.n_positions,
        )
        self.plain, self.order, self.tokens, self.processor = model, order, tokens, processor
        self.accumulate, self.on_step = options.accumulate, on_step
        self.objective = objective  # what its micro-batches carry (a BERT run's: the step's masks)
        self.schedule = {"lr": options.lr, "warmup": options.warmup, "total": options.steps}
        self.keep = set(kept_steps(options.steps, options.keep_checkpoints))
        self.checkpoints = self.run_dir / CHECKPOINTS_DIR

    def batches(self, step: int) -> tuple[torch.Tensor, ...]:
        ids = torch.from_numpy(self.tokens[self.order.next()].astype(np.int64)).to(self.device)
        return self.objective.micro_batches(ids, step, self.dist, self.accumulate)

    def after_step(self, step: int, record: dict) -> None:
        if step in self.keep:
            self.save_model(self.checkpoints, f"{KEPT_PREFIX}{step:07d}")
        if self.on_step is not None:
            self.on_step(step, record, self.plain)

    def save(self, step: int, *, done: bool) -> None:
        state = capture_state(
            step, self.optimizer, self.order, self.dist, model=self.model, schedule=self.schedule
        )
        whole = self.whole_model()
        if self.dist.is_main:
            save_checkpoint(self.checkpoints, whole, state, processor=self.processor)
        self.dist.barrier()

    def finish(self, step: int) -> None:
        self.save_model(self.run_dir, MODEL_DIR)

    def save_model(self, directory: Path, name: str) -> None:
        """The model alone (a model directory, no training state) as directory/name."""
        whole = self.whole_model()
        if self.dist.is_main:
            save_checkpoint(directory, whole, None, processor=self.processor, name=name)
        self.dist.barrier()

    def whole_model(self) -> nn.Module | None:
        """The model with all its weights, on rank 0 (gathered from the shards under FSDP; all ranks call)."""
        if not is_sharded(self.model):
            return self.plain
        weights = full_state_dict(self.model)
        if not self.dist.is_main:
            return None
        with torch.device("meta"), torch.random.fork_rng(devices=[]):  # no memory, no RNG draws
            whole = ImageGPT(self.plain.config)
        whole.load_state_dict(weights, assign=True)
        return whole


# Setting a run up. Everything is checked before anything is written, so that a refused run leaves its
# directory as it was; then rank 0 tokenises and writes, and every rank builds the model and resumes.


def train(options: TrainOptions, *, resume: bool = False, on_step=None) -> TrainResult:
    """Pretrain an ImageGPT per `options` into the run directory options.out (resume: continue the run there).

    on_step(step, record, model), if given, is called after every optimizer step with the step's metrics.
    Under torchrun (WORLD_SIZE set) this runs DistributedDataParallel; call it from every rank.
    """
    options.validate()
    options = replace(options, data_options=dict(options.data_options))  # the caller's copy stays as given
    dist = init_distributed(resolve_device(options.device))
    try:
        with contextlib.ExitStack() as hold:  # the run's lock, taken once everything is checked
            return _train(options, resume, dist, on_step, hold)
    finally:
        close_distributed(dist)


def _train(options: TrainOptions, resume: bool, dist: Distributed, on_step, hold) -> TrainResult:
    resolve_dtype(options.dtype, dist.device, training=True)  # refuse a dtype the device cannot run, early
    run_dir = Path(options.out)
    prepare_run_dir(run_dir, {}, resume=resume, write=False)
    if resume:
        _check_resume(options, run_dir)
    train_set, val_set, resolution = _datasets(options, dist)
    palette = _palette(options, run_dir, resume, dist, train_set)
    config = _config(options, resolution, palette, dist)
    dist.barrier()

    hold.enter_context(RunLock(run_dir, enabled=dist.is_main))  # for the rest of the run
    if dist.is_main:  # again under the lock: another process may have started a run here meanwhile
        prepare_run_dir(run_dir, {}, resume=resume, write=False)
    latest = _latest_checkpoint(run_dir, dist) if resume else None
    state, loaded = (None, None) if latest is None else _read_checkpoint(latest, config)
    processor, tokens = _tokenise(options, run_dir, resume, dist, palette, resolution, (train_set, val_set))
    options.clusters = len(processor.palette)  # the run's palette decides (a --palette file, a resumed run's)

    order = BatchOrder(len(tokens[0]), options.batch_size, options.data_seed, dist.rank, dist.world_size)
    model, ddp, optimizer = _model(options, config, loaded, dist)
    dtype = resolve_dtype(options.dtype, dist.device, training=True, width=config.n_embd)
    step = 0
    if state is not None:
        step = restore_state(state, optimizer, order, dist, model=ddp, source=latest / STATE_FILE)
        if step >= options.steps and (run_dir / MODEL_DIR / "config.json").is_file():
            return _finished(run_dir, step, config.objective)  # resuming a finished run changes nothing
    if resume and dist.is_main:
        prepare_run_dir(run_dir, asdict(options), resume=True)  # records the overrides of this session
    if not resume and options.progress and dist.is_main:
        print(_banner(options, config, processor, tokens, dist, is_sharded(ddp), dtype))
    metrics = MetricsLog(run_dir / METRICS_FILE, enabled=dist.is_main, resume_step=step if resume else None)
    per_rank = options.batch_size // dist.world_size
    objective = pretraining_objective(config, tokens[1], options.eval_images, per_rank, options.seed)
    run = Pretraining(
        options,
        model,
        ddp,
        optimizer,
        order,
        tokens[0],
        processor,
        metrics,
        dist=dist,
        dtype=dtype,
        step=step,
        on_step=on_step,
        objective=objective,
    )
    plan = Plan(
        steps=options.steps,
        lr=options.lr,
        warmup=options.warmup,
        clip=options.clip,
        eval_every=options.eval_every,
        save_every=options.save_every,
        stop_after=options.stop_after,
        progress=options.progress,
    )
    return _result(run, train_loop(run, objective, plan))


def _datasets(options: TrainOptions, dist: Distributed):
    """(train split, val split, resolution), with the batch size checked against them and the processes."""
    data_options = options.dataset_options()
    train_set = load_dataset(options.data, split="train", seed=options.data_seed, **data_options)
    val_set = load_dataset(options.data, split="val", seed=options.data_seed, **data_options)
    resolution = _resolution(options, train_set)
    if options.batch_size % (dist.world_size * options.accumulate):
        raise ArgumentError(
            f"--batch-size {options.batch_size} must be divisible by the number of processes "
            f"({dist.world_size}) times --accumulate ({options.accumulate})"
        )
    BatchOrder(len(train_set), options.batch_size)  # does the data hold a batch?
    if options.resolution is None and isinstance(resolution, int):
        options.resolution = resolution
    return train_set, val_set, resolution


def _resolution(options: TrainOptions, dataset) -> int | tuple[int, int]:
    if options.resolution is not None:
        return options.resolution
    if dataset.image_size is None:
        raise ArgumentError(f"the images of {options.data} differ in size; choose one with --resolution")
    height, width = dataset.image_size
    return height if height == width else (height, width)


def _palette(options: TrainOptions, run_dir: Path, resume: bool, dist: Distributed, train_set):
    """The run's own palette (fitted or copied at the start), so that a resumed run uses the same one; None
    on the other ranks of a fresh run, which read it once rank 0 has written it."""
    palette_path = run_dir / PALETTE_FILE
    if resume:
        if not palette_path.is_file():
            raise CheckpointError(f"{palette_path} is missing; the run cannot be resumed without its palette")
        return Palette.load(palette_path)
    if options.palette is not None:
        palette = Palette.load(options.palette)
        check_clusters(len(palette), f"the number of colours in {options.palette}")
        return palette
    if dist.is_main:
        return fit_palette(train_set, options.clusters, options.palette_pixels, options.seed)
    return None


def _config(options: TrainOptions, resolution, palette: Palette | None, dist: Distributed) -> ImageGPTConfig:
    """The model's config, refused where training it could not fit in memory."""
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
    micro = options.batch_size // dist.world_size // options.accumulate
    check_memory(training_bytes(config, micro), f"{what}, {micro} images a micro-batch,", hint, dist.device)
    if dist.device.type != "cpu":  # the model is built on the host first
        check_memory(4 * config.num_parameters(), f"building {options.preset}", hint)
    return config


def _latest_checkpoint(run_dir: Path, dist: Distributed) -> Path | None:
    checkpoints = run_dir / CHECKPOINTS_DIR
    if dist.is_main:
        find_checkpoint(checkpoints)  # rank 0 repairs what a crash left, so that ranks never race
    dist.barrier()
    return find_checkpoint(checkpoints, repair=False)


def _read_checkpoint(latest: Path, config: ImageGPTConfig) -> tuple[dict, ImageGPT]:
    """A checkpoint's training state and model, read and checked before anything of the run is written."""
    state = load_training_state(latest)
    loaded = ImageGPT.from_pretrained(latest)
    shape = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "objective", "bert_mask_prob")
    if any(getattr(loaded.config, k) != getattr(config, k) for k in shape):
        raise CheckpointError(f"{latest} holds a model of another shape than this run's arguments describe")
    return state, loaded


def _tokenise(
    options: TrainOptions, run_dir: Path, resume: bool, dist: Distributed, palette, resolution, splits
) -> tuple[ImageProcessor, tuple]:
    """(processor, token ids of each split): rank 0 quantises into the token cache, then writes the palette
    and args.json; the other ranks open the cache once it has."""
    cache_dir = Path(options.cache_dir) if options.cache_dir else run_dir / "cache"
    if dist.is_main:
        processor = ImageProcessor(palette, resolution)
        tokens = tuple(
            token_cache(split, processor, cache_dir, progress=options.progress) for split in splits
        )
        if not resume:
            palette.save(run_dir / PALETTE_FILE)  # before args.json: a run with args.json has its palette
            prepare_run_dir(run_dir, asdict(options) | {"clusters": len(palette)})
    dist.barrier()
    if not dist.is_main:
        processor = ImageProcessor(Palette.load(run_dir / PALETTE_FILE), resolution)
        tokens = tuple(token_cache(split, processor, cache_dir) for split in splits)
    return processor, tokens


def _model(options: TrainOptions, config: ImageGPTConfig, loaded: ImageGPT | None, dist: Distributed):
    """(model, the model as distributed, optimizer): DDP wraps the model, FSDP shards it in place (then the
    two are one); the optimizer comes after either."""
    torch.manual_seed(options.seed)
    model = ImageGPT(config) if loaded is None else loaded
    model.to(dist.device)
    model.transformer.gradient_checkpointing = options.gradient_checkpointing
    ddp = wrap_model(model, dist, fsdp_units=list(model.transformer.h) if options.fsdp else None)
    optimizer = make_optimizer(model, options.lr, options.weight_decay)
    model.train()
    return model, ddp, optimizer


def _banner(options, config, processor, tokens, dist: Distributed, sharded: bool, dtype) -> str:
    return (
        f"imagegpt train: {options.preset} ({config.num_parameters() / 1e6:.2f}M parameters, "
        f"{describe(config)}) at "
        f"{processor.height}x{processor.width}, {len(processor.palette)} colours, {len(tokens[0])} train / "
        f"{len(tokens[1])} val images, {dist.world_size} process(es){' with FSDP' * sharded} on "
        f"{dist.device}, {str(dtype).split('.')[-1]}"
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


def _finished(run_dir: Path, step: int, objective: str) -> TrainResult:
    """The result of resuming a finished run, from its metrics: nothing is trained or written."""
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


def _result(run: Pretraining, outcome: Outcome) -> TrainResult:
    evaluation = outcome.evaluation or {}
    return TrainResult(
        run_dir=run.run_dir,
        model_dir=run.run_dir / MODEL_DIR if outcome.done else run.checkpoints / "latest",
        step=outcome.step,
        stopped=not outcome.done,
        train_loss=outcome.train_loss,
        val_loss=evaluation.get("loss"),
        val_bits_per_dim=evaluation.get("bits_per_dim"),
        tokens_per_second=outcome.tokens_per_second,
        dtype=str(run.dtype).removeprefix("torch."),
        signal=outcome.signal,
        objective=run.plain.config.objective,
    )
