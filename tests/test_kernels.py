"""The native decode-attention kernel (imagegpt._kernels): built where it can run, equal to SDPA on the same
keys and values for every dtype, layout and thread count, and declined where it does not apply."""

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

from imagegpt import kernels


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
needs_kernel = pytest.mark.skipif(not kernels.available(), reason="the native kernel does not run here")


def c_compiler_works() -> bool:
    """Whether the C compiler setuptools would use (CC, else Python's own) compiles a trivial file here."""
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    try:
        done = subprocess.run(
            [*compiler, "-x", "c", "-c", "-", "-o", os.devnull],
            input="int f(void) { return 0; }\n", capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not CAN_RUN, reason="the kernel is built for x86-64 Linux CPUs with AVX2, FMA and F16C")
def test_the_kernel_is_built_and_runs_where_it_can():
    # setup.py builds it as optional: a broken build would otherwise pass unnoticed, with SDPA everywhere.
    # Without a working C compiler the install leaves it out on purpose, and everything runs on PyTorch.
    if kernels._kernels is None and not c_compiler_works():
        pytest.skip("no working C compiler: imagegpt was installed without its native kernels")
    assert kernels._kernels is not None, "imagegpt._kernels was not built; reinstall with a C compiler"
    assert kernels._supported()
    assert kernels.available() is (os.environ.get("IMAGEGPT_NATIVE_KERNELS") != "0")


def query_and_cache(B, nh, hs, S, dtype, seed, spare=5, scale=1.0):
    """q as the c_attn output's view (B, nh, 1, hs) and k, v as views of the first S positions of a cache."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, 3 * nh * hs, generator=g) * scale
    q = qkv[..., : nh * hs].view(B, 1, nh, hs).transpose(1, 2)
    cache_k = torch.randn(B, nh, S + spare, hs, generator=g).to(dtype)
    cache_v = torch.randn(B, nh, S + spare, hs, generator=g).to(dtype)
    return q, cache_k[:, :, :S], cache_v[:, :, :S]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs", [8, 16, 24, 40, 64, 96, 128, 136])
def test_equals_sdpa_for_every_dtype_and_head_width(dtype, hs):
    for seed, S in enumerate([1, 2, 3, 4, 5, 8, 9, 31, 300]):
        q, k, v = query_and_cache(3, 5, hs, S, dtype, seed)
        expected = F.scaled_dot_product_attention(q, k.float(), v.float())
        got = kernels.decode_attention(q, k, v)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_any_thread_count_gives_the_same_result(threads):
    q, k, v = query_and_cache(2, 3, 64, 77, torch.float32, 1)
    expected = F.scaled_dot_product_attention(q, k, v)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.decode_attention(q, k, v)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_peaked_and_flat_softmaxes():
    # large scores: a nearly one-hot softmax, where an unstabilised exp would overflow
    q, k, v = query_and_cache(2, 2, 32, 50, torch.float32, 2, scale=60.0)
    torch.testing.assert_close(
        kernels.decode_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5
    )
    # all keys equal: the plain mean of the values
    q, k, v = query_and_cache(1, 2, 16, 40, torch.float32, 3)
    k.copy_(k[:, :, :1].clone().expand_as(k))
    torch.testing.assert_close(kernels.decode_attention(q, k, v), v.mean(dim=2, keepdim=True))


@needs_kernel
def test_the_result_is_laid_out_for_merging_heads():
    q, k, v = query_and_cache(4, 3, 8, 6, torch.float32, 4)
    y = kernels.decode_attention(q, k, v)
    assert y.transpose(1, 2).is_contiguous()  # (B, 1, nh, hs): the reshape to (B, 1, C) is a view


@needs_kernel
def test_cases_it_does_not_serve_are_declined(monkeypatch):
    q, k, v = query_and_cache(2, 2, 16, 5, torch.float32, 5)
    assert kernels.decode_attention(q, k, v) is not None
    two_queries = torch.randn(2, 2, 2, 16)
    assert kernels.decode_attention(two_queries, k, v) is None
    assert kernels.decode_attention(q, k, v.to(torch.bfloat16)) is None  # mixed dtypes
    assert kernels.decode_attention(q.double(), k.double(), v.double()) is None
    assert kernels.decode_attention(q[..., :12], k[..., :12], v[..., :12]) is None  # hs not a multiple of 8
    assert kernels.decode_attention(q, k.transpose(2, 3), v.transpose(2, 3)) is None  # rows not contiguous
    leaf = q.clone().requires_grad_()
    assert kernels.decode_attention(leaf, k, v) is None  # autograd needs SDPA's backward
    with torch.no_grad():
        assert kernels.decode_attention(leaf, k, v) is not None  # no graph is built
    monkeypatch.setenv("IMAGEGPT_NATIVE_KERNELS", "0")
    assert not kernels.available()
    assert kernels.decode_attention(q, k, v) is None


@needs_kernel
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_packed_linear_equals_the_definition(activation):
    generator = torch.Generator().manual_seed(7)
    for N, K in [(1, 1), (8, 5), (16, 64), (17, 33), (40, 24), (515, 64)]:
        weight = torch.randn(N, K, generator=generator)
        bias = torch.randn(N, generator=generator)
        packed = kernels.pack_linear(weight, scale=1.5)
        assert packed.shape == ((N + 15) // 16, K, 16)
        padded = torch.zeros(packed.size(0) * 16)
        padded[:N] = 0.25 * bias
        for M in [0, 1, 2, 3, 4, 5, 6, 7, 13, kernels.MAX_ROWS]:
            wide = torch.randn(M, 2 * K, generator=generator)
            x = wide[:, :K]  # rows strided, as a view of a wider tensor
            expected = 1.5 * x @ weight.T + 0.25 * bias
            if activation == "silu":
                expected = F.silu(expected)
            got = kernels.packed_linear(x, packed, padded, N, activation)
            assert got.shape == (M, N)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_packed_linear_keeps_leading_dimensions_and_any_thread_count():
    weight, x = torch.randn(24, 16), torch.randn(3, 1, 16)
    packed, bias = kernels.pack_linear(weight), torch.zeros(32)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            got = kernels.packed_linear(x, packed, bias, 24)
            assert got.shape == (3, 1, 24)
            torch.testing.assert_close(got, x @ weight.T, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_an_int8_packed_linear_sums_the_int8_products_exactly(activation):
    # the kernel quantizes x's rows as quantize_int8 does (the same float32 division and rounding), sums
    # the int8 products exactly and scales back in the order below: the same float32 numbers
    generator = torch.Generator().manual_seed(11)
    for N, K in [(1, 8), (8, 16), (17, 40), (40, 24), (515, 64), (33, 1024)]:
        weight = torch.randn(N, K, generator=generator)
        bias = torch.randn(N, generator=generator)
        packed, scales = kernels.pack_linear_int8(weight, scale=1.5)
        qw, sw = kernels.quantize_int8(1.5 * weight)
        assert packed.shape == ((N + 15) // 16, K // 4, 16, 4) and packed.dtype == torch.int8
        assert torch.equal(scales[:N], sw) and not scales[N:].any()
        assert torch.equal(packed.permute(0, 2, 1, 3).reshape(-1, K)[:N], qw)
        padded = torch.zeros(packed.size(0) * 16)
        padded[:N] = bias
        for M in [0, 1, 2, 3, 4, 5, 13, kernels.MAX_ROWS]:
            x = torch.randn(M, 2 * K, generator=generator)[:, :K]  # rows strided, a view of a wider tensor
            qx, sx = kernels.quantize_int8(x)
            products = (qx.long() @ qw.long().T).float()  # exact in float32: |sum| < 2^24 here
            expected = products * (sx[:, None] * sw[None, :]) + bias
            got = kernels.packed_linear(x, packed, padded, N, activation, scales)
            assert got.shape == (M, N)
            if activation == "silu":
                torch.testing.assert_close(got, F.silu(expected), atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(got, expected)


@needs_kernel
def test_int8_packing_is_the_same_natively_and_in_pytorch(monkeypatch):
    generator = torch.Generator().manual_seed(13)
    for N, K, scale in [(1, 8, 1.0), (17, 40, 1.702), (515, 64, 1 / 1.702), (48, 1024, 0.5)]:
        weight = torch.randn(N, 2 * K, generator=generator)[:, :K]  # rows strided
        weight[0] = 0.0  # an all-zero column: scale 1, as quantize_int8 has it
        native = kernels.pack_linear_int8(weight, scale)
        with monkeypatch.context() as patch:
            patch.setenv("IMAGEGPT_NATIVE_KERNELS", "0")
            torch_packed = kernels.pack_linear_int8(weight, scale)
        assert torch.equal(native[0], torch_packed[0]) and torch.equal(native[1], torch_packed[1])
        assert native[1][0] == 1 and not native[1][N:].any()


@needs_kernel
def test_an_int8_packed_linear_is_close_to_the_float_one_and_any_thread_count_agrees():
    generator = torch.Generator().manual_seed(12)
    weight, x = torch.randn(96, 256, generator=generator), torch.randn(16, 256, generator=generator)
    packed, scales = kernels.pack_linear_int8(weight, scale=0.5)
    bias = torch.zeros(96)
    exact = 0.5 * x @ weight.T
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(kernels.packed_linear(x, packed, bias, 96, "none", scales))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)
    # two roundings of 1/254 of a row's largest at most; summed over 256 products, seen here: 0.6% of the
    # largest output
    error = (results[0] - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.02
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.pack_linear_int8(torch.randn(4, 12))


def test_without_the_extension_sampling_runs_on_pytorch_and_int8_weights_are_refused(monkeypatch):
    """An install where imagegpt._kernels was not built (no C compiler, aarch64): the same calls work."""
    from imagegpt import ImageGPT, ImageGPTConfig
    from imagegpt.errors import ConfigError
    from imagegpt.sampling import sample

    monkeypatch.setattr(kernels, "_kernels", None)
    kernels._supported.cache_clear()
    try:
        assert not kernels.available()
        q, k, v = query_and_cache(2, 2, 8, 5, torch.float32, seed=3)
        assert kernels.decode_attention(q, k, v) is None
        torch.manual_seed(0)
        model = ImageGPT(ImageGPTConfig(vocab_size=9, n_positions=16, n_embd=16, n_layer=2, n_head=2))
        ids = sample(model, 2, seed=0, top_k=3)
        assert ids.shape == (2, 16) and torch.equal(ids, sample(model, 2, seed=0, top_k=3, dtype="float32"))
        with pytest.raises(ConfigError, match="not available here"):
            sample(model, 1, weight_dtype="int8")
    finally:
        kernels._supported.cache_clear()
