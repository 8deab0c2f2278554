"""The architecture, exactly as the original: presets, norm, activation, SOS, head, initialisation, the
attention path, KV cache (and its static, masked form), losses, gradient checkpointing, and
forward_intermediates, the one pass every feature consumer takes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imagegpt import ImageGPT, ImageGPTClassifier, ImageGPTConfig
from imagegpt.errors import ArgumentError
from imagegpt.model import MLP, KVCache, Norm, quick_gelu, sos_inputs
from imagegpt.quantize import Int8KVCache, cache_position_bytes, new_cache, quantize_int8
from model_helpers import ids_for, randomised


def nano(**overrides):
    return ImageGPTConfig.from_preset("igpt-nano", resolution=(6, 5), clusters=16, **overrides)


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


@pytest.mark.parametrize("preset", ["igpt-mini", "igpt-micro", "igpt-demo", "igpt-nano"])
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


def test_norm_gradients_are_those_of_the_definition():
    norm = Norm(8).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(norm, (x,))
    by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    grads = torch.autograd.grad(norm(x).square().sum(), (x, norm.weight))
    for got, expected in zip(grads, torch.autograd.grad(by_hand.square().sum(), (x, norm.weight))):
        torch.testing.assert_close(got, expected)


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
    assert torch.equal(x, torch.linspace(-6, 6, 101))  # its input untouched: in place on its own temporary
    x64 = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(quick_gelu, (x64,))


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
    cache = new_cache(config, 3, 7, dtype=dtype)
    tensors = cache.k + cache.v + (cache.k_scale + cache.v_scale if cache.quantized else [])
    assert sum(t.nbytes for t in tensors) == 3 * 7 * cache_position_bytes(config, dtype)


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


def test_bfloat16_autocast_model_is_close_to_float32():
    config = nano()
    model = randomised(ImageGPT(config))
    ids = ids_for(config)
    reference = model.image_loss(ids)
    reference.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.image_loss(ids)
        assert model(ids).logits.dtype == torch.bfloat16
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-2)
    for p, g in zip(model.parameters(), grads):
        assert p.grad.dtype == torch.float32
        assert torch.allclose(p.grad, g, atol=0.05 * g.abs().max().item() + 1e-6)


def test_an_int8_cache_returns_keys_and_values_within_half_a_step():
    config = ImageGPTConfig(vocab_size=17, n_positions=40, n_embd=64, n_layer=1, n_head=2)
    with pytest.raises(ArgumentError, match="Int8KVCache"):  # int8 rows need scales: refused, not truncated
        KVCache(config, 3, dtype=torch.int8)
    cache = new_cache(config, 3, dtype=torch.int8)
    assert isinstance(cache, Int8KVCache)
    k, v = torch.randn(2, 3, 2, 6, 32).unbind(0)
    keys, values = cache.update(0, 4, k, v)  # positions 4..9, float32, dequantized
    assert keys.dtype == values.dtype == torch.float32 and keys.shape == (3, 2, 10, 32)
    for got, want, scale in ((keys, k, cache.k_scale[0]), (values, v, cache.v_scale[0])):
        assert torch.all((got[:, :, 4:] - want).abs() <= scale[:, :, 4:10, None] / 2 * (1 + 1e-6))
        torch.testing.assert_close(scale[:, :, 4:10], want.abs().amax(-1) / 127)
    assert cache.k[0].dtype == torch.int8 and cache.k[0].element_size() == 1
    whole, _ = cache.update(0, torch.tensor([1]), k[:, :, :1], v[:, :, :1])  # the static step's form
    assert whole.shape == (3, 2, config.n_positions, 32)
    torch.testing.assert_close(whole[:, :, 1], keys[:, :, 4], atol=0, rtol=0)
    q, scale = quantize_int8(k[:, :, :1])
    assert torch.equal(cache.k[0][:, :, 1:2], q) and torch.equal(cache.k_scale[0][:, :, 1:2], scale)


def test_a_static_step_over_the_whole_cache_under_a_mask_equals_the_dynamic_one():
    """Positions as a tensor (CUDA graphs): the same attention module, the whole cache read, later positions
    masked; the cache's zeros beyond the position never reach the result."""
    config = nano()
    model = randomised(ImageGPT(config)).eval()
    ids = ids_for(config, batch=2)
    dynamic, static = KVCache(config, 2), KVCache(config, 2)
    with torch.no_grad():
        model(ids[:, :5], kv_cache=dynamic)
        model(ids[:, :5], kv_cache=static)
        for t in range(5, 9):
            expected = model(ids[:, t : t + 1], kv_cache=dynamic, start=t).logits
            got = model(ids[:, t : t + 1], kv_cache=static, start=torch.tensor([t])).logits
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert static.mask(torch.tensor([2])).tolist() == [[i <= 2 for i in range(config.n_positions)]]


def test_attention_with_a_cache_is_the_caches_to_do():
    """A cache that stores its keys in its own way attends in its own way (imagegpt.cpu's does): the model
    hands it q, k and v and takes what it returns."""

    class Recording(KVCache):
        def attend(self, layer, pos, q, k, v, mask=None, dropout=0.0):
            seen.append((layer, pos, tuple(q.shape)))
            return super().attend(layer, pos, q, k, v, mask, dropout)

    config = nano()
    model = randomised(ImageGPT(config)).eval()
    seen = []
    with torch.no_grad():
        model(ids_for(config, batch=2)[:, :4], kv_cache=Recording(config, 2), start=0)
    assert seen == [(layer, 0, (2, config.n_head, 4, config.head_dim)) for layer in range(config.n_layer)]


# forward_intermediates: the probe's, fine-tuning's and feature extraction's one pass


class BlockCounter:
    def __init__(self, model):
        self.calls = 0
        for block in model.transformer.h:
            block.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_forward_intermediates_are_the_hidden_states_as_each_norm_reads_them():
    config = nano(n_layer=3)
    model = randomised(ImageGPT(config)).eval()
    ids = ids_for(config)
    transformer = model.transformer
    states = model(ids, output_hidden_states=True).hidden_states
    raw = [*states[:-1], transformer.h[-1](states[-2])]  # the input of each block, then the last's output
    final, normed = model.forward_intermediates(ids, [3, 0, 2], stop_early=False)
    torch.testing.assert_close(final, states[-1])
    for got, layer in zip(normed, [3, 0, 2]):  # in the order asked
        norm = transformer.ln_f if layer == 3 else transformer.h[layer].ln_1
        torch.testing.assert_close(got, norm(raw[layer]))
    _, plain = model.forward_intermediates(ids, [1, 3], norm=False)
    torch.testing.assert_close(plain[0], raw[1])
    torch.testing.assert_close(plain[1], raw[3])
    _, pooled = model.forward_intermediates(ids, [2], pool=True)
    assert pooled[0].shape == (3, config.n_embd) and pooled[0].dtype == torch.float32
    torch.testing.assert_close(pooled[0], transformer.h[2].ln_1(raw[2]).mean(dim=1))


def test_forward_intermediates_stop_after_the_deepest_layer_asked():
    config = nano(n_layer=4)
    model = randomised(ImageGPT(config)).eval()
    counter = BlockCounter(model)
    final, _ = model.forward_intermediates(ids_for(config), [0, 2])
    assert final is None and counter.calls == 2  # blocks 0 and 1: layer 2 is block 2's input
    model.forward_intermediates(ids_for(config), [0], stop_early=False)
    assert counter.calls == 2 + 4
    for wrong in ([], [5], [-1]):
        with pytest.raises(ValueError, match="layers must lie in"):
            model.forward_intermediates(ids_for(config), wrong)


def test_a_classifier_reads_its_last_layer_through_forward_intermediates():
    config = nano(num_labels=3)
    model = randomised(ImageGPTClassifier(config)).eval()
    ids = ids_for(config)
    _, (pooled,) = model.forward_intermediates(ids, [config.n_layer], pool=True)
    torch.testing.assert_close(model(ids).logits, pooled @ model.score.weight.T)
