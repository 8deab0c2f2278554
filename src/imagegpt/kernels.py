"""The native CPU kernels of the decode step (imagegpt/_kernels.c): one-token attention over a KV cache, and
few-rows linear layers on packed weights.

A decode step's attention reads every cached key and value once, so on a CPU it is bound by memory traffic.
decode_attention streams a float32, bfloat16 or float16 cache once, widens it to float32 in registers and
computes in float32; PyTorch's SDPA reads a float32 cache more slowly and a half-precision one far more slowly
on CPUs without bfloat16 units. packed_linear multiplies a decode step's few rows by a weight packed once into
register-tile order. decode_block runs a whole block's decode step (norms, the four linear layers, the cache
write, attention, residuals) in one call, sparing the few hundred small PyTorch calls a step would make;
decode_plan lays out a stack of blocks once, so that a whole step's blocks are one call.
docs/performance.md has the numbers.

The extension is optional (setup.py): where it is not built, or the CPU lacks AVX2/FMA/F16C, or
IMAGEGPT_NATIVE_KERNELS=0 is set, `available()` is False, `decode_attention` returns None and the model uses
SDPA and the library GEMM.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    from . import _kernels
except ImportError:  # not built here: SDPA it is
    _kernels = None

CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INT8 = 3  # decode_block's code for an int8 cache with per-row scales


@functools.cache
def _supported() -> bool:
    return _kernels is not None and _kernels.supported()


def available() -> bool:
    """Whether the kernels run here: the extension is built, the CPU can run it, and it is not
    switched off with IMAGEGPT_NATIVE_KERNELS=0 (read at every call, so tests and users can switch)."""
    return os.environ.get("IMAGEGPT_NATIVE_KERNELS", "1") != "0" and _supported()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """softmax(q K^T / sqrt(hs)) V for one query per image and head, or None where the kernel does not apply.

    q: (B, nh, 1, hs) float32; k, v: (B, nh, S, hs) of one dtype among float32, bfloat16 and float16, such
    as views of a preallocated cache (rows of hs contiguous, heads and images uniformly strided). All on the
    CPU, hs a multiple of 8, no autograd. The result is float32, (B, nh, 1, hs), laid out as (B, 1, nh, hs)
    so that merging the heads is free.
    """
    if not available() or torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    B, nh, T, hs = q.shape
    S = k.size(2)
    if (
        T != 1
        or S < 1
        or hs % 8
        or q.dtype != torch.float32
        or k.dtype != v.dtype
        or k.dtype not in CODES
        or k.shape != (B, nh, S, hs)
        or v.shape != k.shape
        or k.stride() != v.stride()
        or not all(t.device.type == "cpu" for t in (q, k, v))
        or q.stride(3) != 1
        or k.stride(3) != 1
        or k.stride(2) < hs
    ):
        return None
    out = torch.empty(B, 1, nh, hs)
    _kernels.decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1),
        k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        out.data_ptr(), out.stride(0), out.stride(2),
        B, nh, hs, S, CODES[k.dtype], hs**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    return out.transpose(1, 2)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (..., n) as int8 and a float32 scale per row: round(x / scale) with scale = max |x| / 127 (1
    for a row of zeros), to nearest even; x ~= q * scale to within scale / 2. The int8 KV cache's rows,
    quantized exactly as _kernels.c quantizes them."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


# ---- few-rows linear layers on packed weights ----

# The packed multiply serves at most this many rows (a decode step's batch); more go to the library GEMM,
# which blocks its work for large matrices.
MAX_ROWS = 64
ACTIVATIONS = {"none": 0, "silu": 1}


def pack_linear(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """weight (N, K) float32 times `scale`, packed into column blocks of 16: (ceil(N / 16), K, 16), the
    columns past N zero."""
    N, K = weight.shape
    weight = weight.detach()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    packed = torch.empty((N + 15) // 16, K, 16)
    _kernels.pack_linear(weight.data_ptr(), N, K, weight.stride(0), float(scale), packed.data_ptr())
    return packed


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    out_features: int,
    activation: str = "none",
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x W^T + bias) for x (..., K) float32 with at most MAX_ROWS rows, W as pack_linear packed it and
    bias float32 padded to the packed columns (zeros for none). With `scales`, W is pack_linear_int8's
    (these its column scales) and x's rows are quantized as quantize_int8 does: out = sx sw (qx . qw) + bias,
    the int8 products summed exactly in int32."""
    K = in_features(packed)
    rows = x.reshape(-1, K)
    if rows.stride(1) != 1 or rows.stride(0) < K:
        rows = rows.contiguous()
    M = rows.size(0)
    out = torch.empty(M, out_features)
    _kernels.packed_linear(
        rows.data_ptr(), rows.stride(0), M, K, packed.data_ptr(), out_features, bias.data_ptr(),
        ACTIVATIONS[activation], out.data_ptr(), out.stride(0), 0 if scales is None else scales.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out.view(*x.shape[:-1], out_features)


def pack_linear_int8(weight: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float32 times `scale`, each row (an output column) quantized to int8 with its own scale
    (quantize_int8's rounding), packed for decode_block's int8 layers: column blocks of 16, each
    [K / 4][16][4] bytes, (ceil(N / 16), K / 4, 16, 4); and the column scales (16 ceil(N / 16),) float32.
    Padding columns are zeros with scale 0. K must be a multiple of 8. Natively where the kernels run (one
    pass: igpt-s's 96 layers in ~0.12 s, 0.3-0.7 s in PyTorch), else in PyTorch: the same numbers."""
    N, K = weight.shape
    if K % 8:
        raise ValueError(f"int8 packing needs in_features a multiple of 8, got {K}")
    if not available():
        return _pack_linear_int8_torch(weight, scale)
    blocks = (N + 15) // 16
    weight = weight.detach().float()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    packed = torch.empty(blocks, K // 4, 16, 4, dtype=torch.int8)
    scales = torch.empty(blocks * 16)
    _kernels.pack_linear_int8(
        weight.data_ptr(), N, K, weight.stride(0), float(scale), packed.data_ptr(), scales.data_ptr()
    )
    return packed, scales


def _pack_linear_int8_torch(weight: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = weight.shape
    q, scales = quantize_int8(weight.detach().float() * scale)
    blocks = (N + 15) // 16
    padded = torch.zeros(blocks * 16, K, dtype=torch.int8)
    padded[:N] = q
    padded_scales = torch.zeros(blocks * 16)
    padded_scales[:N] = scales
    return padded.view(blocks, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous(), padded_scales


def in_features(packed: torch.Tensor) -> int:
    """K of a weight packed by pack_linear (blocks, K, 16) or pack_linear_int8 (blocks, K / 4, 16, 4)."""
    return packed.size(1) * (4 if packed.dtype == torch.int8 else 1)


# ---- whole blocks for one new token per image ----


def decode_block(
    x: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    linears: tuple,
    k: torch.Tensor,
    v: torch.Tensor,
    position: int,
    n_head: int,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> bool:
    """One pre-norm transformer block for one new token per image, in place on x, in one native call:

        x += proj(attention(qkv(norm1(x))));  x += out(silu(fc(norm2(x))))

    with the new key and value written into the cache (k, v) at `position` and attention over positions
    [0, position]. x: (B, 1, C) float32, contiguous, B <= MAX_ROWS; norms: the two norms' (C,) weights;
    linears: (packed, padded bias, out_features, column scales) for qkv (3C), proj (C), fc (silu applied;
    quick-GELU's scales folded in by the caller) and out (C), all packed by pack_linear (scales None) or all
    by pack_linear_int8 (then each layer's input rows are quantized as quantize_int8 does, the products
    summed exactly in int32, and scaled back by the row's and the column's scales); k, v: the layer's whole
    cache (B, nh, L, hs) of one dtype among float32, bfloat16 and float16, rows contiguous, hs a multiple of
    8; or int8 with `scales`, the keys' and values' float32 row scales (B, nh, L) (quantize_int8's
    quantization).

    Returns False, changing nothing, where the shapes or dtypes do not fit (the caller runs the modules)."""
    plan = decode_plan(x.size(0), [(norms, linears, k, v, scales)], eps, n_head)
    return plan is not None and plan(x, position)


# a layer's entries in decode_blocks' pointer table: the two norms, (weight, bias, scales) of the four linear
# layers, the keys, the values and their scales
TABLE_WIDTH = 18


class DecodePlan:
    """A stack of blocks' decode step (decode_block's, block after block) over one KV cache, checked and laid
    out once by decode_plan: each call runs every block for one new token per image in one native call and
    one parallel region. It holds the operands' tensors; a plan's scratch serves one call at a time."""

    def __init__(self, batch, width, n_head, eps, n_fc, int8, code, strides, length, table, keep):
        self.batch, self.width, self.length = batch, width, length
        self.layers, self.int8 = len(table) // TABLE_WIDTH, int8
        self._args = (batch, width, n_head, eps, n_fc, int(int8), len(table) // TABLE_WIDTH, code, *strides)
        self._table = torch.tensor(table, dtype=torch.int64)  # pointers, as int64
        self._keep = keep  # the tensors behind the pointers
        self._scratch = torch.empty(batch * (5 * width + n_fc))
        rows = batch * (2 * max(width, n_fc) + 4)
        self._rows = torch.empty(rows, dtype=torch.int8) if int8 else None

    def __call__(self, x: torch.Tensor, position: int) -> bool:
        """Run the blocks in place on x (B, 1, C) float32 contiguous at `position`; False, with nothing
        changed, where x or the position does not fit the plan."""
        if (
            x.shape != (self.batch, 1, self.width)
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or not x.is_contiguous()
            or not 0 <= position < self.length
        ):
            return False
        _kernels.decode_blocks(
            x.data_ptr(), *self._args, self._table.data_ptr(), position, self._scratch.data_ptr(),
            0 if self._rows is None else self._rows.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return True


def decode_plan(batch: int, layers: list, eps: float, n_head: int) -> DecodePlan | None:
    """The DecodePlan of blocks given as (norms, linears, k, v, scales), each as decode_block takes them, for
    `batch` images; None where any layer does not fit the kernel or they differ in shapes, dtypes or cache
    layout."""
    if not layers:
        return None
    fits = [_layer_fits(batch, n_head, *layer) for layer in layers]
    if any(f is None for f in fits) or len(set(fits)) != 1:
        return None
    C, n_fc, int8, code, strides, length = fits[0]
    table, keep = [], []
    for norms, linears, k, v, scales in layers:
        tensors = [*norms, *(t for w, b, _, s in linears for t in (w, b, s)), k, v, *(scales or (None, None))]
        table += [0 if t is None else t.data_ptr() for t in tensors]
        keep.append(tensors)
    return DecodePlan(batch, C, n_head, eps, n_fc, int8, code, strides, length, table, keep)


def _layer_fits(B: int, n_head: int, norms, linears, k, v, scales):
    """(C, fc width, int8 weights, cache code, cache and scale strides, cache length) of one layer's
    operands where the kernel takes them, else None."""
    (qkv, _, qkv_n, _), (_, _, proj_n, _), (_, _, fc_n, _), (_, _, out_n, _) = linears
    C = proj_n
    hs = C // n_head
    int8 = qkv.dtype == torch.int8
    if (
        B < 1
        or B > MAX_ROWS
        or C % n_head
        or hs % 8
        or (qkv_n, out_n) != (3 * C, C)
        or tuple(in_features(w) for w, *_ in linears) != (C, C, C, fc_n)
        or any(w.size(0) != (n + 15) // 16 or b.numel() < 16 * w.size(0) for w, b, n, _ in linears)
        or any((w.dtype == torch.int8) != int8 or (s is not None) != int8 for w, _, _, s in linears)
        or any(s is not None and s.numel() < 16 * w.size(0) for w, _, _, s in linears)
        or (int8 and fc_n % 8)
        or (k.dtype not in CODES and k.dtype != torch.int8)
        or (k.dtype == torch.int8) != (scales is not None)
        or v.dtype != k.dtype
        or k.shape != (B, n_head, k.size(2), hs)
        or v.shape != k.shape
        or k.stride() != v.stride()
        or k.stride(3) != 1
        or k.size(2) < 1
        or any(g.dtype != torch.float32 or g.shape != (C,) or g.stride(0) != 1 for g in norms)
        or k.device.type != "cpu"
    ):
        return None
    scale_strides = (0, 0)
    if scales is not None:
        k_scale, v_scale = scales
        if (
            k_scale.dtype != torch.float32
            or v_scale.dtype != torch.float32
            or k_scale.shape != k.shape[:3]
            or v_scale.shape != k_scale.shape
            or k_scale.stride() != v_scale.stride()
            or k_scale.stride(2) != 1
        ):
            return None
        scale_strides = (k_scale.stride(0), k_scale.stride(1))
    code = CODES.get(k.dtype, INT8)
    return C, fc_n, int8, code, (*k.stride()[:3], *scale_strides), k.size(2)
