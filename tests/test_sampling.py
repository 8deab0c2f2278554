"""The KV-cached sampler: cached logits equal the full forward, greedy equals transformers' generate, the
filters only emit allowed tokens, prefixes are kept, seeds reproduce, and bad arguments are refused."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from imagegpt import ImageGPT, ImageGPTConfig, cpu, sampling
from imagegpt.cpu.engine import NativeInt8KVCache
from imagegpt.errors import ArgumentError, CheckpointError, ConfigError
from imagegpt.model import KVCache, sos_inputs
from imagegpt.palette import Palette
from imagegpt.processor import ImageProcessor
from imagegpt.quantize import Int8KVCache
from imagegpt.sampling import (
    CACHE_BUDGET_BYTES,
    SamplingOptions,
    complete,
    complete_images,
    decode_one_token,
    decode_one_token_static,
    default_batch_size,
    filter_logits,
    generate,
    keep_rows,
    load_for_sampling,
    prefill,
    sample,
    sample_images,
    sample_next,
)

CLUSTERS = 16
SIDE = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int, std: float = 0.3, **overrides) -> ImageGPT:
    """A tiny model with every weight random (the zero-initialised head would make all logits equal)."""
    torch.manual_seed(seed)
    config = ImageGPTConfig.from_preset("igpt-nano", resolution=SIDE, clusters=CLUSTERS, **overrides)
    model = ImageGPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("ln_1.weight") and not name.endswith("ln_2.weight"):
                p.normal_(0.0, std)
    return model


def random_ids(rows: int, seed: int, length: int = SIDE * SIDE) -> torch.Tensor:
    return torch.randint(0, CLUSTERS, (rows, length), generator=torch.Generator().manual_seed(seed))


# ---- the engine against the full forward ----


@pytest.mark.parametrize("static", [False, True])
def test_cached_decode_matches_full_forward_at_every_position(static):
    model = tiny_model(1)
    ids = random_ids(3, 2)
    inputs = sos_inputs(ids, model.config.sos_id)
    with torch.no_grad():
        full = model(inputs).logits  # (B, n, V)
        for split in (1, 7):  # prefill the first `split` inputs, then decode one token at a time
            cache = KVCache(model.config, 3, zeroed=static)
            if not static:  # the dynamic step never reads a position before writing it
                for tensor in cache.k + cache.v:
                    tensor.fill_(math.nan)
            logits = [prefill(model, inputs[:, :split], cache)]
            for position in range(split, inputs.size(1)):
                token = inputs[:, position : position + 1]
                if static:
                    logits.append(decode_one_token_static(model, token, torch.tensor([position]), cache))
                else:
                    logits.append(decode_one_token(model, token, position, cache))
            cached = torch.stack(logits, dim=1)
            torch.testing.assert_close(cached, full[:, split - 1 :], atol=1e-5, rtol=0)


def test_kv_cache_holds_layers_by_batch_by_positions_by_width():
    model = tiny_model(0)
    config = model.config
    cache = KVCache(config, 5)
    per_tensor = config.n_layer * 5 * config.n_positions * config.n_embd
    assert sum(k.numel() for k in cache.k) == sum(v.numel() for v in cache.v) == per_tensor
    row_bytes = 2 * per_tensor // 5 * 4
    rows = default_batch_size(model, 10**9, torch.float32)
    assert rows * row_bytes <= CACHE_BUDGET_BYTES < (rows + 1) * row_bytes
    assert default_batch_size(model, 3, torch.float32) == 3


needs_kernel = pytest.mark.skipif(not cpu.available(), reason="the native kernels do not run here")


def spy(monkeypatch, name):
    """The calls of one of imagegpt.cpu's C functions (their arguments: the C code's)."""
    calls, real = [], getattr(cpu.ops._kernels, name)
    monkeypatch.setattr(cpu.ops._kernels, name, lambda *a: calls.append(a) or real(*a))
    return calls


@needs_kernel
def test_decode_steps_run_the_native_engine_and_give_pytorchs_tokens(monkeypatch, cpu_avx512):
    model = tiny_model(30)
    steps = spy(monkeypatch, "decode_blocks")
    native = complete(model, random_ids(3, 31), 0.25, seed=5, top_k=4, dtype="float32")
    # every decode step is one call for all the blocks; the prefill of SOS and 2 rows runs the model's modules
    assert len(steps) == model.config.n_positions - 2 * SIDE - 1
    assert all(call[6:8] == (0, model.config.n_layer) for call in steps)  # float32 weights, every block
    monkeypatch.setenv("IMAGEGPT_NATIVE_KERNELS", "0")
    assert torch.equal(native, complete(model, random_ids(3, 31), 0.25, seed=5, top_k=4, dtype="float32"))


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float16", "int8"])
def test_a_half_precision_cache_holds_the_rounded_keys_and_values(monkeypatch, native, cache_dtype):
    monkeypatch.setenv("IMAGEGPT_NATIVE_KERNELS", native)
    model = tiny_model(32, std=0.1)
    dtype = getattr(torch, cache_dtype)
    inputs = sos_inputs(random_ids(2, 33), model.config.sos_id)
    # one-token attention native or SDPA's; an int8 cache is its own class (quantize.Int8KVCache)
    kinds = {"1": (cpu.NativeKVCache, NativeInt8KVCache), "0": (KVCache, Int8KVCache)}[native]
    with torch.no_grad():
        full = model(inputs).logits
        cache = kinds[1](model.config, 2) if cache_dtype == "int8" else kinds[0](model.config, 2, dtype=dtype)
        logits = [prefill(model, inputs[:, :5], cache)]  # a prefill of 5 reads the cache back in float32
        for position in range(5, inputs.size(1)):
            logits.append(decode_one_token(model, inputs[:, position : position + 1], position, cache))
    assert cache.k[0].dtype == dtype
    # keys and values rounded to 8 (bfloat16) or 11 (float16) significant bits, or to steps of 1/127 of their
    # row's largest (int8): close, not equal (seen here: 5e-4, 5e-5, 1.6e-3, logits up to 0.24)
    error = (torch.stack(logits, dim=1) - full[:, 4:]).abs().max().item()
    assert 0 < error < {"bfloat16": 5e-3, "float16": 5e-4, "int8": 1e-2}[cache_dtype]


def test_sampling_defaults_to_float32_arithmetic_on_any_cpu(monkeypatch, cpu_bf16, native_kernels):
    """dtype="auto" samples in float32 arithmetic whether or not the CPU has bfloat16 units
    (imagegpt.device); where the native engine runs, on bfloat16 copies of the weights and a bfloat16
    cache; elsewhere it is dtype="float32", exact."""
    model = tiny_model(33, std=0.1)
    used = []
    real = sampling.autocast
    monkeypatch.setattr(sampling, "autocast", lambda device, dtype: used.append(dtype) or real(device, dtype))
    ids = sample(model, 2, seed=4, top_k=4)
    assert set(used) == {torch.float32}
    compact = {"weight_dtype": "bfloat16", "cache_dtype": "bfloat16"} if native_kernels else {}
    assert torch.equal(ids, sample(model, 2, seed=4, top_k=4, dtype="float32", **compact))
    used.clear()
    if cpu_bf16:  # named, bfloat16 is honoured where the units are
        sample(model, 1, seed=4, top_k=4, dtype="bfloat16")
        assert set(used) == {torch.bfloat16}
    else:
        with pytest.raises(ArgumentError, match="bfloat16 is not supported on cpu"):
            sample(model, 1, dtype="bfloat16")


def test_cache_dtype_sets_the_cache_and_the_default_batch(monkeypatch, cpu_bf16):
    model = tiny_model(34, std=0.1)
    made = []
    real = sampling.Decoder.new_cache
    monkeypatch.setattr(
        sampling.Decoder, "new_cache", lambda *a: made.append(real(*a).k[0].dtype) or real(*a)
    )
    exact = sample(model, 2, seed=1, top_k=4, dtype="float32")
    half = sample(model, 2, seed=1, top_k=4, cache_dtype="bfloat16")
    quarter = sample(model, 2, seed=1, top_k=4, cache_dtype="int8")
    sample(model, 2, seed=1, top_k=4)
    automatic = torch.bfloat16 if cpu.available() else torch.float32  # the native engine's cache: bfloat16
    assert made == [torch.float32, torch.bfloat16, torch.int8, automatic]
    for ids in (half, quarter):
        assert ids.shape == exact.shape and ids.min() >= 0 and ids.max() < CLUSTERS
    c = model.config
    rows = default_batch_size(model, 10**9, torch.float32)
    assert default_batch_size(model, 10**9, torch.bfloat16) == 2 * rows
    int8_row = 2 * c.n_layer * c.n_positions * (c.n_embd + 4 * c.n_head)  # int8 rows and their scales
    assert default_batch_size(model, 10**9, torch.int8) == CACHE_BUDGET_BYTES // int8_row
    with pytest.raises(ArgumentError, match="cache_dtype must be one of"):
        sample(model, 1, cache_dtype="int4")


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float32"])
def test_static_decode_reads_a_cache_of_any_precision(cache_dtype):
    model = tiny_model(35)
    inputs = sos_inputs(random_ids(2, 36), model.config.sos_id)
    with torch.no_grad():
        dynamic = KVCache(model.config, 2, dtype=getattr(torch, cache_dtype))
        static = KVCache(model.config, 2, dtype=getattr(torch, cache_dtype))
        prefill(model, inputs[:, :3], dynamic)
        prefill(model, inputs[:, :3], static)
        expected = decode_one_token(model, inputs[:, 3:4], 3, dynamic)
        got = decode_one_token_static(model, inputs[:, 3:4], torch.tensor([3]), static)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---- greedy decoding against transformers' generate ----


@pytest.fixture(scope="module")
def transformers_pair(tmp_path_factory):
    """transformers' ImageGPTForCausalImageModeling with random weights, and the same weights in ours."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    hf_config = transformers.ImageGPTConfig(
        vocab_size=CLUSTERS + 1, n_positions=SIDE * SIDE, n_embd=64, n_layer=2, n_head=2
    )
    hf = transformers.ImageGPTForCausalImageModeling(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln_" not in name:
                p.normal_(0.0, 0.2)
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    return hf, ImageGPT.from_pretrained(directory).eval()


def hf_greedy(hf, prefix: torch.Tensor) -> torch.Tensor:
    sos = torch.full((prefix.size(0), 1), hf.config.vocab_size - 1)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.cat([sos, prefix], dim=1),
            attention_mask=torch.ones(prefix.size(0), prefix.size(1) + 1, dtype=torch.long),
            max_length=hf.config.n_positions + 1,
            do_sample=False,
            pad_token_id=hf.config.vocab_size - 1,
        )
    return out[:, 1:]


def test_greedy_sampling_equals_transformers_generate(transformers_pair, cpu_avx512):
    hf, ours = transformers_pair
    expected = hf_greedy(hf, torch.empty(4, 0, dtype=torch.long))
    assert torch.equal(sample(ours, 4, temperature=0, dtype="float32"), expected)
    # top-k 1 at any temperature is greedy too
    assert torch.equal(sample(ours, 4, temperature=1.5, top_k=1, seed=5, dtype="float32"), expected)


def test_greedy_completion_equals_transformers_generate(transformers_pair):
    hf, ours = transformers_pair
    ids = random_ids(3, 4)
    for keep in (3, 0.5):
        keep_tokens = keep_rows(keep, SIDE) * SIDE
        expected = hf_greedy(hf, ids[:, :keep_tokens])
        got = complete(ours, ids, keep, n=2, temperature=0, dtype="float32")
        assert torch.equal(got, expected.repeat_interleave(2, dim=0))


# ---- the token filters ----


def allowed_by_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.sort(logits, dim=-1, descending=True).values[..., k - 1 : k]
    return logits >= kth


def allowed_by_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """A token is in the nucleus if the tokens strictly more likely than it hold less than p of the mass."""
    probs = logits.float().softmax(-1)
    more_likely = (probs[:, None, :] > probs[:, :, None]).float() @ probs[:, :, None]  # (B, V, 1)
    return more_likely[..., 0] < p - 1e-6


def test_filters_keep_exactly_the_allowed_tokens():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 5, 49):
        kept = filter_logits(logits, top_k=k).isfinite()
        assert torch.equal(kept, allowed_by_top_k(logits, k))
        assert (kept.sum(-1) == k).all()
    for p in (0.05, 0.5, 0.9):
        kept = filter_logits(logits, top_p=p).isfinite()
        assert torch.equal(kept, allowed_by_top_p(logits, p))
    assert filter_logits(logits, top_k=0, top_p=1.0).isfinite().all()
    # temperature scales before top-p: at a high temperature the nucleus grows
    hot = filter_logits(logits, temperature=4.0, top_p=0.5).isfinite().sum()
    assert hot > filter_logits(logits, temperature=1.0, top_p=0.5).isfinite().sum()


@pytest.mark.parametrize("top_k, top_p", [(4, 1.0), (0, 0.6), (6, 0.7)])
def test_draws_only_emit_allowed_tokens_with_the_renormalised_frequencies(top_k, top_p):
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(1)).repeat(20000, 1)
    draws = sample_next(logits, 1.0, top_k, top_p, torch.Generator().manual_seed(2))
    allowed = filter_logits(logits[:1], 1.0, top_k, top_p)
    assert allowed.isfinite()[0, draws].all()
    expected = allowed.softmax(-1)[0]
    frequencies = torch.bincount(draws, minlength=30).float() / len(draws)
    assert (frequencies - expected).abs().max() < 0.015


def test_sampling_draws_from_the_whole_distribution_when_unfiltered():
    logits = torch.zeros(4000, 8)
    draws = sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == set(range(8))


def test_sampled_images_respect_top_k_and_top_p_of_the_full_forward():
    model = tiny_model(5, std=0.5)
    for top_k, top_p in ((3, 1.0), (0, 0.5)):
        ids = sample(model, 4, top_k=top_k, top_p=top_p, seed=0, dtype="float32")
        with torch.no_grad():
            logits = model(sos_inputs(ids, model.config.sos_id)).logits  # logits[:, i] gave ids[:, i]
        flat, tokens = logits.flatten(0, 1), ids.flatten()
        # top-p with a small tolerance: a token at the nucleus boundary may sit within rounding of top_p
        allowed = allowed_by_top_k(flat, top_k) if top_k else allowed_by_top_p(flat, top_p + 1e-4)
        assert allowed[torch.arange(len(tokens)), tokens].all()


def test_sos_is_never_emitted_and_tokens_are_image_tokens():
    model = tiny_model(6)
    ids = sample(model, 6, temperature=3.0, seed=1)
    assert ids.shape == (6, SIDE * SIDE) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < model.config.n_clusters


# ---- seeds, prefixes, batches ----


def test_same_seed_same_images_and_different_seeds_differ():
    model = tiny_model(7)
    a = sample(model, 5, top_k=8, seed=11, batch_size=2)
    assert torch.equal(a, sample(model, 5, top_k=8, seed=11, batch_size=2))
    assert not torch.equal(a, sample(model, 5, top_k=8, seed=12, batch_size=2))
    assert not torch.equal(sample(model, 5), sample(model, 5))  # no seed: a fresh one each time


def test_completion_keeps_the_prefix_exactly_and_orders_rows_by_image():
    model = tiny_model(8)
    ids = random_ids(3, 9)
    for keep, rows in ((0.5, 4), (0.3, 2), (5, 5), (0.99, 8)):
        assert keep_rows(keep, SIDE) == rows
        out = complete(model, ids, keep, n=4, seed=0, batch_size=5)
        assert out.shape == (12, SIDE * SIDE)
        assert torch.equal(out[:, : rows * SIDE], ids.repeat_interleave(4, dim=0)[:, : rows * SIDE])
    # the 4 completions of one image differ after the prefix
    assert len({tuple(row[4 * SIDE :].tolist()) for row in complete(model, ids[:1], 0.5, n=4, seed=3)}) > 1


def test_completion_from_a_prefix_only_and_of_the_whole_image():
    model = tiny_model(10)
    ids = random_ids(2, 11)
    top_half = ids[:, : SIDE * SIDE // 2]
    assert torch.equal(complete(model, top_half, 0.5, seed=4), complete(model, ids, 0.5, seed=4))
    assert torch.equal(complete(model, ids, 1.0, n=2), ids.repeat_interleave(2, dim=0))
    assert torch.equal(complete(model, ids[0].numpy(), SIDE), ids[:1])  # one image, numpy, all rows


def test_keeping_nothing_is_unconditional_sampling_with_the_same_seed():
    model = tiny_model(12)
    ids = random_ids(2, 13)
    for keep in (0, 0.0):
        assert torch.equal(
            complete(model, ids, keep, n=3, seed=21, top_k=5), sample(model, 6, seed=21, top_k=5)
        )


def test_generation_can_stop_early_at_the_same_tokens():
    model = tiny_model(25)
    first = generate(model, torch.empty(3, 0, dtype=torch.long), length=10, seed=5, top_k=4)
    assert torch.equal(first, sample(model, 3, seed=5, top_k=4)[:, :10])
    with pytest.raises(ArgumentError, match="length must lie in"):
        generate(model, random_ids(1, 0, length=12), length=10)


def test_the_callback_sees_every_token_as_it_is_drawn_and_the_same_tokens_come_out():
    model = tiny_model(26)
    ids = random_ids(2, 27)
    seen = []
    keep = lambda start, new: seen.append((start, new.clone()))
    out = complete(model, ids, 0.5, n=2, seed=6, batch_size=3, callback=keep)
    assert torch.equal(out, complete(model, ids, 0.5, n=2, seed=6, batch_size=3))  # the hook changes nothing
    half = SIDE * SIDE // 2
    # batches of rows 0-2 then 3: one call per drawn token, k growing from 1 to the half image
    assert [(start, tuple(new.shape)) for start, new in seen] == [
        *((0, (3, k)) for k in range(1, half + 1)),
        *((3, (1, k)) for k in range(1, half + 1)),
    ]
    for start, new in seen:  # what the callback saw is what the output holds
        assert torch.equal(new, out[start : start + len(new), half : half + new.size(1)])
    sample(model, 2, seed=0, callback=lambda start, new: seen.append(new))  # sample() passes it on
    assert tuple(seen[-1].shape) == (2, SIDE * SIDE)


def test_a_callback_that_raises_stops_the_work_and_restores_the_model():
    class Stop(Exception):
        pass

    model = tiny_model(28).train()
    calls = []

    def stop_after_five(start, new):
        calls.append(new.size(1))
        if len(calls) == 5:
            raise Stop

    with pytest.raises(Stop):
        sample(model, 2, seed=0, callback=stop_after_five)
    assert calls == [1, 2, 3, 4, 5]
    assert model.training


def test_sampling_restores_the_training_mode_and_runs_without_gradients():
    model = tiny_model(14).train()
    sample(model, 1, seed=0)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("compile", [True, "static"])
def test_compiled_decode_step_gives_the_eager_tokens(compile):
    model = tiny_model(15)
    ids = random_ids(1, 16)
    options = {"top_k": 5, "seed": 2, "dtype": "float32"}  # two rows each time: one batch shape to compile
    eager = complete(model, ids, 0.5, n=2, **options), sample(model, 2, **options)
    assert torch.equal(complete(model, ids, 0.5, n=2, **options, compile=compile), eager[0])
    assert torch.equal(sample(model, 2, **options, compile=compile), eager[1])


def test_unknown_compile_setting_is_refused():
    with pytest.raises(ArgumentError, match="compile must be"):
        sample(tiny_model(0), 1, compile="fast")


# ---- with a processor ----


def tiny_processor(seed: int = 0, size=SIDE) -> ImageProcessor:
    centres = np.random.default_rng(seed).uniform(-1, 1, (CLUSTERS, 3))
    return ImageProcessor(Palette(centres), size)


def test_images_in_images_out():
    model, processor = tiny_model(17), tiny_processor()
    ids, images = sample_images(model, processor, 3, seed=0)
    assert images.shape == (3, SIDE, SIDE, 3) and images.dtype == np.uint8
    assert np.array_equal(images, processor.decode(ids))
    photos = np.random.default_rng(1).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    ids, images = complete_images(model, processor, list(photos), 0.25, n=2, seed=0)
    assert ids.shape == (4, SIDE * SIDE) and images.shape == (4, SIDE, SIDE, 3)
    prefix = processor.encode(list(photos))[:, : 2 * SIDE].repeat_interleave(2, dim=0)
    assert torch.equal(ids[:, : 2 * SIDE], prefix)


def test_non_square_images_take_their_shape_from_the_processor():
    model = tiny_model(18, n_positions=4 * 6)
    processor = ImageProcessor(tiny_processor().palette, (4, 6))
    ids = random_ids(1, 19, length=24)
    out = complete(model, ids, 0.5, processor=processor, seed=0)
    assert torch.equal(out[:, :12], ids[:, :12]) and out.shape == (1, 24)
    with pytest.raises(ConfigError, match="not a square"):
        complete(model, ids, 0.5)
    with pytest.raises(ConfigError, match="4x4 images have 16 tokens"):
        complete(model, ids, 0.5, processor=ImageProcessor(processor.palette, 4))


def test_a_checkpoint_without_palette_is_refused_for_sampling(tmp_path):
    model = tiny_model(20)
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_for_sampling(tmp_path / "bare")
    model.save_pretrained(tmp_path / "full", processor=tiny_processor())
    loaded, processor = load_for_sampling(tmp_path / "full")
    assert torch.equal(sample(loaded, 2, seed=3), sample(model, 2, seed=3))
    assert processor.size == (SIDE, SIDE)


# ---- bad arguments ----


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"cache_dtype": "int4"}, "cache_dtype must be one of"),
        ({"compile": "fast"}, "compile must be"),
    ],
)
def test_bad_sampling_settings_are_refused(options, message):
    model = tiny_model(21)
    with pytest.raises(ArgumentError, match=message):
        SamplingOptions(**options)  # checked once, where the options are made
    with pytest.raises(ArgumentError, match=message):
        sample(model, 2, **options)
    with pytest.raises(ArgumentError, match=message):
        complete(model, random_ids(1, 0), 0.5, **options)


def test_one_options_object_or_its_fields_as_keywords():
    model = tiny_model(23)
    options = SamplingOptions(top_k=4, seed=3, cache_dtype="bfloat16")
    ids = sample(model, 2, top_k=4, seed=3, cache_dtype="bfloat16")
    assert torch.equal(sample(model, 2, options), ids)
    assert torch.equal(sampling.sample_images(model, tiny_processor(), 2, options)[0], ids)
    assert torch.equal(
        sample(model, 2, options, seed=4), sample(model, 2, top_k=4, seed=4, cache_dtype="bfloat16")
    )
    assert options.seed == 3  # keywords replace fields of a copy
    prefix = random_ids(2, 24)
    assert torch.equal(
        complete(model, prefix, 0.5, options, n=2), complete(model, prefix, 0.5, n=2, **vars(options))
    )
    with pytest.raises(TypeError, match="top_q"):
        sample(model, 1, top_q=0.5)
    with pytest.raises(ArgumentError, match="options must be a SamplingOptions"):
        sample(model, 1, {"top_k": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 5


@pytest.mark.parametrize("n", [0, -3, 1.5, True])
def test_n_below_one_is_refused(n):
    model = tiny_model(22)
    with pytest.raises(ArgumentError, match="n must be a positive integer"):
        sample(model, n)
    with pytest.raises(ArgumentError, match="n must be a positive integer"):
        complete(model, random_ids(1, 0), 0.5, n=n)


@pytest.mark.parametrize(
    "keep, message",
    [
        (1.5, r"outside \[0, 1\]"),
        (-0.1, r"outside \[0, 1\]"),
        (math.nan, r"outside \[0, 1\]"),
        (SIDE + 1, "outside 0..8"),
        (-1, "outside 0..8"),
        (True, "number of rows"),
        ("half", "number of rows"),
    ],
)
def test_bad_keep_is_refused(keep, message):
    with pytest.raises(ArgumentError, match=message):
        complete(tiny_model(23), random_ids(1, 0), keep)


def test_bad_ids_are_refused():
    model = tiny_model(24)
    with pytest.raises(ArgumentError, match="longer than the model's images"):
        complete(model, random_ids(1, 0, length=SIDE * SIDE + 1), 0.5)
    with pytest.raises(ArgumentError, match="needs 48 tokens"):
        complete(model, random_ids(1, 0, length=40), 6)
    with pytest.raises(ArgumentError, match=r"lie in \[0, 16\)"):
        complete(model, torch.full((1, SIDE * SIDE), CLUSTERS), 0.5)  # SOS is not an image token
    with pytest.raises(ArgumentError, match="integer token ids"):
        complete(model, torch.rand(1, SIDE * SIDE), 0.5)
    with pytest.raises(ArgumentError, match=r"shape \[B, H\*W\]"):
        complete(model, torch.zeros(1, 2, SIDE * SIDE, dtype=torch.long), 0.5)
    with pytest.raises(ArgumentError, match="longer than the model's images"):
        generate(model, random_ids(1, 0, length=SIDE * SIDE + 3))


@needs_kernel
def test_int8_weights_reach_every_decode_step_and_reproduce(monkeypatch, cpu_bf16):
    model = tiny_model(35, std=0.1)
    steps = spy(monkeypatch, "decode_blocks")
    ids = sample(model, 3, seed=2, top_k=4, weight_dtype="int8")
    # the prefill of [SOS] is one token too: a decode step; every block of every step in one call on int8
    # weights (the C function's 7th and 8th arguments: the weights' dtype code, 3, and the blocks)
    assert [call[6:8] for call in steps] == [(3, model.config.n_layer)] * model.config.n_positions
    assert torch.equal(ids, sample(model, 3, seed=2, top_k=4, weight_dtype="int8"))
    assert ids.min() >= 0 and ids.max() < CLUSTERS
    prefix = random_ids(2, 36)
    done = complete(model, prefix, keep=3, n=2, seed=2, weight_dtype="int8", cache_dtype="int8")
    assert torch.equal(done[:, : 3 * SIDE], prefix[:, : 3 * SIDE].repeat_interleave(2, dim=0))


@needs_kernel
def test_by_default_the_native_engine_decodes_on_bfloat16_weights_and_cache(monkeypatch):
    model = tiny_model(38, std=0.1)
    steps = spy(monkeypatch, "decode_blocks")
    made = []
    real = sampling.Decoder.new_cache
    monkeypatch.setattr(
        sampling.Decoder, "new_cache", lambda *a: made.append(real(*a).k[0].dtype) or real(*a)
    )
    ids = sample(model, 3, seed=2, top_k=4)
    # every step on bfloat16 weights (dtype code 1) over a bfloat16 cache; what a call names is kept
    assert [call[6:9] for call in steps] == [(1, model.config.n_layer, 1)] * model.config.n_positions
    named = sample(model, 3, seed=2, top_k=4, weight_dtype="bfloat16", cache_dtype="bfloat16")
    assert torch.equal(ids, named)
    steps.clear()
    sample(model, 3, seed=2, top_k=4, cache_dtype="float32")
    sample(model, 3, seed=2, top_k=4, weight_dtype="int8")
    sample(model, 3, seed=2, top_k=4, dtype="float32")
    sample(model, 65, seed=2, top_k=4, batch_size=65)  # more than the engine takes: float32, on PyTorch
    sample(model, 3, seed=2, top_k=4, batch_size=100)  # a batch of 3 after all
    n = model.config.n_positions
    assert [call[6] for call in steps] == [1] * n + [3] * n + [0] * n + [1] * n  # bfloat16, int8, float32
    caches = [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    assert made[2:] == caches


@needs_kernel
def test_bfloat16_weights_reproduce_and_stay_near_the_float32_ones(monkeypatch):
    model = tiny_model(39, std=0.1)
    options = {"seed": 3, "top_k": 4, "weight_dtype": "bfloat16"}
    ids = sample(model, 3, **options)
    assert torch.equal(ids, sample(model, 3, **options))
    prefix = random_ids(2, 40)
    done = complete(model, prefix, keep=3, n=2, cache_dtype="int8", **options)
    assert torch.equal(done[:, : 3 * SIDE], prefix[:, : 3 * SIDE].repeat_interleave(2, dim=0))
    with pytest.raises(ArgumentError, match="bfloat16 weights take batches of at most 64 images"):
        sample(model, 65, weight_dtype="bfloat16", batch_size=65)
    with pytest.raises(ConfigError, match="bfloat16 weights run in imagegpt's native CPU decode kernel only"):
        sample(model, 1, weight_dtype="bfloat16", compile=True)
    monkeypatch.setenv("IMAGEGPT_NATIVE_KERNELS", "0")
    with pytest.raises(ConfigError, match="not available here"):
        sample(model, 1, weight_dtype="bfloat16")


def test_int8_weights_are_refused_where_they_cannot_run(monkeypatch):
    model = tiny_model(37, std=0.1)
    with pytest.raises(ArgumentError, match="weight_dtype must be one of"):
        sample(model, 1, weight_dtype="int4")
    with pytest.raises(ConfigError, match="without compile"):
        sample(model, 1, weight_dtype="int8", compile=True)
    if cpu.available():
        with pytest.raises(ArgumentError, match="at most 64 images"):
            sample(model, 1, weight_dtype="int8", batch_size=65)
        narrow = ImageGPT(ImageGPTConfig(vocab_size=17, n_positions=16, n_embd=36, n_layer=1, n_head=3))
        with pytest.raises(ConfigError, match="multiples of 8; this model has 36, 12 and 144"):
            sample(narrow, 1, weight_dtype="int8")
    monkeypatch.setenv("IMAGEGPT_NATIVE_KERNELS", "0")
    with pytest.raises(ConfigError, match="not available here"):
        sample(model, 1, weight_dtype="int8")
