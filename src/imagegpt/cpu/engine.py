"""The CPU decode engine: sampling's decode step on the native kernels, beside the model.

A decode step feeds one token per image and is bound by memory traffic: every weight and every cached key
and value is read once per step, for a few rows of work. PyTorch's kernels leave much of that on the table
at a few rows, and a small model's step is otherwise some 400 short calls from Python. DecodeEngine takes
the model as it is and builds, once, what the kernels need:

- every block's linear layers packed into the few-rows multiply's layout (ops.pack_linear; quick-GELU's
  1.702 folded into the MLP's weights, so that the kernel's fused silu computes it), stacked over the
  blocks, and the norms' weights beside them: float32, bfloat16 (weight_dtype=torch.bfloat16: half the
  bytes a step streams, widened to float32 in registers) or int8 (quantized per output column);
- a step: the model's own embeddings, then every block and the final norm in one call (ops.decode_blocks:
  one parallel region, barriers between phases), then the model's own head;
- caches (NativeKVCache) whose one-token attention reads the cache in its own dtype (ops.decode_attention),
  for the prefill and for any step the packed blocks do not take.

Nothing is attached to the model: the engine holds the packed copies, checks before each step that the
model's weights are the ones it packed (repacking if not), and goes with generate() when it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model import ImageGPT, KVCache
from ..quantize import Int8KVCache
from . import ops

# The packed weights are a second copy of the blocks' linear layers; models with more than this many bytes
# of them (igpt-s has 0.3 GB, igpt-m 1.8 GB) decode on PyTorch's kernels rather than double their memory.
PACK_BUDGET_BYTES = 2 * 1024**3
GELU = 1.702  # quick_gelu(z) = silu(1.702 z) / 1.702
_NAMES = {torch.bfloat16: "bfloat16", torch.int8: "int8"}  # the packed weights' dtypes besides float32


class NativeKVCache(KVCache):
    """A KVCache whose one-token attention (a decode step's) runs ops.decode_attention over the cache as it
    is stored: bfloat16, float16 and int8 caches are not widened to float32 first, as SDPA needs them."""

    def attend(self, layer: int, pos, q, k, v, mask=None, dropout: float = 0.0) -> torch.Tensor:
        if not (
            isinstance(pos, int)
            and q.size(2) == 1
            and mask is None
            and dropout == 0.0
            and q.size(3) % 8 == 0
            and q.device.type == "cpu"
            and not (torch.is_grad_enabled() and q.requires_grad)
            and ops.available()
        ):
            return super().attend(layer, pos, q, k, v, mask, dropout)
        self.write(layer, pos, k, v)
        end = pos + 1
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        scales = (self.k_scale[layer][:, :, :end], self.v_scale[layer][:, :, :end]) if self.quantized else ()
        y = torch.ops.imagegpt.decode_attention(q.float(), keys, values, *(scales or (None, None)))
        return y.to(q.dtype)


class NativeInt8KVCache(NativeKVCache, Int8KVCache):
    """An Int8KVCache that NativeKVCache's one-token attention reads as stored."""


@dataclass
class PackedBlocks:
    """Every block's operands for ops.decode_blocks, stacked over the blocks, and what they were packed
    from (each parameter and its version then)."""

    norms: torch.Tensor  # (L, 2, C)
    weights: list[torch.Tensor]  # qkv, proj, fc, out: (L, *ops.pack_linear's or pack_linear_int8's shape)
    biases: list[torch.Tensor]  # (L, padded)
    scales: list[torch.Tensor]  # int8: the column scales (L, padded); float32 and bfloat16: none
    fc_width: int
    sources: list[
        tuple[dict, str, nn.Parameter, int]
    ]  # (where its module holds it, name, parameter, version)


def linear_weights(model: ImageGPT) -> list[nn.Linear]:
    """The blocks' linear layers, in decode_blocks' order: qkv, proj, fc, out of each block."""
    return [m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]


def refusal(model: ImageGPT, weight_dtype: torch.dtype) -> str | None:
    """Why the packed blocks cannot run this model here, or None."""
    config = model.config
    linears = linear_weights(model)
    size = torch.empty((), dtype=weight_dtype).element_size()
    blocks = model.transformer.h
    if not ops.available():
        return (
            "the native CPU kernels are not available here (the extension is not built, the CPU lacks "
            "AVX2/FMA/F16C, or IMAGEGPT_NATIVE_KERNELS=0)"
        )
    if not all(p.device.type == "cpu" and p.dtype == torch.float32 for p in blocks.parameters()):
        return "this model's weights are not all CPU float32"
    if sum(m.weight.numel() * size for m in linears) > PACK_BUDGET_BYTES:
        return f"this model's linear weights exceed the packing budget of {PACK_BUDGET_BYTES:,} bytes"
    if weight_dtype == torch.int8 and (config.n_embd % 8 or config.head_dim % 8 or config.inner_dim % 8):
        return (
            "the kernels need n_embd, the head width and the MLP width multiples of 8; this model has "
            f"{config.n_embd}, {config.head_dim} and {config.inner_dim}"
        )
    if config.head_dim % 8:
        return f"the kernels need the head width a multiple of 8; this model's is {config.head_dim}"
    if len({eps for b in blocks for eps in (b.ln_1.eps, b.ln_2.eps)} | {model.transformer.ln_f.eps}) != 1:
        return "the kernels take one norm epsilon for every block and the final norm"
    return None


def pack_blocks(model: ImageGPT, weight_dtype: torch.dtype = torch.float32) -> PackedBlocks:
    """The blocks' weights as ops.decode_blocks takes them (see the module docstring)."""
    blocks = model.transformer.h
    C, fc = model.config.n_embd, model.config.inner_dim
    scales_by = (1.0, 1.0, GELU, 1 / GELU)  # quick-GELU's scales ride on the MLP's weights
    bias_scales = (1.0, 1.0, GELU, 1.0)
    int8 = weight_dtype == torch.int8
    linears = linear_weights(model)
    with torch.no_grad():
        norms = torch.stack([torch.stack([b.ln_1.weight, b.ln_2.weight]) for b in blocks]).contiguous()
        weights, biases, scales = [], [], []
        for i, (N, K) in enumerate(((3 * C, C), (C, C), (fc, C), (C, fc))):
            layers = linears[i::4]
            shape = (ops.column_blocks(N), K // 4, 16, 4) if int8 else (ops.column_blocks(N), K, 16)
            weight = torch.empty(len(blocks), *shape, dtype=weight_dtype)  # bfloat16: rounded to nearest
            bias = torch.zeros(len(blocks), 16 * ops.column_blocks(N))
            scale = torch.empty(len(blocks), 16 * ops.column_blocks(N)) if int8 else None
            for j, layer in enumerate(layers):
                if int8:
                    weight[j], scale[j] = ops.pack_linear_int8(layer.weight.detach(), scales_by[i])
                else:
                    weight[j] = ops.pack_linear(layer.weight.detach(), scales_by[i])
                if layer.bias is not None:
                    bias[j, :N] = layer.bias * bias_scales[i]
            weights.append(weight)
            biases.append(bias)
            scales += [scale] if int8 else []
    sources = [
        (m._parameters, name, p, p._version) for m in blocks.modules() for name, p in m._parameters.items()
    ]
    return PackedBlocks(norms, weights, biases, scales, fc, sources)


class DecodeEngine:
    """A model's CPU decode step on the native kernels, built once per generate() call.

    step(model, token, position, cache) has sampling.decode_one_token's signature and numbers (float32
    weights: within float32 rounding; bfloat16 weights: the same on the weights rounded to bfloat16, the
    arithmetic float32; int8 weights: each layer's weights quantized per output column and its input rows per
    row, the products summed exactly in int32). new_cache() makes the caches it attends over.
    """

    max_batch = ops.MAX_ROWS  # the most images per step the packed blocks take

    def __init__(self, model: ImageGPT, weight_dtype: torch.dtype = torch.float32):
        self.model = model
        self.weight_dtype = weight_dtype
        self.packed = pack_blocks(model, weight_dtype) if refusal(model, weight_dtype) is None else None
        self.scratch = torch.empty(0)

    @staticmethod
    def runs(model: ImageGPT, weight_dtype: torch.dtype = torch.float32) -> bool:
        """Whether the packed blocks run this model here, on weights of weight_dtype."""
        return refusal(model, weight_dtype) is None

    @classmethod
    def create(cls, model: ImageGPT, weight_dtype: torch.dtype = torch.float32) -> DecodeEngine | None:
        """The engine where the kernels run here, else None; bfloat16 and int8 weights, which only the
        packed blocks run, raise a ConfigError saying which condition is not met."""
        reason = refusal(model, weight_dtype)
        if weight_dtype != torch.float32 and reason is not None:
            raise ConfigError(
                f"{_NAMES[weight_dtype]} weights run in imagegpt's native CPU decode kernel only, but "
                f"{reason}: use weight_dtype float32"
            )
        return cls(model, weight_dtype) if ops.available() else None

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype, zeroed=True) -> NativeKVCache:
        if dtype == torch.int8:
            return NativeInt8KVCache(self.model.config, batch_size, max_length, "cpu", zeroed)
        return NativeKVCache(self.model.config, batch_size, max_length, "cpu", dtype, zeroed)

    def takes(self, cache: KVCache) -> bool:
        """Whether step() runs the packed blocks over this cache (else the model's modules)."""
        return (
            self.packed is not None and cache.batch_size <= self.max_batch and cache.k[0].device.type == "cpu"
        )

    def step(self, model: ImageGPT, token: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """Feed token (B, 1) at `position`, attending over the cached positions; its logits (B, V)."""
        if not (self.takes(cache) and not model.training and not torch.is_autocast_enabled("cpu")):
            if self.weight_dtype != torch.float32:
                what = _NAMES[self.weight_dtype]
                raise ConfigError(f"{what} weights decode in the packed blocks only: CPU float32, eval mode, "
                                  f"batches of at most {self.max_batch}")  # fmt: skip
            x, _ = model.transformer(token, cache, position)
            return model.lm_head(x[:, -1])
        if not self._fresh():
            self.packed = pack_blocks(model, self.weight_dtype)  # the weights changed since packing
        transformer, packed = model.transformer, self.packed
        eps = transformer.h[0].ln_1.eps
        x = transformer.embed(token, position)  # (B, 1, C), a new tensor the blocks update in place
        scales = (cache.k_scale, cache.v_scale) if cache.quantized else ([], [])
        torch.ops.imagegpt.decode_blocks(
            x, packed.norms, packed.weights, packed.biases, packed.scales, cache.k, cache.v, *scales,
            self._scratch(x.size(0)), position, model.config.n_head, eps, packed.fc_width,
            transformer.ln_f.weight.detach(),
        )  # fmt: skip
        return model.lm_head(x[:, -1])  # x as ln_f leaves it

    def _fresh(self) -> bool:
        """Whether the blocks still hold the parameters packed, unchanged since (each in-place change counts
        a version)."""
        return all(held.get(name) is p and p._version == v for held, name, p, v in self.packed.sources)

    def _scratch(self, batch: int) -> torch.Tensor:
        size = ops.scratch_size(batch, self.model.config.n_embd, self.packed.fc_width)
        if self.scratch.numel() < size:
            self.scratch = torch.empty(size)
        return self.scratch
