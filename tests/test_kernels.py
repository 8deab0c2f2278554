"""The native decode kernels as PyTorch operators (imagegpt.cpu.ops, torch.ops.imagegpt.*): built where they
can run, equal to their definitions for every dtype, layout and thread count, a clear error for arguments
they do not take, and traceable by torch.compile around them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imagegpt.cpu import ops
from imagegpt.quantize import quantize_int8


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


CAN_RUN = (
    sys.platform.startswith("linux")
    and platform.machine() == "x86_64"
    and {"avx2", "fma", "f16c"} <= cpu_flags()
)
needs_kernel = pytest.mark.skipif(not ops.available(), reason="the native kernels do not run here")
attention = torch.ops.imagegpt.decode_attention


KERNELS_C = Path(__file__).resolve().parents[1] / "src" / "imagegpt" / "cpu" / "_kernels.c"


def compile_c(source: str, *flags: str) -> subprocess.CompletedProcess | None:
    """The C compiler setuptools would use (CC, else Python's own) run on `source` with Python's headers;
    None where no compiler runs."""
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    include = "-I" + sysconfig.get_paths()["include"]
    try:
        return subprocess.run(
            [*compiler, include, *flags, "-x", "c", "-c", "-", "-o", os.devnull],
            input=source, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None


def c_extension_builds() -> bool:
    """Whether a file that includes Python.h compiles here: without a compiler, or without Python's headers
    (no python3-dev), setuptools cannot build the extension."""
    done = compile_c("#include <Python.h>\nint f(void) { return 0; }\n")
    return done is not None and done.returncode == 0


@pytest.mark.skipif(not CAN_RUN, reason="the kernels are built for x86-64 Linux CPUs with AVX2, FMA and F16C")
def test_the_kernels_are_built_and_run_where_they_can():
    # setup.py builds them as optional: a broken build would pass unnoticed, with PyTorch everywhere.
    # Without a C compiler or Python's headers the install leaves them out on purpose: all runs on PyTorch.
    if ops._kernels is None and not c_extension_builds():
        pytest.skip("no C compiler or no Python headers: imagegpt was installed without its native kernels")
    assert ops._kernels is not None, "imagegpt.cpu._kernels was not built; reinstall with a C compiler"
    assert ops.built()
    assert ops.available() is (os.environ.get("IMAGEGPT_NATIVE_KERNELS") != "0")


def test_the_source_compiles_without_its_x86_kernels():
    # On aarch64 and other CPUs setup.py builds the extension without them (every call refused, sampling on
    # PyTorch); IMAGEGPT_NO_X86 compiles that build here, so a change that breaks it fails on x86 too.
    if not c_extension_builds():
        pytest.skip("no C compiler or no Python headers here")
    flags = ["-std=c11", "-Wall", "-Werror", "-fsyntax-only", "-DIMAGEGPT_NO_X86"]
    flags += ["-fopenmp"] * sys.platform.startswith("linux")  # as setup.py builds it
    done = compile_c(KERNELS_C.read_text(), *flags)
    assert done.returncode == 0, done.stderr[-3000:]


def query_and_cache(B, nh, hs, S, dtype, seed, spare=5, scale=1.0):
    """q as the c_attn output's view (B, nh, 1, hs) and k, v as views of the first S positions of a cache
    (int8: with the rows' scales), and the float32 keys and values they stand for."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, 3 * nh * hs, generator=g) * scale
    q = qkv[..., : nh * hs].view(B, 1, nh, hs).transpose(1, 2)
    k, v = (torch.randn(B, nh, S + spare, hs, generator=g) for _ in range(2))
    if dtype == torch.int8:
        (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
        floats = (qk.float() * sk[..., None])[:, :, :S], (qv.float() * sv[..., None])[:, :, :S]
        return q, (qk[:, :, :S], qv[:, :, :S], sk[:, :, :S], sv[:, :, :S]), floats
    k, v = k.to(dtype), v.to(dtype)
    return q, (k[:, :, :S], v[:, :, :S], None, None), (k[:, :, :S].float(), v[:, :, :S].float())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("hs", [8, 16, 24, 40, 64, 96, 128, 136])
def test_attention_equals_sdpa_for_every_cache_dtype_and_head_width(dtype, hs):
    for seed, S in enumerate([1, 2, 3, 4, 5, 8, 9, 31, 300]):
        q, cache, (k, v) = query_and_cache(3, 5, hs, S, dtype, seed)
        expected = F.scaled_dot_product_attention(q, k, v)
        got = attention(q, *cache)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_any_thread_count_gives_the_same_attention(threads):
    q, cache, (k, v) = query_and_cache(2, 3, 64, 77, torch.float32, 1)
    expected = F.scaled_dot_product_attention(q, k, v)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = attention(q, *cache)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_peaked_and_flat_softmaxes():
    # large scores: a nearly one-hot softmax, where an unstabilised exp would overflow
    q, cache, (k, v) = query_and_cache(2, 2, 32, 50, torch.float32, 2, scale=60.0)
    torch.testing.assert_close(
        attention(q, *cache), F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5
    )
    # all keys equal: the plain mean of the values
    q, (k, v, _, _), _ = query_and_cache(1, 2, 16, 40, torch.float32, 3)
    k.copy_(k[:, :, :1].clone().expand_as(k))
    torch.testing.assert_close(attention(q, k, v, None, None), v.mean(dim=2, keepdim=True))


@needs_kernel
def test_the_attention_is_laid_out_for_merging_heads():
    q, cache, _ = query_and_cache(4, 3, 8, 6, torch.float32, 4)
    assert attention(q, *cache).transpose(1, 2).is_contiguous()  # (B, 1, nh, hs): the merge is a view


def test_arguments_the_kernels_do_not_take_are_a_clear_error():
    # checked before anything reaches the C code, whether or not it is built here
    q, (k, v, _, _), _ = query_and_cache(2, 2, 16, 5, torch.float32, 5)
    bad = {
        "q must be \\(B, nh, 1, hs\\)": (torch.randn(2, 2, 2, 16), k, v, None, None),
        "v must be a CPU torch.float32": (q, k, v.to(torch.bfloat16), None, None),
        "q must be a CPU torch.float32": (q.double(), k.double(), v.double(), None, None),
        "multiple of 8": (q[..., :12], k[..., :12], v[..., :12], None, None),
        "rows of hs must be contiguous": (q, k.mT.contiguous().mT, v.mT.contiguous().mT, None, None),
        "scales go with an int8 cache": (q, k, v, torch.ones(2, 2, 5), torch.ones(2, 2, 5)),
        "the same strides": (q, k, v.contiguous(), None, None),
    }
    for message, arguments in bad.items():
        with pytest.raises(ValueError, match=message):
            attention(*arguments)
    with pytest.raises(ValueError, match="M <= 64"):
        torch.ops.imagegpt.packed_linear(
            torch.randn(65, 16), torch.zeros(1, 16, 16), torch.zeros(16), 16, "none", None
        )
    with pytest.raises(ValueError, match="packed must be \\(2, 16, 16\\)"):
        torch.ops.imagegpt.packed_linear(
            torch.randn(3, 16), torch.zeros(1, 16, 16), torch.zeros(32), 24, "none", None
        )
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.imagegpt.packed_linear(
            torch.randn(3, 16), torch.zeros(1, 16, 16), torch.zeros(16), 16, "relu", None
        )
    with pytest.raises(ValueError, match="multiple of 8"):
        torch.ops.imagegpt.pack_linear_int8(torch.randn(4, 12), 1.0)


@needs_kernel
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_packed_linear_equals_the_definition(activation, cpu_avx512):
    generator = torch.Generator().manual_seed(7)
    for N, K in [(1, 1), (8, 5), (16, 64), (17, 33), (40, 24), (515, 64)]:
        weight = torch.randn(N, 2 * K, generator=generator)[:, :K]  # rows strided, a view of a wider weight
        bias = torch.randn(N, generator=generator)
        packed = ops.pack_linear(weight, 1.5)
        assert packed.shape == ((N + 15) // 16, K, 16)
        padded = torch.zeros(packed.size(0) * 16)
        padded[:N] = 0.25 * bias
        for M in [0, 1, 2, 3, 4, 5, 6, 7, 13, 16, 17, 33, ops.MAX_ROWS]:  # the tiles' 6 and 16 rows, and more
            x = torch.randn(M, K, generator=generator)
            expected = 1.5 * x @ weight.T + 0.25 * bias
            if activation == "silu":
                expected = F.silu(expected)
            got = ops.packed_linear(x, packed, padded, N, activation, None)
            assert got.shape == (M, N)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_bfloat16_weights_give_the_numbers_of_float32_weights_of_their_values(activation, cpu_avx512):
    # a bfloat16 weight is widened to float32 exactly, in registers, then meets the same FMAs: bit for bit
    generator = torch.Generator().manual_seed(10)
    for N, K in [(1, 1), (17, 33), (515, 64)]:
        weight = torch.randn(N, K, generator=generator)
        packed = ops.pack_linear(weight, 1.5).to(torch.bfloat16)  # rounded to nearest, ties to even
        rounded = ops.pack_linear((1.5 * weight).bfloat16().float(), 1.0)
        assert torch.equal(packed.float(), rounded) and not torch.equal(rounded, ops.pack_linear(weight, 1.5))
        bias = torch.randn(packed.size(0) * 16, generator=generator)
        for M in [1, 6, 16, 17, 40]:
            x = torch.randn(M, K, generator=generator)
            got = ops.packed_linear(x, packed, bias, N, activation, None)
            assert torch.equal(got, ops.packed_linear(x, rounded, bias, N, activation, None))
    arguments = blocks_arguments(B=5, bf16=True)
    widened = [*arguments[:2], [w.float() for w in arguments[2]], *arguments[3:]]
    assert all(w.dtype == torch.bfloat16 for w in arguments[2])
    outputs = [flat(decode_blocks_on_copies(a)) for a in (arguments, widened)]
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def flat(outputs: tuple) -> list:
    """decode_blocks_on_copies' x, k and v as one list of tensors."""
    x, k, v = outputs
    return [x, *k, *v]


def on_both_paths(monkeypatch, function, *arguments) -> list:
    """function(*arguments) with the AVX-512 tiles switched off, then on."""
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("IMAGEGPT_CPU_AVX512", flag)
        results.append(function(*arguments))
    return results


def decode_blocks_on_copies(arguments: list) -> tuple:
    """decode_blocks on copies of what it changes (x and the caches); those copies, as it left them."""
    x, k, v = arguments[0].clone(), [t.clone() for t in arguments[5]], [t.clone() for t in arguments[6]]
    torch.ops.imagegpt.decode_blocks(x, *arguments[1:5], k, v, *arguments[7:])
    return x, k, v


@needs_kernel
def test_the_avx512_and_avx2_tiles_give_the_same_numbers(monkeypatch):
    # the same chain of FMAs over k for every output, the same exp: equal bit for bit, residuals included
    if not ops._cpu_avx512():
        pytest.skip("this CPU lacks AVX-512F: only the AVX2 path can run here")
    generator = torch.Generator().manual_seed(8)
    for N, K in [(17, 33), (40, 24), (515, 64)]:
        packed = ops.pack_linear(torch.randn(N, K, generator=generator), 1.0)
        bias = torch.randn(packed.size(0) * 16, generator=generator)
        for M in [1, 6, 15, 16, 17, 40]:
            x = torch.randn(M, K, generator=generator)
            for activation in ("none", "silu"):
                arguments = (x, packed, bias, N, activation, None)
                avx2, avx512 = on_both_paths(monkeypatch, ops.packed_linear, *arguments)
                assert torch.equal(avx2, avx512)
    for cache_dtype, bf16 in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        for B in (3, 16, 20):
            arguments = blocks_arguments(B=B, cache_dtype=cache_dtype, bf16=bf16)
            (x2, k2, v2), (x5, k5, v5) = on_both_paths(monkeypatch, decode_blocks_on_copies, arguments)
            assert torch.equal(x2, x5) and not torch.equal(x2, arguments[0])
            assert all(torch.equal(a, b) for a, b in zip(k2 + v2, k5 + v5))


@needs_kernel
def test_decode_blocks_can_end_with_the_final_norm():
    arguments = blocks_arguments(B=5)
    weight = 1 + 0.1 * torch.randn(32, generator=torch.Generator().manual_seed(9))
    x, _, _ = decode_blocks_on_copies(arguments)
    normed, _, _ = decode_blocks_on_copies([*arguments, weight])
    torch.testing.assert_close(normed, F.rms_norm(x, (32,), weight, 1e-5), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="final_norm must be \\(32,\\)"):
        torch.ops.imagegpt.decode_blocks(*arguments, torch.ones(16))


@needs_kernel
def test_the_avx512_switch_reaches_the_kernels(monkeypatch):
    calls = {name: [] for name in ("packed_linear", "decode_blocks")}
    at = {"packed_linear": 12, "decode_blocks": 19}  # where the C functions take avx512
    for name, seen in calls.items():
        real, i = getattr(ops._kernels, name), at[name]
        monkeypatch.setattr(ops._kernels, name, lambda *a, f=real, i=i, seen=seen: seen.append(a[i]) or f(*a))
    packed = ops.pack_linear(torch.randn(20, 16), 1.0)
    for flag in ("0", None):
        if flag is None:
            monkeypatch.delenv("IMAGEGPT_CPU_AVX512", raising=False)
        else:
            monkeypatch.setenv("IMAGEGPT_CPU_AVX512", flag)
        ops.packed_linear(torch.randn(3, 16), packed, torch.zeros(32), 20, "none", None)
        torch.ops.imagegpt.decode_blocks(*blocks_arguments())
    detected = int("avx512f" in cpu_flags())  # on Linux, the kernel's word for what the CPU and OS run
    assert ops.avx512() is bool(detected)
    assert calls == {"packed_linear": [0, detected], "decode_blocks": [0, detected]}


def pack_linear_int8_reference(weight: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_linear_int8's layout in PyTorch: quantize_int8 per row, column blocks of 16, [K / 4][16][4]."""
    N, K = weight.shape
    q, scales = quantize_int8(weight.float() * scale)
    blocks = (N + 15) // 16
    padded = torch.zeros(blocks * 16, K, dtype=torch.int8)
    padded[:N] = q
    padded_scales = torch.zeros(blocks * 16)
    padded_scales[:N] = scales
    return padded.view(blocks, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous(), padded_scales


@needs_kernel
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_an_int8_packed_linear_sums_the_int8_products_exactly(activation):
    # the kernel quantizes x's rows as quantize_int8 does (the same float32 division and rounding), sums
    # the int8 products exactly and scales back in the order below: the same float32 numbers
    generator = torch.Generator().manual_seed(11)
    for N, K in [(1, 8), (8, 16), (17, 40), (40, 24), (515, 64), (33, 1024)]:
        weight = torch.randn(N, K, generator=generator)
        bias = torch.randn(N, generator=generator)
        packed, scales = ops.pack_linear_int8(weight, 1.5)
        qw, sw = quantize_int8(1.5 * weight)
        assert packed.shape == ((N + 15) // 16, K // 4, 16, 4) and packed.dtype == torch.int8
        assert torch.equal(scales[:N], sw) and not scales[N:].any()
        assert torch.equal(packed.permute(0, 2, 1, 3).reshape(-1, K)[:N], qw)
        padded = torch.zeros(packed.size(0) * 16)
        padded[:N] = bias
        for M in [0, 1, 2, 3, 4, 5, 13, ops.MAX_ROWS]:
            x = torch.randn(M, K, generator=generator)
            qx, sx = quantize_int8(x)
            products = (qx.long() @ qw.long().T).float()  # exact in float32: |sum| < 2^24 here
            expected = products * (sx[:, None] * sw[None, :]) + bias
            got = ops.packed_linear(x, packed, padded, N, activation, scales)
            assert got.shape == (M, N)
            if activation == "silu":
                torch.testing.assert_close(got, F.silu(expected), atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(got, expected)


@needs_kernel
def test_int8_packing_is_its_pytorch_definition():
    generator = torch.Generator().manual_seed(13)
    for N, K, scale in [(1, 8, 1.0), (17, 40, 1.702), (515, 64, 1 / 1.702), (48, 1024, 0.5)]:
        weight = torch.randn(N, 2 * K, generator=generator)[:, :K]  # rows strided
        weight[0] = 0.0  # an all-zero column: scale 1, as quantize_int8 has it
        native = ops.pack_linear_int8(weight, scale)
        reference = pack_linear_int8_reference(weight, scale)
        assert torch.equal(native[0], reference[0]) and torch.equal(native[1], reference[1])
        assert native[1][0] == 1 and not native[1][N:].any()


@needs_kernel
def test_an_int8_packed_linear_is_close_to_the_float_one_and_any_thread_count_agrees():
    generator = torch.Generator().manual_seed(12)
    weight, x = torch.randn(96, 256, generator=generator), torch.randn(16, 256, generator=generator)
    packed, scales = ops.pack_linear_int8(weight, 0.5)
    bias = torch.zeros(96)
    exact = 0.5 * x @ weight.T
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.packed_linear(x, packed, bias, 96, "none", scales))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)
    # two roundings of 1/254 of a row's largest at most; summed over 256 products, seen here: 0.6% of the
    # largest output
    error = (results[0] - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.02


def blocks_arguments(L=2, B=3, C=32, n_head=2, fc=80, S=9, int8=False, cache_dtype=torch.float32, bf16=False):
    """decode_blocks' arguments for L random blocks (as imagegpt.cpu.engine packs them: float32, bfloat16 or
    int8 weights) and a random cache."""
    g = torch.Generator().manual_seed(L * 100 + B)
    pack = (lambda w: ops.pack_linear_int8(w, 1.0)) if int8 else (lambda w: (ops.pack_linear(w, 1.0), None))
    weights, biases, scales = [], [], []
    for N, K in ((3 * C, C), (C, C), (fc, C), (C, fc)):
        packed = [pack(0.1 * torch.randn(N, K, generator=g)) for _ in range(L)]
        weights.append(torch.stack([w for w, _ in packed]).to(torch.bfloat16 if bf16 else packed[0][0].dtype))
        biases.append(0.1 * torch.randn(L, 16 * ((N + 15) // 16), generator=g))
        scales += [torch.stack([s for _, s in packed])] if int8 else []
    norms = 1 + 0.1 * torch.randn(L, 2, C, generator=g)
    shape = (B, n_head, S, C // n_head)
    if cache_dtype == torch.int8:
        k = [quantize_int8(torch.randn(shape, generator=g))[0] for _ in range(L)]
        v = [quantize_int8(torch.randn(shape, generator=g))[0] for _ in range(L)]
        k_scale, v_scale = ([torch.rand(shape[:3], generator=g) for _ in range(L)] for _ in range(2))
    else:
        k, v = ([torch.randn(shape, generator=g).to(cache_dtype) for _ in range(L)] for _ in range(2))
        k_scale, v_scale = [], []
    x = torch.randn(B, 1, C, generator=g)
    scratch = torch.empty(ops.scratch_size(B, C, fc))
    return [x, norms, weights, biases, scales, k, v, k_scale, v_scale, scratch, 4, n_head, 1e-5, fc]


@needs_kernel
def test_decode_blocks_refuses_what_does_not_fit_before_touching_anything():
    arguments = blocks_arguments()
    x, k = arguments[0], arguments[5]
    before = (x.clone(), [t.clone() for t in k])

    def refused(message, index, value):
        changed = list(arguments)
        changed[index] = value
        with pytest.raises(ValueError, match=message):
            torch.ops.imagegpt.decode_blocks(*changed)

    refused("x must be \\(B, 1, C\\)", 0, torch.randn(3, 2, 32))
    refused("x must be contiguous", 0, torch.randn(3, 1, 64)[:, :, ::2])
    refused("x must be \\(B, 1, C\\) with 1 <= B <= 64", 0, torch.randn(65, 1, 32))
    refused("norms must be \\(2, 2, 32\\)", 1, torch.ones(3, 2, 32))
    refused("qkv must be", 2, [w.double() for w in arguments[2]])
    refused("proj must be a CPU torch.bfloat16 tensor", 2, [arguments[2][0].bfloat16(), *arguments[2][1:]])
    refused("proj's bias must be", 3, [arguments[3][0], arguments[3][1][:, :8], *arguments[3][2:]])
    refused("one cache per block", 6, arguments[6][:1])
    refused("the same dtype, shape and strides", 6, [arguments[6][0], arguments[6][1].to(torch.bfloat16)])
    refused("k\\[0\\] must be \\(3, 2, 9, 16\\)", 5, [t[:2] for t in k])  # another batch than x's
    refused("scales: one per block's int8 cache", 7, [torch.ones(3, 2, 9)] * 2)
    refused("outside the cache's 9 positions", 10, 9)
    refused("scratch must hold", 9, torch.empty(10))
    refused("head width must be a multiple of 8", 11, 8)  # heads 4 wide
    assert torch.equal(x, before[0]) and all(torch.equal(a, b) for a, b in zip(k, before[1]))


@needs_kernel
@pytest.mark.parametrize(
    ("weights", "cache_dtype"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("int8", torch.int8)],
)
def test_the_operators_pass_torch_librarys_checks(weights, cache_dtype):
    """torch.library.opcheck: schema (what each operator mutates), fake implementations and torch.compile's
    tracing around them (aot_dispatch) agree with the real ones."""
    q, cache, _ = query_and_cache(2, 2, 16, 5, cache_dtype, 6)
    torch.library.opcheck(torch.ops.imagegpt.decode_attention, (q.contiguous(), *cache))
    weight = torch.randn(20, 16)
    torch.library.opcheck(torch.ops.imagegpt.pack_linear, (weight, 1.5))
    torch.library.opcheck(torch.ops.imagegpt.pack_linear_int8, (weight, 1.5))
    int8 = weights == "int8"
    packed, scales = ops.pack_linear_int8(weight, 1.0) if int8 else (ops.pack_linear(weight, 1.0), None)
    args = (torch.randn(3, 16), packed.to(getattr(torch, weights)), torch.zeros(32), 20, "silu", scales)
    torch.library.opcheck(torch.ops.imagegpt.packed_linear, args)
    arguments = blocks_arguments(int8=int8, cache_dtype=cache_dtype, bf16=weights == "bfloat16")
    torch.library.opcheck(torch.ops.imagegpt.decode_blocks, arguments)
    torch.library.opcheck(torch.ops.imagegpt.decode_blocks, [*arguments, torch.ones(32)])


@needs_kernel
def test_torch_compile_traces_around_the_operators():
    q, cache, (k, v) = query_and_cache(2, 2, 16, 5, torch.float32, 7)
    step = torch.compile(
        lambda q, k, v: 2 * attention(q, k, v, None, None), backend="aot_eager", fullgraph=True
    )
    torch.testing.assert_close(
        step(q, k, v), 2 * F.scaled_dot_product_attention(q, k, v), atol=4e-6, rtol=1e-5
    )


def test_without_the_extension_sampling_runs_on_pytorch_and_the_operators_say_so(monkeypatch):
    """An install where imagegpt.cpu._kernels was not built (no C compiler, aarch64): the same calls work."""
    from imagegpt import ImageGPT, ImageGPTConfig
    from imagegpt.errors import ConfigError
    from imagegpt.sampling import sample

    monkeypatch.setattr(ops, "_kernels", None)
    ops.built.cache_clear()
    try:
        assert not ops.available()
        q, cache, _ = query_and_cache(2, 2, 8, 5, torch.float32, seed=3)
        with pytest.raises(RuntimeError, match="not built here"):
            attention(q, *cache)
        torch.manual_seed(0)
        model = ImageGPT(ImageGPTConfig(vocab_size=9, n_positions=16, n_embd=16, n_layer=2, n_head=2))
        ids = sample(model, 2, seed=0, top_k=3)
        assert ids.shape == (2, 16) and torch.equal(ids, sample(model, 2, seed=0, top_k=3, dtype="float32"))
        with pytest.raises(ConfigError, match="not available here"):
            sample(model, 1, weight_dtype="int8")
    finally:
        ops.built.cache_clear()


def test_the_old_module_name_still_answers_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("imagegpt.kernels", None)
    with pytest.warns(DeprecationWarning, match="imagegpt.cpu"):
        kernels = importlib.import_module("imagegpt.kernels")
    assert kernels.available() is ops.available() and kernels.MAX_ROWS == ops.MAX_ROWS
    assert kernels.quantize_int8 is quantize_int8


@needs_kernel
def test_calling_an_operator_imports_no_compiler():
    """The operators are plain Library kernels: their first call does not import torch._dynamo (about a
    second at every sampling command's start, which torch.library.custom_op's wrapper costs)."""
    code = (
        "import sys, torch\n"
        "from imagegpt.cpu import ops\n"
        "q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 3, 8)\n"
        "ops.decode_attention(q, k, k, None, None)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
