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


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict(
    classifier: ImageGPTClassifier,
    ids: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> np.ndarray:
    """Class logits float32 [N, num_labels] of image tokens [N, H*W]; SOS is prepended here."""
    from .device import autocast, resolve_device, resolve_dtype

    device = next(classifier.parameters()).device if device is None else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    was_training = classifier.training
    classifier.to(device).eval()
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if isinstance(ids, np.ndarray) else ids.long()
    logits = []
    try:
        for start in range(0, len(ids), batch_size):
            batch = sos_inputs(ids[start : start + batch_size].to(device), classifier.config.sos_id)
            with autocast(device, dtype):
                logits.append(classifier(batch).logits.float().cpu())
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(12, 2.5 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=120)
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
    plt.close(fig)
