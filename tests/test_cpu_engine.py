"""The CPU decode engine (imagegpt.cpu.DecodeEngine): its step equals the model's own decode step, over
every cache dtype, on float32, bfloat16 and int8 weights; its caches attend natively; it attaches nothing to
the model, notices changed weights, and steps aside where the packed blocks do not apply."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from imagegpt import ImageGPT, ImageGPTConfig, cpu
from imagegpt.cpu import engine as engine_module
from imagegpt.cpu import ops
from imagegpt.errors import ConfigError
from imagegpt.model import KVCache
from imagegpt.quantize import new_cache, quantize_int8
from imagegpt.sampling import decode_one_token
from model_helpers import randomised

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="the native kernels do not run here")
pytestmark = needs_kernel


def config_for(n_embd=64, n_head=2, n_inner=None, n_layer=2):
    return ImageGPTConfig(
        vocab_size=17, n_positions=40, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_inner=n_inner
    )


def filled(cache: KVCache, seed: int) -> KVCache:
    """Random keys and values at every position of every layer."""
    generator = torch.Generator().manual_seed(seed)
    for layer in range(len(cache.k)):
        k, v = (torch.randn(cache.k[layer].shape, generator=generator) for _ in range(2))
        cache.update(layer, 0, k, v)
    return cache


class Spy:
    """Counts the calls of one of the C functions behind the operators (their arguments: the C code's)."""

    def __init__(self, monkeypatch, name):
        self.calls, real = [], getattr(ops._kernels, name)
        monkeypatch.setattr(ops._kernels, name, lambda *a: self.calls.append(a) or real(*a))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize(("n_embd", "n_head", "n_inner"), [(40, 5, 88), (64, 2, None), (96, 4, 200)])
def test_a_step_equals_the_models_own(monkeypatch, cache_dtype, n_embd, n_head, n_inner, cpu_avx512):
    # widths that are not multiples of the kernel's 16 columns (40, 120, 88, 200) and head widths of 8..32
    model = randomised(ImageGPT(config_for(n_embd, n_head, n_inner))).eval()
    engine = cpu.DecodeEngine(model)
    blocks = Spy(monkeypatch, "decode_blocks")
    threads = torch.get_num_threads()
    for seed, (batch, position, n) in enumerate([(1, 0, 1), (7, 1, 2), (64, 37, 3), (16, 39, threads)]):
        token = torch.randint(0, 16, (batch, 1), generator=torch.Generator().manual_seed(seed))
        plain = filled(new_cache(model.config, batch, dtype=cache_dtype), seed)
        native = filled(engine.new_cache(batch, 40, cache_dtype), seed)
        torch.set_num_threads(n)
        try:
            with torch.no_grad():
                expected = decode_one_token(model, token, position, plain)
                got = engine.step(model, token, position, native)
        finally:
            torch.set_num_threads(threads)
        assert len(blocks.calls) == seed + 1 and blocks.calls[-1][7] == 2  # both blocks in one call
        # a rounded cache: the new key can round one step apart in the two paths (its float32 values differ
        # in the last bits), and attention reads the rounded key; float32 caches agree to 1e-5
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.int8: 2e-2}
        torch.testing.assert_close(got, expected, atol=tolerance[cache_dtype], rtol=tolerance[cache_dtype])
        # one rounding step: relative for floats (float32: the second block's input already differs in the
        # last bits); int8: a step of the row's scale (max |x| / 127, |x| < 6)
        step = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.int8: 6 / 127}
        for layer in range(2):
            for new, old in zip(native.read(layer), plain.read(layer)):
                # the new key and value at `position`, rounded to the cache's dtype; other positions untouched
                rtol = 0 if cache_dtype == torch.int8 else step[cache_dtype]
                torch.testing.assert_close(
                    new[:, :, position], old[:, :, position], atol=step[cache_dtype], rtol=rtol
                )
                assert torch.equal(new[:, :, :position], old[:, :, :position])
                assert torch.equal(new[:, :, position + 1 :], old[:, :, position + 1 :])


def int8_linear(x, linear, weight_scale=1.0, bias_scale=1.0):
    """A linear layer on int8 weights as the kernel defines it, in float64: x's rows and the scaled weight's
    rows quantized (quantize_int8), their products summed, scaled back, the scaled bias added."""
    (qx, sx), (qw, sw) = quantize_int8(x), quantize_int8(weight_scale * linear.weight)
    y = (qx.double() @ qw.double().T) * sx.double()[..., None] * sw.double()
    return (y + bias_scale * linear.bias.double()).float()


def int8_step(model, token, position, cache):
    """The model's decode step with every block's linear layers as int8_linear (the MLP's quick-GELU
    computed as the kernel does, silu(1.702 z) / 1.702 with 1.702 folded into the weights)."""
    transformer = model.transformer
    x = transformer.embed(token, position)
    for block in transformer.h:
        attn, mlp, (B, T, C) = block.attn, block.mlp, x.shape
        q, k, v = int8_linear(block.ln_1(x), attn.c_attn).split(C, dim=2)
        q, k, v = (t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = cache.attend(attn.layer_idx, position, q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + int8_linear(y, attn.c_proj)
        h = F.silu(int8_linear(block.ln_2(x), mlp.c_fc, 1.702, 1.702))
        x = x + int8_linear(h, mlp.c_proj, 1 / 1.702)
    return model.lm_head(transformer.ln_f(x)[:, -1])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize(("n_embd", "n_head", "n_inner"), [(40, 5, 88), (64, 2, None), (96, 4, 200)])
def test_an_int8_weights_step_equals_its_definition(cache_dtype, n_embd, n_head, n_inner):
    model = randomised(ImageGPT(config_for(n_embd, n_head, n_inner, n_layer=1))).eval()
    engine = cpu.DecodeEngine(model, torch.int8)
    rows = agreeing = 0
    for seed, (batch, position) in enumerate([(7, 1), (64, 37), (16, 39)]):
        token = torch.randint(0, 16, (batch, 1), generator=torch.Generator().manual_seed(seed))
        plain, defined = (filled(new_cache(model.config, batch, dtype=cache_dtype), seed) for _ in range(2))
        native = filled(engine.new_cache(batch, 40, cache_dtype), seed)
        with torch.no_grad():
            exact = decode_one_token(model, token, position, plain)
            expected = int8_step(model, token, position, defined)
            got = engine.step(model, token, position, native)
        # the kernel's float32 norms and attention differ from the modules' in the last bits, so a value
        # landing within a bit of a rounding boundary can quantize one step apart (a few rows in a hundred
        # here); every other row agrees to float32 rounding
        largest = expected.abs().max()
        close = ((got - expected).abs() <= 1e-4 * largest).all(1)
        rows, agreeing = rows + batch, agreeing + int(close.sum())
        torch.testing.assert_close(got, expected, atol=0.02 * largest, rtol=0)
        assert (got - exact).abs().max() < 0.1 * largest  # int8 weights stay near the float32 ones
        assert (got - exact).abs().max() > 10 * (got - expected)[close].abs().max()  # but are not them
    assert agreeing >= 0.9 * rows


def rounded_to_bfloat16(model: ImageGPT) -> ImageGPT:
    """A copy of the model whose blocks' linear weights are what the engine packs as bfloat16, undone: w s
    rounded to bfloat16, over s (s the quick-GELU scale the engine folds into the MLP's weights, else 1)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for b in rounded.transformer.h:
            scaled = ((b.attn.c_attn, 1), (b.attn.c_proj, 1), (b.mlp.c_fc, 1.702), (b.mlp.c_proj, 1 / 1.702))
            for layer, s in scaled:
                layer.weight.copy_((layer.weight * s).bfloat16().float() / s)
    return rounded


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_embd", "n_head", "n_inner"), [(40, 5, 88), (96, 4, 200)])
def test_a_bfloat16_weights_step_is_the_model_on_its_rounded_weights(cache_dtype, n_embd, n_head, n_inner,
                                                                     cpu_avx512):  # fmt: skip
    model = randomised(ImageGPT(config_for(n_embd, n_head, n_inner))).eval()
    rounded = rounded_to_bfloat16(model)
    engine = cpu.DecodeEngine(model, torch.bfloat16)
    assert {w.dtype for w in engine.packed.weights} == {torch.bfloat16}
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[cache_dtype]  # as in the float32 weights' test
    for seed, (batch, position) in enumerate([(1, 0), (7, 1), (64, 37), (16, 39)]):
        token = torch.randint(0, 16, (batch, 1), generator=torch.Generator().manual_seed(seed))
        plain, exact_cache = (filled(new_cache(model.config, batch, dtype=cache_dtype), seed) for _ in "ab")
        native = filled(engine.new_cache(batch, 40, cache_dtype), seed)
        with torch.no_grad():
            expected = decode_one_token(rounded, token, position, plain)
            exact = decode_one_token(model, token, position, exact_cache)
            got = engine.step(model, token, position, native)
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
        if cache_dtype == torch.float32:  # the weights are rounded: the step is not the float32 model's
            assert (got - exact).abs().max() > 100 * (got - expected).abs().max()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_new_keys_and_values_are_rounded_as_torch_rounds(cache_dtype):
    # with ln_1's weight zero the keys and values are c_attn's bias exactly: crafted values, among them
    # ties (bfloat16: the low 16 bits 0x8000), to even either way, tiny, huge and infinite ones
    model = ImageGPT(config_for(n_layer=1)).eval()
    block = model.transformer.h[0]
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (2 * 64,), generator=generator, dtype=torch.int64)
    bits[:32] = (bits[:32] & ~0xFFFF) | 0x8000
    values = bits.to(torch.int32).view(torch.float32)
    values[values.isnan()] = 1.0
    special = [1e-40, -3e38, 7e4, -65520.0, float("inf"), 1.0 + 2**-8, 1.0 + 3 * 2**-8, 0.0]
    values[32:40] = torch.tensor(special)
    with torch.no_grad():
        block.ln_1.weight.zero_()
        block.attn.c_attn.bias[64:] = values
        engine = cpu.DecodeEngine(model)
        cache = engine.new_cache(3, 40, cache_dtype)
        engine.step(model, torch.zeros(3, 1, dtype=torch.long), 5, cache)
    expected = values.to(cache_dtype)
    for tensor, part in ((cache.k[0], expected[:64]), (cache.v[0], expected[64:])):
        assert torch.equal(tensor[:, :, 5].reshape(3, 64), part.expand(3, 64))


def test_an_int8_cache_is_quantized_as_the_cache_quantizes():
    # as above, the keys and values are c_attn's bias: the kernel's int8 rows and scales equal those of
    # quantize_int8, a head of zeros included (scale 1)
    model = ImageGPT(config_for(n_layer=1)).eval()
    block = model.transformer.h[0]
    values = 3 * torch.randn(2 * 64, generator=torch.Generator().manual_seed(1))
    values[32:64] = 0.0  # the keys' second head
    values[64] = 1e-30  # a tiny row maximum
    with torch.no_grad():
        block.ln_1.weight.zero_()
        block.attn.c_attn.bias[64:] = values
        engine = cpu.DecodeEngine(model)
        cache = engine.new_cache(2, 40, torch.int8)
        engine.step(model, torch.zeros(2, 1, dtype=torch.long), 9, cache)
    for rows, scales, part in (
        (cache.k[0], cache.k_scale[0], values[:64]),
        (cache.v[0], cache.v_scale[0], values[64:]),
    ):
        q, scale = quantize_int8(part.view(2, 32))  # (heads, hs)
        assert torch.equal(rows[:, :, 9], q.expand(2, 2, 32))
        assert torch.equal(scales[:, :, 9], scale.expand(2, 2))
    assert cache.k_scale[0][0, 1, 9] == 1.0 and not cache.k[0][:, 1, 9].any()


def test_the_native_cache_attends_one_token_natively_and_the_rest_as_the_model_does(monkeypatch):
    # the steps' float32 results differ in the last bits, which can round a later key to a neighbouring
    # bfloat16 or int8 value: within a rounding step of those caches (the tolerances of
    # test_a_step_equals_the_models_own), float32 to 1e-5
    torch.manual_seed(0)
    model = randomised(ImageGPT(config_for())).eval()
    engine = cpu.DecodeEngine(model)
    attention = Spy(monkeypatch, "decode_attention")
    ids = torch.randint(0, 16, (3, 12), generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        plain, native = new_cache(model.config, 3, dtype=dtype), engine.new_cache(3, 40, dtype)
        with torch.no_grad():
            expected = [model(ids[:, :8], kv_cache=plain).logits[:, -1]]
            got = [model(ids[:, :8], kv_cache=native).logits[:, -1]]  # a prefill: SDPA over the cache
            assert attention.calls == []
            for t in range(8, 12):  # one token: the model's modules, the cache's native attention
                expected.append(model(ids[:, t : t + 1], kv_cache=plain, start=t).logits[:, -1])
                got.append(model(ids[:, t : t + 1], kv_cache=native, start=t).logits[:, -1])
        assert len(attention.calls) == 4 * 2  # every step, every layer
        attention.calls.clear()
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.int8: 2e-2}[dtype]
        torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=tolerance, rtol=tolerance)
    with torch.enable_grad():  # autograd needs SDPA's backward
        q = torch.randn(3, 2, 1, 32, requires_grad=True)
        native.attend(0, 12, q, torch.randn(3, 2, 1, 32), torch.randn(3, 2, 1, 32)).sum().backward()
    assert attention.calls == [] and q.grad is not None
    monkeypatch.setenv("IMAGEGPT_NATIVE_KERNELS", "0")
    with torch.no_grad():
        native.attend(0, 13, q, torch.randn(3, 2, 1, 32), torch.randn(3, 2, 1, 32))
    assert attention.calls == []


def test_the_engine_attaches_nothing_to_the_model():
    model = randomised(ImageGPT(config_for())).eval()
    state = {name: dict(vars(module)) for name, module in model.named_modules()}
    engine = cpu.DecodeEngine(model)
    with torch.no_grad():
        engine.step(model, torch.zeros(2, 1, dtype=torch.long), 0, engine.new_cache(2, 40, torch.float32))
    assert {name: dict(vars(module)) for name, module in model.named_modules()} == state


def test_changed_weights_are_packed_again(monkeypatch):
    model = randomised(ImageGPT(config_for())).eval()
    engine = cpu.DecodeEngine(model)
    token = torch.randint(0, 16, (2, 1), generator=torch.Generator().manual_seed(3))

    def step():
        with torch.no_grad():
            expected = decode_one_token(model, token, 0, KVCache(model.config, 2))
            return engine.step(model, token, 0, engine.new_cache(2, 40, torch.float32)), expected

    packs = []
    real = engine_module.pack_blocks
    monkeypatch.setattr(engine_module, "pack_blocks", lambda *a: packs.append(1) or real(*a))
    step()
    assert packs == []  # packed once, when made
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias.add_(1.0)  # in place
    got, expected = step()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    model.transformer.h[0].attn.c_attn.weight = torch.nn.Parameter(torch.randn(192, 64))  # replaced
    got, expected = step()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert packs == [1, 1]


def test_the_engine_steps_aside_in_training_under_autocast_and_for_large_batches(monkeypatch):
    model = randomised(ImageGPT(config_for())).eval()
    engine = cpu.DecodeEngine(model)
    blocks = Spy(monkeypatch, "decode_blocks")
    with torch.no_grad():
        model.train()  # dropout (0 here, but the engine cannot know what a module does in training)
        engine.step(model, torch.zeros(2, 1, dtype=torch.long), 0, engine.new_cache(2, 40, torch.float32))
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            engine.step(model, torch.zeros(2, 1, dtype=torch.long), 0, engine.new_cache(2, 40, torch.float32))
        large = engine.new_cache(65, 40, torch.float32)
        assert not engine.takes(large)
        engine.step(model, torch.zeros(65, 1, dtype=torch.long), 0, large)
    assert blocks.calls == []


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.int8])
def test_rounded_weights_never_step_aside_to_the_float32_modules(weights):
    # the model's modules would decode on its float32 weights: not what was asked, so it is an error
    model = randomised(ImageGPT(config_for())).eval()
    engine = cpu.DecodeEngine(model, weights)
    token = torch.zeros(65, 1, dtype=torch.long)
    with pytest.raises(ConfigError, match="weights decode in the packed blocks only"):
        engine.step(model, token, 0, engine.new_cache(65, 40, torch.float32))


def test_what_the_engine_cannot_run_is_said(monkeypatch):
    model = ImageGPT(config_for())
    assert engine_module.refusal(model, torch.float32) is None
    narrow = ImageGPT(ImageGPTConfig(vocab_size=17, n_positions=16, n_embd=36, n_layer=1, n_head=3))
    assert "head width a multiple of 8" in engine_module.refusal(narrow, torch.float32)
    with pytest.raises(ConfigError, match="multiples of 8; this model has 36, 12 and 144"):
        cpu.DecodeEngine.create(narrow, torch.int8)
    engine = cpu.DecodeEngine.create(narrow)  # float32: the model's modules with the native caches
    assert engine is not None and engine.packed is None
    monkeypatch.setattr(engine_module, "PACK_BUDGET_BYTES", 1000)
    assert "packing budget" in engine_module.refusal(model, torch.float32)
    assert cpu.DecodeEngine(model).packed is None
    monkeypatch.setenv("IMAGEGPT_NATIVE_KERNELS", "0")
    assert cpu.DecodeEngine.create(model) is None
    for weights in ("int8", "bfloat16"):
        with pytest.raises(ConfigError, match=f"{weights} weights run in .* not available here"):
            cpu.DecodeEngine.create(model, getattr(torch, weights))
    assert not cpu.DecodeEngine.runs(model, torch.bfloat16)
