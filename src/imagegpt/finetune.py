"""Classification fine-tuning with the paper's joint objective, and evaluation of classifier directories.

Chen et al. (2020), section 3.3: the classifier average-pools the layer-normed activations over positions
and applies a linear head; the whole network is trained on L_clf + W * L_gen, where L_gen is the next-token
loss of the pretrained generative head, which regularises the shared blocks. Inputs are
`[SOS, x0, ..., x_{n-2}]`, as in pretraining.

The head at layer L < n_layer: the saved classifier keeps blocks 0..L-1 only, so its config has `n_layer = L`,
and its final norm `ln_f` is initialised from block L's `ln_1`. The pooled feature the head first sees is then
exactly the linear probe's feature n^L (imagegpt.probe). During training, if W > 0, the pretrained blocks
L..end, final norm and `lm_head` are kept alongside to compute L_gen on the full model, as pretrained; they
are dropped when the classifier is saved. The directory written is in transformers'
ImageGPTForImageClassification format.

A BERT model (imagegpt.objectives) is fine-tuned as the paper does: L_GEN is L_BERT ("L_GEN in
{L_AR, L_BERT}", section 2.3), computed in the same forward pass as L_CLF on the image with a fresh BERT mask
each step (the seeded training masks, a function of the run's seed and the step), and the classifier reads
images under a fixed evaluation mask (section 4.6: "we must also mask them at evaluation time to keep inputs
in-distribution"). `classify` also reports the paper's ensemble: the modal prediction over 5 masks per image.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import latest_model_dir, load_with_processor
from .data import detect_format, load_dataset, token_cache
from .device import DTYPES, autocast, resolve_device, resolve_dtype
from .errors import ArgumentError, CheckpointError, DataError
from .files import check_folders, check_output, write_text_atomic
from .limits import check_memory
from .loop import EARLY, SIGNAL, STOPPED, Outcome, Plan, TrainingRun, evaluate_split, train_loop
from .model import ImageGPT, ImageGPTClassifier, bert_loss_per_image, image_inputs
from .objectives import ENSEMBLE_MASKS, ensemble_vote, evaluation_masks, training_masks
from .probe import data_options_for
from .trainer import (
    ARGS_FILE,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    MODEL_DIR,
    STATE_FILE,
    BatchOrder,
    MetricsLog,
    RunLock,
    StepResult,
    capture_state,
    damaged,
    find_checkpoint,
    load_args,
    load_training_state,
    make_optimizer,
    prepare_run_dir,
    restore_state,
    save_checkpoint,
    training_bytes,
)

# --------------------------------------------------------------------------------------------------- model


class FinetuneModel(nn.Module):
    """An ImageGPTClassifier initialised from a pretrained ImageGPT, plus what L_gen needs during training.

    classifier: the model that is saved (transformers' ImageGPTForImageClassification layout).
    gen_blocks, gen_norm, lm_head: the pretrained blocks after `layer`, final norm and next-token head, kept
        only while gen_weight > 0 (gen_norm is None at the final layer: the classifier's ln_f is shared).
    """

    def __init__(
        self,
        pretrained: ImageGPT,
        num_labels: int,
        id2label: dict[int, str] | None = None,
        layer: int | None = None,
        generative: bool = True,
    ):
        super().__init__()
        config = pretrained.config
        n_layer = config.n_layer
        layer = n_layer if layer is None else int(layer)
        if not 1 <= layer <= n_layer:
            raise ArgumentError(
                f"--layer {layer} is out of range: the head can sit after block 1 to {n_layer} (the final "
                f"layer, the default) of this {n_layer}-block model"
            )
        if num_labels < 2:
            raise ArgumentError(f"a classifier needs at least 2 classes, got {num_labels}")
        self.layer = layer
        classifier_config = config.replace(n_layer=layer, num_labels=num_labels, id2label=id2label)
        self.classifier = ImageGPTClassifier(classifier_config)
        source = pretrained.transformer
        target = self.classifier.transformer
        target.wte.load_state_dict(source.wte.state_dict())
        target.wpe.load_state_dict(source.wpe.state_dict())
        for i in range(layer):
            target.h[i].load_state_dict(source.h[i].state_dict())
        # The head reads the normed activation n^layer, as the probe does (see the module docstring).
        target.ln_f.load_state_dict((source.ln_f if layer == n_layer else source.h[layer].ln_1).state_dict())
        self.generative = generative
        self.gen_blocks = (
            nn.ModuleList(copy.deepcopy(source.h[i]) for i in range(layer, n_layer)) if generative else None
        )
        self.gen_norm = copy.deepcopy(source.ln_f) if generative and layer < n_layer else None
        self.lm_head = copy.deepcopy(pretrained.lm_head) if generative else None
        self.to(next(pretrained.parameters()).device)

    @property
    def config(self):
        return self.classifier.config

    def forward(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        gen_weight: float = 0.0,
        mask: torch.Tensor | None = None,
    ):
        """Image tokens [B, T] (no SOS) -> (class logits, L_clf, L_gen); L_gen is None if gen_weight is 0.

        mask: BERT models' masked positions (B, T), True where masked (required for them)."""
        transformer = self.classifier.transformer
        inputs = image_inputs(ids, self.config)
        if not self.config.is_causal and mask is None:
            raise ArgumentError("a BERT model reads masked images: pass the mask of the batch")
        # the last block's output (B, T, C), kept unnormed: L_gen continues from it through gen_blocks
        _, (x,) = transformer.forward_intermediates(inputs, [self.layer], norm=False, mask=mask)
        normed = transformer.ln_f(x)
        logits = self.classifier.score(normed.mean(dim=1))  # (B, num_labels)
        clf_loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        gen_loss = None
        if gen_weight > 0:
            if not self.generative:
                raise ArgumentError("this FinetuneModel was built with generative=False; it has no L_gen")
            if self.gen_norm is not None:
                for block in self.gen_blocks:
                    x = block(x)
                normed = self.gen_norm(x)
            gen_logits = self.lm_head(normed)  # (B, T, n_clusters)
            if self.config.is_causal:
                gen_loss = F.cross_entropy(gen_logits.flatten(0, 1).float(), ids.flatten())
            else:  # L_BERT
                gen_loss = bert_loss_per_image(gen_logits, ids, mask).mean()
        return logits, clf_loss, gen_loss


def joint_loss(clf_loss: torch.Tensor, gen_loss: torch.Tensor | None, gen_weight: float) -> torch.Tensor:
    """The paper's fine-tuning objective L_clf + W * L_gen."""
    return clf_loss if gen_loss is None or gen_weight == 0 else clf_loss + gen_weight * gen_loss


# -------------------------------------------------------------------------------------------- augmentation


def default_pad(height: int) -> int:
    """Reflect padding for random crops: 4 pixels at 32x32 (the usual CIFAR recipe), scaled with the size."""
    return max(1, round(4 * height / 32))


def augment_pixels(pixels: np.ndarray, rng: np.random.Generator, pad: int, flip: bool = True) -> np.ndarray:
    """Random crop after `pad`-pixel reflect padding, and a random horizontal flip, per image.

    pixels: [B, H, W, C] (the processor's [-1, 1] floats, before quantisation). Returns a new array.
    """
    B, H, W, _ = pixels.shape
    if pad < 0 or pad >= min(H, W):
        raise ArgumentError(f"augmentation padding must be in [0, {min(H, W)}) for {H}x{W} images, got {pad}")
    padded = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect") if pad else pixels
    out = np.empty_like(pixels)
    dy = rng.integers(0, 2 * pad + 1, size=B)
    dx = rng.integers(0, 2 * pad + 1, size=B)
    flips = rng.random(B) < 0.5 if flip else np.zeros(B, dtype=bool)
    for i in range(B):
        crop = padded[i, dy[i] : dy[i] + H, dx[i] : dx[i] + W]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


def encode_images(processor, images, augment: bool = False, rng: np.random.Generator | None = None, pad=None):
    """Images -> token ids [B, H*W], optionally augmented on pixels before quantisation."""
    if not augment:
        return processor.encode(images)
    pixels = processor.to_pixels(images)  # [B, H, W, 3] in [-1, 1] at the model's resolution
    pixels = augment_pixels(pixels, rng, default_pad(pixels.shape[1]) if pad is None else pad)
    return torch.as_tensor(processor.palette.encode(pixels), dtype=torch.long).reshape(len(pixels), -1)


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict(
    classifier: ImageGPTClassifier,
    ids: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    draw: int = 0,
    indices=None,
) -> np.ndarray:
    """Class logits float32 [N, num_labels] of image tokens [N, H*W]; SOS is prepended here.

    A BERT classifier reads each image under its fixed evaluation mask number `draw`, that of the image at
    `indices` in its split (default 0..N-1)."""
    device = next(classifier.parameters()).device if device is None else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    was_training = classifier.training
    classifier.to(device).eval()
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if isinstance(ids, np.ndarray) else ids.long()
    config = classifier.config
    indices = np.arange(len(ids)) if indices is None else np.asarray(indices)
    logits = []
    try:
        for start in range(0, len(ids), batch_size):
            batch = image_inputs(ids[start : start + batch_size].to(device), config)
            mask = None
            if not config.is_causal:
                mask = evaluation_masks(config, indices[start : start + batch_size], draw).to(device)
            with autocast(device, dtype):
                logits.append(classifier(batch, mask=mask).logits.float().cpu())
    finally:
        classifier.train(was_training)
    return torch.cat(logits).numpy()


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """Counts int64 [num_classes, num_classes]: row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, -1)


def format_confusion(matrix: np.ndarray, class_names: list[str]) -> str:
    """The confusion matrix as a text table (rows true, columns predicted)."""
    names = [str(n)[:10] for n in class_names]
    width = max(6, *(len(n) for n in names), len(str(int(matrix.max(initial=0)))) + 1)
    lines = [" " * width + " " + " ".join(f"{n:>{width}}" for n in names) + "   <- predicted"]
    for name, row in zip(names, matrix):
        lines.append(f"{name:>{width}} " + " ".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def plot_confusion(matrix: np.ndarray, class_names: list[str], path, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG, counts written in the cells."""
    # matplotlib takes 0.3 s to import: only a command that draws pays for it. The Agg canvas: no display,
    # no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(12, 2.5 + 0.5 * k)
    fig = Figure(figsize=(size, size * 0.9), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(k), [str(n) for n in class_names], rotation=45, ha="right")
        ax.set_yticks(range(k), [str(n) for n in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)


# ------------------------------------------------------------------------------------------------ training


@dataclass
class FinetuneOptions:
    """Everything a fine-tuning run depends on. The fields from model_dir to dtype are the run's: saved as its
    args.json, and read back from there on resume. out, device, stop_after and progress belong to a session.

    layer: the head sits after block L (default: the final layer). gen_weight: W in L_clf + W * L_gen (0: no
    L_gen). augment: None = on, except for digits and MNIST-style data. steps / epochs: the length (default
    10 epochs). warmup: default 5% of the run, at most 100 steps. eval_every: steps between validations
    (default one epoch); each saves checkpoints/latest. patience: validations without improvement before
    stopping early (None: never). stop_after: stop, resumably, after this many steps of this session.
    """

    model_dir: str | None = None
    data: str | None = None
    layer: int | None = None
    gen_weight: float = 1.0
    augment: bool | None = None
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    warmup: int | None = None
    weight_decay: float = 0.0
    batch_size: int = 32
    eval_every: int | None = None
    patience: int | None = 5
    seed: int = 0
    data_options: dict = field(default_factory=dict)
    clip: float = 1.0
    dtype: str | None = "auto"
    out: str = "runs/finetune"
    device: str | None = "auto"
    stop_after: int | None = None
    progress: bool = False

    def __post_init__(self):  # the spellings the Python API takes: paths, a torch.dtype, None for no options
        for name in ("model_dir", "data", "out"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, str(getattr(self, name)))
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if self.data_options is None:
            self.data_options = {}

    def run_args(self) -> dict:
        """The run's arguments, as args.json holds them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SESSION_OPTIONS}

    def validate(self) -> None:
        """Every option checked before anything is written."""
        check_finetune_args(self.run_args())
        stop_after = self.stop_after
        if stop_after is not None and (
            isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1
        ):
            raise ArgumentError(f"--stop-after must be a positive integer, got {stop_after!r}")
        check_output(self.out, directory=True, what="--out")

    def resumed(self) -> FinetuneOptions:
        """These options with the run's own arguments (OUT/args.json) in place of the given ones."""
        path = Path(self.out) / ARGS_FILE
        saved = load_args(self.out)
        options = replace(self, **{k: v for k, v in saved.items() if k in self.run_args()})
        try:
            options.validate()
        except ArgumentError as e:
            raise damaged(path, f"its arguments are not valid ({e})") from e
        return options


SESSION_OPTIONS = ("out", "device", "stop_after", "progress")


def check_finetune_args(a: dict) -> None:
    """Every fine-tuning argument checked before anything is written (a fresh run's or args.json's)."""
    for name in ("lr", "gen_weight", "weight_decay", "clip"):
        value = a[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ArgumentError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
    if a["lr"] <= 0:
        raise ArgumentError(f"--lr must be positive, got {a['lr']}")
    for name in ("gen_weight", "weight_decay", "clip"):
        if a[name] < 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 0, got {a[name]}")
    if a["steps"] is not None and a["epochs"] is not None:
        raise ArgumentError("give --steps or --epochs, not both")
    for name, minimum in (("batch_size", 1), ("steps", 1), ("eval_every", 1), ("patience", 1), ("warmup", 0),
                          ("seed", 0), ("layer", 1)):  # fmt: skip
        value = a[name]
        if name != "batch_size" and name != "seed" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ArgumentError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
    epochs = a["epochs"]
    number = isinstance(epochs, int | float) and not isinstance(epochs, bool)
    if epochs is not None and not (number and math.isfinite(epochs) and epochs > 0):
        raise ArgumentError(f"--epochs must be a positive number, got {epochs!r}")
    if not isinstance(a["data_options"], dict):
        raise ArgumentError(f"data options must be a dict of KEY: VALUE, got {a['data_options']!r}")
    if a["augment"] is not None and not isinstance(a["augment"], bool):
        raise ArgumentError(f"augment must be true, false or null, got {a['augment']!r}")
    if a["dtype"] is not None and a["dtype"] not in ("auto", *DTYPES):
        raise ArgumentError(f"unknown --dtype {a['dtype']!r}; use one of auto, {', '.join(DTYPES)}")
    if not isinstance(a["model_dir"], str) or not isinstance(a["data"], str):
        raise ArgumentError("the pretrained model and the data must be given as paths or names")


class Classification:
    """Fine-tuning's objective: the paper's L_clf + W * L_gen (FinetuneModel computes both), scored by the
    accuracy on the validation split."""

    def __init__(self, gen_weight: float, val_ids, val_labels: np.ndarray, batch_size: int = 64):
        self.gen_weight, self.batch_size = gen_weight, batch_size
        self.val = LabelledIds(val_ids, val_labels)

    def loss(self, model: FinetuneModel, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]):
        ids, labels, mask = batch  # mask: a BERT model's training mask of the step, else None
        _, clf_loss, gen_loss = model(ids, labels, gen_weight=self.gen_weight, mask=mask)
        parts = {"clf_loss": clf_loss.detach()}
        if gen_loss is not None:
            parts["gen_loss"] = gen_loss.detach()
        return joint_loss(clf_loss, gen_loss, self.gen_weight), parts

    def train_metrics(self, result: StepResult) -> dict[str, float]:
        return result.parts

    def evaluate(self, run: TrainingRun, final: bool) -> dict[str, float]:
        def score(model: FinetuneModel, batch: LabelledIds) -> tuple[float, int]:
            logits = predict(
                model.classifier,
                batch.ids,
                batch_size=len(batch),
                device=run.device,
                dtype=run.dtype,
                indices=batch.indices,  # a BERT model's images each under their own evaluation mask
            )
            return float((logits.argmax(axis=1) == batch.labels).sum()), len(batch)

        return {"accuracy": evaluate_split(run, self.val, score, self.batch_size)}


class LabelledIds:
    """Token ids [N, H*W], their labels [N] and their indices in the split, sliced together."""

    def __init__(self, ids, labels: np.ndarray, indices: np.ndarray | None = None):
        self.ids, self.labels = ids, labels
        self.indices = np.arange(len(labels)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: slice) -> LabelledIds:
        return LabelledIds(self.ids[index], self.labels[index], self.indices[index])


class FineTuning(TrainingRun):
    """A fine-tuning run for the loop: labelled batches (augmented on pixels before quantisation, or read from
    the token cache), checkpoints/latest with the generative parts, and OUT/model, the classifier of the best
    validation accuracy so far. It ends itself after `patience` validations without improvement."""

    command, activity = "finetune", "Fine-tuning"
    resume_advice = " after lowering --lr in its args.json, or start again with a smaller --lr"

    def __init__(
        self,
        options: FinetuneOptions,
        model: FinetuneModel,
        optimizer,
        order: BatchOrder,
        train,
        train_ids,
        processor,
        metrics: MetricsLog,
        *,
        dtype: torch.dtype,
        step: int,
        best: Best,
    ):
        super().__init__(
            model,
            optimizer,
            Path(options.out),
            metrics,
            dtype=dtype,
            step=step,
            tokens_per_step=options.batch_size * model.config.n_positions,
        )
        self.order, self.train, self.train_ids, self.processor = order, train, train_ids, processor
        self.seed, self.patience, self.best = options.seed, options.patience, best

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        index = np.sort(self.order.next())  # sorted: reads the token memmap in file order
        if self.train_ids is None:  # augmented: a function of the step, so that a resumed run draws the same
            rng = np.random.default_rng([self.seed, step])
            ids = encode_images(self.processor, _batch_images(self.train, index), augment=True, rng=rng)
        else:
            ids = torch.as_tensor(np.asarray(self.train_ids[index], dtype=np.int64))
        mask = None  # BERT: the step's training masks, a function of the seed and the step
        config = self.model.config
        if not config.is_causal:
            mask = training_masks(config, self.seed, step, len(ids)).to(self.device)
        labels = torch.as_tensor(self.train.labels[index]).to(self.device)
        return [(ids.to(self.device), labels, mask)]

    def after_evaluation(self, step: int, values: dict) -> bool:
        best = self.best
        if values["accuracy"] > best.accuracy:
            best.accuracy, best.step, best.since = values["accuracy"], step, 0
            save_checkpoint(
                self.run_dir, self.model.classifier, None, processor=self.processor, name=MODEL_DIR
            )
        else:
            best.since += 1
        return self.patience is not None and best.since >= self.patience

    def save(self, step: int, *, done: bool) -> None:
        generative = {k: v for k, v in self.model.state_dict().items() if not k.startswith("classifier.")}
        best = self.best
        state = capture_state(
            step,
            self.optimizer,
            self.order,
            best_accuracy=best.accuracy,
            best_step=best.step,
            since_best=best.since,
            done=done,
            generative=generative,
        )
        save_checkpoint(
            self.run_dir / CHECKPOINTS_DIR, self.model.classifier, state, processor=self.processor
        )


@dataclass
class Best:
    """The best validation accuracy so far, its step, and the validations since it (for patience)."""

    accuracy: float = -1.0
    step: int = 0
    since: int = 0


def finetune(
    model_dir,
    data,
    out,
    *,
    layer: int | None = None,
    gen_weight: float = 1.0,
    augment: bool | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 1e-3,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    eval_every: int | None = None,
    patience: int | None = 5,
    seed: int = 0,
    data_options: dict | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    clip: float = 1.0,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = False,
) -> dict:
    """Fine-tune a pretrained model directory into a classifier; returns a summary (also in OUT/summary.json).

    The keywords are FinetuneOptions' (run_finetune(FinetuneOptions(...)) is the same call). OUT is a run
    directory (imagegpt.trainer): args.json, metrics.jsonl, loss.png, checkpoints/latest (the classifier plus
    the training state, and the generative parts L_gen needs) and OUT/model, the classifier of the best
    validation accuracy so far, in transformers' ImageGPTForImageClassification format. resume: continue the
    run in OUT from its last checkpoint, with the arguments of OUT/args.json (model_dir and data may be None).
    """
    options = {name: value for name, value in locals().items() if name != "resume"}  # FinetuneOptions' fields
    return run_finetune(FinetuneOptions(**options), resume=resume)


def run_finetune(options: FinetuneOptions, *, resume: bool = False) -> dict:
    """Fine-tune per `options` into the run directory options.out (resume: continue the run there with its
    own arguments); returns the summary, also written to OUT/summary.json."""
    # Everything is checked before anything is written: a refused run leaves OUT as it was.
    out = Path(options.out)
    check_output(out, directory=True, what="--out")
    prepare_run_dir(out, {}, resume=resume, write=False)  # a clear error if there is no run, or one already
    if resume:
        options = options.resumed()  # the run's arguments, checked
    else:
        options.validate()
        options = replace(options, data_options=dict(options.data_options))  # the caller's copy, as given
    device = resolve_device(options.device)
    resolve_dtype(options.dtype, device, training=True)  # refuse a dtype the device cannot run, early
    pretrained, processor = load_with_processor(ImageGPT, latest_model_dir(options.model_dir))
    dtype = resolve_dtype(options.dtype, device, training=True, width=pretrained.config.n_embd)
    dataset_options = data_options_for(options.data, options.data_options, processor)
    train, val = (
        _labelled(load_dataset(options.data, split=split, seed=options.seed, **dataset_options), split)
        for split in ("train", "val")
    )
    plan = _plan(options, len(train))
    check_memory(
        training_bytes(pretrained.config, options.batch_size) * (2 if options.gen_weight > 0 else 1),
        f"fine-tuning {options.model_dir} on {options.batch_size} images a step",
        "lower --batch-size, or use --gen-weight 0 (no copy of the generative blocks)",
        device,
    )
    torch.manual_seed(options.seed)  # dropout: the same arguments give the same run (resume restores its RNG)
    class_names = train.class_names or [str(i) for i in range(train.num_classes)]
    model = FinetuneModel(
        pretrained,
        train.num_classes,
        dict(enumerate(class_names)),
        layer=options.layer,
        generative=options.gen_weight > 0,
    ).to(device)
    del pretrained
    with RunLock(out):  # for the rest of the run
        prepare_run_dir(out, {}, resume=resume, write=False)  # again under the lock
        return _finetune(options, resume, model, processor, train, val, plan, dtype)


def _plan(options: FinetuneOptions, images: int) -> Plan:
    """The run's length and schedule: 10 epochs unless told, warmup 5% (at most 100), a validation (and a
    checkpoint) every epoch."""
    steps_per_epoch = max(1, images // options.batch_size)
    total = options.steps or max(1, round((options.epochs or 10) * steps_per_epoch))
    warmup = options.warmup if options.warmup is not None else min(100, total // 20)
    every = options.eval_every or min(steps_per_epoch, total)
    return Plan(
        steps=total,
        lr=options.lr,
        warmup=warmup,
        clip=options.clip,
        eval_every=every,
        save_every=every,
        stop_after=options.stop_after,
        progress=options.progress,
    )


def _finetune(
    options: FinetuneOptions,
    resume: bool,
    model: FinetuneModel,
    processor,
    train,
    val,
    plan: Plan,
    dtype: torch.dtype,
) -> dict:
    """The run, holding its lock: its state resumed, the token caches, then the loop; the summary."""
    out = Path(options.out)
    optimizer = make_optimizer(model, options.lr, options.weight_decay)
    order = BatchOrder(len(train), options.batch_size, seed=options.seed)
    step, best = _resume(out, model, optimizer, order, options) if resume else (0, Best())
    augment = default_augment(options.data) if options.augment is None else options.augment
    val_ids = token_cache(val, processor, out / "cache")
    train_ids = None if augment else token_cache(train, processor, out / "cache")
    if not resume:
        prepare_run_dir(out, options.run_args())
    metrics = MetricsLog(out / METRICS_FILE, resume_step=step if resume else None)
    run = FineTuning(
        options,
        model,
        optimizer,
        order,
        train,
        train_ids,
        processor,
        metrics,
        dtype=dtype,
        step=step,
        best=best,
    )
    objective = Classification(options.gen_weight, val_ids, val.labels, 2 * options.batch_size)
    outcome = train_loop(run, objective, plan)
    summary = {
        "status": _status(outcome, options),
        "step": outcome.step,
        "steps": plan.steps,
        "best_val_accuracy": best.accuracy,
        "best_step": best.step,
        "model": str(out / MODEL_DIR),
        "classes": train.num_classes,
        "augment": augment,
        "layer": model.layer,
        "gen_weight": options.gen_weight,
        "objective": model.config.objective,
        "signal": outcome.signal,  # the signal (SIGINT, SIGTERM) that stopped the run, if one did
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _resume(out: Path, model: FinetuneModel, optimizer, order: BatchOrder, options: FinetuneOptions):
    """(step, Best) of the run's last checkpoint, its weights loaded into model, its optimizer, data order
    and RNG states restored."""
    latest = find_checkpoint(out / CHECKPOINTS_DIR)
    if latest is None:
        raise CheckpointError(
            f"{out} has no checkpoint yet to resume from; start the run again without --resume"
        )
    state = load_training_state(latest)
    source = latest / STATE_FILE
    try:
        best = Best(state["best_accuracy"], state["best_step"], state["since_best"])
        done = bool(state.get("done"))
        classifier = ImageGPTClassifier.from_pretrained(latest, require_head=True)
        model.classifier.load_state_dict(classifier.state_dict())
        missing, unexpected = model.load_state_dict(state.get("generative", {}), strict=False)
    except (KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise damaged(source, f"its state does not fit this run ({type(e).__name__}: {e})") from e
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise CheckpointError(
            f"{latest} does not match this fine-tuning run (layer {model.layer}, gen weight "
            f"{options.gen_weight}); resume with the arguments the run was started with"
        )
    if done:
        raise ArgumentError(f"the run in {out} has already finished; its classifier is in {out / MODEL_DIR}")
    return restore_state(state, optimizer, order, source=source), best


def _status(outcome: Outcome, options: FinetuneOptions) -> str:
    resume = f"continue with `imagegpt finetune --resume {options.out}`"
    if outcome.end == SIGNAL:
        return f"interrupted ({signal.Signals(outcome.signal).name}); {resume}"
    if outcome.end == STOPPED:
        return f"stopped after {options.stop_after} steps; {resume}"
    if outcome.end == EARLY:
        return f"stopped early: no better validation accuracy in {options.patience} validations"
    return "finished"


def default_augment(data) -> bool:
    """Augmentation is on for natural and generated images, off for handwriting (a flipped digit changes)."""
    if str(data) == "digits":
        return False
    path = Path(str(data)).expanduser()
    return not (str(data) not in ("shapes", "photos") and path.exists() and detect_format(path) == "idx")


def _labelled(dataset, split: str):
    if dataset.labels is None:
        raise DataError(
            f"the {split} split of {dataset.name} has no labels; fine-tuning needs a labelled dataset "
            "(digits, shapes, photos, CIFAR, MNIST, or an image folder with one subfolder per class)"
        )
    return dataset


def _batch_images(dataset, index: np.ndarray):
    subset = dataset[index]
    return subset.batch(0, len(subset))


# ------------------------------------------------------------------------------------------------ classify


def classifier_dir(path) -> Path:
    """A classifier directory from itself or from a fine-tuning run directory (its model/)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise CheckpointError(
        f"{path} is not a classifier directory (no config.json) nor an imagegpt finetune run (no model/); "
        "pass the --out folder of imagegpt finetune, or a transformers ImageGPTForImageClassification folder"
    )


def classify(
    model_dir,
    data,
    *,
    split: str = "test",
    out=None,
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    seed: int = 0,
    data_options: dict | None = None,
    cache_dir=None,
) -> dict:
    """Accuracy and confusion matrix of a classifier directory on one split of a labelled dataset.

    Writes classify-SPLIT.json and confusion-SPLIT.png into `out` (default: the folder holding the classifier
    directory, which for `imagegpt finetune --out RUN` is RUN) and returns the report. A BERT classifier's
    accuracy and confusion matrix are under its fixed evaluation masks (draw 0); accuracy_ensemble is the
    modal prediction over 5 masks per image (the module's docstring).
    """
    model_dir = classifier_dir(model_dir)
    out = Path(model_dir).resolve().parent if out is None else Path(out)  # default: beside the classifier
    check_folders(out=out, cache_dir=cache_dir)
    classifier, processor = load_with_processor(ImageGPTClassifier, model_dir, require_head=True)
    options = data_options_for(data, data_options, processor)
    dataset = _labelled(load_dataset(data, split=split, seed=seed, **options), split)
    num_labels = classifier.config.num_labels
    if dataset.num_classes != num_labels:
        raise DataError(
            f"the classifier in {model_dir} has {num_labels} classes but {data} has {dataset.num_classes}; "
            "evaluate it on the kind of data it was fine-tuned on"
        )
    if cache_dir is not None:
        ids = token_cache(dataset, processor, cache_dir)
    else:
        ids = torch.cat([processor.encode(dataset.batch(i, i + 256)) for i in range(0, len(dataset), 256)])
    logits = predict(classifier, ids, batch_size=batch_size, device=device, dtype=dtype)
    predictions = logits.argmax(axis=1)
    matrix = confusion_matrix(dataset.labels, predictions, num_labels)
    id2label = classifier.config.id2label
    class_names = [id2label[i] for i in range(num_labels)] if id2label else (dataset.class_names or [])
    class_names = class_names or [str(i) for i in range(num_labels)]
    report = {
        "model": str(model_dir),
        "data": str(data),
        "split": split,
        "images": len(dataset),
        "accuracy": float((predictions == dataset.labels).mean()),
        "class_names": class_names,
        "confusion": matrix.tolist(),
        "objective": classifier.config.objective,
    }
    if not classifier.config.is_causal:  # the paper's ensemble: the modal prediction over 5 masks per image
        votes = [predictions] + [
            predict(classifier, ids, batch_size=batch_size, device=device, dtype=dtype, draw=d).argmax(axis=1)
            for d in range(1, ENSEMBLE_MASKS)
        ]
        report["ensemble_masks"] = ENSEMBLE_MASKS
        report["accuracy_ensemble"] = float((ensemble_vote(np.stack(votes)) == dataset.labels).mean())
    out.mkdir(parents=True, exist_ok=True)
    report["json"] = str(out / f"classify-{split}.json")
    report["plot"] = str(out / f"confusion-{split}.png")
    write_text_atomic(report["json"], json.dumps(report, indent=2) + "\n")
    name = "/".join(Path(model_dir).resolve().parts[-2:])  # e.g. ft-digits/model
    title = f"{name} on {data} ({split}): accuracy {100 * report['accuracy']:.2f}%"
    plot_confusion(matrix, class_names, report["plot"], title=title)
    return report
