"""`imagegpt demo`: the whole pipeline on built-in data in a few minutes on a laptop CPU.

Fit a palette, pretrain a small model, measure bits/dim on held-out images against the unigram and uniform
baselines, complete held-out images from their top half, sample unconditionally, and probe every layer. Each
part is a step: a function of the DemoContext, listed in STEPS; add one there to extend the demo.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_with_processor, read_config
from .config import ImageGPTConfig
from .data import BUILTINS, GENERATED, fit_palette, load_dataset
from .device import autocast, resolve_device, resolve_dtype
from .errors import ArgumentError, Interrupted
from .evaluate import evaluate
from .files import check_output, write_text_atomic
from .grid import completion_grid, sample_grid, save_image
from .model import ImageGPT
from .palette import check_clusters
from .probe import format_report, probe_pretrained
from .sampling import complete, image_shape, keep_rows, sample
from .train import TrainOptions, train
from .trainer import LOCK_FILE, RunLock

# The demo trains as many steps as fit its budget on the machine at hand, within these bounds: at MAX_STEPS
# its completions close rings and triangles; at MIN_STEPS its probe already beats raw pixels 1.7 times
# (docs/results.md).
MIN_STEPS, MAX_STEPS = 300, 1000
TIMED_STEPS = 3  # training steps timed (after one untimed) to plan the rest


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_choices(cpus: int) -> list[int]:
    """The torch intra-op thread counts the demo times: 1, 2 and 4, as far as the CPUs go. Its model is
    small: more threads mostly add synchronisation, and on a core another process is using they wait on it
    (docs/performance.md, "The demo's thread count")."""
    return [n for n in (1, 2, 4) if n <= max(cpus, 1)]


def planned_steps(budget_seconds: float, seconds_per_step: float) -> int:
    """The steps that fit budget_seconds at seconds_per_step, within [MIN_STEPS, MAX_STEPS]."""
    return max(MIN_STEPS, min(MAX_STEPS, int(budget_seconds / max(seconds_per_step, 1e-9))))


def seconds_per_step(config: ImageGPTConfig, batch_size: int, device, dtype) -> float:
    """The seconds of one pretraining step of a fresh model of `config` here (forward, backward, AdamW), as
    the run will take them: its dtype resolved as train resolves it, random tokens, TIMED_STEPS timed."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, training=True, width=config.n_embd)
    model = ImageGPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.n_clusters, (batch_size, config.n_positions), device=device)

    def step():
        with autocast(device, dtype):
            loss = model.image_loss(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device

    step()
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    return (time.perf_counter() - started) / TIMED_STEPS


def fastest_threads(config: ImageGPTConfig, batch_size: int, device, dtype) -> tuple[int, dict[int, float]]:
    """Time pretraining steps (seconds_per_step) at each of thread_choices() and keep the fastest count set.

    Measured rather than guessed, since what a second thread gains depends on the CPU and on what else runs
    now: the load average still counts the set-up that ran a minute ago. Returns the count and every timing.
    """
    seconds = {}
    for threads in thread_choices(usable_cpus()):
        torch.set_num_threads(threads)
        seconds[threads] = seconds_per_step(config, batch_size, device, dtype)
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best, seconds


class ThreadFallback:
    """on_step for the demo's training: on two threads, when `slow` steps in a row take over `factor` times
    the usual (the median of the first `baseline` steps), go on with one thread. Another process has then
    taken a core, and the two threads' synchronisation waits on it: steps turn several times slower than on
    one thread (docs/performance.md, "The demo's thread count")."""

    def __init__(self, say, baseline: int = 10, slow: int = 5, factor: float = 2.5):
        self.say, self.baseline, self.slow, self.factor = say, baseline, slow, factor
        self.seconds: list[float] = []
        self.last = time.perf_counter()

    def __call__(self, step: int, record: dict, model) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now
        if torch.get_num_threads() < 2 or len(self.seconds) <= self.baseline + self.slow:
            return
        usual = float(np.median(self.seconds[1 : self.baseline + 1]))  # the first step warms up
        if min(self.seconds[-self.slow :]) > self.factor * usual:
            torch.set_num_threads(1)
            slowed = f"steps slowed from {usual:.2f} s to over {self.factor * usual:.2f} s"
            self.say(f"\ntrain: {slowed} (the CPU is shared now); one thread from step {step} on")


@dataclass
class DemoOptions:
    """What the demo runs. The defaults fit in about 5 minutes on a 2-core CPU.

    data/resolution/images: the built-in dataset, drawn at this resolution, this many images (80/10/10 split).
    colour: shapes only, "mono" (light shapes on dark grey: the features a short run learns are about form,
    which a linear model on raw pixels cannot see past position and size) or "random" (random colours on
    random gradients, a far harder task for a model this small: docs/results.md).
    steps/batch_size/lr: pretraining; steps=None trains as many steps as fit train_seconds on this machine
    (planned_steps), between MIN_STEPS and MAX_STEPS. keep: the fraction of rows kept when completing
    held-out images. threads: torch's intra-op threads, None for the fastest of
    thread_choices() timed on the demo's model (fastest_threads).
    """

    out: str = "imagegpt-demo"
    data: str = "shapes"
    colour: str = "mono"
    resolution: int = 12
    images: int = 8000
    clusters: int = 8
    preset: str = "igpt-demo"
    steps: int | None = None
    train_seconds: float = 225.0
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0
    keep: float = 0.5
    completions: int = 4
    completion_images: int = 6
    samples: int = 16
    top_k: int = 0
    probe: bool = True
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True

    @property
    def data_options(self) -> dict:
        """Options for load_dataset: the generated datasets take a size and a resolution; digits takes none
        (the processor resizes it)."""
        if self.data not in GENERATED:
            return {}
        colour = {"colour": self.colour} if self.data == "shapes" else {}
        return {"n": self.images, "resolution": self.resolution, **colour}

    def validate(self) -> None:
        """Every option checked before anything is created, with the checks the other commands use: the
        palette's size as `palette fit` and `train` check it, the training options as `train` does."""
        counts = ("resolution", "images", "batch_size", "completions", "completion_images", "samples")
        for name in (*counts, *(n for n in ("steps", "threads") if getattr(self, n) is not None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        cpus = os.cpu_count() or 1
        if self.threads is not None and self.threads > cpus:  # thousands of OpenMP threads crash the process
            raise ArgumentError(f"--threads must be at most this machine's {cpus} CPUs, got {self.threads}")
        if isinstance(self.train_seconds, bool) or not isinstance(self.train_seconds, int | float):
            raise ArgumentError(f"--train-seconds must be a number, got {self.train_seconds!r}")
        if not self.train_seconds > 0:
            raise ArgumentError(f"--train-seconds must be positive, got {self.train_seconds!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ArgumentError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, int | float) or not 0 <= self.keep <= 1:
            raise ArgumentError(f"--keep is a fraction of the image's rows in [0, 1], got {self.keep!r}")
        if self.data not in BUILTINS:
            raise ArgumentError(f"--data must be a built-in set: {', '.join(BUILTINS)}; got {self.data!r}")
        check_clusters(self.clusters)
        if self.colour not in ("mono", "random"):
            raise ArgumentError(f"--colour must be mono or random, got {self.colour!r}")
        resolve_dtype(self.dtype, resolve_device(self.device), training=True)
        check_output(self.out, directory=True, what="--out")
        train_options(
            self, Path(self.out), Path(self.out) / "palette.json", self.steps or MAX_STEPS
        ).validate()
        for split in ("val", "test"):  # a split too small or a resolution the data refuses (the train split
            load_dataset(self.data, split=split, seed=self.seed, **self.data_options)  # is never empty)


def train_options(o: DemoOptions, out: Path, palette: Path, steps: int):
    """The demo's pretraining run (out/run) of `steps` steps, on the palette fitted in `palette`."""
    return TrainOptions(
        data=o.data,
        out=str(out / "run"),
        preset=o.preset,
        resolution=o.resolution,
        palette=str(palette),
        steps=steps,
        batch_size=o.batch_size,
        lr=o.lr,
        warmup=o.warmup,
        eval_every=max(steps // 4, 1),
        eval_images=256,
        save_every=max(steps // 4, 1),
        seed=o.seed,
        data_seed=o.seed,
        data_options={k: v for k, v in o.data_options.items() if k != "resolution"},  # train sets it
        device=o.device,
        dtype=o.dtype,
        cache_dir=str(out / "cache"),
        progress=o.progress,
    )


@dataclass
class DemoContext:
    options: DemoOptions
    out: Path
    results: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    palette_path: Path | None = None
    model_dir: Path | None = None

    @property
    def data_options(self) -> dict:
        return self.options.data_options

    def say(self, message: str) -> None:
        if self.options.progress:
            print(message, flush=True)


def fit_palette_step(ctx: DemoContext) -> None:
    o = ctx.options
    train = load_dataset(o.data, split="train", seed=o.seed, **ctx.data_options)
    palette = fit_palette(train, o.clusters, seed=o.seed)
    ctx.palette_path = palette.save(ctx.out / "palette.json")
    ctx.files["palette"] = ctx.palette_path
    ctx.results["palette"] = {"clusters": len(palette), "train_images": len(train)}
    ctx.say(f"palette: {len(palette)} colours fitted on {len(train)} {o.data} images -> {ctx.palette_path}")


def train_step(ctx: DemoContext) -> None:
    o = ctx.options
    run_dir = ctx.out / "run"
    resume = (run_dir / "args.json").exists()
    seconds = _choose_threads(ctx)
    if resume:  # the steps it was started with, whatever this machine would plan now
        steps = json.loads((run_dir / "args.json").read_text())["steps"]
        ctx.say(f"train: resuming the interrupted run in {run_dir}")
    else:
        steps = o.steps or _plan(ctx, seconds)
    options = train_options(o, ctx.out, ctx.palette_path, steps)
    result = train(options, resume=resume, on_step=ThreadFallback(ctx.say))
    if result.stopped:
        message = f"training was stopped at step {result.step}; run the demo again to resume it"
        raise Interrupted(message, result.signal) if result.signal else ArgumentError(message)
    ctx.model_dir = result.model_dir
    ctx.files["model"] = result.model_dir
    ctx.files["loss_curve"] = run_dir / "loss.png"
    ctx.results["train"] = {
        "preset": o.preset,
        "parameters": _parameters(result.model_dir),
        "steps": result.step,
        "tokens_per_second": result.tokens_per_second,
        "final_train_loss": result.train_loss,
    }


def _model_config(o: DemoOptions) -> ImageGPTConfig:
    """The config of the model the demo trains, for timing its steps before the run builds it."""
    return ImageGPTConfig.from_preset(o.preset, o.resolution, o.clusters)


def _choose_threads(ctx: DemoContext) -> float | None:
    """On the CPU without --threads: set the fastest thread count (fastest_threads), said; returns its
    seconds per step. None where --threads was given or the device is a GPU."""
    o = ctx.options
    if o.threads is not None or resolve_device(o.device).type != "cpu":
        return None
    threads, seconds = fastest_threads(_model_config(o), o.batch_size, o.device, o.dtype)
    timed = ", ".join(f"{n} thread{'s' * (n > 1)} {t:.2f} s" for n, t in seconds.items())
    ctx.say(f"train: {threads} thread{'s' * (threads > 1)}, the fastest step here ({timed})")
    return seconds[threads]


def _plan(ctx: DemoContext, seconds: float | None) -> int:
    """The steps that fit the training budget here (planned_steps on `seconds` a step, timed now if None),
    said."""
    o = ctx.options
    if seconds is None:
        seconds = seconds_per_step(_model_config(o), o.batch_size, o.device, o.dtype)
    steps = planned_steps(o.train_seconds, seconds)
    ctx.say(
        f"train: {steps} steps ({seconds:.2f} s each here) fit the {o.train_seconds:g} s budget "
        f"(between {MIN_STEPS} and {MAX_STEPS}; --steps N trains exactly N)"
    )
    return steps


def evaluate_step(ctx: DemoContext) -> None:
    o = ctx.options
    evaluation = evaluate(
        ctx.model_dir,
        o.data,
        split="test",
        device=o.device,
        dtype=o.dtype,
        seed=o.seed,
        cache_dir=ctx.out / "cache",
        data_options=ctx.data_options,
    )
    ctx.results["evaluate"] = evaluation.to_dict()
    ctx.say(evaluation.summary())


def _load(ctx: DemoContext):
    return load_with_processor(ImageGPT, ctx.model_dir)


def complete_step(ctx: DemoContext) -> None:
    o = ctx.options
    model, processor = _load(ctx)
    test = load_dataset(o.data, split="test", seed=o.seed, **ctx.data_options)
    count = min(o.completion_images, len(test))
    pick = np.sort(np.random.default_rng(o.seed).choice(len(test), size=count, replace=False))
    originals = processor.encode(test.batch(0, len(test))[pick])
    ids = complete(
        model, originals, o.keep, n=o.completions, processor=processor, top_k=o.top_k, seed=o.seed,
        device=o.device, dtype=o.dtype,
    )  # fmt: skip
    rows = keep_rows(o.keep, image_shape(model.config, processor)[0])
    grid = completion_grid(processor.decode(originals), processor.decode(ids), rows)
    path = save_image(grid, ctx.out / "completions.png")
    ctx.files["completions"] = path
    ctx.results["complete"] = {"images": count, "completions_per_image": o.completions, "keep_rows": rows}
    ctx.say(f"completions: {count} held-out images x {o.completions}, top {rows} rows kept -> {path}")


def sample_step(ctx: DemoContext) -> None:
    o = ctx.options
    model, processor = _load(ctx)
    ids = sample(model, o.samples, top_k=o.top_k, seed=o.seed, device=o.device, dtype=o.dtype)
    path = save_image(sample_grid(processor.decode(ids)), ctx.out / "samples.png")
    ctx.files["samples"] = path
    ctx.results["sample"] = {"images": o.samples}
    ctx.say(f"samples: {o.samples} unconditional samples -> {path}")


# The demo's probe starts from a short grid; fit_probe extends it where an end wins (features of a model
# this small usually want weak regularisation, the raw pixels strong).
DEMO_CS = (0.1, 1.0, 10.0)
# ...and stops each fit at 300 L-BFGS iterations, not 1000: the probe then takes half the time, and the
# best layer's accuracy moves by about a tenth of a point (docs/results.md).
DEMO_MAX_ITER = 300


def probe_step(ctx: DemoContext) -> None:
    o = ctx.options
    if not o.probe:
        return
    report, paths = probe_pretrained(
        ctx.model_dir,
        o.data,
        ctx.out / "probe",
        layers="all",
        Cs=DEMO_CS,
        device=o.device,
        dtype=o.dtype,
        cache_dir=ctx.out / "cache",
        seed=o.seed,
        data_options=ctx.data_options,
        max_iter=DEMO_MAX_ITER,
    )
    ctx.files["probe"] = paths["plot"]
    best = next(r for r in report["rows"] if r["layer"] == report["best_layer"])
    ctx.results["probe"] = {
        "best_layer": report["best_layer"],
        "n_layer": report["n_layer"],
        "best_test_accuracy": best["test_accuracy"],
        "raw_pixel_test_accuracy": report["baseline"]["test_accuracy"] if report["baseline"] else None,
        "chance": report["chance"],
    }
    ctx.say(format_report(report))


Step = Callable[[DemoContext], None]
STEPS: list[tuple[str, Step]] = [
    ("palette", fit_palette_step),
    ("train", train_step),
    ("evaluate", evaluate_step),
    ("complete", complete_step),
    ("sample", sample_step),
    ("probe", probe_step),
]


def _parameters(model_dir: Path) -> int:
    return read_config(model_dir).num_parameters()


def _prepare(out: Path, overwrite: bool) -> None:
    """A finished demo is kept unless overwrite; an interrupted one is resumed. Call holding out's RunLock
    (whose file stays)."""
    if (out / "summary.json").exists():
        if not overwrite:
            raise ArgumentError(
                f"{out} already holds a finished demo; pass --overwrite or choose another --out"
            )
        for path in out.iterdir():
            if path.name != LOCK_FILE:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(options: DemoOptions | None = None, steps: list[tuple[str, Step]] | None = None) -> DemoContext:
    """Run every step in order; returns the context with results, files and timings (also in summary.json)."""
    options = options or DemoOptions()
    options.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads or min(2, usable_cpus()))  # until training times them
    try:
        return _run_steps(options, steps)
    finally:
        torch.set_num_threads(threads)


def _run_steps(options: DemoOptions, steps: list[tuple[str, Step]] | None) -> DemoContext:
    out = Path(options.out)
    with RunLock(out):  # one demo at a time in out
        return _locked_steps(options, steps, out)


def _locked_steps(options: DemoOptions, steps: list[tuple[str, Step]] | None, out: Path) -> DemoContext:
    _prepare(out, options.overwrite)
    ctx = DemoContext(options=options, out=out)
    write_text_atomic(out / "demo_args.json", json.dumps(asdict(options), indent=2) + "\n")
    started = time.perf_counter()
    for name, step in STEPS if steps is None else steps:
        ctx.say(f"\n== {name} ==")
        t0 = time.perf_counter()
        step(ctx)
        ctx.timings[name] = round(time.perf_counter() - t0, 2)
    ctx.timings["total"] = round(time.perf_counter() - started, 2)
    summary = {
        "results": ctx.results,
        "files": {k: str(v) for k, v in ctx.files.items()},
        "timings_seconds": ctx.timings,
    }
    ctx.files["summary"] = out / "summary.json"
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return ctx


def format_summary(ctx: DemoContext) -> str:
    r = ctx.results
    lines = ["", "== summary =="]
    if "train" in r:
        t = r["train"]
        lines.append(
            f"model      {t['preset']} ({t['parameters'] / 1e6:.2f}M parameters), {t['steps']} steps"
            + (f", {t['tokens_per_second']:.0f} tokens/s" if t["tokens_per_second"] else "")
        )
    if "evaluate" in r:
        e = r["evaluate"]
        lines.append(
            f"bits/dim   {e['bits_per_dim']:.3f} on held-out images (unigram baseline "
            f"{e['unigram_bits_per_dim']:.3f}, uniform {e['uniform_bits_per_dim']:.3f})"
        )
    if "probe" in r:
        lines.extend(probe_lines(r["probe"]))
    lines.append(f"time       {ctx.timings['total']:.0f} s")
    lines.append("files")
    for name, path in ctx.files.items():
        lines.append(f"  {name:<12} {path}")
    return "\n".join(lines)


def probe_lines(p: dict) -> list[str]:
    """The probe's result and, in words, its margin over raw pixels and chance: the paper's finding."""
    accuracy, raw, chance = p["best_test_accuracy"], p["raw_pixel_test_accuracy"], p["chance"]
    where = f"layer {p['best_layer']} of {p['n_layer']}" if "n_layer" in p else f"layer {p['best_layer']}"
    lines = [f"probe      best {where}: {100 * accuracy:.1f}% test accuracy (chance {100 * chance:.1f}%)"]
    if raw is None:
        return lines
    margin = accuracy / raw
    verdict = (
        "beat the pixels themselves, as the paper found"
        if margin >= 1.5
        else "beat the pixels, but narrowly: train longer for the paper's margin"
        if margin > 1.0
        else "do not beat the pixels: the model has not learned enough yet (train longer)"
    )
    lines.append(
        f"           {margin:.2f}x a linear model on raw pixels ({100 * raw:.1f}%) and "
        f"{accuracy / chance:.1f}x chance: features learned only by predicting pixels {verdict}"
    )
    return lines
