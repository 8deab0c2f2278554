"""The two pretraining objectives of Chen et al. (2020), section 2.1, and what each needs beside the model.

- "ar", L_AR: every token is predicted from the ones before it; the model reads [SOS, x0, ..., x_{n-2}] with
  causal attention.
- "bert", L_BERT: a BERT mask M holds each position independently with probability bert_mask_prob (0.15). The
  model reads the image with the token embeddings of the positions in M zeroed (no mask token, no SOS; the
  position embeddings are still added), attends without a causal mask, and is trained on the cross-entropy at
  the positions in M only, averaged per image over its masked positions, then over the batch: OpenAI's
  image-gpt src/model.py, written as `bert_loss_per_image` (below).

This module holds what the BERT objective needs beside the model (the masks, the ensemble vote, the checks)
and imports nothing of the model, which draws on it; pretraining's loop objectives (train.NextPixel,
train.MaskedPixels), evaluation, probes and fine-tuning use it.

Masks come from seeded generators, never from the global RNG:
- training: the masks of step s are drawn for the whole global batch from a generator seeded with (the run's
  seed, s), and each process takes its own rows. A resumed run, any number of processes and any gradient
  accumulation draw exactly the masks that one process would.
- evaluation: the d-th mask of image i (its index in the evaluated split) comes from a generator seeded with
  (seed, i, d), so an image is always scored under the same masks, whatever the batch size or the number of
  processes.

BERT models are evaluated as in section 4.6 of the paper: "because inputs to the BERT model are masked at
training time, we must also mask them at evaluation time to keep inputs in-distribution" (features, probes and
classifiers read images under the evaluation mask of draw 0), and "we sample 5 independent masks for each
input and take the modal prediction, breaking ties at random" (`ensemble_vote` over ENSEMBLE_MASKS draws).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import OBJECTIVES, ImageGPTConfig
from .errors import ArgumentError, ConfigError

# The paper's evaluation ensemble: "we sample 5 independent masks for each input and take the modal
# prediction".
ENSEMBLE_MASKS = 5

# The streams of the seeded generators (numpy SeedSequence entropy words), so that no two uses share draws.
_TRAINING, _EVALUATION, _TIES = 0x7472_6169, 0x6576_616C, 0x7469_6573


def check_objective(name) -> str:
    """name if it is an objective imagegpt trains ("ar" or "bert"); an ArgumentError otherwise."""
    if name not in OBJECTIVES:
        raise ArgumentError(
            f"unknown --objective {name!r}; use ar (next-pixel prediction, the default) or bert "
            "(masked-pixel prediction)"
        )
    return name


def check_mask_prob(value) -> float:
    """A BERT mask probability in (0, 1); an ArgumentError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ArgumentError(f"--mask-prob is a probability in (0, 1) (the paper's is 0.15), got {value!r}")
    return float(value)


def describe(config: ImageGPTConfig) -> str:
    """The objective in words, for reports: 'ar (next-pixel)' or 'bert (masked-pixel, p=0.15)'."""
    if config.is_causal:
        return "ar (next-pixel)"
    return f"bert (masked-pixel, p={config.bert_mask_prob:g})"


def require_causal(config: ImageGPTConfig, what: str = "sampling") -> None:
    """Refuse a BERT model where only a next-pixel model makes sense (sampling, completion)."""
    if not config.is_causal:
        raise ConfigError(
            f"{what} needs a next-pixel (autoregressive) model, but this is a BERT model: it predicts masked "
            "pixels from all the others, not each pixel from the ones before, so it cannot draw images "
            "pixel by pixel. Use a model trained with --objective ar"
        )


# ------------------------------------------------------------------------------------------------- masks


def training_masks(
    config: ImageGPTConfig, seed: int, step: int, global_batch: int, rows: slice | None = None
) -> torch.Tensor:
    """The BERT masks (len(rows), n_positions) bool, True where masked, of training step `step` (0-based):
    drawn for the whole global batch from a generator seeded with (seed, step); `rows` picks this
    process's."""
    uniform = np.random.default_rng([_TRAINING, seed, step]).random((global_batch, config.n_positions))
    return torch.from_numpy(uniform[rows if rows is not None else slice(None)] < config.bert_mask_prob)


def evaluation_masks(
    config: ImageGPTConfig, indices: Sequence[int], draw: int = 0, seed: int = 0
) -> torch.Tensor:
    """The fixed BERT masks (len(indices), n_positions) bool of the images at `indices` of a split: mask
    number `draw` of image i is drawn from a generator seeded with (seed, i, draw)."""
    rows = [
        np.random.default_rng([_EVALUATION, seed, int(i), draw]).random(config.n_positions) for i in indices
    ]
    if not rows:
        return torch.zeros(0, config.n_positions, dtype=torch.bool)
    return torch.from_numpy(np.stack(rows) < config.bert_mask_prob)


def ensemble_vote(predictions: np.ndarray, seed: int = 0) -> np.ndarray:
    """The modal class of each column of predictions (K masks, N images), ties broken at random (seeded)."""
    predictions = np.asarray(predictions, dtype=np.int64)
    K, N = predictions.shape
    counts = np.zeros((N, int(predictions.max(initial=0)) + 1), dtype=np.int64)
    for row in predictions:
        counts[np.arange(N), row] += 1
    modal = counts == counts.max(axis=1, keepdims=True)
    noise = np.random.default_rng([_TIES, seed]).random(counts.shape)
    return np.argmax(np.where(modal, noise, -1.0), axis=1)


def bert_micro_batches(
    config: ImageGPTConfig,
    seed: int,
    step: int,
    ids: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    chunks=1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) micro-batches of a process's share `ids` (B, T) of step `step`'s global batch: its rows of
    the step's training masks, split into `chunks` for gradient accumulation."""
    B = len(ids)
    mask = training_masks(config, seed, step, B * world_size, slice(rank * B, (rank + 1) * B))
    return list(zip(ids.chunk(chunks), mask.to(ids.device).chunk(chunks)))


def check_evaluation_masks(masks) -> int:
    """A number of evaluation masks per image (at least 1); an ArgumentError otherwise."""
    if isinstance(masks, bool) or not isinstance(masks, int) or masks < 1:
        raise ArgumentError(f"the number of evaluation masks per image must be at least 1, got {masks!r}")
    return masks


def bert_loss_per_image(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_BERT of each image (B,): the cross-entropy of its masked tokens (mask True), averaged over them as in
    the original code; 0 for an image without a masked position (the paper's sum over an empty M)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none").view(ids.shape)
    mask = mask.to(nll.dtype)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
