"""The int8 KV cache: a memory trick beside the model, as gpt-fast's quantize.py is beside its model.py.

Each cached row of head_dim values is stored as int8 with one float32 scale (quantize_int8), a quarter of a
float32 cache's bytes plus a scale per head; the model never knows, since attention reads the cache through
KVCache.update. Sampling makes one when asked for cache_dtype="int8"; imagegpt.cpu's engine attends over it
without widening it first.
"""

from __future__ import annotations

import torch

from .config import ImageGPTConfig
from .model import KVCache


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (..., n) as int8 and a float32 scale per row: round(x / scale), scale = max |x| / 127 (1 for
    a row of zeros), to nearest even; x ~= q * scale to within scale / 2."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


def cache_position_bytes(config: ImageGPTConfig, dtype: torch.dtype) -> int:
    """Bytes of a KV cache for one image at one position, over all layers (int8: with its scales)."""
    per_layer = config.n_embd * torch.empty((), dtype=dtype).element_size()
    if dtype == torch.int8:  # and a float32 scale per head
        per_layer += 4 * config.n_head
    return 2 * config.n_layer * per_layer


class Int8KVCache(KVCache):
    """A KVCache of int8 rows, each with a float32 scale (k_scale, v_scale: (B, nh, max_length) per layer),
    read back as float32."""

    quantized = True

    def __init__(self, config: ImageGPTConfig, batch_size: int, max_length: int | None = None,
                 device=None, zeroed: bool = True):  # fmt: skip
        super().__init__(config, batch_size, max_length, device, torch.int8, zeroed)
        shape = self.k[0].shape[:3]
        self.k_scale = [torch.ones(shape, device=device) for _ in range(config.n_layer)]
        self.v_scale = [torch.ones(shape, device=device) for _ in range(config.n_layer)]

    def write(self, layer: int, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        at = slice(pos, pos + k.size(2)) if isinstance(pos, int) else pos
        (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
        self.k[layer][:, :, at], self.k_scale[layer][:, :, at] = qk, sk
        self.v[layer][:, :, at], self.v_scale[layer][:, :, at] = qv, sv

    def read(self, layer: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k[layer][:, :, :end].float() * self.k_scale[layer][:, :, :end, None]
        v = self.v[layer][:, :, :end].float() * self.v_scale[layer][:, :, :end, None]
        return k, v


def new_cache(config: ImageGPTConfig, batch_size: int, max_length: int | None = None, device=None,
              dtype: torch.dtype = torch.float32, zeroed: bool = True) -> KVCache:  # fmt: skip
    """A KVCache in `dtype`, an Int8KVCache for torch.int8."""
    if dtype == torch.int8:
        return Int8KVCache(config, batch_size, max_length, device, zeroed)
    return KVCache(config, batch_size, max_length, device, dtype, zeroed)
