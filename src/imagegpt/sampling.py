"""KV-cached sampling and completion, in the style of gpt-fast.

The engine: a static KV cache preallocated once per batch (keys and values of n_layer x B x n_positions x
n_embd each: nothing quadratic in the sequence length), one prefill of [SOS] + prefix, then one-token decode
steps whose attention reads the cached keys. The next token is drawn on the device from a torch.Generator (the
exponential-race form of sampling, argmax(p / q) with q ~ Exp(1), as gpt-fast does), so a step never waits
for the host and the same seed and settings give the same tokens on the same machine.

Sequence layout: the model reads [SOS, x0, ..., x_{n-2}] and the logits at position i give x_i, as the
released models were trained. A prefix of P tokens is one prefill of P + 1 inputs (SOS and the prefix) whose
last logits give x_P; decode step i then feeds x_{i-1} at position i and gives x_i. Completing from an empty
prefix is therefore exactly unconditional sampling, its prefill of [SOS] a decode step at position 0.

How to sample is one SamplingOptions (temperature, top-k, top-p, seed, dtypes, batch size, compile), checked
once; every sampler also takes its fields as keywords. Where the decode steps run is decided once per call
(make_decoder): on CPUs where imagegpt.cpu's native kernels run, its DecodeEngine takes the steps (float32
arithmetic, all of a step's blocks in one call on weights packed once, float32, bfloat16 or int8; it reads
float32, bfloat16, float16 and int8 caches as they are stored). With float32 weights and cache (dtype=
"float32") it gives the numbers of PyTorch's path within float32 rounding; by default it decodes on bfloat16
copies of the weights and a bfloat16 cache, which halve the bytes a step streams (SamplingOptions).
`compile=True` compiles the PyTorch step with torch.compile: a static-shape step on CUDA (positions as a
tensor, attention over the whole cache under a mask, mode="reduce-overhead": each step replays a CUDA graph),
dynamic shapes elsewhere.
On CPUs where the native kernels run, compiling buys nothing (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import numpy as np
import torch

from . import cpu
from .device import DTYPES, autocast, resolve_device, resolve_dtype
from .errors import ArgumentError, CheckpointError, ConfigError
from .limits import check_memory
from .model import ImageGPT, KVCache
from .objectives import require_causal
from .quantize import cache_position_bytes, new_cache

# The default batch holds at most this many bytes of KV cache (igpt-s in float32: 20 images of 32x32).
CACHE_BUDGET_BYTES = 2 * 1024**3
CACHE_DTYPES = {**DTYPES, "int8": torch.int8}
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
COMPILE_MODES = (False, True, "static", "dynamic")


# ---- choosing the next token ----


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ArgumentError unless temperature >= 0, top_k >= 0 (0 = off) and 0 < top_p <= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ArgumentError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not math.isfinite(temperature):
        raise ArgumentError(f"temperature must be finite, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ArgumentError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ArgumentError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """float32 logits / temperature with every token outside the top-k and the top-p nucleus set to -inf.

    The order is transformers': temperature, then top-k (ties with the k-th value are kept), then top-p over
    the remaining distribution (the smallest set of most likely tokens whose mass reaches top_p; at least
    one).
    """
    logits = logits.float()
    if temperature > 0 and temperature != 1:  # x / 1 is x: no copy for the default
        logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        mass_below = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = mass_below <= 1 - top_p  # the tail whose mass stays within 1 - top_p
        drop[..., -1] = False  # keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row (B,) from its logits (B, V): argmax at temperature 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    # argmax(p / q) with q ~ Exp(1) draws from p without a host sync. q is kept above 0 so that a masked token
    # (p == 0) scores exactly 0 and is never chosen; the most likely token always scores > 0.
    q = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / q).argmax(dim=-1)


# ---- sampling options ----


def _dtype_in(table: dict[str, torch.dtype], name, argument: str) -> torch.dtype:
    """`name` (a key of table, or one of its torch.dtypes) as a torch.dtype; ArgumentError otherwise."""
    dtype = table.get(name) if isinstance(name, str) else name
    if dtype not in table.values():
        raise ArgumentError(f"{argument} must be one of {', '.join(table)} (or None), got {name!r}")
    return dtype


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to sample, for generate(), sample(), complete() and the *_images helpers; checked when made.

    temperature: 0 is greedy. top_k: keep the k most likely tokens (0 = off; transformers' docs use 40).
    top_p: keep the smallest set of tokens whose mass reaches top_p (1 = off). seed: the same seed, options
    and batch size give the same tokens on the same machine (None: a fresh random seed). batch_size: rows
    generated at a time (None: as many as fit CACHE_BUDGET_BYTES of KV cache). dtype: the autocast compute
    dtype (None or "auto" = float32 arithmetic on every device; "bfloat16" only when named). Where the native
    CPU engine decodes (imagegpt.cpu, batches of at most 64), None or "auto" also keeps the decode steps'
    weights and the KV cache in bfloat16 unless weight_dtype or cache_dtype name others: half the bytes
    each step streams, the arithmetic float32; "float32" keeps both float32, exact. cache_dtype: the KV
    cache's storage, "float32", "bfloat16", "float16" or "int8" (None: the compute dtype's, or bfloat16 as
    above); half precision halves the cache's memory and the attention's memory traffic, int8 (each cached
    row of a head scaled to [-127, 127], a float32 scale beside it) quarters them, at a coarser rounding.
    weight_dtype: "float32" (None), "bfloat16" or "int8": the decode steps' linear layers on weights rounded
    to bfloat16 (the arithmetic stays float32) or quantized per output column and inputs per row, the
    products summed exactly in int32 (imagegpt.cpu); half or a quarter of the weights' memory traffic; CPU
    (the native kernels), float32 compute, no compile and batches of at most 64 only. compile: False, True,
    "static" or "dynamic" (see the module docstring).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    batch_size: int | None = None
    dtype: str | torch.dtype | None = None
    cache_dtype: str | torch.dtype | None = None
    weight_dtype: str | torch.dtype | None = None
    compile: bool | str = False

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise ArgumentError(f"seed must be an integer or None, got {self.seed!r}")
        if self.batch_size is not None:
            _check_count(self.batch_size, "batch_size")
        if not any(self.compile is mode or self.compile == mode for mode in COMPILE_MODES):
            raise ArgumentError(f"compile must be True, False, 'static' or 'dynamic', got {self.compile!r}")
        if self.dtype not in (None, "auto") and not isinstance(self.dtype, torch.dtype):
            _dtype_in(DTYPES, self.dtype, "dtype")
        if self.cache_dtype is not None:
            _dtype_in(CACHE_DTYPES, self.cache_dtype, "cache_dtype")
        if self.weight_dtype is not None:
            _dtype_in(WEIGHT_DTYPES, self.weight_dtype, "weight_dtype")


def sampling_options(options: SamplingOptions | None = None, **keywords) -> SamplingOptions:
    """`options` (default SamplingOptions()) with the given fields replaced: the keyword form of every
    sampler, e.g. sample(model, 4, top_k=40) is sample(model, 4, SamplingOptions(top_k=40))."""
    if options is None:
        options = SamplingOptions()
    elif not isinstance(options, SamplingOptions):
        raise ArgumentError(f"options must be a SamplingOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **keywords) if keywords else options


# ---- the engine: prefill and one-token decode steps ----


def decode_one_token(model: ImageGPT, token: torch.Tensor, position, cache: KVCache) -> torch.Tensor:
    """Feed token (B, 1) at `position`, attending over the cached positions; its logits (B, V).

    position: an int, or a (1,) tensor for a static-shape step (CUDA graphs): attention then covers the whole
    cache under a mask, and the cache must hold finite values beyond `position` (a zeroed KVCache)."""
    x, _ = model.transformer(token, cache, position)
    return model.lm_head(x[:, -1])  # only the last position's logits: the head's work is one row per image


def prefill(model: ImageGPT, inputs: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run [SOS] + prefix (B, P + 1) from position 0, filling the cache; the last position's logits (B, V)."""
    return decode_one_token(model, inputs, 0, cache)  # the same computation, over P + 1 tokens at once


decode_one_token_static = decode_one_token  # the name of the static step before it was the same function

_COMPILED: dict[tuple[str, str], Callable] = {}


def decode_step(device: torch.device, compile: bool | str) -> tuple[Callable, bool]:
    """(the decode step, whether it is the static one) for `compile`: False, True (static on CUDA, dynamic
    elsewhere), "static" or "dynamic". Compiled steps are compiled once per process and reused."""
    if compile is False:
        return decode_one_token, False
    if compile is True:
        compile = "static" if device.type == "cuda" else "dynamic"
    if compile not in ("static", "dynamic"):
        raise ArgumentError(f"compile must be True, False, 'static' or 'dynamic', got {compile!r}")
    key = (device.type, compile)
    if key not in _COMPILED:
        if compile == "dynamic":
            _COMPILED[key] = torch.compile(decode_one_token, dynamic=True)
        elif device.type == "cuda":  # each step replays a CUDA graph
            _COMPILED[key] = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        else:
            _COMPILED[key] = torch.compile(decode_one_token, fullgraph=True)
    return _COMPILED[key], compile == "static"


def resolve_cache_dtype(name, compute: torch.dtype, weights: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: `name` ("float32", "bfloat16", "float16", "int8" or a torch.dtype), or when None
    the compute dtype under autocast and the weights' dtype otherwise."""
    if name is None:
        return compute if compute != torch.float32 else weights
    return _dtype_in(CACHE_DTYPES, name, "cache_dtype")


def resolve_weight_dtype(name) -> torch.dtype:
    """The decode steps' weights: "float32" (None: the model's own), "bfloat16" or "int8" (or the
    torch.dtype)."""
    return torch.float32 if name is None else _dtype_in(WEIGHT_DTYPES, name, "weight_dtype")


def default_batch_size(model: ImageGPT, rows: int, cache_dtype: torch.dtype) -> int:
    """The most rows (at most `rows`) whose KV cache fits in CACHE_BUDGET_BYTES."""
    c = model.config
    per_row = c.n_positions * cache_position_bytes(c, cache_dtype)
    return max(1, min(rows, CACHE_BUDGET_BYTES // per_row))


@dataclasses.dataclass
class Decoder:
    """What one generate() call resolved from its options, once: the dtypes, the decode step and, on CPUs
    where it runs, imagegpt.cpu's DecodeEngine, which then makes the caches and takes the steps."""

    device: torch.device
    dtype: torch.dtype  # the autocast compute dtype
    cache_dtype: torch.dtype
    weight_dtype: torch.dtype
    compile: bool | str
    step: Callable  # decode_one_token or its compiled form
    static: bool  # the step takes positions as tensors (CUDA graphs)
    engine: cpu.DecodeEngine | None

    def new_cache(self, config, batch_size: int, length: int) -> KVCache:
        if self.engine is not None:  # never static: positions below the one written are all it reads
            return self.engine.new_cache(batch_size, length, self.cache_dtype, zeroed=False)
        # A compiled dynamic step gets one spare position, so that its view of the cache never spans the whole
        # tensor: the last step would otherwise be compiled anew for being contiguous.
        spare = int(bool(self.compile) and not self.static)
        length += spare
        cache = new_cache(config, batch_size, length, self.device, self.cache_dtype, zeroed=self.static)
        if self.static and self.device.type == "cuda":  # CUDA graphs replay on the cache's memory
            for tensor in cache.k + cache.v:
                torch._dynamo.mark_static_address(tensor)
        return cache


def make_decoder(model: ImageGPT, options: SamplingOptions, device: torch.device, rows: int = 1) -> Decoder:
    """The Decoder for `options` on `device`, to generate `rows` rows; a ConfigError where bfloat16 or int8
    weights, named, cannot run."""
    dtype = resolve_dtype(options.dtype, device)
    step, static = decode_step(device, options.compile)
    native = device.type == "cpu" and not options.compile
    compact = native and _auto_decodes_in_bfloat16(model, options, rows)
    cache_dtype = resolve_cache_dtype(options.cache_dtype, dtype, next(model.parameters()).dtype)
    weight_dtype = resolve_weight_dtype(options.weight_dtype)
    if compact:  # what the call names stays as named
        cache_dtype = cache_dtype if options.cache_dtype is not None else torch.bfloat16
        weight_dtype = weight_dtype if options.weight_dtype is not None else torch.bfloat16
    named = options.weight_dtype not in (None, "float32", torch.float32)
    if named and not (native and dtype == torch.float32):
        raise ConfigError(
            f"{options.weight_dtype} weights run in imagegpt's native CPU decode kernel only: sample on the "
            "CPU in float32 without compile, or use weight_dtype float32"
        )
    engine = cpu.DecodeEngine.create(model, weight_dtype) if native else None  # the one place cpu is used
    if engine is not None:
        step = engine.step
    return Decoder(device, dtype, cache_dtype, weight_dtype, options.compile, step, static, engine)


def _auto_decodes_in_bfloat16(model: ImageGPT, options: SamplingOptions, rows: int) -> bool:
    """Whether a call that names no dtype decodes on bfloat16 copies of the weights and a bfloat16 KV cache
    (float32 arithmetic): where the CPU engine runs this model (imagegpt.cpu: x86-64 with AVX2) and takes
    the batch. A decode step there streams every weight and cached value once, so half the bytes make it
    1.35-1.5x faster (docs/performance.md); the demo model's bits/dim moves in the sixth decimal.
    dtype="float32" keeps everything float32: exact."""
    if options.dtype not in (None, "auto"):
        return False
    given = options.batch_size
    batch = min(given, rows) if given else default_batch_size(model, rows, torch.float32)
    return batch <= cpu.DecodeEngine.max_batch and cpu.DecodeEngine.runs(model, torch.bfloat16)


# ---- generation: batches of prefixes -> full images ----


def _model_device(model: ImageGPT, device) -> torch.device:
    """The device to sample on: `device` (moving the model there) or, when None, the model's own."""
    current = next(model.parameters()).device
    if device is None:
        return current
    device = resolve_device(device)
    if device != current:
        model.to(device)
    return device


def _batch_size(model: ImageGPT, options: SamplingOptions, decoder: Decoder, rows: int) -> int:
    """options.batch_size, or as many rows as fit the cache budget; bfloat16 and int8 weights take at most the
    engine's."""
    most = decoder.engine.max_batch if decoder.weight_dtype != torch.float32 else None
    if options.batch_size is None:
        return min(default_batch_size(model, rows, decoder.cache_dtype), most or rows)
    if most is not None and options.batch_size > most and options.weight_dtype is not None:  # named
        raise ArgumentError(
            f"{options.weight_dtype} weights take batches of at most {most} images, got {options.batch_size}"
        )
    return options.batch_size


def _check_length(config, P: int, length: int | None) -> int:
    if config.n_positions < P:
        raise ArgumentError(
            f"a prefix of {P} tokens is longer than the model's images of {config.n_positions} tokens"
        )
    n_positions = config.n_positions if length is None else length
    if not P <= n_positions <= config.n_positions:
        raise ArgumentError(
            f"length must lie in [{P}, {config.n_positions}] (the prefix to the image), got {length}"
        )
    return n_positions


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


@torch.no_grad()  # as gpt-fast: inference_mode tensors and CUDA-graph trees are a less trodden path
def generate(
    model: ImageGPT,
    prefixes: torch.Tensor,
    options: SamplingOptions | None = None,
    *,
    device=None,
    progress: bool | str = False,
    length: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    **keywords,
) -> torch.LongTensor:
    """Complete each row of `prefixes` (R, P), image tokens without SOS, to n_positions tokens; (R,
    n_positions).

    The engine under sample() and complete(); the prefix tokens are copied to the output unchanged. Rows are
    generated options.batch_size at a time, all drawing from one torch.Generator seeded with options.seed.
    options / keywords: SamplingOptions (sampling_options). device: where to sample (None: the model's
    device). progress: show a tqdm bar (a string sets its label). length: stop after this many tokens per row
    (P <= length <= n_positions). callback: called after every drawn token as callback(start, new), where new
    (B, k) holds the k tokens drawn so far after the prefix for output rows start..start + B - 1 (a view on
    the device: copy what you keep); an exception it raises stops the work and propagates (the model is left
    as it was found).
    """
    options = sampling_options(options, **keywords)
    config = model.config
    require_causal(config, "sampling and completion")
    prefixes = _as_ids(prefixes, config.n_clusters)
    R, P = prefixes.shape
    n_positions = _check_length(config, P, length)
    device = _model_device(model, device)
    decoder = make_decoder(model, options, device, R)
    batch_size = _batch_size(model, options, decoder, R)
    _check_memory(config, device, R, n_positions, min(batch_size, R), decoder.cache_dtype)
    generator = _generator(device, options.seed)
    out = torch.empty(R, n_positions, dtype=torch.long)
    out[:, :P] = prefixes
    if n_positions == P:
        return out
    bar = _progress_bar(progress, total=R * (n_positions - P))
    was_training = model.training
    model.eval()
    draw = lambda logits: sample_next(logits, options.temperature, options.top_k, options.top_p, generator)
    cache = None
    try:
        for lo in range(0, R, batch_size):
            prefix = prefixes[lo : lo + batch_size].to(device)
            B = prefix.size(0)
            if cache is None or cache.batch_size != B:  # one cache reused by every batch of the same size
                cache = decoder.new_cache(config, B, n_positions)
            tokens = _complete_batch(
                model, prefix, n_positions, cache, decoder, draw, _on_token(bar, callback, lo)
            )
            out[lo : lo + B, P:] = tokens.cpu()
    finally:
        bar.close()
        model.train(was_training)
    return out


def _check_memory(config, device, R: int, n_positions: int, batch: int, cache_dtype) -> None:
    cache_bytes = batch * n_positions * cache_position_bytes(config, cache_dtype)
    what = f"sampling {R} images of {n_positions} tokens, {batch} at a time,"
    hint = "lower the batch size or the number of images"
    on_host = device.type == "cpu"
    check_memory(R * n_positions * 8 + (cache_bytes if on_host else 0), what, hint)  # the tokens out
    if not on_host:
        check_memory(cache_bytes, what, hint, device)  # the KV cache


def _on_token(bar, callback, start: int) -> Callable[[torch.Tensor, int], None]:
    """The per-token hook of _complete_batch: the progress bar, then the callback (if any) on rows from
    start."""

    def drawn(tokens: torch.Tensor, k: int) -> None:
        bar.update(tokens.size(0))
        if callback is not None:
            callback(start, tokens[:, :k])

    return drawn


def _complete_batch(model, prefix, n_positions: int, cache, decoder: Decoder, draw, drawn):
    """A prefill of [SOS] + prefix (B, P), then decode steps up to n_positions; the new tokens (B, n - P).

    drawn(tokens, k) is called after each token, when the first k new tokens are drawn. Without a prefix the
    prefill is the one token SOS at position 0: a decode step."""
    B, P = prefix.shape
    device = prefix.device
    tokens = torch.empty(B, n_positions - P, dtype=torch.long, device=device)
    inputs = torch.cat([torch.full((B, 1), model.config.sos_id, device=device), prefix], dim=1)
    positions = torch.arange(n_positions, device=device) if decoder.static else None
    at = lambda position: positions[position : position + 1] if decoder.static else position
    with autocast(device, decoder.dtype):
        logits = decoder.step(model, inputs, at(0), cache) if P == 0 else prefill(model, inputs, cache)
    token = tokens[:, 0] = draw(logits)
    drawn(tokens, 1)
    for position in range(P + 1, n_positions):
        # x_{position-1} goes in at `position`; its logits give x_position
        with autocast(device, decoder.dtype):
            logits = decoder.step(model, token[:, None], at(position), cache)
        token = tokens[:, position - P] = draw(logits)
        drawn(tokens, position - P + 1)
    return tokens


def _progress_bar(progress: bool | str, total: int):
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else "sampling"
    return tqdm(
        total=total, desc=label, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True
    )


def sample(
    model: ImageGPT,
    n: int,
    options: SamplingOptions | None = None,
    *,
    device=None,
    progress: bool | str = False,
    callback=None,
    **keywords,
) -> torch.LongTensor:
    """n images sampled from [SOS]: token ids (n, n_positions) on the CPU; processor.decode(ids) gives pixels.

    options / keywords: SamplingOptions, e.g. sample(model, 8, top_k=40, seed=0). device, progress, callback:
    generate()'s.
    """
    n = _check_count(n, "n")
    prefixes = torch.empty(n, 0, dtype=torch.long)
    options = sampling_options(options, **keywords)
    return generate(model, prefixes, options, device=device, progress=progress, callback=callback)


def image_shape(config, processor=None) -> tuple[int, int]:
    """(height, width) of the model's images: the processor's when given, else the square of n_positions."""
    if processor is None:
        side = config.square_side()
        return side, side
    height, width = processor.height, processor.width
    if height * width != config.n_positions:
        raise ConfigError(
            f"the processor's {height}x{width} images have {height * width} tokens but the model reads "
            f"{config.n_positions}; use the processor saved with the model"
        )
    return height, width


def keep_rows(keep, height: int) -> int:
    """Rows of the image to keep: an int is a number of rows (0..height); a float a fraction of the height in
    [0, 1], rounded to the nearest row."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ArgumentError(
            f"keep must be a number of rows (int) or a fraction of the height (float), got {keep!r}"
        )
    if isinstance(keep, numbers.Integral):
        if not 0 <= keep <= height:
            raise ArgumentError(
                f"keep={keep} rows is outside 0..{height}, the rows of the model's images; pass a number of "
                "rows "
                "up to the height, or a fraction such as 0.5"
            )
        return int(keep)
    if not 0 <= keep <= 1:  # also refuses nan
        raise ArgumentError(f"keep fraction {keep} is outside [0, 1]; 0.5 keeps the top half of each image")
    return math.floor(keep * height + 0.5)


def _as_ids(ids, n_clusters: int) -> torch.Tensor:
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ArgumentError(f"ids must be token ids [B, H*W], got {type(ids).__name__}: {e}") from e
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ArgumentError(
            f"ids must be integer token ids, got dtype {ids.dtype}; encode images with a processor"
        )
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.size(0) == 0:
        raise ArgumentError(f"ids must be token ids of shape [B, H*W] with B >= 1, got {tuple(ids.shape)}")
    ids = ids.long().cpu()
    if ids.numel() and (ids.min() < 0 or ids.max() >= n_clusters):
        raise ArgumentError(
            f"token ids must lie in [0, {n_clusters}) (the palette; SOS = {n_clusters} is added for you), "
            "got "
            f"values in [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids


def complete(
    model: ImageGPT,
    ids,
    keep: int | float,
    options: SamplingOptions | None = None,
    *,
    n: int = 1,
    processor=None,
    device=None,
    progress: bool | str = False,
    callback=None,
    **keywords,
) -> torch.LongTensor:
    """n completions of each image of `ids` (B, L) from its top rows: token ids (B * n, n_positions) on the
    CPU.

    Rows i * n ... i * n + n - 1 complete image i. keep: rows to keep, an int number of rows or a float
    fraction of the height in [0, 1] (0.5 = the top half); those keep * width tokens are copied unchanged and
    the rest is sampled. ids may hold just the prefix (L < n_positions) as long as it covers the rows kept.
    The image height and width come from `processor` when given, else the square of n_positions. keep=0 is
    exactly sample() with the same seed and options. options / keywords, device, progress, callback:
    sample()'s.
    """
    options = sampling_options(options, **keywords)
    n = _check_count(n, "n")
    config = model.config
    height, width = image_shape(config, processor)
    rows = keep_rows(keep, height)
    ids = _as_ids(ids, config.n_clusters)
    if ids.size(1) > config.n_positions:
        raise ArgumentError(
            f"the prefix of {ids.size(1)} tokens is longer than the model's images of {config.n_positions} "
            f"tokens ({height}x{width}); encode the images with the model's processor"
        )
    keep_tokens = rows * width
    if keep_tokens > ids.size(1):
        raise ArgumentError(
            f"keeping {rows} rows needs {keep_tokens} tokens per image, but the ids have only {ids.size(1)}"
        )
    prefixes = ids[:, :keep_tokens].repeat_interleave(n, dim=0)
    return generate(model, prefixes, options, device=device, progress=progress, callback=callback)


# ---- with a processor: images in, images out ----


def load_for_sampling(path, **kwargs):
    """(ImageGPT, ImageProcessor) from a model directory, an imagegpt train run directory, or a Hub id.

    Sampling needs the palette to turn tokens into pixels, so a directory without preprocessor_config.json is
    a CheckpointError; and a next-pixel model, so a BERT model is a ConfigError.
    """
    from pathlib import Path

    from .checkpoint import latest_model_dir, load_with_processor
    from .processor import PROCESSOR_NAME

    directory = latest_model_dir(path)  # as given when not a local path: a Hub id
    if Path(directory).expanduser().is_dir() and not (Path(directory) / PROCESSOR_NAME).is_file():
        raise CheckpointError(
            f"{directory} has no {PROCESSOR_NAME} (the palette), so sampled tokens cannot be turned into "
            "images; use a checkpoint saved with its processor (imagegpt train writes one), or save one "
            "there with ImageProcessor(palette, size).save_pretrained(directory)"
        )
    model, processor = load_with_processor(ImageGPT, directory, **kwargs)
    require_causal(model.config, f"sampling from {directory}")  # before any other work of the caller's
    return model, processor


def sample_images(
    model: ImageGPT, processor, n: int, options: SamplingOptions | None = None, **keywords
) -> tuple[torch.LongTensor, np.ndarray]:
    """sample() and the decoded images: (ids (n, H*W), uint8 images (n, H, W, 3)). keywords: sample()'s."""
    image_shape(model.config, processor)
    ids = sample(model, n, options, **keywords)
    return ids, processor.decode(ids)


def complete_images(
    model: ImageGPT, processor, images, keep: int | float, options: SamplingOptions | None = None, *,
    n: int = 1, **keywords,
) -> tuple[torch.LongTensor, np.ndarray]:  # fmt: skip
    """complete() on images in any form the processor reads: (ids (B * n, H*W), uint8 images (B * n, H, W,
    3)). keywords: complete()'s."""
    ids = complete(model, processor.encode(images), keep, options, n=n, processor=processor, **keywords)
    return ids, processor.decode(ids)
