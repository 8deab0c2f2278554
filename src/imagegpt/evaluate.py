"""Bits per dimension: how well a model predicts held-out images, in the paper's units.

Every token of an image is predicted from [SOS, x0, ..., x_{n-2}] (the training objective). The mean negative
log-likelihood per token in nats gives

    bits per token = nats / ln 2
    bits per dim   = nats / ln 2 / 3

the paper's "bits per dimension": the per-token loss divided by the 3 colour channels a token stands for.
With a palette the model predicts palette ids, not 8-bit sub-pixels, so this is not the 8-bit bits/dim of
PixelCNN-style models: a lossy palette (512 clusters for 16.7M colours) discards information that the 8-bit
figure pays for, and the two are not comparable. Compare runs only at the same palette.

A BERT model (imagegpt.objectives) is scored on what it was trained to do: the masked tokens of fixed, seeded
masks (each position masked with the model's bert_mask_prob; `masks` draws per image, 1 by default, the masks
training's validation uses), each predicted from all the unmasked ones. Its nats per masked token and the bits
per dimension made from them are NOT comparable to a next-pixel model's: predicting a pixel from both sides is
an easier task than predicting it from the pixels before it, and only 15% of the tokens are scored.

Two reference points come with every evaluation:
- uniform: log2(K) / 3, a model that knows nothing but the palette size;
- unigram: the entropy of the token frequencies on the training split / 3, a model that knows how often each
  colour occurs but not where.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import latest_model_dir, load_with_processor
from .data import load_dataset, token_cache
from .device import autocast, resolve_device, resolve_dtype
from .errors import ArgumentError
from .files import check_folders
from .model import ImageGPT, sos_inputs
from .objectives import check_evaluation_masks, evaluation_masks

LN2 = math.log(2.0)


def bits_per_token(nats_per_token: float) -> float:
    return nats_per_token / LN2


def bits_per_dim(nats_per_token: float) -> float:
    """The paper's bits per dimension: nats per token / ln 2 / 3 channels."""
    return nats_per_token / LN2 / 3.0


def _as_long(ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.long()
    return torch.from_numpy(np.asarray(ids).astype(np.int64))


@torch.no_grad()  # not inference_mode: an FSDP model's gathered weights must stay usable for training
def image_nll(
    model: nn.Module,
    ids,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    indices=None,
    draw: int = 0,
) -> tuple[float, int]:
    """(sum of the losses in nats, number of tokens scored) of one batch of image tokens [B, H*W].

    The model (in whatever mode it is) reads [SOS, x0, ..., x_{n-2}] and predicts every token x0..x_{n-1}
    under autocast; the losses are computed in float32 from the logits and summed in float64. A BERT model
    predicts the masked tokens of evaluation mask number `draw` of the images at `indices` in their split
    (default 0..B-1; imagegpt.objectives.evaluation_masks) from the unmasked ones.
    """
    batch = _as_long(ids).to(device or next(model.parameters()).device)
    config = model.config
    mask = None
    if not config.is_causal:
        indices = range(len(batch)) if indices is None else indices
        mask = evaluation_masks(config, indices, draw).to(batch.device)
    with autocast(batch.device, dtype):
        logits = model(batch if mask is not None else sos_inputs(batch, config.sos_id), mask=mask).logits
    if mask is None:
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.flatten(), reduction="sum")
        return float(nll.double()), batch.numel()
    nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.flatten(), reduction="none")
    return float((nll.double() * mask.flatten()).sum()), int(mask.sum())


@torch.no_grad()
def token_nll(
    model: nn.Module,
    ids,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    masks: int = 1,
) -> tuple[float, int]:
    """(sum of the losses in nats, number of tokens scored) over ids [N, H*W] (a tensor or a uint16 memmap),
    in eval mode, image_nll batch by batch. BERT models: over `masks` evaluation masks per image (image i
    of ids is image i of its split)."""
    if batch_size < 1:
        raise ArgumentError(f"batch size must be at least 1, got {batch_size}")
    draws = range(1 if model.config.is_causal else check_evaluation_masks(masks))
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(ids), batch_size)
    try:
        for start in tqdm(starts, desc="evaluating", unit="batch", disable=not progress):
            batch = ids[start : start + batch_size]
            indices = range(start, start + len(batch))
            for draw in draws:
                nats, tokens = image_nll(model, batch, device=device, dtype=dtype, indices=indices, draw=draw)
                total, count = total + nats, count + tokens
    finally:
        model.train(was_training)
    return total, count


def unigram_entropy(ids, n_clusters: int) -> float:
    """Entropy in nats of the token frequencies in ids: the loss of a model that predicts every position with
    the palette's colour frequencies."""
    counts = np.zeros(n_clusters, dtype=np.int64)
    for start in range(0, len(ids), 4096):  # a memmap in chunks
        chunk = np.asarray(ids[start : start + 4096]).astype(np.int64).ravel()
        counts += np.bincount(chunk, minlength=n_clusters)[:n_clusters]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass
class Evaluation:
    """Likelihood of a split under a model, with the uniform and palette-unigram baselines."""

    split: str
    images: int
    tokens: int
    clusters: int
    nats_per_token: float
    bits_per_token: float
    bits_per_dim: float
    uniform_bits_per_dim: float
    unigram_bits_per_dim: float | None = None
    objective: str = "ar"
    masks: int | None = None  # BERT: evaluation masks per image (the tokens are the masked ones)

    @classmethod
    def from_nll(
        cls,
        split: str,
        images: int,
        total_nats: float,
        tokens: int,
        clusters: int,
        unigram_nats=None,
        objective: str = "ar",
        masks: int | None = None,
    ) -> Evaluation:
        if tokens == 0:
            raise ArgumentError("no token was scored: evaluate more images (every BERT mask drawn was empty)")
        nats = total_nats / tokens
        return cls(
            split=split,
            images=images,
            tokens=tokens,
            clusters=clusters,
            nats_per_token=nats,
            bits_per_token=bits_per_token(nats),
            bits_per_dim=bits_per_dim(nats),
            uniform_bits_per_dim=math.log2(clusters) / 3.0,
            unigram_bits_per_dim=None if unigram_nats is None else bits_per_dim(unigram_nats),
            objective=objective,
            masks=masks if objective == "bert" else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        tokens = f"{self.tokens} tokens"
        if self.objective == "bert":
            tokens = f"{self.tokens} masked tokens of {self.masks} fixed BERT mask(s) per image"
        lines = [f"{self.split}: {self.images} images, {tokens}, palette of {self.clusters} colours"]
        if self.objective == "bert":
            lines.append(
                "  a BERT model, each masked token predicted from all the unmasked ones: NOT comparable to a "
                "next-pixel model's bits/dim"
            )
        lines += [
            f"  nats per token   {self.nats_per_token:.4f}",
            f"  bits per token   {self.bits_per_token:.4f}",
            f"  bits per dim     {self.bits_per_dim:.4f}   (bits per token / 3 channels)",
        ]
        if self.unigram_bits_per_dim is not None:
            lines.append(
                f"  unigram baseline {self.unigram_bits_per_dim:.4f}   (entropy of train colours / 3)"
            )
        lines.append(f"  uniform baseline {self.uniform_bits_per_dim:.4f}   (log2 {self.clusters} / 3)")
        return "\n".join(lines)


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    split: str = "test",
    *,
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    seed: int = 0,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    unigram: bool = True,
    progress: bool = False,
    data_options: dict | None = None,
    masks: int = 1,
) -> Evaluation:
    """Evaluate a model directory (or a run directory's latest checkpoint) on a split of a dataset.

    seed: the dataset's split seed (use the one the model was trained with, 0 by default, so that the held-out
    split is the same). limit: evaluate a seeded subset of at most this many images. cache_dir: keep the token
    ids in imagegpt.data's token cache there. unigram: also compute the unigram baseline on the train split.
    masks: BERT models only, the fixed evaluation masks per image (see the module's docstring).
    """
    check_evaluation_masks(masks)
    model_dir = latest_model_dir(model_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    check_folders(cache_dir=cache_dir)
    model, processor = load_with_processor(ImageGPT, model_dir)
    model.to(device)
    options = dict(data_options or {})
    limit = options.pop("limit", limit)  # it applies to the evaluated split, not to the unigram's train

    def tokens_of(split_name: str, limit_: int | None):
        dataset = load_dataset(data, split=split_name, seed=seed, limit=limit_, **options)
        if cache_dir is not None:
            return token_cache(dataset, processor, cache_dir)
        return np.concatenate(
            [processor.encode(dataset.batch(s, s + 256)).numpy() for s in range(0, len(dataset), 256)]
        )

    ids = tokens_of(split, limit)
    total, count = token_nll(
        model, ids, batch_size=batch_size, device=device, dtype=dtype, progress=progress, masks=masks
    )
    config = model.config
    unigram_nats = unigram_entropy(tokens_of("train", None), config.n_clusters) if unigram else None
    return Evaluation.from_nll(
        split, len(ids), total, count, config.n_clusters, unigram_nats, config.objective, masks
    )
