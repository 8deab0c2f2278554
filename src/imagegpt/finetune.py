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
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentError
from .model import ImageGPT, ImageGPTClassifier, sos_inputs

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

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None, gen_weight: float = 0.0):
        """Image tokens [B, T] (no SOS) -> (class logits, L_clf, L_gen); L_gen is None if gen_weight is 0."""
        transformer = self.classifier.transformer
        inputs = sos_inputs(ids, self.config.sos_id)
        positions = torch.arange(inputs.size(1), device=inputs.device)
        x = transformer.drop(transformer.wte(inputs) + transformer.wpe(positions))  # (B, T, C)
        for block in transformer.h:
            x = block(x)
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
            gen_loss = F.cross_entropy(gen_logits.flatten(0, 1).float(), ids.flatten())
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
