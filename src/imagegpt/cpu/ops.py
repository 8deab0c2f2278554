"""The native decode kernels (imagegpt/cpu/_kernels.c) as PyTorch operators: torch.ops.imagegpt.*.

Each operator checks every tensor it is given (dtype, shape, strides, device) and raises ValueError naming
what does not fit, so a wrong argument is an error, never a crash; only then are the tensors' addresses handed
to the C code. Each has a fake implementation, so torch.compile traces around it as one opaque call.

    decode_attention(q, k, v, k_scale, v_scale)  one query per image and head over a KV cache
    pack_linear(weight, scale)                   a weight in the few-rows multiply's layout (float32; as
                                                 bfloat16, .to(torch.bfloat16) of it)
    pack_linear_int8(weight, scale)              the same, quantized per output column
    packed_linear(x, packed, bias, out_features, activation, scales)   act(x W^T + b) for a few rows
    decode_blocks(x, norms, weights, biases, scales, k, v, k_scale, v_scale, scratch, position, n_head,
                  eps, fc_width, final_norm)     every block's step for one new token per image, in place

The extension is optional (setup.py): where it is not built, `built()` is False and calling an operator is a
RuntimeError; `available()` is what callers ask.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch import Tensor

try:
    from . import _kernels
except ImportError:  # not built here
    _kernels = None

# The cache dtypes the kernels read, by the C code's codes; int8 rows come with a float32 scale each. The
# packed weights use the same codes: float32, bfloat16 or int8 (with a float32 scale per column).
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
PACKED_DTYPES = (torch.float32, torch.bfloat16)  # pack_linear's layout; int8 has pack_linear_int8's
ACTIVATIONS = {"none": 0, "silu": 1}
# The packed multiply serves at most this many rows (a decode step's batch); its register tiles are sized
# for few rows, and more are the library GEMM's work.
MAX_ROWS = 64
# decode_blocks' pointer table, per layer: the two norms, (weight, bias, scales) of qkv, proj, fc and out,
# the keys, the values and their scales
TABLE_WIDTH = 18


@functools.cache
def built() -> bool:
    """Whether the extension is built and this CPU runs it (x86-64 with AVX2, FMA and F16C)."""
    return _kernels is not None and _kernels.supported()


def available() -> bool:
    """Whether the kernels run here: built(), and not switched off with IMAGEGPT_NATIVE_KERNELS=0 (read at
    every call, so that tests and users can switch). The one place that decides."""
    return os.environ.get("IMAGEGPT_NATIVE_KERNELS", "1") != "0" and built()


@functools.cache
def _cpu_avx512() -> bool:
    return built() and _kernels.supports_avx512()


def avx512() -> bool:
    """Whether the float32 linear layers take their AVX-512F tiles: the CPU (and OS) runs AVX-512F, and
    IMAGEGPT_CPU_AVX512=0 does not switch them off (read at every call, so that tests and users can switch;
    there is no switching them on where the CPU lacks the instructions). The one place that decides; the
    two paths give the same numbers."""
    return os.environ.get("IMAGEGPT_CPU_AVX512", "1") != "0" and _cpu_avx512()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check(t: Tensor, name: str, dtype=torch.float32, shape=None, contiguous=True) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu" or t.dtype != dtype:
        raise ValueError(f"{name} must be a CPU {dtype} tensor, got {t.device} {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _kernel():
    if not built():
        raise RuntimeError(
            "imagegpt.cpu._kernels is not built here, or this CPU lacks AVX2/FMA/F16C: check "
            "imagegpt.cpu.available() before calling its operators"
        )
    return _kernels


def _threads() -> int:
    return torch.get_num_threads()


# The operators' library. Its kernels are registered with Library.impl rather than torch.library.custom_op,
# whose wrapper imports torch._dynamo on an operator's first call (~1 s at every sampling command's start).
_LIBRARY = torch.library.Library("imagegpt", "DEF")


def _operator(schema: str, fake):
    """Define imagegpt::<schema> with the decorated function as its CPU kernel and `fake` as its fake
    implementation; the name then stands for the operator, torch.ops.imagegpt.<name>."""

    def register(kernel):
        name = schema.split("(", 1)[0]
        _LIBRARY.define(schema)
        _LIBRARY.impl(name, kernel, "CPU")
        torch.library.register_fake(f"imagegpt::{name}", fake, lib=_LIBRARY)
        return getattr(torch.ops.imagegpt, name)

    return register


# ---- one query over a KV cache ----


def _check_cache(k: Tensor, v: Tensor, k_scale: Tensor | None, v_scale: Tensor | None, shape, name="k"):
    """k and v (B, nh, S, hs) of one cache dtype, rows of hs contiguous, uniformly strided alike; int8 with
    float32 scales (B, nh, S) strided alike."""
    _require(k.dtype in CODES, f"{name} must be one of {', '.join(map(str, CODES))}, got {k.dtype}")
    for t, what in ((k, name), (v, "v")):
        _check(t, what, k.dtype, shape, contiguous=False)
    _require(
        k.stride() == v.stride(), f"{name} and v must have the same strides, got {k.stride()}, {v.stride()}"
    )
    _require(k.stride(3) == 1 and k.stride(2) >= k.size(3), f"{name}'s rows of hs must be contiguous")
    int8 = k.dtype == torch.int8
    _require(int8 == (k_scale is not None) == (v_scale is not None), "scales go with an int8 cache, and only")
    if int8:
        for t, what in ((k_scale, "k_scale"), (v_scale, "v_scale")):
            _check(t, what, torch.float32, k.shape[:3], contiguous=False)
        _require(
            k_scale.stride() == v_scale.stride() and k_scale.stride(2) == 1, "scales: rows of S contiguous"
        )


def _fake_attention(q, k, v, k_scale, v_scale):
    B, nh, _, hs = q.shape
    return q.new_empty(B, 1, nh, hs).transpose(1, 2)


@_operator(
    "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? k_scale, Tensor? v_scale) -> Tensor",
    _fake_attention,
)
def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, k_scale: Tensor | None, v_scale: Tensor | None
) -> Tensor:
    """softmax(q K^T / sqrt(hs)) V for one query per image and head: q (B, nh, 1, hs) float32; k, v (B, nh, S,
    hs) float32, bfloat16, float16 or int8 (with k_scale, v_scale (B, nh, S)), such as views of a
    preallocated cache; hs a multiple of 8. The result is float32 (B, nh, 1, hs), laid out as (B, 1, nh, hs)
    so that merging the heads is free."""
    B, nh, T, hs = _check_query(q)
    S = k.size(2) if k.dim() == 4 else 0
    _check_cache(k, v, k_scale, v_scale, (B, nh, S, hs))
    _require(S >= 1, "the cache must hold at least one position")
    out = torch.empty(B, 1, nh, hs)
    int8 = k_scale is not None
    _kernel().decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1),
        k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        k_scale.data_ptr() if int8 else 0, v_scale.data_ptr() if int8 else 0,
        k_scale.stride(0) if int8 else 0, k_scale.stride(1) if int8 else 0,
        out.data_ptr(), out.stride(0), out.stride(2),
        B, nh, hs, S, CODES[k.dtype], hs**-0.5, _threads(),
    )  # fmt: skip
    return out.transpose(1, 2)


def _check_query(q: Tensor) -> tuple[int, int, int, int]:
    _check(q, "q", contiguous=False)
    _require(q.dim() == 4 and q.size(2) == 1, f"q must be (B, nh, 1, hs), got {tuple(q.shape)}")
    _require(q.size(3) % 8 == 0 and q.size(3) > 0, f"the head width must be a multiple of 8, got {q.size(3)}")
    _require(q.stride(3) == 1, "q's rows of hs must be contiguous")
    return tuple(q.shape)


# ---- few-rows linear layers on packed weights ----


def column_blocks(n: int) -> int:
    """Column blocks of 16 that hold n output columns."""
    return (n + 15) // 16


@_operator(
    "pack_linear(Tensor weight, float scale) -> Tensor",
    lambda weight, scale: weight.new_empty(column_blocks(weight.size(0)), weight.size(1), 16),
)
def pack_linear(weight: Tensor, scale: float) -> Tensor:
    """weight (N, K) float32 times `scale` in column blocks of 16: (ceil(N / 16), K, 16), past N zero."""
    _check(weight, "weight", contiguous=False)
    _require(weight.dim() == 2 and weight.stride(1) == 1, "weight must be (N, K) with rows contiguous")
    N, K = weight.shape
    packed = torch.empty(column_blocks(N), K, 16)
    _kernel().pack_linear(weight.data_ptr(), N, K, weight.stride(0), float(scale), packed.data_ptr())
    return packed


def _fake_pack_int8(weight, scale):
    N, K = weight.shape
    packed = weight.new_empty(column_blocks(N), K // 4, 16, 4, dtype=torch.int8)
    return packed, weight.new_empty(column_blocks(N) * 16)


@_operator("pack_linear_int8(Tensor weight, float scale) -> (Tensor, Tensor)", _fake_pack_int8)
def pack_linear_int8(weight: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """weight (N, K) float32 times `scale`, each row (an output column) quantized to int8 with its own scale
    (quantize_int8's rounding), in column blocks of 16, each [K / 4][16][4] bytes: (ceil(N / 16), K / 4,
    16, 4); and the column scales (16 ceil(N / 16),), 0 for the padding columns. K a multiple of 8."""
    _check(weight, "weight", contiguous=False)
    _require(weight.dim() == 2 and weight.stride(1) == 1, "weight must be (N, K) with rows contiguous")
    N, K = weight.shape
    _require(K % 8 == 0, f"int8 packing needs in_features a multiple of 8, got {K}")
    packed = torch.empty(column_blocks(N), K // 4, 16, 4, dtype=torch.int8)
    scales = torch.empty(column_blocks(N) * 16)
    _kernel().pack_linear_int8(
        weight.data_ptr(), N, K, weight.stride(0), float(scale), packed.data_ptr(), scales.data_ptr()
    )
    return packed, scales


def in_features(packed: Tensor) -> int:
    """K of a weight packed by pack_linear (blocks, K, 16), float32 or bfloat16, or pack_linear_int8
    (blocks, K / 4, 16, 4)."""
    return packed.size(-3) * 4 if packed.dtype == torch.int8 else packed.size(-2)


def _packed_dtype(packed: Tensor, int8: bool) -> torch.dtype:
    """The dtype a packed weight must have: int8 where scales come with it; else pack_linear's float32, or
    bfloat16 (its .to()), whichever it has (float32 named in the error where it has neither)."""
    dtypes = (torch.int8,) if int8 else PACKED_DTYPES
    return packed.dtype if isinstance(packed, Tensor) and packed.dtype in dtypes else dtypes[0]


def _check_packed(packed: Tensor, bias: Tensor, scales: Tensor | None, N: int, K: int, name: str) -> None:
    """A packed weight (pack_linear's, float32 or bfloat16, or with scales pack_linear_int8's) of N x K, with
    its padded bias."""
    int8 = scales is not None
    shape = (column_blocks(N), K // 4, 16, 4) if int8 else (column_blocks(N), K, 16)
    _check(packed, name, _packed_dtype(packed, int8), shape)
    _check(bias, f"{name}'s bias", shape=(16 * column_blocks(N),))
    if int8:
        _check(scales, f"{name}'s scales", shape=(16 * column_blocks(N),))


@_operator(
    "packed_linear(Tensor x, Tensor packed, Tensor bias, int out_features, str activation, Tensor? scales) "
    "-> Tensor",
    lambda x, packed, bias, out_features, activation, scales: x.new_empty(x.size(0), out_features),
)
def packed_linear(x: Tensor, packed: Tensor, bias: Tensor, out_features: int, activation: str,
                  scales: Tensor | None) -> Tensor:  # fmt: skip
    """act(x W^T + bias) for x (M, K) float32, M <= MAX_ROWS, with W packed by pack_linear (float32, or
    bfloat16: widened to float32 in registers, the same numbers as float32 weights of those values) and
    bias padded to its blocks (zeros for none); act "none" or "silu". With `scales`, W is
    pack_linear_int8's (these its column scales) and x's rows are quantized as quantize_int8 does: out = sx
    sw (qx . qw) + bias, the int8 products summed exactly in int32."""
    _check(x, "x")
    _require(
        x.dim() == 2 and x.size(0) <= MAX_ROWS, f"x must be (M, K) with M <= {MAX_ROWS}, got {tuple(x.shape)}"
    )
    _require(
        activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}"
    )
    M, K = x.shape
    _require(scales is None or K % 8 == 0, f"int8 weights need in_features a multiple of 8, got {K}")
    _check_packed(packed, bias, scales, out_features, K, "packed")
    out = torch.empty(M, out_features)
    _kernel().packed_linear(
        x.data_ptr(), K, M, K, packed.data_ptr(), out_features, bias.data_ptr(), ACTIVATIONS[activation],
        out.data_ptr(), out_features, 0 if scales is None else scales.data_ptr(), _threads(), int(avx512()),
        CODES[packed.dtype],
    )  # fmt: skip
    return out


# ---- every block's decode step in one call ----


@_operator(
    "decode_blocks(Tensor(a!) x, Tensor norms, Tensor[] weights, Tensor[] biases, Tensor[] scales, "
    "Tensor(b!)[] k, Tensor(c!)[] v, Tensor(d!)[] k_scale, Tensor(e!)[] v_scale, Tensor(f!) scratch, "
    "int position, int n_head, float eps, int fc_width, Tensor? final_norm=None) -> ()",
    lambda *arguments: None,  # it changes its arguments in place and returns nothing
)
def decode_blocks(
    x: Tensor, norms: Tensor, weights: list[Tensor], biases: list[Tensor], scales: list[Tensor],
    k: list[Tensor], v: list[Tensor], k_scale: list[Tensor], v_scale: list[Tensor],
    scratch: Tensor, position: int, n_head: int, eps: float, fc_width: int, final_norm: Tensor | None = None,
) -> None:  # fmt: skip
    """L pre-norm blocks for one new token per image, in place on x (B, 1, C) float32, B <= MAX_ROWS:

        x += proj(attention(qkv(norm1(x))));  x += out(silu(fc(norm2(x))))

    with each block's new key and value written into its cache at `position` and attention over [0,
    position]. norms (L, 2, C): the blocks' two norm weights. weights, biases: qkv (3C), proj (C), fc
    (fc_width, silu applied: quick-GELU's scales folded in by the caller) and out (C), each stacked over the
    blocks: (L, *pack_linear's shape), all float32 or all bfloat16, and (L, padded bias); or all int8 (L,
    *pack_linear_int8's shape) with `scales`, their column scales (L, padded), each layer's input rows then
    quantized as quantize_int8 does. k, v: L caches (B, nh, S, hs) float32, bfloat16, float16, or int8 with
    k_scale and v_scale (L of (B, nh, S)); hs a multiple of 8. scratch: at least scratch_size() float32
    elements. final_norm (C,): x is then normed as the blocks' norms do, with these weights (a model's final
    norm).
    """
    table = _blocks_table(x, norms, weights, biases, scales, k, v, k_scale, v_scale, scratch,
                                position, n_head, fc_width)  # fmt: skip
    B, _, C = x.shape
    if final_norm is not None:
        _check(final_norm, "final_norm", shape=(C,))
    code = CODES[k[0].dtype]
    strides = (*k[0].stride()[:3], *(k_scale[0].stride()[:2] if k_scale else (0, 0)))
    rows = scratch.data_ptr() + 4 * B * (5 * C + fc_width)  # the int8 weights' quantized rows, after
    _kernel().decode_blocks(
        x.data_ptr(), B, C, n_head, eps, fc_width, CODES[weights[0].dtype], len(k), code, *strides,
        table.data_ptr(), position, scratch.data_ptr(), rows if scales else 0, _threads(), int(avx512()),
        0 if final_norm is None else final_norm.data_ptr(),
    )  # fmt: skip


def scratch_size(batch: int, width: int, fc_width: int) -> int:
    """float32 elements of decode_blocks' scratch: five rows of C and one of fc_width per image, then the int8
    weights' quantized input rows (two bytes per element of the wider layer and a scale, per image)."""
    return batch * (5 * width + fc_width) + (batch * (2 * max(width, fc_width) + 4) + 3) // 4


def _blocks_table(x, norms, weights, biases, scales, k, v, k_scale, v_scale, scratch, position, n_head, fc):
    """Every argument of decode_blocks checked, and the C code's table of TABLE_WIDTH pointers per layer."""
    _check(x, "x")
    _require(x.dim() == 3 and x.size(1) == 1 and 1 <= x.size(0) <= MAX_ROWS,
             f"x must be (B, 1, C) with 1 <= B <= {MAX_ROWS}, got {tuple(x.shape)}")  # fmt: skip
    B, _, C = x.shape
    L = len(k)
    _require(L >= 1 and len(v) == L, f"k and v must hold one cache per block, got {len(k)} and {len(v)}")
    _require(n_head >= 1 and C % n_head == 0 and (C // n_head) % 8 == 0,
             f"the head width must be a multiple of 8, got C={C}, n_head={n_head}")  # fmt: skip
    _check(norms, "norms", shape=(L, 2, C))
    int8 = len(scales) > 0
    _require(len(weights) == len(biases) == 4 and len(scales) in (0, 4), "four linear layers per block")
    _require(not int8 or fc % 8 == 0, f"int8 weights need the MLP width a multiple of 8, got {fc}")
    sizes = ((3 * C, C), (C, C), (fc, C), (C, fc))  # (out, in) of qkv, proj, fc, out
    for i, (name, (N, K)) in enumerate(zip(("qkv", "proj", "fc", "out"), sizes)):
        shape = (L, column_blocks(N), K // 4, 16, 4) if int8 else (L, column_blocks(N), K, 16)
        _check(weights[i], name, _packed_dtype(weights[0], int8), shape)
        _check(biases[i], f"{name}'s bias", shape=(L, 16 * column_blocks(N)))
        if int8:
            _check(scales[i], f"{name}'s scales", shape=(L, 16 * column_blocks(N)))
    S = k[0].size(2) if k[0].dim() == 4 else 0
    int8_cache = len(k_scale) > 0
    _require(len(k_scale) == len(v_scale) == (L if int8_cache else 0), "scales: one per block's int8 cache")
    first = (k[0], v[0], k_scale[0] if int8_cache else None, v_scale[0] if int8_cache else None)
    _check_cache(*first, shape=(B, n_head, S, C // n_head), name="k[0]")
    layout = {(t.dtype, t.shape, t.stride(), t.device) for t in (*k, *v)}
    _require(len(layout) == 1, "every block's cache must have the same dtype, shape and strides")
    if int8_cache:
        layout = {(t.dtype, t.shape, t.stride(), t.device) for t in (*k_scale, *v_scale)}
        _require(len(layout) == 1, "every block's cache scales must have the same dtype, shape and strides")
    _require(0 <= position < S, f"position {position} is outside the cache's {S} positions")
    _check(scratch, "scratch")
    _require(scratch.numel() >= scratch_size(B, C, fc), f"scratch must hold {scratch_size(B, C, fc)} floats")

    table = np.zeros((L, TABLE_WIDTH), dtype=np.int64)  # the addresses; 0 for no scales
    layers = np.arange(L, dtype=np.int64)
    stacked = [norms[:, 0], norms[:, 1]]
    for i in range(4):
        stacked += [weights[i], biases[i], scales[i] if int8 else None]
    for column, t in enumerate(stacked):  # each block's slice of a tensor stacked over the blocks
        if t is not None:
            table[:, column] = t.data_ptr() + layers * (t.stride(0) * t.element_size())
    for column, caches in enumerate((k, v, k_scale, v_scale), start=14):
        if caches:
            table[:, column] = [t.data_ptr() for t in caches]
    return torch.from_numpy(table.ravel())
