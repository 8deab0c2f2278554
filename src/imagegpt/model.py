"""The ImageGPT transformer, readable top to bottom.

A GPT-2-style decoder over colour tokens in raster order, exactly as Chen et al. (2020) and the released
checkpoints: pre-norm blocks whose norm has no mean-centring and no bias, quick-GELU MLPs, causal attention
scaled by 1/sqrt(head_dim), learned position embeddings, an output head untied from the embeddings that never
predicts SOS, and SOS = vocab_size - 1.

Two levels of API:
- `forward(input_ids, labels=...)` keeps transformers' semantics: ids are used as given and the loss is the
  shifted next-token cross-entropy. This is what parity with transformers is checked on.
- `loss_per_image(ids)` and friends take image tokens [x0, ..., x_{n-1}] and feed [SOS, x0, ..., x_{n-2}], as
  the released models were trained, so every token of the image is predicted.

The same network is the paper's BERT model when `config.objective == "bert"`: attention is not causal, the
model reads the image tokens themselves (no SOS), `mask=` zeroes the token embeddings of masked positions, and
the loss is the cross-entropy at the masked positions (`bert_loss_per_image`; imagegpt.objectives draws the
masks).

Module and parameter names mirror transformers' (transformer.h.{i}.attn.c_attn, ...) so that checkpoint
conversion is a transpose of the linear weights and nothing else.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .config import ImageGPTConfig
from .device import cpu_has_bf16
from .errors import ArgumentError
from .kernels import quantize_int8
from .objectives import evaluation_masks


def sos_inputs(ids: torch.Tensor, sos_id: int) -> torch.Tensor:
    """[x0, ..., x_{n-1}] -> [SOS, x0, ..., x_{n-2}]: the input whose next-token targets are the image."""
    sos = torch.full_like(ids[:, :1], sos_id)
    return torch.cat([sos, ids[:, :-1]], dim=1)


def image_inputs(ids: torch.Tensor, config: ImageGPTConfig) -> torch.Tensor:
    """What the model reads for image tokens [x0, ..., x_{n-1}]: [SOS, x0, ..., x_{n-2}] for the next-pixel
    objective, the tokens themselves for BERT models (read with the masked positions' embeddings zeroed)."""
    return sos_inputs(ids, config.sos_id) if config.is_causal else ids


def bert_loss_per_image(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_BERT of each image (B,): the cross-entropy of its masked tokens (mask True), averaged over them as in
    the original code; 0 for an image without a masked position (the paper's sum over an empty M)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none").view(ids.shape)
    mask = mask.to(nll.dtype)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


# bfloat16 on CPUs without bfloat16 units. On such CPUs (AVX2 only, no AVX512-BF16/AMX) PyTorch's bfloat16
# matrix multiplies run on slow generic kernels, 5-50x slower than float32. Under CPU bfloat16 autocast there,
# the linear layers and attention round their operands to bfloat16 exactly as autocast does, multiply them
# with the float32 kernels (a product of two bfloat16 numbers is exact in float32, and bfloat16 kernels
# accumulate in float32 too) and round the result to bfloat16: autocast's numbers at float32's speed, with
# bfloat16 activations.


def _emulate_bf16(x: torch.Tensor) -> bool:
    """True under CPU bfloat16 autocast on a CPU without bfloat16 units."""
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not cpu_has_bf16()
    )


def _addmm(bias, a, b, alpha: float, beta: float, emulate: bool) -> torch.Tensor:
    """beta * bias + alpha * a @ b for 2-D a and b; emulated: bfloat16-rounded operands, float32 kernel."""
    if emulate:
        with torch.autocast("cpu", enabled=False):
            a, b = a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()
            bias = None if bias is None else bias.to(torch.bfloat16).float()
            return _addmm(bias, a, b, alpha, beta, False)
    if bias is None:
        out = torch.mm(a, b)
        return out.mul_(alpha) if alpha != 1.0 else out
    return torch.addmm(bias, a, b, beta=beta, alpha=alpha)


# At most this many rows go through `linear` as weight @ x.T on CPU (see there).
FEW_ROWS = 256


class _Linear(torch.autograd.Function):
    """beta * bias + alpha * act(x) @ weight.T, act = silu or identity, with a hand-written backward for the
    two cases that autograd serves poorly:

    - silu: x is saved instead of silu(x), and silu is recomputed in backward (one fused pass), which keeps
      the widest activation of every block out of memory during training;
    - emulate: bfloat16 autocast on a CPU without bfloat16 units (see above). The input is saved in bfloat16,
      as autocast would, the weight as the float32 parameter; gradients: the input's rounded to bfloat16, the
      weight's and bias's in float32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, beta, silu, emulate):
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.options = (alpha, beta, silu, emulate)
        if emulate:  # the weight stays float32 (the parameter itself, no copy); _addmm rounds it
            x = x.to(torch.bfloat16)
        ctx.save_for_backward(x, weight)
        a = F.silu(x) if silu else x
        out = _addmm(bias, a.reshape(-1, a.size(-1)), weight.t(), alpha, beta, emulate)  # (N, out)
        return (out.to(torch.bfloat16) if emulate else out).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        alpha, beta, silu, emulate = ctx.options
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        device, enabled, dtype = ctx.autocast
        grad_x = grad_weight = grad_bias = None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            a = F.silu(x) if silu else x
            g = grad.reshape(-1, grad.size(-1))  # (N, out)
            g_alpha = g * alpha if alpha != 1.0 else g
            if ctx.needs_input_grad[0]:
                grad_a = _addmm(None, g_alpha, weight, 1.0, 1.0, emulate).to(a.dtype).view(a.shape)
                grad_x = (torch.ops.aten.silu_backward(grad_a, x) if silu else grad_a).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = _addmm(None, g_alpha.t(), a.reshape(-1, a.size(-1)), 1.0, 1.0, emulate)
                grad_weight = grad_weight.to(weight_dtype)
            if bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = g.sum(0, dtype=torch.float32).mul_(beta).to(bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, alpha=1.0, beta=1.0, silu=False) -> torch.Tensor:
    """beta * bias + alpha * act(x) @ weight.T, act = silu if asked, else identity.

    The scales are free: BLAS applies them inside the multiply.
    """
    emulate = _emulate_bf16(x)
    if emulate or (silu and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _Linear.apply(x, weight, bias, alpha, beta, silu, emulate)
    if silu:
        x = F.silu(x)
    rows = x.reshape(-1, x.size(-1))
    if (
        rows.size(0) <= FEW_ROWS
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")  # measured for float32 BLAS only
    ):
        # Decode steps: weight @ x.T parallelises over the weight's rows, where x @ weight.T (a few rows)
        # leaves BLAS little to split. Per igpt-s block, 2 threads: 30% less time at 16 rows, 8% at 256.
        out = _addmm(None if bias is None else bias[:, None], weight, rows.t(), alpha, beta, False)
        return out.t().contiguous().view(*x.shape[:-1], -1)
    if alpha == 1.0 and beta == 1.0:
        return F.linear(x, weight, bias)
    return _addmm(bias, rows, weight.t(), alpha, beta, False).view(*x.shape[:-1], -1)


class PackedLinear:
    """A linear layer's weight packed once for few-rows CPU float32 inference (imagegpt.kernels).

    A decode step multiplies a few rows by every weight of the model, so its linear layers are bound by
    streaming the weights through the FMA units; the library GEMMs reach about a third of the FMA peak at 16
    rows here, the packed multiply about half (igpt-s, 16 rows, 2 threads: a step's linear layers in 26-37
    instead of 58-62 ms; docs/performance.md). The weight and bias are multiplied by their scales
    before packing, and `activation` ("silu") is applied in the multiply's epilogue: that is how the MLP
    gets quick-GELU in one call.

    dtype=torch.int8 quantizes the (scaled) weight per output column (kernels.pack_linear_int8), and each
    call quantizes its input rows (packed_weights uses such layers in the blocks' decode steps only).
    """

    def __init__(
        self,
        module: nn.Linear,
        weight_scale=1.0,
        bias_scale=1.0,
        activation: str = "none",
        dtype=torch.float32,
    ):
        self.out_features = module.out_features
        self.scales = None  # int8: the column scales
        if dtype == torch.int8:
            self.weight, self.scales = kernels.pack_linear_int8(module.weight, weight_scale)
        else:
            self.weight = kernels.pack_linear(module.weight, weight_scale)
        self.bias = torch.zeros(self.weight.size(0) * 16)  # padded to the packed columns
        if module.bias is not None:
            self.bias[: self.out_features] = module.bias.detach() * bias_scale
        self.activation = activation
        self.sources = [p for p in (module.weight, module.bias) if p is not None]
        self.versions = [p._version for p in self.sources]  # packed from these values

    def fresh(self) -> bool:
        """Whether the module's weight and bias are unchanged since packing."""
        return all(p._version == v for p, v in zip(self.sources, self.versions))

    def applies(self, x: torch.Tensor) -> bool:
        """Whether x can go through the packed weight: at most kernels.MAX_ROWS rows of CPU float32 without
        autograd or autocast, the module's weight and bias unchanged since packing, and the kernel on."""
        return _packed_inference(x) and self.fresh()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, n, scales = self.operands()
        return kernels.packed_linear(x, weight, bias, n, self.activation, scales)

    def operands(self) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        return self.weight, self.bias, self.out_features, self.scales


def _packed_inference(x: torch.Tensor) -> bool:
    """What every packed path needs of its input: at most kernels.MAX_ROWS rows of CPU float32, no autograd,
    no autocast, not under compile (compiled steps lay out their own weights), and the kernels on."""
    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() <= kernels.MAX_ROWS * x.size(-1)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and kernels.available()
    )


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) through `linear`, for bfloat16 autocast on any CPU."""

    packed: PackedLinear | None = None  # set by packed_weights() for the length of a block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.packed.applies(x):
            return self.packed(x)
        return linear(x, self.weight, self.bias)


class _RMSNorm(torch.autograd.Function):
    """x / sqrt(mean(x^2) + eps) * weight with a hand-written backward: it saves only x and 1/rms, and makes
    about half the memory passes of autograd through the composite (the CPU has no fused backward kernel)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        with torch.autocast(x.device.type, enabled=False):
            wide = x.float() if x.element_size() < 4 else x  # statistics in float32 at least
            rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
            ctx.save_for_backward(x, weight, rstd)
            return (x * rstd).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = grad * weight
            # d/dx (x * rstd) applied to g: rstd * (g - x_hat * mean(g * x_hat))
            dot = (g * x_hat).mean(-1, keepdim=True)
            grad_x = torch.addcmul(g, x_hat, dot, value=-1.0).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


class Norm(nn.Module):
    """ImageGPT's layer norm: x / sqrt(mean(x^2) + eps) * weight. No mean-centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)  # a fused kernel without backward


# Without autograd, the MLP runs over chunks of rows whose 4x-wide intermediate holds at most this many
# elements (8 MiB in float32): inference memory stays near the model's size, and pieces stay in the caches.
MLP_CHUNK_ELEMENTS = 2**21


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0, causal: bool = True
) -> torch.Tensor:
    """Attention of T queries over the last T of S keys, each query seeing the keys up to its own position.

    q is (B, nh, T, hs); k and v are (B, nh, S, hs) with S >= T (S > T when a KV cache holds earlier
    positions). SDPA's fused kernels never materialise the T x S matrix and scale by 1/sqrt(hs).
    causal=False (BERT models): every query sees every key; there is no KV cache then (S == T).
    """
    T, S = q.size(-2), k.size(-2)
    if T == 1 and dropout == 0.0 and q.device.type == "cpu" and causal:
        y = _native_decode_attention(q, k, v)
        if y is not None:
            return y
    if _emulate_bf16(q):  # bfloat16 operands, float32 kernels (see _Linear)
        with torch.autocast("cpu", enabled=False):
            q, k, v = (t.to(torch.bfloat16).float() for t in (q, k, v))
            return causal_attention(q, k, v, dropout, causal).to(torch.bfloat16)
    if k.dtype != q.dtype:  # a cache kept in another precision than the compute: read it in q's
        k, v = k.to(q.dtype), v.to(q.dtype)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
    if T == 1:  # one new token sees every cached position
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def _native_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """One query over a cache through imagegpt.kernels (CPU, float32 compute), or None where it does not
    apply. Under emulated bfloat16 autocast it gets what autocast would: q rounded to bfloat16, a bfloat16
    cache, the result rounded to bfloat16."""
    if torch.compiler.is_compiling():  # the kernel works on raw pointers, which dynamo cannot trace
        return None
    emulate = _emulate_bf16(q)
    if emulate and k.dtype != torch.bfloat16:
        return None
    query = q.to(torch.bfloat16).float() if emulate else q.float()
    y = kernels.decode_attention(query, k, v)
    if y is None:
        return None
    return y.to(torch.bfloat16) if emulate else y.to(q.dtype)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]


def cache_position_bytes(config: ImageGPTConfig, dtype: torch.dtype) -> int:
    """Bytes of a KVCache for one image at one position, over all layers (int8: with its scales)."""
    per_layer = config.n_embd * torch.empty((), dtype=dtype).element_size()
    if dtype == torch.int8:  # and a float32 scale per head
        per_layer += 4 * config.n_head
    return 2 * config.n_layer * per_layer


class KVCache:
    """Preallocated keys and values, one (B, nh, max_length, hs) tensor of each per layer.

    Memory is 2 x n_layer x B x max_length x n_embd elements, allocated once; `update` writes new positions in
    place and returns views over the positions filled so far. One tensor per layer (not one for all layers)
    lets torch.compile update a layer's cache in place: a write into a view of a larger graph input would be
    compiled into a copy of the whole cache at every step.

    dtype=torch.int8 stores each cached row of hs as int8 with a float32 scale (quantize_int8; k_scale and
    v_scale, (B, nh, max_length) per layer): a quarter of float32's memory. The native decode block reads it
    as it is; everything else gets float32 keys and values dequantized from it.
    """

    def __init__(
        self,
        config: ImageGPTConfig,
        batch_size: int,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        zeroed: bool = True,
    ):
        # zeroed=False leaves the memory uninitialised: fine for `update`, which only ever returns positions
        # written, and it spares touching gigabytes up front (`write` needs finite values everywhere).
        max_length = config.n_positions if max_length is None else max_length
        shape = (batch_size, config.n_head, max_length, config.head_dim)
        new = torch.zeros if zeroed else torch.empty
        self.k = [new(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [new(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.quantized = dtype == torch.int8
        if self.quantized:
            self.k_scale = [torch.ones(shape[:3], device=device) for _ in range(config.n_layer)]
            self.v_scale = [torch.ones(shape[:3], device=device) for _ in range(config.n_layer)]

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_length(self) -> int:
        return self.k[0].size(2)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.size(2)
        self._put(layer, slice(start, end), k, v)
        return self._read(layer, slice(0, end))

    def _put(self, layer: int, at, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.quantized:
            (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
            self.k[layer][:, :, at], self.k_scale[layer][:, :, at] = qk, sk
            self.v[layer][:, :, at], self.v_scale[layer][:, :, at] = qv, sv
        else:
            self.k[layer][:, :, at] = k.to(self.k[layer].dtype)
            self.v[layer][:, :, at] = v.to(self.v[layer].dtype)

    def _read(self, layer: int, at: slice):
        k, v = self.k[layer][:, :, at], self.v[layer][:, :, at]
        if self.quantized:
            k = dequantize_int8(k, self.k_scale[layer][:, :, at])
            v = dequantize_int8(v, self.v_scale[layer][:, :, at])
        return k, v

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Static-shape update for CUDA graphs: write k, v (B, nh, T, hs) at `positions` (a (T,) tensor on the
        cache's device) and return the layer's whole cache, (B, nh, max_length, hs); the caller masks the
        positions not yet written, which must hold finite values (a zeroed cache)."""
        self._put(layer, positions, k, v)
        return self._read(layer, slice(None))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.attn_pdrop = config.attn_pdrop
        self.is_causal = config.is_causal  # False for BERT models: "no attention logit masking is required"
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, start, k, v)  # (B, nh, start + T, hs)
        y = causal_attention(q, k, v, self.attn_pdrop if self.training else 0.0, self.is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    # set by packed_weights(): c_fc with quick-GELU's scales and silu fused, and c_proj; kept here, not on the
    # Linear modules, so that c_fc called on its own still computes c_fc
    packed: tuple[PackedLinear, PackedLinear] | None = None

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.inner_dim)
        self.c_proj = Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # c_proj(quick_gelu(c_fc(x))) with quick_gelu(z) = z * sigmoid(1.702 z) = silu(1.702 z) / 1.702: the
        # two scales ride on the matrix multiplies (BLAS alpha and beta), so the activation is one fused silu
        # kernel forward and backward instead of three passes over the widest tensor.
        if torch.is_grad_enabled():
            h = linear(x, self.c_fc.weight, self.c_fc.bias, alpha=1.702, beta=1.702)  # (B, T, inner)
            # silu(h) is recomputed in backward, not kept
            return self.dropout(linear(h, self.c_proj.weight, self.c_proj.bias, alpha=1 / 1.702, silu=True))
        # Without autograd, rows go through in chunks, so the 4x-wide intermediate never exists whole.
        rows = x.reshape(-1, x.size(-1))
        chunk = max(256, MLP_CHUNK_ELEMENTS // self.c_fc.weight.size(0))
        if rows.size(0) <= chunk:
            return self.dropout(self._inference(rows).view(*x.shape[:-1], -1))
        first = self._inference(rows[:chunk])  # its dtype is autocast's
        out = first.new_empty(rows.size(0), first.size(-1))
        out[:chunk] = first
        for i in range(chunk, rows.size(0), chunk):
            out[i : i + chunk] = self._inference(rows[i : i + chunk])
        return self.dropout(out.view(*x.shape[:-1], -1))

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and all(p.applies(x) for p in self.packed):
            up, down = self.packed
            return down(up(x))  # silu(1.702 z) fused into up; down's weight carries the 1 / 1.702
        h = linear(x, self.c_fc.weight, self.c_fc.bias, alpha=1.702, beta=1.702)
        return linear(F.silu(h, inplace=True), self.c_proj.weight, self.c_proj.bias, alpha=1 / 1.702)


class PackedBlock:
    """A Block's decode step (one new token per image over a KV cache) in one native call,
    kernels.decode_block, on the packed weights of its four linear layers: a decode step of igpt-s is
    otherwise some 400 small kernels launched from Python, ~10 ms of its 50-150. Set by packed_weights() on
    every Block, on the PackedLinears of its linear layers and MLP, or on int8 ones of its own
    (int8_linears)."""

    def __init__(self, block: Block, linears: tuple[PackedLinear, ...] | None = None):
        self.block = block
        attn, mlp = block.attn, block.mlp
        self.linears = linears or (attn.c_attn.packed, attn.c_proj.packed, *mlp.packed)

    def applies(self, x: torch.Tensor) -> bool:
        """Whether x (B, 1, C) can take the native call: eval mode (dropout), no autograd or autocast, every
        packed layer's weights unchanged since packing."""
        return _packed_inference(x) and self.usable()

    def usable(self) -> bool:
        """applies() but for the input: eval mode and every packed layer's weights unchanged."""
        block = self.block
        return (
            not block.training
            and block.ln_1.eps == block.ln_2.eps
            and all(linear.fresh() for linear in self.linears)
        )

    def operands(self, kv_cache: KVCache) -> tuple:
        """(norms, linears, k, v, scales) for kernels.decode_block / decode_plan over kv_cache."""
        block = self.block
        layer = block.attn.layer_idx
        scales = (kv_cache.k_scale[layer], kv_cache.v_scale[layer]) if kv_cache.quantized else None
        norms = (block.ln_1.weight, block.ln_2.weight)
        linears = tuple(linear.operands() for linear in self.linears)
        return norms, linears, kv_cache.k[layer], kv_cache.v[layer], scales

    def __call__(self, x: torch.Tensor, kv_cache: KVCache, start: int) -> bool:
        """Run the block in place on x (B, 1, C), where applies(x); False, with nothing changed, where the
        kernel does not take the cache's or the weights' layout."""
        norms, linears, k, v, scales = self.operands(kv_cache)
        block = self.block
        return kernels.decode_block(x, norms, block.ln_1.eps, linears, k, v, start, block.attn.n_head, scales)


class PackedStack:
    """Every block's decode step in one native call (kernels.DecodePlan), set by packed_weights() on the
    Transformer beside the PackedBlocks: one call and one parallel region per step instead of one per block
    (the blocks' Python alone was 3-6 ms of a 24 ms igpt-s step at batch 16). The plan is made once per
    cache; `plans` holds the caches weakly, so a plan goes with its cache, and all of them with the stack
    when packed_weights() ends."""

    def __init__(self, blocks: list[PackedBlock]):
        self.blocks = blocks
        self.plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVCache -> DecodePlan | None

    def __call__(self, x: torch.Tensor, kv_cache: KVCache, start: int) -> bool:
        """Run every block in place on x (B, 1, C); False, with nothing changed, where some block cannot take
        the native call (the caller runs the blocks one by one)."""
        if not (_packed_inference(x) and all(packed.usable() for packed in self.blocks)):
            return False
        plan = self.plans.get(kv_cache, False)
        if plan is False:  # not made yet for this cache; None: the kernel does not take it
            plan = self.plans[kv_cache] = self._plan(x.size(0), kv_cache)
        return plan is not None and plan(x, start)

    def _plan(self, batch: int, kv_cache: KVCache) -> kernels.DecodePlan | None:
        blocks = [packed.block for packed in self.blocks]
        if len({(b.ln_1.eps, b.attn.n_head) for b in blocks}) != 1:  # decode_plan takes one of each
            return None
        layers = [packed.operands(kv_cache) for packed in self.blocks]
        return kernels.decode_plan(batch, layers, blocks[0].ln_1.eps, blocks[0].attn.n_head)


class Block(nn.Module):
    packed: PackedBlock | None = None  # set by packed_weights() for the length of a block

    def __init__(self, config: ImageGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = Norm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, start: int = 0, inplace: bool = False
    ) -> torch.Tensor:
        """inplace=True adds the residuals into x itself (inference, when nobody else holds x)."""
        if self.packed is not None and kv_cache is not None and x.size(1) == 1 and self.packed.applies(x):
            out = x if inplace else x.clone()
            if self.packed(out, kv_cache, start):
                return out
        if inplace:
            x += self.attn(self.ln_1(x), kv_cache, start)
            x += self.mlp(self.ln_2(x))
            return x
        x = x + self.attn(self.ln_1(x), kv_cache, start)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Embeddings, blocks and the final norm: everything but the head."""

    packed: PackedStack | None = None  # set by packed_weights() for the length of a block

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        # Left uninitialised here (init_weights draws them): nn.Embedding's own normal_ init costs seconds of
        # one-time imports on the meta device, where checkpoint loading builds the model.
        self.wte = nn.Embedding(
            config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd)
        )
        self.wpe = nn.Embedding(
            config.n_positions, config.n_embd, _weight=torch.empty(config.n_positions, config.n_embd)
        )
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = Norm(config.n_embd, config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_cache: KVCache | None = None,
        start: int = 0,
        output_hidden_states: bool = False,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns the final normed hidden state (B, T, C) and, if asked, n_layer + 1 hidden states.

        As in transformers, hidden_states[i] is the input of block i for i < n_layer, and the last entry is
        the output of the final norm. mask (B, T) bool, True where masked (BERT models): those positions'
        token embeddings are zeroed; their position embeddings are still added, as in the original code.
        """
        B, T = input_ids.shape
        if start + T > self.wpe.num_embeddings:
            raise ValueError(
                f"sequence of {start + T} positions exceeds the model's n_positions={self.wpe.num_embeddings}"
            )
        positions = torch.arange(start, start + T, device=input_ids.device)
        tokens = self.wte(input_ids)  # (B, T, C)
        if mask is not None:
            tokens = tokens.masked_fill(mask.unsqueeze(-1), 0.0)
        x = self.drop(tokens + self.wpe(positions))  # (B, T, C)
        hidden_states = [] if output_hidden_states else None
        # Without autograd and with no hidden state handed out, the blocks update x in place: one fewer
        # (B, T, C) buffer alive and allocated per block.
        inplace = hidden_states is None and not torch.is_grad_enabled()
        stack = self.packed if kv_cache is not None and T == 1 and inplace else None
        if stack is not None and stack(x, kv_cache, start):  # every block's decode step in one native call
            return self.ln_f(x), None
        for block in self.h:
            if hidden_states is not None:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache, start, inplace)
        x = self.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)
            return x, tuple(hidden_states)
        return x, None


# Packed weights are a second copy of the linear layers; models with more than this many bytes of them
# (igpt-s has 0.3 GB, igpt-m 1.8 GB) sample with the plain weights rather than double their memory.
PACK_BUDGET_BYTES = 2 * 1024**3


def can_pack(model: nn.Module, weight_dtype=torch.float32) -> bool:
    """Whether packed_weights() would pack: the native kernels run here, every linear weight is a CPU
    float32 one, and together they fit PACK_BUDGET_BYTES in `weight_dtype` (float32 or int8)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    size = torch.empty((), dtype=weight_dtype).element_size()
    return (
        kernels.available()
        and bool(linears)
        and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linears)
        and sum(m.weight.numel() * size for m in linears) <= PACK_BUDGET_BYTES
    )


def mlp_linears(mlp: MLP, dtype=torch.float32) -> tuple[PackedLinear, PackedLinear]:
    """The MLP as two PackedLinears: c_proj(quick_gelu(z)) = (W / 1.702) silu(1.702 z) + b."""
    up = PackedLinear(mlp.c_fc, 1.702, 1.702, activation="silu", dtype=dtype)
    return up, PackedLinear(mlp.c_proj, weight_scale=1 / 1.702, dtype=dtype)


def int8_linears(block: Block) -> tuple[PackedLinear, ...]:
    """The block's four linear layers as int8 PackedLinears (quick-GELU's scales folded into the MLP's)."""
    attn = block.attn
    return (
        PackedLinear(attn.c_attn, dtype=torch.int8),
        PackedLinear(attn.c_proj, dtype=torch.int8),
        *mlp_linears(block.mlp, torch.int8),
    )


@contextlib.contextmanager
def packed_weights(model: nn.Module, weight_dtype=torch.float32):
    """Within the block, the model's linear layers run few-rows CPU float32 inference (decode steps) on
    packed weights (PackedLinear), and each Block's decode step over a KV cache is one native call
    (PackedBlock); everything else takes the plain weights. A no-op where can_pack() is False; a layer whose
    weight or bias changes inside the block goes back to its plain weights.

    weight_dtype=torch.int8: only the blocks' decode steps are packed, on int8 weights (one scale per output
    column) with each layer's input rows quantized on the fly (int8 x int8 products summed in int32);
    everything else, a prefill included, runs the plain float32 weights."""
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    in_mlps = {id(linear) for mlp in mlps for linear in (mlp.c_fc, mlp.c_proj)}
    linears = [m for m in model.modules() if isinstance(m, Linear) and id(m) not in in_mlps]
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    holders = mlps + linears + blocks
    if weight_dtype not in (torch.float32, torch.int8):
        raise ValueError(f"weight_dtype must be torch.float32 or torch.int8, got {weight_dtype}")
    if not can_pack(model, weight_dtype) or any(m.packed is not None for m in holders):  # or packed already
        yield
        return
    if weight_dtype == torch.int8:
        holders = blocks
        for block in blocks:
            block.packed = PackedBlock(block, int8_linears(block))
    else:
        for mlp in mlps:
            mlp.packed = mlp_linears(mlp)
        for module in linears:
            module.packed = PackedLinear(module)
        for block in blocks:  # decode steps: each block in one native call, on the PackedLinears above
            block.packed = PackedBlock(block)
    stacks = [m for m in model.modules() if isinstance(m, Transformer)]
    for stack in stacks:  # and all of a transformer's blocks in one call
        stack.packed = PackedStack([block.packed for block in stack.h])
    holders = holders + stacks
    try:
        yield
    finally:
        for module in holders:
            del module.packed  # back to the class default, None


@dataclass
class ImageGPTOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def init_weights(model: nn.Module, config: ImageGPTConfig) -> None:
    """The original code's initialisation, which the paper reports matters for stable training."""
    if any(p.is_meta for p in model.parameters()):
        return  # built on the meta device to receive a checkpoint's weights: nothing to draw
    width_std = 1.0 / math.sqrt(config.n_embd)
    for name, p in model.named_parameters():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            nn.init.ones_(p)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        elif name.endswith("wpe.weight"):
            nn.init.normal_(p, std=0.01)
        elif name.endswith("wte.weight") or ".mlp." in name:
            nn.init.normal_(p, std=0.02)
        elif name.endswith("attn.c_attn.weight"):
            nn.init.normal_(p, std=width_std)
        elif name.endswith("attn.c_proj.weight"):
            nn.init.normal_(p, std=1.0 / math.sqrt(config.n_embd * config.n_layer))
        elif name in ("lm_head.weight", "score.weight"):
            nn.init.zeros_(p)
        else:  # pragma: no cover - a new parameter must be given its initialisation here
            raise AssertionError(f"no initialisation rule for parameter {name}")


class _Pretrained(nn.Module):
    """Loading and saving transformers-format directories (see imagegpt.checkpoint)."""

    config: ImageGPTConfig

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load from a transformers ImageGPT directory, or a hub id when online."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a directory that transformers' ImageGPT classes load with no missing or unexpected keys."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ImageGPT(_Pretrained):
    """The backbone plus the next-token head (transformers' ImageGPTForCausalImageModeling)."""

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        # vocab_size - 1 outputs: SOS is never predicted. Untied from wte.
        self.lm_head = Linear(config.n_embd, config.n_clusters, bias=False)
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        kv_cache: KVCache | None = None,
        start: int = 0,
        mask: torch.Tensor | None = None,
    ) -> ImageGPTOutput:
        """transformers' semantics: ids used as given; loss = CE(logits[:, :-1], labels[:, 1:]).

        BERT models: mask (B, T) bool, True where masked, zeroes those positions' token embeddings, and the
        loss is L_BERT of labels at the masked positions (bert_loss_per_image, averaged over the batch).
        """
        x, hidden_states = self.transformer(input_ids, kv_cache, start, output_hidden_states, mask)
        logits = self.lm_head(x)  # (B, T, n_clusters)
        loss = None
        if labels is not None and self.config.is_causal:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        elif labels is not None:
            if mask is None:
                raise ArgumentError("a BERT model's loss is over its masked positions: pass mask= as well")
            loss = bert_loss_per_image(logits, labels, mask).mean()
        return ImageGPTOutput(logits=logits, loss=loss, hidden_states=hidden_states)

    def loss_per_image(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss in nats of each image (B,) under the model's objective.

        Next-pixel: every token of ids predicted from [SOS, ...]. BERT: the tokens at `mask` (B, T), True
        where masked, predicted from the others; by default the fixed evaluation masks of images 0..B-1
        (imagegpt.objectives.evaluation_masks), so that repeated calls agree.
        """
        if not self.config.is_causal:
            if mask is None:
                mask = evaluation_masks(self.config, range(len(ids))).to(ids.device)
            return bert_loss_per_image(self(ids, mask=mask).logits, ids, mask)
        logits = self(sos_inputs(ids, self.config.sos_id)).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none")
        return nll.view(ids.shape).mean(dim=1)

    def image_loss(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective's loss in nats for the batch: next-pixel, the mean over all tokens, SOS
        handled; BERT, the mean over images of loss_per_image(ids, mask)."""
        if not self.config.is_causal:
            return self.loss_per_image(ids, mask).mean()
        logits = self(sos_inputs(ids, self.config.sos_id)).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class ImageGPTClassifier(_Pretrained):
    """The backbone plus a linear `score` head on the position-averaged final normed hidden state.

    Matches transformers' ImageGPTForImageClassification, whose input ids are used as given: to read images as
    the released models were trained, feed `sos_inputs(ids, sos_id)` (imagegpt's fine-tuning does).
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.score = Linear(config.n_embd, config.num_labels, bias=False)
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        mask: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """mask: BERT models' masked positions (see ImageGPT.forward)."""
        x, hidden_states = self.transformer(input_ids, output_hidden_states=output_hidden_states, mask=mask)
        logits = self.score(x.mean(dim=1))  # (B, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits=logits, loss=loss, hidden_states=hidden_states)
