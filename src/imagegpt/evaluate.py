"""Bits per dimension: how well a model predicts held-out images, in the paper's units.

Every token of an image is predicted from [SOS, x0, ..., x_{n-2}] (the training objective). The mean negative
log-likelihood per token in nats gives

    bits per token = nats / ln 2
    bits per dim   = nats / ln 2 / 3

the paper's "bits per dimension": the per-token loss divided by the 3 colour channels a token stands for.
With a palette the model predicts palette ids, not 8-bit sub-pixels, so this is not the 8-bit bits/dim of
PixelCNN-style models: a lossy palette (512 clusters for 16.7M colours) discards information that the 8-bit
figure pays for, and the two are not comparable. Compare runs only at the same palette.

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
    model: nn.Module, ids, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[float, int]:
    """(sum of next-token losses in nats, number of tokens) of one batch of image tokens [B, H*W].

    The model (in whatever mode it is) reads [SOS, x0, ..., x_{n-2}] and predicts every token x0..x_{n-1}
    under autocast; the losses are computed in float32 from the logits and summed in float64.
    """
    batch = _as_long(ids).to(device or next(model.parameters()).device)
    with autocast(batch.device, dtype):
        logits = model(sos_inputs(batch, model.config.sos_id)).logits
    nll = F.cross_entropy(logits.flatten(0, 1).float(), batch.flatten(), reduction="sum")
    return float(nll.double()), batch.numel()


@torch.no_grad()
def token_nll(
    model: nn.Module,
    ids,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[float, int]:
    """(sum of next-token losses in nats, number of tokens) over ids [N, H*W] (a tensor or a uint16 memmap),
    in eval mode, image_nll batch by batch."""
    if batch_size < 1:
        raise ArgumentError(f"batch size must be at least 1, got {batch_size}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(ids), batch_size)
    try:
        for start in tqdm(starts, desc="evaluating", unit="batch", disable=not progress):
            nats, tokens = image_nll(model, ids[start : start + batch_size], device=device, dtype=dtype)
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

    @classmethod
    def from_nll(
        cls, split: str, images: int, total_nats: float, tokens: int, clusters: int, unigram_nats=None
    ) -> Evaluation:
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
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.split}: {self.images} images, {self.tokens} tokens, palette of {self.clusters} colours",
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
) -> Evaluation:
    """Evaluate a model directory (or a run directory's latest checkpoint) on a split of a dataset.

    seed: the dataset's split seed (use the one the model was trained with, 0 by default, so that the held-out
    split is the same). limit: evaluate a seeded subset of at most this many images. cache_dir: keep the token
    ids in imagegpt.data's token cache there. unigram: also compute the unigram baseline on the train split.
    """
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
    total, count = token_nll(model, ids, batch_size=batch_size, device=device, dtype=dtype, progress=progress)
    unigram_nats = unigram_entropy(tokens_of("train", None), model.config.n_clusters) if unigram else None
    return Evaluation.from_nll(split, len(ids), total, count, model.config.n_clusters, unigram_nats)
