"""ImageGPTConfig and the size presets (the paper's iGPT-S/M/L/XL and small CPU-sized models)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import ConfigError

# The pretraining objectives of Chen et al. (2020), section 2.1: next-pixel (L_AR) and masked-pixel (L_BERT).
OBJECTIVES = ("ar", "bert")

# Widths, depths and head counts. S, M and L are the released models (Chen et al. 2020, table/appendix and
# openai/image-gpt). The paper gives no head count for XL: we use 24 heads of width 128, iGPT-M's head width.
# The small presets are ours: they train in minutes on a 2-core CPU at 8x8 to 16x16.
PRESETS: dict[str, dict[str, int]] = {
    "igpt-xl": {"n_embd": 3072, "n_layer": 60, "n_head": 24},
    "igpt-l": {"n_embd": 1536, "n_layer": 48, "n_head": 16},
    "igpt-m": {"n_embd": 1024, "n_layer": 36, "n_head": 8},
    "igpt-s": {"n_embd": 512, "n_layer": 24, "n_head": 8},
    "igpt-mini": {"n_embd": 256, "n_layer": 8, "n_head": 8},
    "igpt-micro": {"n_embd": 128, "n_layer": 4, "n_head": 4},
    "igpt-demo": {"n_embd": 96, "n_layer": 6, "n_head": 4},  # the demo's: its probe peaks mid-stack
    "igpt-tiny": {"n_embd": 64, "n_layer": 8, "n_head": 4},
    "igpt-nano": {"n_embd": 64, "n_layer": 2, "n_head": 2},
}


def _resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    height, width = (int(r) for r in resolution)
    if height < 1 or width < 1:
        raise ConfigError(f"resolution must be positive, got {height}x{width}")
    return height, width


@dataclass
class ImageGPTConfig:
    """The shape of an ImageGPT model. Field names follow transformers' ImageGPTConfig.

    vocab_size: number of palette clusters + 1; the last id (vocab_size - 1) is the start-of-sequence token.
    n_positions: sequence length, height * width of the images the model reads.
    n_inner: MLP width; None means 4 * n_embd.
    num_labels: classes of the classification head (ImageGPTClassifier only).
    objective: what the model was pretrained on, which decides how it reads images (imagegpt.objectives):
        "ar", the next-pixel objective (causal attention, SOS; what transformers' ImageGPT is), or "bert",
        the masked-pixel objective (full attention; the token embeddings of masked positions zeroed, no SOS).
    bert_mask_prob: "bert" only: the probability of each position being masked. A field of the model, not
        only of its training run, because evaluation, probes and fine-tuning mask inputs with the same
        probability to keep them in distribution (Chen et al. 2020, section 4.6).
    """

    vocab_size: int = 512 + 1
    n_positions: int = 32 * 32
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    n_inner: int | None = None
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    num_labels: int = 2
    id2label: dict[int, str] | None = field(default=None)
    objective: str = "ar"
    bert_mask_prob: float = 0.15

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.vocab_size < 2:
            raise ConfigError("vocab_size must be at least 2: one palette cluster plus the SOS token")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); choose a head count "
                "that divides the width"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ConfigError(f"n_inner must be a positive integer or None, got {self.n_inner!r}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"objective must be one of {', '.join(OBJECTIVES)} (next-pixel or masked-pixel), got "
                f"{self.objective!r}"
            )
        mask_prob = self.bert_mask_prob
        if isinstance(mask_prob, bool) or not isinstance(mask_prob, int | float) or not 0 < mask_prob < 1:
            raise ConfigError(f"bert_mask_prob must be a probability in (0, 1), got {mask_prob!r}")
        self.bert_mask_prob = float(mask_prob)
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if len(self.id2label) != self.num_labels:
                self.num_labels = len(self.id2label)

    @property
    def n_clusters(self) -> int:
        """Palette size: every id below this is a colour."""
        return self.vocab_size - 1

    @property
    def sos_id(self) -> int:
        return self.vocab_size - 1

    @property
    def is_causal(self) -> bool:
        """Whether attention is causal: the next-pixel objective's models, which can sample."""
        return self.objective == "ar"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def dropout(self) -> float:
        """The largest of the three dropout rates (0 in the paper's recipe)."""
        return max(self.resid_pdrop, self.embd_pdrop, self.attn_pdrop)

    def square_side(self) -> int:
        """Side of the square image this config reads; a ConfigError if n_positions is not a square."""
        side = math.isqrt(self.n_positions)
        if side * side != self.n_positions:
            raise ConfigError(
                f"n_positions={self.n_positions} is not a square; pass the image height and width explicitly"
            )
        return side

    def num_parameters(self, classifier: bool = False) -> int:
        """Parameter count of ImageGPT (or ImageGPTClassifier), computed from the shape alone."""
        d, inner = self.n_embd, self.inner_dim
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        embeddings = self.vocab_size * d + self.n_positions * d
        head = d * self.num_labels if classifier else d * self.n_clusters
        return embeddings + self.n_layer * block + d + head

    @classmethod
    def from_preset(
        cls, name: str, resolution: int | tuple[int, int] = 32, clusters: int = 512, **overrides
    ) -> ImageGPTConfig:
        """A preset's shape at the given resolution (an int for square images, or (height, width))."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        if clusters < 1:
            raise ConfigError(f"clusters must be at least 1, got {clusters}")
        height, width = _resolution(resolution)
        return cls(
            **{**PRESETS[name], "vocab_size": clusters + 1, "n_positions": height * width, **overrides}
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ImageGPTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes) -> ImageGPTConfig:
        return replace(self, **changes)
