"""The native CPU kernels of the decode step (imagegpt/_kernels.c): one-token attention over a KV cache, and
few-rows linear layers on packed weights.

A decode step's attention reads every cached key and value once, so on a CPU it is bound by memory traffic.
decode_attention streams a float32, bfloat16 or float16 cache once, widens it to float32 in registers and
computes in float32; PyTorch's SDPA reads a float32 cache more slowly and a half-precision one far more slowly
on CPUs without bfloat16 units. packed_linear multiplies a decode step's few rows by a weight packed once into
register-tile order. decode_block runs a whole block's decode step (norms, the four linear layers, the cache
write, attention, residuals) in one call, sparing the few hundred small PyTorch calls a step would make.
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
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, out_features: int, activation: str = "none"
) -> torch.Tensor:
    """act(x W^T + bias) for x (..., K) float32 with at most MAX_ROWS rows, W as pack_linear packed it and
    bias float32 padded to the packed columns (zeros for none)."""
    K = packed.size(1)
    rows = x.reshape(-1, K)
    if rows.stride(1) != 1 or rows.stride(0) < K:
        rows = rows.contiguous()
    M = rows.size(0)
    out = torch.empty(M, out_features)
    _kernels.packed_linear(
        rows.data_ptr(), rows.stride(0), M, K, packed.data_ptr(), out_features, bias.data_ptr(),
        ACTIVATIONS[activation], out.data_ptr(), out.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    return out.view(*x.shape[:-1], out_features)


# ---- a whole block for one new token per image ----


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
    linears: (packed, padded bias, out_features) for qkv (3C), proj (C), fc (silu applied; quick-GELU's
    scales folded in by the caller) and out (C), packed by pack_linear; k, v: the layer's whole cache (B, nh,
    L, hs) of one dtype among float32, bfloat16 and float16, rows contiguous, hs a multiple of 8; or int8 with
    `scales`, the keys' and values' float32 row scales (B, nh, L) (model.quantize_int8's quantization).

    Returns False, changing nothing, where the shapes or dtypes do not fit (the caller runs the modules)."""
    B, T, C = x.shape
    hs = C // n_head
    (qkv, qkv_b, qkv_n), (proj, proj_b, proj_n), (fc, fc_b, fc_n), (out, out_b, out_n) = linears
    if (
        T != 1
        or B > MAX_ROWS
        or C % n_head
        or hs % 8
        or (qkv_n, proj_n, out_n) != (3 * C, C, C)
        or (qkv.size(1), proj.size(1), fc.size(1), out.size(1)) != (C, C, C, fc_n)
        or any(w.size(0) != (n + 15) // 16 or b.numel() < 16 * w.size(0) for w, b, n in linears)
        or x.dtype != torch.float32
        or not x.is_contiguous()
        or (k.dtype not in CODES and k.dtype != torch.int8)
        or (k.dtype == torch.int8) != (scales is not None)
        or v.dtype != k.dtype
        or k.shape != (B, n_head, k.size(2), hs)
        or v.shape != k.shape
        or k.stride() != v.stride()
        or k.stride(3) != 1
        or not 0 <= position < k.size(2)
        or any(g.dtype != torch.float32 or g.shape != (C,) or g.stride(0) != 1 for g in norms)
        or k.device.type != "cpu"
    ):
        return False
    code, ks, vs, s_sb, s_sh = CODES.get(k.dtype, INT8), 0, 0, 0, 0
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
            return False
        ks, vs, s_sb, s_sh = k_scale.data_ptr(), v_scale.data_ptr(), k_scale.stride(0), k_scale.stride(1)
    scratch = torch.empty(B * (5 * C + fc_n))
    _kernels.decode_block(
        x.data_ptr(), B, C, n_head, norms[0].data_ptr(), norms[1].data_ptr(), eps,
        qkv.data_ptr(), qkv_b.data_ptr(), proj.data_ptr(), proj_b.data_ptr(), fc.data_ptr(), fc_b.data_ptr(),
        fc_n, out.data_ptr(), out_b.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
        k.stride(2), code, ks, vs, s_sb, s_sh, position, scratch.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return True
