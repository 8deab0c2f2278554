"""Linear probes on ImageGPT features, the protocol of Chen et al. (2020), section 3.2.

The feature of layer l is the paper's layer-normed activation, average-pooled over positions:

    f_l = mean_t n^l_t,   n^l = ln_1 of block l applied to h^l (the input of block l)   for l < n_layer,
                          n^L = ln_f(h^L)                                              for l = n_layer.

Two mistakes common in public notebooks are avoided here. transformers' `hidden_states[l]` for l < n_layer
are *un-normed* residual-stream activations: we apply the block's own norm, as the paper does. And the model
input is `[SOS, x0, ..., x_{n-2}]`, as in training: raw processor output shifts every feature by one position.

BERT models (imagegpt.objectives) are probed as in section 4.6 of the paper: "because inputs to the BERT model
are masked at training time, we must also mask them at evaluation time to keep inputs in-distribution". Every
image is read under its fixed evaluation mask (draw 0; positions masked with the model's bert_mask_prob, token
embeddings zeroed) with full attention and no SOS, and the test accuracy is also reported for the paper's
ensemble: "we sample 5 independent masks for each input and take the modal prediction, breaking ties at
random" (the probe fitted on draw 0 predicts the test images under draws 0..4).

A probe is an L-BFGS logistic regression (scikit-learn) on standardised features. Its regularisation
strength C is chosen on the validation split and the test accuracy reported for that choice.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import latest_model_dir, load_with_processor
from .data import load_dataset, token_cache
from .device import autocast, resolve_device, resolve_dtype
from .errors import ArgumentError, DataError, ImageInputError
from .files import check_folders, write_text_atomic
from .model import ImageGPT, image_inputs
from .objectives import ENSEMBLE_MASKS, ensemble_vote, evaluation_masks

DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


# -------------------------------------------------------------------------------------------------- layers


def resolve_layers(layers: str | int | Sequence[int], n_layer: int) -> list[int]:
    """'all' -> 0..n_layer, 'middle' -> n_layer // 2; an int, a list or '0,3,5' -> those layers, sorted.

    Layer 0 is the embeddings (the input of block 0) and layer n_layer is the output of the final norm.
    """
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text == "all":
            return list(range(n_layer + 1))
        if text == "middle":
            return [n_layer // 2]
        try:
            layers = [int(part) for part in text.split(",") if part.strip()]
        except ValueError as e:
            raise ArgumentError(
                f"cannot read layers {layers!r}: use 'all', 'middle', or comma-separated numbers like 0,3,5"
            ) from e
    elif isinstance(layers, int | np.integer):
        layers = [int(layers)]
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise ArgumentError("no layers given: use 'all', 'middle', or layer numbers like 0,3,5")
    for layer in layers:
        if not 0 <= layer <= n_layer:
            raise ArgumentError(
                f"layer {layer} is out of range: this model has {n_layer} blocks, so layers go from 0 "
                f"(the embeddings) to {n_layer} (after the final norm)"
            )
    return layers


# ------------------------------------------------------------------------------------------------ features


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the backbone's config and weights: features depend on nothing else."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.transformer.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def ids_fingerprint(ids: torch.Tensor) -> str:
    array = np.ascontiguousarray(ids.cpu().numpy().astype(np.int64))
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:20]


def _is_ids(x) -> bool:
    return isinstance(x, torch.Tensor | np.ndarray) and x.ndim == 2


def _image_batches(images, batch_size: int):
    """Batches of an ImageDataset (via .batch, which decodes image files lazily) or of an image sequence."""
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        yield images.batch(start, stop) if hasattr(images, "batch") else images[start:stop]


def _as_ids(images_or_ids, config, processor, batch_size: int) -> torch.Tensor:
    """Token ids [N, n_positions] from ids (2-D integers), or from a batch of images via the processor."""
    if _is_ids(images_or_ids):
        tensor = isinstance(images_or_ids, torch.Tensor)
        if (
            images_or_ids.is_floating_point()
            if tensor
            else not np.issubdtype(images_or_ids.dtype, np.integer)
        ):
            raise ImageInputError(
                "a 2-D input is read as token ids [N, H*W] and must hold integers; pass images as "
                "[N, H, W, 3] arrays or as a list"
            )
        ids = images_or_ids.long() if tensor else torch.from_numpy(np.asarray(images_or_ids, dtype=np.int64))
    else:
        if processor is None:
            raise ArgumentError(
                "images were given without a processor: pass "
                "processor=ImageProcessor.from_pretrained(model_dir), or pass token ids [N, H*W]"
            )
        if len(images_or_ids) == 0:
            raise ImageInputError("no images given: pass at least one image")
        ids = torch.cat([processor.encode(batch) for batch in _image_batches(images_or_ids, batch_size)])
    if ids.size(0) == 0:
        raise ImageInputError("no images given: pass at least one image")
    if ids.size(1) != config.n_positions:
        raise ImageInputError(
            f"token ids have {ids.size(1)} positions but the model reads {config.n_positions}; encode the "
            "images with the model's own processor"
        )
    if int(ids.min()) < 0 or int(ids.max()) >= config.n_clusters:
        raise ImageInputError(
            f"token ids must be palette indices in [0, {config.n_clusters}); got values in "
            f"[{int(ids.min())}, {int(ids.max())}]. Pass image tokens without SOS: it is prepended here"
        )
    return ids


@torch.no_grad()
def _run_layers(
    model: torch.nn.Module,
    ids: torch.Tensor,
    layers: list[int],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    draw: int = 0,
) -> dict[int, np.ndarray]:
    """Average-pooled normed activations of `layers` (model.forward_intermediates: one pass per batch, only
    the blocks below the deepest layer asked). BERT models read image i under its evaluation mask `draw`."""
    config = model.config
    n, deepest = ids.size(0), max(layers)
    features = {layer: np.empty((n, config.n_embd), dtype=np.float32) for layer in layers}
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"features (layers {layers[0]}..{deepest})", unit="batch", leave=False)
    for start in starts:
        batch = image_inputs(ids[start : start + batch_size].to(device), config)
        with autocast(device, dtype):
            mask = None
            if not config.is_causal:  # BERT: the masked positions' token embeddings zeroed, as in training
                mask = evaluation_masks(config, range(start, start + len(batch)), draw).to(device)
            _, pooled = model.forward_intermediates(batch, layers, norm=True, pool=True, mask=mask)
        for layer, values in zip(layers, pooled):
            features[layer][start : start + len(batch)] = values.cpu().numpy()
    return features


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def extract_features(
    model: torch.nn.Module,
    images_or_ids,
    layers: str | int | Sequence[int] = "all",
    *,
    processor=None,
    concat: bool = False,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    draw: int = 0,
) -> dict[int, np.ndarray] | np.ndarray:
    """Average-pooled layer-normed features: {layer: float32 [N, n_embd]}, or [N, n_embd * layers] if concat.

    images_or_ids: token ids [N, H*W] (a 2-D integer tensor or array; SOS is prepended here), or images in any
        form `processor.encode` reads (then `processor` is required).
    layers: 'all', 'middle', an int, a list, or '0,3,5'.
    device: where to run; None keeps the model where it is (the model is moved otherwise).
    dtype: autocast dtype; None or 'auto' = float32 (imagegpt.device).
    cache_dir: if given, features are cached there per layer, keyed by the model's weights, the token ids and
        the dtype, so a second call (or another layer selection) reuses what was computed.
    draw: BERT models read image i (its place in images_or_ids) under its fixed evaluation mask number
        `draw` (imagegpt.objectives.evaluation_masks), as the paper evaluates them; next-pixel models
        ignore it.
    """
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be at least 1, got {batch_size}")
    config = model.config
    layers = resolve_layers(layers, config.n_layer)
    device = next(model.parameters()).device if device is None else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ids = _as_ids(images_or_ids, config, processor, batch_size)

    features: dict[int, np.ndarray] = {}
    paths: dict[int, Path] = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        key = f"{model_fingerprint(model)}-{ids_fingerprint(ids)}-{str(dtype).removeprefix('torch.')}"
        key += "" if config.is_causal else f"-mask{draw}"
        for layer in layers:
            paths[layer] = cache_dir / f"{key}-layer{layer}.npy"
            if paths[layer].exists():
                features[layer] = np.load(paths[layer])
    missing = [layer for layer in layers if layer not in features]
    if missing:
        was_training = model.training
        model.to(device).eval()
        try:
            computed = _run_layers(model, ids, missing, batch_size, device, dtype, progress, draw)
        finally:
            model.train(was_training)
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for layer, array in computed.items():
                _atomic_save(paths[layer], array)
        features.update(computed)
    if concat:
        return np.concatenate([features[layer] for layer in layers], axis=1)
    return {layer: features[layer] for layer in layers}


# -------------------------------------------------------------------------------------------------- probes


@dataclass
class ProbeResult:
    """One probe: the C chosen on validation, and the accuracies of the probe trained with it."""

    C: float
    val_accuracy: float
    test_accuracy: float | None
    val_accuracies: dict[float, float] = field(default_factory=dict)
    train_accuracy: float | None = None
    extended: list[float] = field(default_factory=list)  # Cs tried past the grid's end (_extend_grid)
    test_accuracy_ensemble: float | None = None  # BERT: the modal prediction over the test images' masks


def _check_labels(labels, what: str) -> np.ndarray:
    if labels is None:
        raise DataError(
            f"the {what} split has no labels; a probe needs a labelled dataset (digits, shapes, CIFAR, "
            "MNIST, or an image folder with one subfolder per class)"
        )
    return np.asarray(labels, dtype=np.int64)


MAX_ITER = 1000  # L-BFGS iterations per fit: enough to converge on every probe here
SMALL_PROBLEM = 4_000_000  # feature values (samples x features) below which the probe uses one BLAS thread


def fit_probe(
    train_features: np.ndarray,
    train_labels,
    val_features: np.ndarray,
    val_labels,
    test_features: np.ndarray | None = None,
    test_labels=None,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = MAX_ITER,
    ensemble: Sequence[np.ndarray] = (),
) -> ProbeResult:
    """L-BFGS logistic regression on standardised features; C chosen by validation accuracy (ties: smaller C).

    ensemble: the test images' features under further BERT masks; test_accuracy_ensemble is then the accuracy
    of the modal prediction over test_features and these (ties broken at random, objectives.ensemble_vote).
    The scaler is fitted on the training features only. The C grid is walked from strong to weak
    regularisation with warm starts, which makes the whole grid cost little more than its weakest member.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_labels = _check_labels(train_labels, "training")
    val_labels = _check_labels(val_labels, "validation")
    if len(np.unique(train_labels)) < 2:
        raise DataError("the training labels hold a single class; a probe needs at least two")
    if not Cs:
        raise ArgumentError("the C grid is empty; give at least one regularisation strength")
    scaler = StandardScaler().fit(train_features)
    train_x, val_x = scaler.transform(train_features), scaler.transform(val_features)
    classifier = LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True)
    # L-BFGS makes thousands of small matrix products; below a few million feature values a second BLAS
    # thread only adds synchronisation (digits, 1437 x 192: 45x slower with 2 threads on a busy 2-core CPU).
    blas_threads = 1 if train_x.size < SMALL_PROBLEM else None
    best, val_accuracies = None, {}

    def fit(C: float) -> bool:
        """Fit at C (warm-started from the last fit); True when it beats the best so far on validation."""
        nonlocal best
        classifier.set_params(C=C)
        with warnings.catch_warnings(), threadpool_limits(blas_threads, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(train_x, train_labels)
        val_accuracies[C] = float(classifier.score(val_x, val_labels))
        better = best is None or val_accuracies[C] > val_accuracies[best[0]]
        if better:
            best = (C, copy.deepcopy(classifier))
        return better

    grid = sorted({float(c) for c in Cs})
    for C in grid:
        fit(C)
    extended = _extend_grid(fit, best[0], grid) if len(grid) > 1 else []
    C, chosen = best
    test_accuracy = ensemble_accuracy = None
    if test_features is not None:
        test_labels = _check_labels(test_labels, "test")
        test_accuracy = float(chosen.score(scaler.transform(test_features), test_labels))
    if ensemble:
        votes = [chosen.predict(scaler.transform(f)) for f in (test_features, *ensemble)]
        ensemble_accuracy = float((ensemble_vote(np.stack(votes)) == test_labels).mean())
    return ProbeResult(
        C=C,
        val_accuracy=val_accuracies[C],
        test_accuracy=test_accuracy,
        val_accuracies=val_accuracies,
        train_accuracy=float(chosen.score(train_x, train_labels)),
        extended=extended,
        test_accuracy_ensemble=ensemble_accuracy,
    )


GRID_STEP = 10.0  # an extension of the C grid goes one decade at a time...
GRID_EXTENSIONS = 4  # ...for at most this many decades past the grid's end


def _extend_grid(fit, best_C: float, grid: list[float]) -> list[float]:
    """When the best C is at an end of the grid, go on past that end a decade at a time while validation
    improves (at most GRID_EXTENSIONS decades): an edge winner means the grid did not bracket the optimum.
    Returns the Cs added."""
    if best_C not in (grid[0], grid[-1]):
        return []
    factor = GRID_STEP if best_C == grid[-1] else 1 / GRID_STEP
    added, C = [], best_C
    for _ in range(GRID_EXTENSIONS):
        C *= factor
        added.append(C)
        if not fit(C):
            break
    return added


def labels_per_class_subset(labels, k: int, seed: int) -> np.ndarray:
    """Indices of k examples of each class, drawn with `seed` (the paper's low-data probes)."""
    labels = np.asarray(labels)
    if k < 1:
        raise ArgumentError(f"labels per class must be at least 1, got {k}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < k:
            raise DataError(
                f"class {label} has only {len(members)} training examples, fewer than "
                f"--labels-per-class {k}; ask for fewer labels per class"
            )
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def _probe_row(name, train, val, test, labels_per_class, seeds, Cs, ensemble=(), max_iter=MAX_ITER) -> dict:
    """A table row: one probe (full data) or the mean and std over seeds (low-data mode). ensemble: the test
    features under further BERT masks (fit_probe)."""
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = train, val, test
    fit = dict(Cs=Cs, ensemble=ensemble, max_iter=max_iter)
    if labels_per_class is None:
        result = fit_probe(train_x, train_y, val_x, val_y, test_x, test_y, **fit)
        return {"layer": name, **_result_dict(result)}
    runs = []
    for seed in range(seeds):
        subset = labels_per_class_subset(train_y, labels_per_class, seed)
        runs.append(fit_probe(train_x[subset], train_y[subset], val_x, val_y, test_x, test_y, **fit))
    tests = np.array([r.test_accuracy for r in runs])
    vals = np.array([r.val_accuracy for r in runs])
    row = {
        "layer": name,
        "test_accuracy": float(tests.mean()),
        "test_accuracy_std": float(tests.std()),
        "val_accuracy": float(vals.mean()),
        "val_accuracy_std": float(vals.std()),
        "runs": [{"seed": seed, **_result_dict(r)} for seed, r in enumerate(runs)],
    }
    if ensemble:
        row["test_accuracy_ensemble"] = float(np.mean([r.test_accuracy_ensemble for r in runs]))
    return row


def _result_dict(result: ProbeResult) -> dict:
    values = {**asdict(result), "val_accuracies": _str_keys(result.val_accuracies)}
    if values["test_accuracy_ensemble"] is None:  # next-pixel models and the pixel baselines
        del values["test_accuracy_ensemble"]
    return values


def _str_keys(values: dict[float, float]) -> dict[str, float]:
    return {f"{k:g}": v for k, v in values.items()}


def dataset_ids(dataset, processor, cache_dir=None, batch_size: int = 256) -> np.ndarray | torch.Tensor:
    """A dataset's token ids [N, H*W]: from imagegpt.data's token cache under cache_dir/tokens if given."""
    if processor is None:
        raise ArgumentError("images need a processor to become tokens: pass the model's ImageProcessor")
    if cache_dir is not None and hasattr(dataset, "name") and hasattr(dataset, "batch"):
        return token_cache(dataset, processor, Path(cache_dir) / "tokens")
    return torch.cat([processor.encode(batch) for batch in _image_batches(dataset, batch_size)])


def raw_pixel_features(images, processor, batch_size: int = 256) -> np.ndarray:
    """The baseline's features: the images resized to the model's resolution, in [-1, 1], flattened."""
    if _is_ids(images):
        raise ArgumentError("the raw-pixel baseline needs images, not token ids; pass baseline=False")
    if processor is None:
        raise ArgumentError("the raw-pixel baseline needs the model's processor to resize the images")
    chunks = [processor.to_pixels(batch) for batch in _image_batches(images, batch_size)]
    return np.concatenate([c.reshape(len(c), -1) for c in chunks]).astype(np.float32)


def run_probe(
    model: torch.nn.Module,
    processor,
    train,
    val,
    test,
    *,
    layers: str | int | Sequence[int] = "all",
    concat: bool = False,
    labels_per_class: int | None = None,
    seeds: int = 5,
    Cs: Sequence[float] = DEFAULT_CS,
    baseline: bool = True,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    ensemble_masks: int = ENSEMBLE_MASKS,
    max_iter: int = MAX_ITER,
) -> dict:
    """Per-layer linear probes and pixel baselines on three labelled splits; returns a JSON-able report.

    The baselines are logistic regressions on the raw pixels (resized to the model's resolution) and on the
    palette-quantised pixels the model actually reads; the gap between them is what the palette loses.

    train / val / test: imagegpt.data ImageDatasets, or (images, labels) or (token ids, labels) pairs.
    cache_dir: token ids (imagegpt.data.token_cache) and features are cached in its tokens/ and features/.
    labels_per_class: low-data mode, K training labels per class drawn `seeds` times; rows hold mean and std.
    concat: also probe the concatenation of the chosen layers (a row named like '3+4+5').
    ensemble_masks: BERT models: the test accuracy is also reported for the modal prediction over this many
        masks per test image (the paper's 5; 1 turns the ensemble off). See the module's docstring.
    max_iter: L-BFGS iterations per fit (fewer: a faster probe, not quite converged at weak regularisation).
    """
    splits = {"train": train, "val": val, "test": test}
    data = _checked_splits(splits, labels_per_class, seeds)
    draws = _ensemble_draws(model.config, ensemble_masks)
    layers = resolve_layers(layers, model.config.n_layer)

    def features_of(split_ids, draw=0):
        features_dir = None if cache_dir is None else Path(cache_dir) / "features"
        return extract_features(model, split_ids, layers, batch_size=batch_size, device=device, dtype=dtype,
                                cache_dir=features_dir, progress=progress, draw=draw)  # fmt: skip

    features, ids = {}, {}
    for split, (images, _) in data.items():
        ids[split] = images if _is_ids(images) else dataset_ids(images, processor, cache_dir)
        features[split] = features_of(ids[split])
    further = [features_of(ids["test"], draw) for draw in range(1, draws)]  # BERT: the test ensemble's

    def row(name, pick, ensemble=()):
        return _probe_row(
            name, *((pick(split), data[split][1]) for split in splits), labels_per_class, seeds, Cs, ensemble,
            max_iter,
        )  # fmt: skip

    rows = [
        row(layer, lambda split, layer=layer: features[split][layer], [f[layer] for f in further])
        for layer in layers
    ]
    concat_row = None
    if concat and len(layers) > 1:
        concat_row = row(
            "+".join(map(str, layers)),
            lambda split: np.concatenate([features[split][layer] for layer in layers], axis=1),
            [np.concatenate([f[layer] for layer in layers], axis=1) for f in further],
        )
    baselines = _baseline_rows(data, ids, processor, row) if baseline else (None, None)
    report = _report(model, train, data, layers, rows, draws, labels_per_class, seeds, Cs, dtype)
    report.update({"concat": concat_row, "baseline": baselines[0], "palette_baseline": baselines[1]})
    report["max_iter"] = max_iter
    return report


def _checked_splits(splits: dict, labels_per_class: int | None, seeds: int) -> dict:
    """split -> (images: a dataset, images or token ids; labels), checked before any feature is made."""
    data = {}
    for split, dataset in splits.items():
        images, labels = (dataset, dataset.labels) if hasattr(dataset, "labels") else dataset
        data[split] = (images, _check_labels(labels, split))
    if labels_per_class is not None:
        if seeds < 1:
            raise ArgumentError(f"seeds must be at least 1, got {seeds}")
        labels_per_class_subset(data["train"][1], labels_per_class, 0)
    train_classes = set(np.unique(data["train"][1]).tolist())
    for split in ("val", "test"):
        unseen = set(np.unique(data[split][1]).tolist()) - train_classes
        if unseen:
            raise DataError(f"the {split} split has classes {sorted(unseen)} that the training split lacks")
    return data


def _ensemble_draws(config, ensemble_masks) -> int:
    """How many masks each test image is read under: 1 for next-pixel models, ensemble_masks for BERT's."""
    if isinstance(ensemble_masks, bool) or not isinstance(ensemble_masks, int) or ensemble_masks < 1:
        raise ArgumentError(f"ensemble_masks must be a positive integer, got {ensemble_masks!r}")
    return 1 if config.is_causal else ensemble_masks


def _baseline_rows(data: dict, ids: dict, processor, row) -> tuple[dict, dict]:
    """The probes on raw pixels and on the palette's pixels (every pixel its palette colour: the images as
    the model reads them)."""
    pixels = {split: raw_pixel_features(images, processor) for split, (images, _) in data.items()}
    centers = processor.palette.centers
    palette = {split: centers[np.asarray(i, dtype=np.int64)].reshape(len(i), -1) for split, i in ids.items()}
    return row("pixels", lambda split: pixels[split]), row("palette", lambda split: palette[split])


def _report(model, train, data, layers, rows, draws, labels_per_class, seeds, Cs, dtype) -> dict:
    """run_probe's report but for the concat and baseline rows."""
    config = model.config
    n_classes = len(np.unique(data["train"][1]))
    return {
        "data": getattr(train, "name", None),
        "objective": config.objective,
        "bert_mask_prob": None if config.is_causal else config.bert_mask_prob,
        "ensemble_masks": draws if draws > 1 else None,
        "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        "layers": layers,
        "sizes": {split: len(images) for split, (images, _) in data.items()},
        "classes": n_classes,
        "chance": 1.0 / n_classes,
        "labels_per_class": labels_per_class,
        "seeds": seeds if labels_per_class is not None else None,
        "C_grid": [float(c) for c in sorted(Cs)],
        "dtype": str(resolve_dtype(dtype, next(model.parameters()).device)).removeprefix("torch."),
        "rows": rows,
        "best_layer": max(rows, key=lambda r: r["val_accuracy"])["layer"],
    }


# ----------------------------------------------------------------------------------------------- reporting


def _accuracy_text(row: dict) -> str:
    text = f"{100 * row['test_accuracy']:6.2f}%"
    if "test_accuracy_std" in row:
        text += f" ± {100 * row['test_accuracy_std']:.2f}"
    return text


def format_report(report: dict) -> str:
    """The per-layer accuracy table printed by `imagegpt probe`."""
    low_data = report["labels_per_class"] is not None
    title = f"linear probe on {report['data'] or 'data'}: {report['classes']} classes, chance "
    title += (
        f"{100 * report['chance']:.1f}%, train/val/test {report['sizes']['train']}/{report['sizes']['val']}/"
    )
    title += f"{report['sizes']['test']}"
    if low_data:
        title += f"; {report['labels_per_class']} labels per class, mean ± std over {report['seeds']} seeds"
    lines = [title, _objective_line(report)]
    ensemble = report.get("ensemble_masks")
    header = f"{'layer':>8}  {'val acc':>8}  {'test acc':>16}"
    lines.append(header + (f"  {f'{ensemble}-mask vote':>13}" if ensemble else "") + f"  {'C':>6}")

    def line(row, marker=""):
        C = f"{row['C']:g}" if "C" in row else "-"
        val = f"{100 * row['val_accuracy']:7.2f}%"
        text = f"{row['layer']!s:>8}  {val:>8}  {_accuracy_text(row):>16}"
        if ensemble:
            voted = row.get("test_accuracy_ensemble")
            text += f"  {'-' if voted is None else f'{100 * voted:.2f}%':>13}"
        return f"{text}  {C:>6}{marker}"

    for row in report["rows"]:
        lines.append(line(row, "  <- best on val" if row["layer"] == report["best_layer"] else ""))
    if report["concat"]:
        lines.append(line(report["concat"]))
    if report["baseline"]:
        lines.append(line(report["baseline"], "  (logistic regression on raw pixels)"))
    if report.get("palette_baseline"):
        lines.append(
            line(report["palette_baseline"], "  (... on the palette-quantised pixels the model reads)")
        )
    extended = grid_extensions(report)
    if extended:
        grid = report["C_grid"]
        moves = ", ".join(f"{name} to C={C:g}" for name, C in extended.items())
        lines.append(f"the C grid ({grid[0]:g}..{grid[-1]:g}) was extended where its end won: {moves}")
    return "\n".join(lines)


def _objective_line(report: dict) -> str:
    """Which objective the model was pretrained with, and how its images were read."""
    if report.get("objective", "ar") == "ar":
        return "model pretrained with the next-pixel (ar) objective: images read as [SOS, x0, ..., x_{n-2}]"
    line = (
        f"model pretrained with the BERT objective (p={report['bert_mask_prob']:g}): images read under a "
        "fixed mask, as in training"
    )
    if report.get("ensemble_masks"):
        line += (
            f"; the vote column is the modal prediction over {report['ensemble_masks']} masks per test image"
        )
    return line


def grid_extensions(report: dict) -> dict[str, float]:
    """Row name -> the farthest C tried past the grid's end (over a row's seeds in low-data mode)."""
    rows = [*report["rows"], report["concat"], report["baseline"], report.get("palette_baseline")]
    farthest = {}
    for row in filter(None, rows):
        for run in row.get("runs", [row]):
            if run.get("extended"):
                C = run["extended"][-1]
                previous = farthest.get(str(row["layer"]))
                if previous is None or abs(math.log10(C)) > abs(math.log10(previous)):
                    farthest[str(row["layer"])] = C
    return farthest


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """Test accuracy by layer, with the pixel baselines and chance as horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display and no pyplot global state
    from matplotlib.figure import Figure

    rows = report["rows"]
    x = [row["layer"] for row in rows]
    y = [100 * row["test_accuracy"] for row in rows]
    err = [100 * row.get("test_accuracy_std", 0.0) for row in rows]
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", capsize=3, label="linear probe (test)")
    if report["baseline"]:
        ax.axhline(100 * report["baseline"]["test_accuracy"], color="tab:red", ls="--", label="raw pixels")
    if report.get("palette_baseline"):
        accuracy = 100 * report["palette_baseline"]["test_accuracy"]
        ax.axhline(accuracy, color="tab:orange", ls=":", lw=2, label="palette-quantised pixels")
    if report["concat"]:
        ax.axhline(
            100 * report["concat"]["test_accuracy"],
            color="tab:green",
            ls="-.",
            label=f"layers {report['concat']['layer']}",
        )
    ax.axhline(100 * report["chance"], color="gray", ls=":", label="chance")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("test accuracy (%)")
    title = f"linear probe, {report['data'] or 'data'}"
    if report["labels_per_class"] is not None:
        title += f", {report['labels_per_class']} labels/class"
    ax.set_title(title)
    ax.set_xticks(x if len(x) <= 25 else x[:: math.ceil(len(x) / 25)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: dict, out: str | os.PathLike) -> dict[str, Path]:
    """probe.json and probe.png under `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "probe.json", "plot": out / "probe.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    plot_report(report, paths["plot"])
    return paths


def data_options_for(data, options: dict | None, processor) -> dict:
    """Dataset options, with generated built-ins (shapes, photos) drawn at the model's resolution by default
    (as `imagegpt train` draws them) rather than resized to it."""
    options = dict(options or {})
    if str(data) in ("shapes", "photos") and processor.height == processor.width:
        options.setdefault("resolution", int(processor.height))
    return options


def probe_pretrained(
    model_dir,
    data,
    out,
    *,
    layers: str | int | Sequence[int] = "all",
    concat: bool = False,
    labels_per_class: int | None = None,
    seeds: int = 5,
    Cs: Sequence[float] = DEFAULT_CS,
    baseline: bool = True,
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    cache_dir=None,
    seed: int = 0,
    data_options: dict | None = None,
    progress: bool = False,
    ensemble_masks: int = ENSEMBLE_MASKS,
    max_iter: int = MAX_ITER,
) -> tuple[dict, dict[str, Path]]:
    """`imagegpt probe`: load a model directory and a dataset's three splits, probe, write probe.json/.png.

    cache_dir defaults to `out/cache`; data_options go to imagegpt.data.load_dataset (limit, n, resolution).
    ensemble_masks: BERT models' test ensemble; max_iter: L-BFGS iterations per fit (run_probe).
    """
    model_dir = latest_model_dir(model_dir)  # a model directory, or a run directory's model
    check_folders(out=out, cache_dir=cache_dir)
    model, processor = load_with_processor(ImageGPT, model_dir)
    options = data_options_for(data, data_options, processor)
    splits = [load_dataset(data, split=s, seed=seed, **options) for s in ("train", "val", "test")]
    report = run_probe(
        model,
        processor,
        *splits,
        layers=layers,
        concat=concat,
        labels_per_class=labels_per_class,
        seeds=seeds,
        Cs=Cs,
        baseline=baseline,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        cache_dir=Path(out) / "cache" if cache_dir is None else cache_dir,
        progress=progress,
        ensemble_masks=ensemble_masks,
        max_iter=max_iter,
    )
    report = {"model": str(model_dir), **report, "data": str(data), "seed": seed}
    return report, write_report(report, out)
