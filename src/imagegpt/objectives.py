"""The two pretraining objectives of Chen et al. (2020), section 2.1, and what each needs beside the model.

- "ar", L_AR: every token is predicted from the ones before it; the model reads [SOS, x0, ..., x_{n-2}] with
  causal attention.
- "bert", L_BERT: a BERT mask M holds each position independently with probability bert_mask_prob (0.15). The
  model reads the image with the token embeddings of the positions in M zeroed (no mask token, no SOS; the
  position embeddings are still added), attends without a causal mask, and is trained on the cross-entropy at
  the positions in M only, averaged per image over its masked positions, then over the batch: OpenAI's
  image-gpt src/model.py, written as `model.bert_loss_per_image`.

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
from torch import nn

from .config import OBJECTIVES, ImageGPTConfig
from .errors import ArgumentError, ConfigError
from .model import bert_loss_per_image, sos_inputs

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


# ---------------------------------------------------------------------------------- what a loop asks of one


class NextPixel:
    """L_AR: the training loss and the evaluation of the next-pixel objective."""

    name = "ar"
    masks = 1  # evaluation scores every token once

    def __init__(self, config: ImageGPTConfig, seed: int = 0):
        self.config, self.seed = config, seed

    def micro_batches(
        self, ids: torch.Tensor, step: int, rank: int = 0, world_size: int = 1, chunks: int = 1
    ):
        """This process's micro-batches of the step's image tokens (B, T) (its share of the global batch)."""
        return list(ids.chunk(chunks))

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss in nats over the batch. Calls model(...), so that a DDP wrapper syncs."""
        logits = model(sos_inputs(batch, self.config.sos_id)).logits  # (B, T, n_clusters)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.flatten())

    def nll(
        self, model: nn.Module, ids: torch.Tensor, indices=None, draw: int = 0
    ) -> tuple[torch.Tensor, int]:
        """(summed next-token loss in nats, tokens scored) of a batch of image tokens."""
        logits = model(sos_inputs(ids, self.config.sos_id)).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="sum"), ids.numel()


class MaskedPixels(NextPixel):
    """L_BERT: the training loss and the evaluation of the masked-pixel objective (the module's docstring).

    Evaluation scores the masked tokens of the fixed evaluation masks: `masks` draws per image (1 by default,
    the masks that training's validation uses), with the evaluation seed 0.
    """

    name = "bert"

    def __init__(self, config: ImageGPTConfig, seed: int = 0, masks: int = 1):
        super().__init__(config, seed)
        if isinstance(masks, bool) or not isinstance(masks, int) or masks < 1:
            raise ArgumentError(f"the number of evaluation masks per image must be at least 1, got {masks!r}")
        self.masks = masks

    def micro_batches(self, ids, step, rank=0, world_size=1, chunks=1):
        """(ids, mask) micro-batches: the step's training masks, this process's rows of the global batch."""
        B = len(ids)
        mask = training_masks(self.config, self.seed, step, B * world_size, slice(rank * B, (rank + 1) * B))
        return list(zip(ids.chunk(chunks), mask.to(ids.device).chunk(chunks)))

    def loss(self, model, batch):
        """L_BERT in nats: each image's mean over its masked tokens, averaged over the batch."""
        ids, mask = batch
        return bert_loss_per_image(model(ids, mask=mask).logits, ids, mask).mean()

    def nll(self, model, ids, indices=None, draw=0):
        """(summed loss in nats of the masked tokens, masked tokens) of a batch under the evaluation masks
        number `draw` of the images at `indices` (default 0..B-1)."""
        indices = range(len(ids)) if indices is None else indices
        mask = evaluation_masks(self.config, indices, draw).to(ids.device)
        logits = model(ids, mask=mask).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none").view(ids.shape)
        return (nll * mask).sum(), int(mask.sum())


def objective_for(config: ImageGPTConfig, seed: int = 0, masks: int = 1) -> NextPixel:
    """The objective of a model's config: NextPixel or MaskedPixels (seed: the training masks' seed; masks:
    BERT evaluation masks per image)."""
    return NextPixel(config, seed) if config.is_causal else MaskedPixels(config, seed, masks)
