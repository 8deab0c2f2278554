"""The architecture, exactly as the original: presets, norm, activation, SOS, head, initialisation, the
attention path, KV cache, losses, gradient checkpointing, and the fast paths (fused MLP scales, hand-written
norm backward, bfloat16 on CPUs without bfloat16 units) checked against their plain definitions."""

import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imagegpt import ImageGPT, ImageGPTClassifier, ImageGPTConfig, kernels
from imagegpt import model as model_module
from imagegpt.model import MLP, KVCache, Norm, quick_gelu, sos_inputs


def nano(**overrides):
    return ImageGPTConfig.from_preset("igpt-nano", resolution=(6, 5), clusters=16, **overrides)


def randomised(model, seed=0, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def ids_for(config, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.n_clusters, (batch, config.n_positions), generator=generator)


# Presets and sizes


@pytest.mark.parametrize(
    ("preset", "millions"), [("igpt-s", 76.7), ("igpt-m", 455), ("igpt-l", 1360), ("igpt-xl", 6800)]
)
def test_paper_preset_parameter_counts(preset, millions):
    config = ImageGPTConfig.from_preset(preset, resolution=32, clusters=512)
    assert config.num_parameters() / 1e6 == pytest.approx(millions, rel=0.01)
    if preset in ("igpt-s", "igpt-m"):  # the real module tree, on the meta device: nothing is allocated
        with torch.device("meta"):
            model = ImageGPT(config)
        assert model.num_parameters() == config.num_parameters()


@pytest.mark.parametrize("preset", ["igpt-mini", "igpt-micro", "igpt-nano"])
def test_small_preset_counts_match_the_modules(preset):
    config = ImageGPTConfig.from_preset(preset, resolution=(4, 7), clusters=9, n_inner=24)
    assert ImageGPT(config).num_parameters() == config.num_parameters()
    assert ImageGPTClassifier(config).num_parameters() == config.num_parameters(classifier=True)


# The architecture


def test_norm_is_rms_without_centring_or_bias():
    norm = Norm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 8) + 3.0  # a non-zero mean that a layer norm would remove
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert torch.allclose(norm(x.requires_grad_()), expected, atol=1e-6)  # the training path


def test_norm_backward_matches_autograd_of_the_definition():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: model_module._RMSNorm.apply(x, w, 1e-5), (x, weight))


def test_mlp_is_quick_gelu_with_four_times_width():
    config = nano()
    mlp = randomised(MLP(config))
    assert mlp.c_fc.weight.shape == (4 * config.n_embd, config.n_embd)
    x = torch.randn(2, 7, config.n_embd, requires_grad=True)
    hidden = F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)
    expected = F.linear(hidden * torch.sigmoid(1.702 * hidden), mlp.c_proj.weight, mlp.c_proj.bias)
    out = mlp(x)
    assert torch.allclose(out, expected, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    reference = torch.autograd.grad(expected.square().sum(), [x, *mlp.parameters()])
    for a, b in zip(grads, reference):
        assert torch.allclose(a, b, atol=1e-4)
    with torch.no_grad():  # the in-place inference path
        assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_quick_gelu():
    x = torch.linspace(-6, 6, 101)
    assert torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(quick_gelu(x), F.gelu(x), atol=1e-3)


def test_non_default_n_inner():
    config = nano(n_inner=40)
    model = ImageGPT(config)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (40, config.n_embd)


def test_sos_id_and_sos_inputs():
    config = nano()
    assert config.sos_id == config.vocab_size - 1 == config.n_clusters
    ids = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    assert sos_inputs(ids, 16).tolist() == [[16, 3, 1, 4], [16, 5, 9, 2]]


def test_head_predicts_every_colour_but_not_sos_and_is_untied():
    config = nano()
    model = ImageGPT(config)
    assert model.lm_head.weight.shape == (config.vocab_size - 1, config.n_embd)
    assert model.lm_head.bias is None
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert model(ids_for(config)).logits.shape == (3, config.n_positions, config.vocab_size - 1)


def test_initialisation_follows_the_original_code():
    torch.manual_seed(0)
    config = ImageGPTConfig.from_preset("igpt-mini", resolution=16, clusters=512)
    model = ImageGPT(config)
    width, depth = config.n_embd, config.n_layer
    expected = {
        "transformer.wpe.weight": 0.01,
        "transformer.wte.weight": 0.02,
        "attn.c_attn.weight": 1 / math.sqrt(width),
        "attn.c_proj.weight": 1 / math.sqrt(width * depth),
        "mlp.c_fc.weight": 0.02,
        "mlp.c_proj.weight": 0.02,
    }
    for suffix, std in expected.items():
        values = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith(suffix)])
        assert values.std().item() == pytest.approx(std, rel=0.03), suffix
        assert abs(values.mean().item()) < 3 * std / math.sqrt(values.numel()) + 1e-4, suffix
    for name, p in model.named_parameters():
        if name.endswith(".bias") or name == "lm_head.weight":
            assert torch.count_nonzero(p) == 0, name
        if "ln_" in name:
            assert torch.all(p == 1), name
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0


def test_classifier_mean_pools_the_final_normed_state():
    config = nano(num_labels=4)
    model = randomised(ImageGPTClassifier(config)).eval()
    ids = ids_for(config)
    out = model(ids, output_hidden_states=True)
    assert model.score.bias is None
    assert torch.allclose(out.logits, out.hidden_states[-1].mean(1) @ model.score.weight.t(), atol=1e-6)


# Attention never materialises T x T


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), tuple(t.shape)))
        return out


def test_no_attention_matrix_is_materialised_forward_or_backward():
    config = ImageGPTConfig(vocab_size=17, n_positions=37, n_embd=24, n_layer=2, n_head=2)
    model = randomised(ImageGPT(config))
    T = config.n_positions
    with ShapeRecorder() as recorder:
        model(ids_for(config), labels=ids_for(config)).loss.backward()
    square = [(op, shape) for op, shape in recorder.ops if len(shape) >= 2 and shape[-2:] == (T, T)]
    assert not square, square
    assert any("scaled_dot_product" in op for op, _ in recorder.ops)


# Outputs


def test_hidden_states_follow_transformers_convention():
    config = nano()
    model = randomised(ImageGPT(config)).eval()
    ids = ids_for(config)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == config.n_layer + 1
    embeddings = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(config.n_positions))
    assert torch.allclose(out.hidden_states[0], embeddings)
    assert torch.allclose(out.hidden_states[1], model.transformer.h[0](embeddings), atol=1e-6)
    final = model.transformer.ln_f(model.transformer.h[1](out.hidden_states[1]))
    assert torch.allclose(out.hidden_states[-1], final, atol=1e-6)
    assert torch.allclose(out.logits, model.lm_head(final), atol=1e-5)


def test_forward_loss_is_shifted_cross_entropy_on_ids_as_given():
    config = nano()
    model = randomised(ImageGPT(config))
    ids = ids_for(config)
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, config.n_clusters), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_loss_per_image_prepends_sos_and_predicts_every_token():
    config = nano()
    model = randomised(ImageGPT(config)).eval()
    ids = ids_for(config)
    inputs = torch.cat([torch.full((ids.size(0), 1), config.sos_id), ids[:, :-1]], dim=1)
    log_probs = torch.log_softmax(model(inputs).logits, dim=-1)  # (B, T, K)
    by_hand = -log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).mean(dim=1)
    assert torch.allclose(model.loss_per_image(ids), by_hand, atol=1e-5)
    assert torch.allclose(model.image_loss(ids), by_hand.mean(), atol=1e-5)


def test_dropout_is_configurable_and_off_in_eval():
    config = nano(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model = randomised(ImageGPT(config))
    ids = ids_for(config)
    torch.manual_seed(1)
    a = model(ids).logits
    b = model(ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


# KV cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_kv_cache_position_bytes_are_what_the_cache_allocates(dtype):
    config = nano()
    cache = KVCache(config, 3, 7, dtype=dtype)
    tensors = cache.k + cache.v + (cache.k_scale + cache.v_scale if cache.quantized else [])
    assert sum(t.nbytes for t in tensors) == 3 * 7 * model_module.cache_position_bytes(config, dtype)


def test_kv_cache_forward_equals_full_forward():
    config = nano()
    model = randomised(ImageGPT(config)).eval()
    ids = ids_for(config, batch=2)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(config, batch_size=2)
        prefix = 7
        steps = [model(ids[:, :prefix], kv_cache=cache, start=0).logits]
        steps += [model(ids[:, t : t + 1], kv_cache=cache, start=t).logits for t in range(prefix, 12)]
        steps.append(model(ids[:, 12:], kv_cache=cache, start=12).logits)  # a chunk after a prefix
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_positions_beyond_n_positions_are_an_error():
    config = nano()
    model = ImageGPT(config)
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, config.n_positions + 1, dtype=torch.long))


# Training paths


def test_gradient_checkpointing_gives_identical_gradients():
    config = nano(n_layer=3)
    model = randomised(ImageGPT(config))
    ids = ids_for(config)

    def gradients():
        model.zero_grad()
        model.image_loss(ids).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.transformer.gradient_checkpointing = True
    checkpointed = gradients()
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-7)


def test_bfloat16_autocast_without_bfloat16_units_matches_native_kernels(monkeypatch):
    """The emulated bfloat16 linear layer gives autocast's numbers: the same forward as PyTorch's own bfloat16
    kernels, gradients within bfloat16 rounding."""
    monkeypatch.setenv("IMAGEGPT_CPU_BF16", "0")
    torch.manual_seed(0)
    x = torch.randn(2, 9, 24, requires_grad=True)
    weight = torch.randn(16, 24, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    g = torch.randn(2, 9, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model_module._emulate_bf16(x)
        ours = model_module.linear(x, weight, bias)
        native = F.linear(x, weight, bias)
    assert ours.dtype == native.dtype == torch.bfloat16
    assert torch.equal(ours, native)
    for a, b in zip(
        torch.autograd.grad(ours, (x, weight, bias), g), torch.autograd.grad(native, (x, weight, bias), g)
    ):
        assert a.dtype == b.dtype
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_bfloat16_autocast_model_is_close_to_float32(monkeypatch):
    config = nano()
    model = randomised(ImageGPT(config))
    ids = ids_for(config)
    reference = model.image_loss(ids)
    reference.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for emulate in (True, False):
        monkeypatch.setenv("IMAGEGPT_CPU_BF16", "0" if emulate else "1")
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.image_loss(ids)
        loss.backward()
        assert loss.item() == pytest.approx(reference.item(), rel=1e-2)
        for p, g in zip(model.parameters(), grads):
            assert p.grad.dtype == torch.float32
            assert torch.allclose(p.grad, g, atol=0.05 * g.abs().max().item() + 1e-6)


def test_linear_with_recomputed_silu_matches_autograd_of_the_definition():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fused(x, weight, bias):
        return model_module._Linear.apply(x, weight, bias, 0.7, 1.3, True, False)

    expected = 1.3 * bias + 0.7 * F.silu(x) @ weight.t()
    assert torch.allclose(fused(x, weight, bias), expected)
    torch.autograd.gradcheck(fused, (x, weight, bias))


def test_bfloat16_emulation_with_silu_matches_native_kernels(monkeypatch):
    monkeypatch.setenv("IMAGEGPT_CPU_BF16", "0")
    torch.manual_seed(1)
    h = torch.randn(5, 32).bfloat16().requires_grad_()  # the bfloat16 output of c_fc under autocast
    weight = torch.randn(8, 32, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    g = torch.randn(5, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model_module.linear(h, weight, bias, silu=True)
        native = F.linear(F.silu(h), weight, bias)
    assert torch.equal(ours, native)
    for a, b in zip(
        torch.autograd.grad(ours, (h, weight, bias), g), torch.autograd.grad(native, (h, weight, bias), g)
    ):
        assert a.dtype == b.dtype
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


def test_inference_path_chunks_the_mlp_and_adds_in_place_with_the_same_numbers(monkeypatch):
    """Without autograd the MLP runs over chunks of rows and the residuals are added in place; the logits,
    the hidden states and the bfloat16 autocast dtype are those of the autograd path."""
    monkeypatch.setattr(model_module, "MLP_CHUNK_ELEMENTS", 1)  # chunks of 256 rows, the least
    config = nano()
    model = randomised(ImageGPT(config)).eval()
    ids = ids_for(config, batch=19)  # 19 x 30 = 570 rows: two whole chunks and a partial one
    reference = model(ids, output_hidden_states=True)  # grad enabled: whole tensors, new residual buffers
    assert reference.logits.requires_grad
    with torch.no_grad():
        chunked = model(ids).logits
        with_states = model(ids, output_hidden_states=True)
    torch.testing.assert_close(chunked, reference.logits, rtol=0, atol=1e-5)
    for ours, expected in zip(with_states.hidden_states, reference.hidden_states, strict=True):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)  # not overwritten by later blocks
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 300, config.n_embd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = mlp(x)
        with torch.no_grad():
            got = mlp(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.detach(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 5, model_module.FEW_ROWS, model_module.FEW_ROWS + 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_without_autograd_matches_the_definition_for_any_number_of_rows(rows, with_bias):
    """Few rows go as weight @ x.T (decode steps), many as x @ weight.T; both give alpha x W^T + beta b."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 24, generator=generator)
    weight = torch.randn(40, 24, generator=generator)
    bias = torch.randn(40, generator=generator) if with_bias else None
    expected = 1.5 * (F.silu(x) @ weight.T) + (0 if bias is None else 0.25 * bias)
    with torch.no_grad():
        got = model_module.linear(x, weight, bias, alpha=1.5, beta=0.25, silu=True)
    assert got.shape == (1, rows, 40) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# Packed weights (CPU float32 inference)

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="the native kernels do not run here")


@needs_kernel
def test_packed_weights_give_the_plain_numbers_and_are_dropped_afterwards(monkeypatch):
    config = nano()
    model = randomised(ImageGPT(config).eval(), scale=0.3)
    ids = ids_for(config)
    calls, steps = [], []
    real, real_step = kernels.packed_linear, kernels.DecodePlan.__call__
    monkeypatch.setattr(kernels, "packed_linear", lambda *a: calls.append(1) or real(*a))

    def step(plan, *args):
        steps.append((plan.layers, real_step(plan, *args)))
        return steps[-1][1]

    monkeypatch.setattr(kernels.DecodePlan, "__call__", step)
    with torch.no_grad():
        expected = model(ids).logits
        cache = KVCache(config, 3)
        model(ids[:, :7], kv_cache=cache)
        expected_step = model(ids[:, 7:8], kv_cache=cache, start=7).logits
        with model_module.packed_weights(model):
            mlps = [m for m in model.modules() if isinstance(m, MLP)]
            assert all(m.packed is not None and m.c_fc.packed is m.c_proj.packed is None for m in mlps)
            assert model.lm_head.packed is not None
            got = model(ids).logits
            cache = KVCache(config, 3)
            model(ids[:, :7], kv_cache=cache)
            got_step = model(ids[:, 7:8], kv_cache=cache, start=7).logits
            # the MLP's fused weights live on the MLP: its c_fc called alone is still c_fc
            x = torch.randn(3, 1, config.n_embd)
            torch.testing.assert_close(mlps[0].c_fc(x), F.linear(x, mlps[0].c_fc.weight, mlps[0].c_fc.bias))
    # the prefill's 21 rows through every linear layer and the head; the step's 3 through one native call
    # for all the blocks, then the head; the full forward's 90 rows are more than kernels.MAX_ROWS and take
    # the plain weights
    assert len(calls) == 4 * config.n_layer + 1 + 1
    assert steps == [(config.n_layer, True)]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_step, expected_step, atol=1e-5, rtol=1e-5)
    holders = (MLP, model_module.Linear, model_module.Block)
    assert all(m.packed is None for m in model.modules() if isinstance(m, holders))


@needs_kernel
@pytest.mark.parametrize(
    ("weight_dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.int8, torch.int8)]
)
def test_a_decode_step_of_all_blocks_in_one_call_equals_block_by_block(
    monkeypatch, weight_dtype, cache_dtype
):
    config = nano(n_embd=64, n_head=2, n_layer=3)
    model = randomised(ImageGPT(config).eval(), scale=0.3)
    ids = ids_for(config, batch=5)
    plans = []
    real = kernels.decode_plan
    monkeypatch.setattr(kernels, "decode_plan", lambda *a: plans.append(real(*a)) or plans[-1])
    caches, steps = [], []
    with torch.no_grad(), model_module.packed_weights(model, weight_dtype):
        stack = model.transformer.packed
        for one_call in (True, False):
            model.transformer.packed = stack if one_call else None
            cache = KVCache(config, 5, dtype=cache_dtype)
            model(ids[:, :6], kv_cache=cache)
            steps.append([model(ids[:, t : t + 1], kv_cache=cache, start=t).logits for t in range(6, 9)])
            caches.append(cache)
        model.transformer.packed = stack
    for layer in range(config.n_layer):
        assert torch.equal(caches[0].k[layer], caches[1].k[layer])
        assert torch.equal(caches[0].v[layer], caches[1].v[layer])
    assert [p.layers for p in plans if p.layers > 1] == [3]  # one plan for the cache, reused by the 3 steps
    assert len(stack.plans) == 1  # the plain run's cache never got one
    del cache, caches[:]
    gc.collect()
    assert len(stack.plans) == 0  # a plan goes with its cache
    for one, each in zip(*steps):
        assert torch.equal(one, each)  # the same kernel code, block after block


@needs_kernel
def test_a_decode_plan_refuses_what_it_was_not_made_for():
    config = nano(n_embd=64, n_head=2, n_layer=2)
    model = randomised(ImageGPT(config).eval())
    with torch.no_grad(), model_module.packed_weights(model):
        cache = KVCache(config, 4)
        layers = [block.packed.operands(cache) for block in model.transformer.h]
        eps, heads = config.layer_norm_epsilon, config.n_head
        plan = kernels.decode_plan(4, layers, eps, heads)
        assert plan.layers == 2 and not plan.int8
        x = torch.randn(4, 1, 64)
        assert not plan(torch.randn(3, 1, 64), 0)  # another batch
        assert not plan(torch.randn(4, 2, 64), 0)  # two tokens
        assert not plan(torch.randn(4, 1, 128)[:, :, ::2], 0)  # not contiguous
        assert not plan(x.double(), 0)
        assert not plan(x, config.n_positions)  # past the cache
        assert torch.equal(cache.k[0], torch.zeros_like(cache.k[0]))  # none of them wrote anything
        assert plan(x, 0) and not torch.equal(cache.k[0], torch.zeros_like(cache.k[0]))
        assert kernels.decode_plan(5, layers, eps, heads) is None  # the cache holds 4 images
        assert kernels.decode_plan(4, [], eps, heads) is None
        int8_cache = KVCache(config, 4, dtype=torch.int8)
        mixed = [layers[0], model.transformer.h[1].packed.operands(int8_cache)]
        assert kernels.decode_plan(4, mixed, eps, heads) is None  # layers with different caches
        assert model.transformer.packed(x.clone(), cache, 1)
        model.transformer.h[1].mlp.c_proj.bias.add_(1.0)  # changed after packing: the stack steps aside
        assert not model.transformer.packed(x.clone(), cache, 1)


def block_config(n_embd, n_head, n_inner):
    return ImageGPTConfig(
        vocab_size=17, n_positions=40, n_embd=n_embd, n_layer=1, n_head=n_head, n_inner=n_inner
    )


def filled_cache(config, batch, dtype, seed):
    cache = KVCache(config, batch, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    for layer in range(config.n_layer):
        k, v = (torch.randn(cache.k[layer].shape, generator=generator) for _ in range(2))
        cache.update(layer, 0, k, v)
    return cache


def cached_rows(cache, layer=0):
    """The layer's whole cache as float32 keys and values (int8 dequantized)."""
    return cache._read(layer, slice(None))


@needs_kernel
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize(("n_embd", "n_head", "n_inner"), [(40, 5, 88), (64, 2, None), (96, 4, 200)])
def test_a_packed_block_decode_step_equals_the_modules(monkeypatch, cache_dtype, n_embd, n_head, n_inner):
    # widths that are not multiples of the kernel's 16 columns (40, 120, 88, 200) and head widths of 8..32
    config = block_config(n_embd, n_head, n_inner)
    block = randomised(ImageGPT(config).eval()).transformer.h[0]
    took = []
    real = kernels.decode_block
    monkeypatch.setattr(kernels, "decode_block", lambda *a: took.append(real(*a)) or took[-1])
    threads = torch.get_num_threads()
    for seed, (batch, position, n) in enumerate([(1, 0, 1), (7, 1, 2), (64, 37, 3), (16, 39, threads)]):
        torch.set_num_threads(n)
        try:
            x = torch.randn(batch, 1, n_embd, generator=torch.Generator().manual_seed(seed))
            plain, packed = (filled_cache(config, batch, cache_dtype, seed) for _ in range(2))
            with torch.no_grad():
                expected = block(x, plain, position)
                with model_module.packed_weights(block):
                    got = block(x, packed, position)  # not in place: x is left as it was
        finally:
            torch.set_num_threads(threads)
        assert took[-1] is True
        # a rounded cache: the new key can round one step apart in the two paths (its float32 values differ
        # in the last bits), and attention reads the rounded key; float32 caches agree to 1e-5
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.int8: 2e-2}
        torch.testing.assert_close(got, expected, atol=tolerance[cache_dtype], rtol=tolerance[cache_dtype])
        # one rounding step: relative for floats; int8: a step of the row's scale (max |x| / 127, |x| < 6)
        step = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.int8: 6 / 127}
        for new, old in zip(cached_rows(packed), cached_rows(plain)):
            # the new key and value at `position`, rounded to the cache's dtype; the other positions untouched
            rtol = 0 if cache_dtype == torch.int8 else step[cache_dtype]
            torch.testing.assert_close(
                new[:, :, position], old[:, :, position], atol=step[cache_dtype], rtol=rtol
            )
            assert torch.equal(new[:, :, :position], old[:, :, :position])
            assert torch.equal(new[:, :, position + 1 :], old[:, :, position + 1 :])
    assert torch.equal(x, torch.randn(16, 1, n_embd, generator=torch.Generator().manual_seed(3)))


def int8_linear(x, weight, bias=None, alpha=1.0, beta=1.0, silu=False):
    """model.linear with int8 weights as the kernel defines them, in float64: x's rows and alpha * weight's
    rows quantized (quantize_int8), their products summed, scaled back, beta * bias added."""
    (qx, sx), (qw, sw) = model_module.quantize_int8(x), model_module.quantize_int8(alpha * weight)
    y = (qx.double() @ qw.double().T) * sx.double()[..., None] * sw.double()
    y = (y + beta * bias.double() if bias is not None else y).float()
    return F.silu(y) if silu else y


@needs_kernel
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize(("n_embd", "n_head", "n_inner"), [(40, 5, 88), (64, 2, None), (96, 4, 200)])
def test_an_int8_weights_block_decode_step_equals_its_definition(
    monkeypatch, cache_dtype, n_embd, n_head, n_inner
):
    config = block_config(n_embd, n_head, n_inner)
    block = randomised(ImageGPT(config).eval()).transformer.h[0]
    took = []
    real = kernels.decode_block
    monkeypatch.setattr(kernels, "decode_block", lambda *a: took.append(real(*a)) or took[-1])
    threads, rows, agreeing = torch.get_num_threads(), 0, 0
    for seed, (batch, position, n) in enumerate([(7, 1, 1), (64, 37, 3), (16, 39, threads)]):
        torch.set_num_threads(n)
        try:
            x = torch.randn(batch, 1, n_embd, generator=torch.Generator().manual_seed(seed))
            plain, defined, packed = (filled_cache(config, batch, cache_dtype, seed) for _ in range(3))
            with torch.no_grad():
                exact = block(x, plain, position)
                with monkeypatch.context() as patch:
                    patch.setattr(model_module, "linear", int8_linear)  # every linear layer of the modules
                    expected = block(x, defined, position)
                with model_module.packed_weights(block, torch.int8):
                    assert block.attn.c_attn.packed is None and block.mlp.packed is None  # the step only
                    got = block(x, packed, position)
        finally:
            torch.set_num_threads(threads)
        assert took[-1] is True
        # the kernel's float32 norms and attention differ from the modules' in the last bits, so a value
        # landing within a bit of a rounding boundary can quantize one step apart (a few rows in a hundred
        # here, off by < 1% of the largest output); every other row agrees to float32 rounding
        largest = expected.abs().max()
        close = ((got - expected).abs() <= 1e-5 * largest).flatten(1).all(1)
        rows, agreeing = rows + batch, agreeing + int(close.sum())
        torch.testing.assert_close(got, expected, atol=0.02 * largest, rtol=0)
        assert (got - exact).abs().max() < 0.1 * largest  # and int8 weights stay near the float32 ones
        assert (got - exact).abs().max() > 10 * (got - expected)[close].abs().max()  # but are not them
    assert agreeing >= 0.9 * rows


@needs_kernel
def test_packed_int8_weights_cover_decode_steps_only_and_are_dropped_afterwards(monkeypatch):
    config = nano()
    model = randomised(ImageGPT(config).eval(), scale=0.3)
    ids = ids_for(config)
    operands = []
    real = kernels.decode_plan

    def plan(batch, layers, *args):
        operands.extend(linears for _, linears, *_ in layers)
        return real(batch, layers, *args)

    monkeypatch.setattr(kernels, "decode_plan", plan)
    with torch.no_grad():
        expected = model(ids[:, :7]).logits
        cache = KVCache(config, 3)
        model(ids[:, :7], kv_cache=cache)
        expected_step = model(ids[:, 7:8], kv_cache=cache, start=7).logits
        cache = KVCache(config, 3)
        with model_module.packed_weights(model, torch.int8):
            assert all(m.packed is None for m in model.modules() if isinstance(m, (MLP, model_module.Linear)))
            got = model(ids[:, :7], kv_cache=cache).logits  # a prefill: the float32 weights
            step = model(ids[:, 7:8], kv_cache=cache, start=7).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(operands) == config.n_layer
    assert all(w.dtype == torch.int8 and s is not None for layers in operands for w, _, _, s in layers)
    error = (step - expected_step).abs().max() / expected_step.abs().max()
    assert 0 < error < 0.1  # seen here: 3.4% (random weights of std 0.3)
    holders = (MLP, model_module.Linear, model_module.Block)
    assert all(m.packed is None for m in model.modules() if isinstance(m, holders))
    with pytest.raises(ValueError, match="weight_dtype"), model_module.packed_weights(model, torch.float16):
        pass


@needs_kernel
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_a_packed_block_rounds_new_keys_and_values_as_torch_does(cache_dtype):
    # with ln_1's weight zero the keys and values are c_attn's bias exactly: crafted values, among them
    # ties (bfloat16: the low 16 bits 0x8000), to even either way, tiny, huge and infinite ones
    config = block_config(64, 2, None)
    block = ImageGPT(config).eval().transformer.h[0]
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
        cache = KVCache(config, 3, dtype=cache_dtype)
        with model_module.packed_weights(block):
            block(torch.randn(3, 1, 64), cache, 5, inplace=True)
    expected = values.to(cache_dtype)
    for tensor, part in ((cache.k[0], expected[:64]), (cache.v[0], expected[64:])):
        assert torch.equal(tensor[:, :, 5].reshape(3, 64), part.expand(3, 64))


@needs_kernel
def test_a_packed_block_quantizes_an_int8_cache_as_the_cache_does():
    # as above, the keys and values are c_attn's bias: the kernel's int8 rows and scales equal those of
    # quantize_int8, a head of zeros included (scale 1)
    config = block_config(64, 2, None)
    block = ImageGPT(config).eval().transformer.h[0]
    values = 3 * torch.randn(2 * 64, generator=torch.Generator().manual_seed(1))
    values[32:64] = 0.0  # the keys' second head
    values[64] = 1e-30  # a tiny row maximum
    with torch.no_grad():
        block.ln_1.weight.zero_()
        block.attn.c_attn.bias[64:] = values
        cache = KVCache(config, 2, dtype=torch.int8)
        with model_module.packed_weights(block):
            block(torch.randn(2, 1, 64), cache, 9, inplace=True)
    for rows, scales, part in (
        (cache.k[0], cache.k_scale[0], values[:64]),
        (cache.v[0], cache.v_scale[0], values[64:]),
    ):
        q, scale = model_module.quantize_int8(part.view(2, 32))  # (heads, hs)
        assert torch.equal(rows[:, :, 9], q.expand(2, 2, 32)) and torch.equal(
            scales[:, :, 9], scale.expand(2, 2)
        )
    assert cache.k_scale[0][0, 1, 9] == 1.0 and not cache.k[0][:, 1, 9].any()


def test_an_int8_cache_returns_keys_and_values_within_half_a_step():
    config = block_config(64, 2, None)
    cache = KVCache(config, 3, dtype=torch.int8)
    k, v = torch.randn(2, 3, 2, 6, 32).unbind(0)
    keys, values = cache.update(0, 4, k, v)  # positions 4..9, float32, dequantized
    assert keys.dtype == values.dtype == torch.float32 and keys.shape == (3, 2, 10, 32)
    for got, want, scale in ((keys, k, cache.k_scale[0]), (values, v, cache.v_scale[0])):
        assert torch.all((got[:, :, 4:] - want).abs() <= scale[:, :, 4:10, None] / 2 * (1 + 1e-6))
        torch.testing.assert_close(scale[:, :, 4:10], want.abs().amax(-1) / 127)
    assert cache.k[0].dtype == torch.int8 and cache.k[0].element_size() == 1
    whole, _ = cache.write(0, torch.tensor([1]), k[:, :, :1], v[:, :, :1])  # the static step's form
    assert whole.shape == (3, 2, config.n_positions, 32)
    torch.testing.assert_close(whole[:, :, 1], keys[:, :, 4], atol=0, rtol=0)


@needs_kernel
def test_a_packed_block_steps_aside_in_training_and_for_a_changed_bias(monkeypatch):
    config = block_config(64, 2, None)
    block = randomised(ImageGPT(config).eval()).transformer.h[0]
    took = []
    real = kernels.decode_block
    monkeypatch.setattr(kernels, "decode_block", lambda *a: took.append(real(*a)) or took[-1])
    x = torch.randn(4, 1, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model_module.packed_weights(block):
        block.train()  # dropout (0 here, but the block cannot know what a module does in training)
        trained = block(x, KVCache(config, 4), 3)
        block.eval()
        assert took == []
        torch.testing.assert_close(trained, block(x, KVCache(config, 4), 3), atol=1e-5, rtol=1e-5)
        block.mlp.c_proj.bias.add_(1.0)  # changed after packing: the module path, with the new bias
        changed = block(x, KVCache(config, 4), 3)
    assert took == [True]
    with torch.no_grad():
        torch.testing.assert_close(changed, block(x, KVCache(config, 4), 3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed - trained, torch.ones_like(x), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_packed_weights_step_aside_for_autograd_autocast_and_changed_weights():
    config = nano()
    model = randomised(ImageGPT(config).eval(), scale=0.3)
    ids = ids_for(config, batch=2)
    with model_module.packed_weights(model):
        with torch.no_grad():
            before = model(ids).logits
        loss = model(ids).logits.square().mean()  # autograd: the plain weights, which get gradients
        loss.backward()
        assert model.lm_head.weight.grad is not None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert not model.lm_head.packed.applies(torch.zeros(1, config.n_embd))
        with torch.no_grad():
            model.lm_head.weight.mul_(2)  # changed inside the block: the packed copy is stale
            after = model(ids).logits
    torch.testing.assert_close(after, 2 * before, atol=1e-5, rtol=1e-5)


def test_models_too_large_to_pack_twice_are_left_alone(monkeypatch):
    model = ImageGPT(nano())
    monkeypatch.setattr(model_module, "PACK_BUDGET_BYTES", 1000)
    assert not model_module.can_pack(model)
    with model_module.packed_weights(model):
        assert all(m.packed is None for m in model.modules() if isinstance(m, (MLP, model_module.Linear)))
