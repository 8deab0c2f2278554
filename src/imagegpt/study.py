"""`imagegpt study`: does a better generative model make better features? (Chen et al. 2020, Figure 3.)

For each run (trained here with `--keep-checkpoints`, or given as a run directory that kept them), every kept
checkpoint is evaluated on the held-out validation split (bits/dim) and probed at every layer (the paper's
linear probe protocol, imagegpt.probe). The result is one point per checkpoint: bits/dim against best-layer
probe accuracy, and the per-layer accuracy curve of each checkpoint.

Everything is resumable: training resumes its runs, and each checkpoint's point is saved as
OUT/points/RUN-step-N.json once computed and read back on the next call (its features are cached too).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .checkpoint import read_config
from .config import PRESETS
from .errors import ArgumentError, CheckpointError
from .evaluate import evaluate
from .files import write_text_atomic
from .probe import probe_pretrained
from .train import TrainOptions, kept_checkpoints, resume_options, train

STUDY_FILE = "study.json"


@dataclass
class StudyOptions:
    """What a study trains and probes.

    runs: run directories with kept checkpoints; when empty, one run per preset is trained into OUT/runs/
    with the training options below and `checkpoints` log-spaced checkpoints. Cs: the probe's C grid (it is
    extended where an end wins). labels_per_class: the paper's low-data probes (K labels per class).
    """

    out: str = "study"
    runs: list[str] = field(default_factory=list)
    presets: list[str] = field(default_factory=lambda: ["igpt-nano", "igpt-micro"])
    data: str = "shapes"
    data_options: dict | None = None  # None: colour=mono for shapes, nothing for the other sets
    resolution: int | None = 12
    clusters: int = 8
    steps: int = 1000
    checkpoints: int = 6
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0)
    labels_per_class: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    @property
    def dataset_options(self) -> dict:
        """The training data's options: data_options, or by default colour=mono for shapes (form alone)."""
        if self.data_options is not None:
            return dict(self.data_options)
        return {"colour": "mono"} if self.data == "shapes" else {}

    def validate(self) -> None:
        if not self.runs and not self.presets:
            raise ArgumentError("give run directories to study (--run) or presets to train (--preset)")
        for name in ("steps", "checkpoints", "batch_size"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ArgumentError(f"--labels-per-class must be positive, got {self.labels_per_class}")
        if not self.Cs or min(self.Cs) <= 0:
            raise ArgumentError("the C grid needs at least one positive regularisation strength")


def train_runs(options: StudyOptions) -> list[Path]:
    """One run per preset into OUT/runs/PRESET, each keeping its checkpoints; resumed where interrupted."""
    unknown = [p for p in options.presets if p not in PRESETS]
    if unknown:
        raise ArgumentError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    runs = []
    for preset in options.presets:
        run_dir = Path(options.out) / "runs" / preset
        train_options = TrainOptions(
            data=options.data, out=str(run_dir), preset=preset, resolution=options.resolution,
            clusters=options.clusters, steps=options.steps, batch_size=options.batch_size, lr=options.lr,
            warmup=options.warmup, eval_every=0, save_every=max(options.steps // 4, 1), seed=options.seed,
            data_seed=options.seed, data_options=options.dataset_options, device=options.device,
            dtype=options.dtype, progress=options.progress, keep_checkpoints=options.checkpoints,
        )  # fmt: skip
        resume = (run_dir / "args.json").exists()
        if options.progress:
            print(f"study: {'resuming' if resume else 'training'} {preset} in {run_dir}", flush=True)
        result = train(train_options, resume=resume)
        if result.stopped:
            raise ArgumentError(f"training {preset} was stopped; run the study again to resume it")
        runs.append(run_dir)
    return runs


def run_data(run_dir: Path) -> tuple[str, dict, int]:
    """(data, data options with the run's resolution, data seed) of a training run, from its args.json."""
    train_options = resume_options(run_dir)
    return train_options.data, train_options.dataset_options(), train_options.data_seed


def checkpoint_point(model_dir: Path, data, data_options, seed: int, out: Path, options) -> dict:
    """Held-out bits/dim and per-layer probes of one checkpoint (cached in `out`.json)."""
    cached = out.with_suffix(".json")
    if cached.is_file():
        return json.loads(cached.read_text())
    common = dict(device=options.device, data_options=data_options, cache_dir=Path(options.out) / "cache")
    evaluation = evaluate(
        model_dir, data, split="val", dtype=options.dtype, seed=seed, unigram=False, **common
    )
    report, _ = probe_pretrained(
        model_dir, data, out, layers="all", Cs=options.Cs, labels_per_class=options.labels_per_class,
        dtype=options.dtype, seed=seed, **common,
    )  # fmt: skip
    best = next(r for r in report["rows"] if r["layer"] == report["best_layer"])
    point = {
        "bits_per_dim": evaluation.bits_per_dim,
        "best_layer": report["best_layer"],
        "best_test_accuracy": best["test_accuracy"],
        "layers": {str(r["layer"]): r["test_accuracy"] for r in report["rows"]},
        "raw_pixel_test_accuracy": report["baseline"]["test_accuracy"],
        "chance": report["chance"],
    }
    write_text_atomic(cached, json.dumps(point, indent=2) + "\n")
    return point


def study_run(run_dir: Path, options: StudyOptions) -> dict:
    """Every kept checkpoint of one run studied: its points, its size and its correlation."""
    kept = kept_checkpoints(run_dir)
    if not kept:
        raise CheckpointError(
            f"{run_dir} kept no checkpoints to study; train it with --keep-checkpoints N (or let "
            "`imagegpt study` train it)"
        )
    data, data_options, seed = run_data(run_dir)
    name = run_dir.name
    points = []
    for step, model_dir in kept.items():
        if options.progress:
            print(f"study: {name} step {step}", flush=True)
        out = Path(options.out) / "points" / f"{name}-step-{step}"
        points.append({"step": step, **checkpoint_point(model_dir, data, data_options, seed, out, options)})
    config = read_config(next(iter(kept.values())))
    return {
        "run": str(run_dir), "name": name, "data": data, "data_options": data_options,
        "parameters": config.num_parameters(), "n_layer": config.n_layer, "points": points,
        "objective": config.objective,
        "correlation": correlation(points),
    }  # fmt: skip


def _check_objectives(runs: list[Path]) -> None:
    """The runs' bits/dim are compared with each other: a BERT run's (of masked tokens) with a next-pixel
    run's would compare two different tasks."""
    from .trainer import load_args

    objectives = {run: load_args(run).get("objective", "ar") for run in runs}
    if len(set(objectives.values())) > 1:
        bert = ", ".join(str(run) for run, objective in objectives.items() if objective == "bert")
        raise ArgumentError(
            f"the runs mix objectives ({bert}: bert, the others ar); a BERT run's bits/dim is of masked "
            "tokens and not comparable to a next-pixel run's. Study each objective's runs on their own"
        )


def correlation(points: list[dict]) -> float | None:
    """Pearson's r between bits/dim and best-layer test accuracy (negative: lower bits/dim, better probe)."""
    x = np.array([p["bits_per_dim"] for p in points], dtype=np.float64)
    y = np.array([p["best_test_accuracy"] for p in points], dtype=np.float64)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    r = float(np.corrcoef(x, y)[0, 1])
    return r if math.isfinite(r) else None


def run_study(options: StudyOptions) -> dict:
    """Train (or take) the runs, study every kept checkpoint, write study.json and the plots; the study."""
    options = replace(options, runs=list(options.runs), presets=list(options.presets))
    options.validate()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in options.runs] or train_runs(options)
    _check_objectives(runs)
    results = [study_run(run_dir, options) for run_dir in runs]
    every = [p for r in results for p in r["points"]]
    study = {
        "options": asdict(options),
        "runs": results,
        "correlation": correlation(every),
        "files": {"study": str(out / STUDY_FILE), "plot": str(out / "accuracy_vs_bits.png")},
    }
    plot_study(study, out)
    write_text_atomic(out / STUDY_FILE, json.dumps(study, indent=2) + "\n")
    return study


def plot_study(study: dict, out: Path) -> None:
    """accuracy_vs_bits.png (one point per checkpoint, a line per run) and RUN-layers.png per run."""
    # matplotlib takes 0.3 s to import: only a command that draws pays for it. The Agg canvas: no display,
    # no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for run in study["runs"]:
        x = [p["bits_per_dim"] for p in run["points"]]
        y = [100 * p["best_test_accuracy"] for p in run["points"]]
        ax.plot(x, y, marker="o", label=f"{run['name']} ({run['parameters'] / 1e6:.2f}M)")
    first = study["runs"][0]["points"][0]
    ax.axhline(100 * first["raw_pixel_test_accuracy"], color="tab:red", ls="--", label="raw pixels")
    ax.axhline(100 * first["chance"], color="grey", ls=":", label="chance")
    ax.set_xlabel("held-out bits/dim (lower is a better generative model)")
    ax.set_ylabel("best-layer linear probe, test accuracy (%)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bits.png")
    for run in study["runs"]:
        plot_layers(run, out / f"{run['name']}-layers.png")


def plot_layers(run: dict, path: Path) -> None:
    # matplotlib takes 0.3 s to import: only a command that draws pays for it. The Agg canvas: no display,
    # no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for point in run["points"]:
        layers = sorted(point["layers"], key=int)
        ax.plot([int(k) for k in layers], [100 * point["layers"][k] for k in layers], marker="o",
                label=f"step {point['step']} ({point['bits_per_dim']:.3f} bits/dim)")  # fmt: skip
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("linear probe, test accuracy (%)")
    ax.set_title(run["name"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def format_study(study: dict) -> str:
    lines = []
    for run in study["runs"]:
        bert = " of masked tokens: a BERT run" if run.get("objective") == "bert" else ""
        lines.append(
            f"{run['name']} ({run['parameters'] / 1e6:.2f}M parameters, {run['n_layer']} layers){bert}:"
        )
        lines.append(f"  {'step':>7}  {'bits/dim':>8}  {'best layer':>10}  {'test acc':>8}")
        for p in run["points"]:
            lines.append(
                f"  {p['step']:>7}  {p['bits_per_dim']:8.4f}  {p['best_layer']!s:>10}  "
                f"{100 * p['best_test_accuracy']:7.2f}%"
            )
        if run["correlation"] is not None:
            lines.append(f"  Pearson r(bits/dim, best-layer accuracy) = {run['correlation']:+.3f}")
    first = study["runs"][0]["points"][0]
    pixels, chance = 100 * first["raw_pixel_test_accuracy"], 100 * first["chance"]
    lines.append(f"raw pixels {pixels:.2f}%, chance {chance:.2f}%")
    if study["correlation"] is not None:
        r = study["correlation"]
        lines.append(f"all checkpoints: Pearson r = {r:+.3f} (negative: lower bits/dim, better features)")
    lines.append(f"wrote {study['files']['study']} and {study['files']['plot']}")
    return "\n".join(lines)
