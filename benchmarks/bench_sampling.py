"""Sampling speed: imagegpt's KV-cached sampler against transformers' generate, in one run on one machine.

Setup: igpt-s (76.7M parameters) with random weights, 1024-token (32x32) images, top-k 40, temperature 1; the
same weights in both (transformers' model is saved and loaded into ours).

1. Batch 16, ours against ImageGPTForCausalImageModeling.generate(do_sample=True, top_k=40), each
   generating whole 1024-token images from [SOS] as a user would (ours: generate(), its weight packing and
   cache set-up included). tokens/s = 16 x 1024 / the seconds of the whole call; the ratio is of those.
   Also per stretch: tokens/s over the first and the last S tokens of an image. transformers' come from
   the same whole-image run (a logits processor stamps the time of every step); ours are timed on their
   own (the first S from [SOS], its set-up included; the last S after a prefill of 1024 - S tokens, decode
   steps only). If a step's cost grew linearly with its position, 2 B / (a + b), a and b the seconds per
   step of the two stretches, would be a whole image's rate: it is printed beside the measured one, and
   for transformers it is not (its steps slow down faster than that late in an image).
   glibc's allocator is tuned for the whole process first (tune_malloc; --default-malloc leaves it): each
   of transformers' steps allocates an ever larger cache, and with the defaults its rate swings up to 2x
   with the allocator's state. Tuned, transformers is at its fastest measured here (ours preallocates).
   --quick (or --stretch S) times only the stretches (transformers too, the last S from a cache filled
   untimed) and reports the estimate: whole images with transformers take six minutes or more here.
2. Batch 64, ours: achieved FLOP/s (2 x parameters FLOP per token) against the compute limit at the matmul
   peaks measured here (one big bfloat16 and one big float32 matmul), and against the memory-traffic limit
   (each decode step reads the weights and every cached key and value). Estimated from its two stretches;
   --full times whole images instead.

    python benchmarks/bench_sampling.py            # whole images, S = 128; about 25 minutes on a 2-core CPU
    python benchmarks/bench_sampling.py --quick    # stretches of S = 16 only, smaller peaks; a few minutes
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import tempfile
import time

import torch
import transformers
from packaging.version import Version

from imagegpt import ImageGPT, cpu
from imagegpt.device import autocast, describe_cpu, resolve_dtype
from imagegpt.quantize import cache_position_bytes
from imagegpt.sampling import (
    SamplingOptions,
    generate,
    make_decoder,
    prefill,
    sample_next,
)

TOP_K = 40
# generate()'s name for a filled cache: transformers 5.24 (checked) takes `cache` and deprecates
# `past_key_values`, which earlier versions take
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def matmul_peak(dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`, best of repeated timings over `seconds`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def read_bandwidth(gigabytes: float) -> float:
    """Bytes/s of summing a float32 tensor far larger than the caches, best of 3."""
    x = torch.ones(int(gigabytes * 1e9 / 4))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def tune_malloc() -> bool:
    """glibc's allocator with a fixed 32 MiB mmap threshold and no trimming below 2 GiB (mallopt), for the
    whole process; False where that is not available. Each of transformers' decode steps allocates a new
    and larger cache; with glibc's defaults (a threshold that moves with what was last freed, memory handed
    back as soon as it is free) those allocations are fresh pages to fault in, and its rate swung from 25.6
    to 53.2 tokens/s here with the allocator's state (docs/performance.md). Tuned, it is at its fastest
    measured, whatever ran before it. Our sampler preallocates its cache: tuned, its rates were within or up
    to 3% above the range of three untuned runs."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024**2)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_prefix(batch: int, length: int, clusters: int) -> torch.Tensor:
    return torch.randint(0, clusters, (batch, length), generator=torch.Generator().manual_seed(0))


def ours_decode(
    model: ImageGPT,
    inputs: torch.Tensor,
    steps: int,
    dtype,
    compile: bool | str = False,
    random_cache=False,
    cache_dtype=None,
    weight_dtype=None,
) -> float:
    """Seconds for `steps` decode steps of our engine after [SOS] + prefix, as generate() runs them.

    inputs: (B, P + 1) model inputs; their first P fill the cache untimed (a prefill, or with random_cache
    random keys and values: the speed of a step does not depend on them), then each step feeds one token (the
    last input first), draws the next with top-k 40 and feeds it.
    """
    config, device = model.config, torch.device("cpu")
    options = SamplingOptions(
        dtype=dtype, compile=compile, cache_dtype=cache_dtype, weight_dtype=weight_dtype
    )
    decoder = make_decoder(model, options, device)  # what generate() runs: the engine's step where it runs
    cache = decoder.new_cache(config, len(inputs), config.n_positions)
    generator = torch.Generator().manual_seed(0)
    P = inputs.size(1) - 1
    with torch.inference_mode(), autocast(device, decoder.dtype):
        if random_cache:
            for tensor in cache.k + cache.v:
                tensor.normal_() if tensor.is_floating_point() else tensor.random_(-127, 128)
        elif P:
            prefill(model, inputs[:, :P], cache)
        token = inputs[:, P]
        start = time.perf_counter()
        for position in range(P, P + steps):
            at = torch.tensor([position]) if decoder.static else position
            logits = decoder.step(model, token[:, None], at, cache)
            token = sample_next(logits, 1.0, TOP_K, 1.0, generator)
        return time.perf_counter() - start


class Ours:
    def __init__(self, model: ImageGPT, dtype, compile: bool, cache_dtype=None, weight_dtype=None):
        self.model, self.dtype, self.compile, self.cache_dtype = model, dtype, compile, cache_dtype
        self.weight_dtype = weight_dtype
        self.name = "imagegpt" + (" (compiled)" if compile else "")
        if dtype != "auto":
            self.name += f" ({dtype})"
        if cache_dtype is not None:
            self.name += f" ({cache_dtype} cache)"
        if weight_dtype is not None:
            self.name += f" ({weight_dtype} weights)"

    def first(self, batch: int, tokens: int) -> float:
        """generate() from [SOS], stopping after `tokens` tokens (its prefill is the one SOS token)."""
        prefixes = torch.empty(batch, 0, dtype=torch.long)
        return timed(
            lambda: generate(
                self.model, prefixes, top_k=TOP_K, seed=0, batch_size=batch, dtype=self.dtype,
                compile=self.compile, length=tokens, cache_dtype=self.cache_dtype,
                weight_dtype=self.weight_dtype,
            )
        )  # fmt: skip

    def whole(self, batch: int, n_positions: int) -> tuple[float, None]:
        """Seconds of generate() for `batch` whole images from [SOS]; no per-step times."""
        return self.first(batch, n_positions), None

    def last(self, inputs: torch.Tensor, tokens: int) -> float:
        return ours_decode(
            self.model, inputs, tokens, self.dtype, self.compile, cache_dtype=self.cache_dtype,
            weight_dtype=self.weight_dtype,
        )  # fmt: skip


class StepClock(transformers.LogitsProcessor):
    """A logits processor that changes nothing and notes the time of each call: generate() calls it once per
    generated token, so the differences of its stamps are the decode steps' durations."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def step_seconds(stamps: list[float]) -> list[float]:
    """The decode steps' durations: the differences of successive stamps."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def stretch_rates(steps: list[float], batch: int, stretch: int) -> tuple[float, float]:
    """tokens/s over the first and the last `stretch` of the steps' durations."""
    if len(steps) < stretch:
        raise ValueError(f"{len(steps)} timed steps, fewer than a stretch of {stretch}")
    return batch * stretch / sum(steps[:stretch]), batch * stretch / sum(steps[-stretch:])


def part_rates(steps: list[float], batch: int, parts: int = 4) -> list[float]:
    """tokens/s over `parts` equal runs of the steps' durations, in order."""
    bounds = [len(steps) * i // parts for i in range(parts + 1)]
    return [batch * (hi - lo) / sum(steps[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]


class Transformers:
    name = "transformers"

    def __init__(self, model):
        self.model = model
        self.sos = model.config.vocab_size - 1

    def generate(self, inputs: torch.Tensor, tokens: int, cache=None, clock=None) -> None:
        processors = transformers.LogitsProcessorList([clock] if clock is not None else [])
        extra = {} if cache is None else {CACHE_KWARG: cache}
        with torch.no_grad():
            self.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), max_length=inputs.size(1) + tokens,
                do_sample=True, top_k=TOP_K, temperature=1.0, top_p=1.0, pad_token_id=self.sos,
                logits_processor=processors, **extra,
            )  # fmt: skip

    def first(self, batch: int, tokens: int) -> float:
        return timed(lambda: self.generate(torch.full((batch, 1), self.sos), tokens))

    def whole(self, batch: int, n_positions: int) -> tuple[float, list[float]]:
        """Seconds of generate() for `batch` whole images from [SOS], and the time stamp of every step."""
        clock = StepClock()
        seconds = timed(lambda: self.generate(torch.full((batch, 1), self.sos), n_positions, clock=clock))
        return seconds, clock.stamps

    def last(self, inputs: torch.Tensor, tokens: int) -> float:
        """generate() continuing from a cache that holds all inputs but the last (filled untimed): every
        generated token is one decode step, as in ours_decode."""
        with torch.no_grad():
            cache = self.model(input_ids=inputs[:, :-1], use_cache=True).past_key_values
        return timed(lambda: self.generate(inputs, tokens, cache))


def measure(sampler, batch: int, stretch: int, n_positions: int, clusters: int, whole: bool) -> dict:
    """tokens/s over the first and the last `stretch` tokens of an image and their whole-image estimate
    ("estimate"); with `whole`, also measured over whole images ("whole")."""
    result = {}
    stamps = None
    if whole:
        seconds, stamps = sampler.whole(batch, n_positions)
        result["whole"] = batch * n_positions / seconds
        print(f"  {sampler.name:40s} whole images: {seconds:8.1f} s", flush=True)
    if stamps is not None:  # the stretches from the whole run's steps
        steps = step_seconds(stamps)
        result["first"], result["last"] = stretch_rates(steps, batch, stretch)
        quarters = ", ".join(f"{rate:.1f}" for rate in part_rates(steps, batch))
        print(f"  {sampler.name:40s} tokens/s by quarter of the image: {quarters}", flush=True)
    else:
        first = sampler.first(batch, stretch)
        print(f"  {sampler.name:40s} first {stretch} tokens: {first:8.1f} s", flush=True)
        sos = torch.full((batch, 1), clusters)  # SOS = the number of clusters
        inputs = torch.cat([sos, random_prefix(batch, n_positions - stretch, clusters)], dim=1)
        last = sampler.last(inputs, stretch)
        print(f"  {sampler.name:40s} last {stretch} tokens:  {last:8.1f} s (decode steps only)", flush=True)
        result["first"], result["last"] = batch * stretch / first, batch * stretch / last
    a, b = batch / result["first"], batch / result["last"]  # seconds per step
    result["estimate"] = 2 * batch / (a + b)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="stretches of 16 tokens only (no whole images), small peak runs"
    )
    parser.add_argument(
        "--stretch", type=int, default=None,
        help="tokens per timed stretch (default 128); given, only the stretches are timed (no whole images)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--flops-batch", type=int, default=64, help="section 2's batch (0: no section 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--dtype", default="auto", help="our dtype (auto, the sampling default: float32 arithmetic)"
    )
    parser.add_argument(
        "--full", action="store_true", help="section 2 on whole images too (default: its stretches' estimate)"
    )
    parser.add_argument("--compile", action="store_true", help="also time our compiled decode step")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="leave glibc's allocator as it is (default: tune_malloc, transformers' fastest case)",
    )  # fmt: skip
    parser.add_argument(
        "--cache-dtypes",
        default="auto,exact,int8",
        help="our KV cache dtypes to time, comma-separated; auto = the default (on the native engine "
        "bfloat16, with bfloat16 weights); exact = dtype float32: float32 weights and cache (default "
        "auto,exact,int8)",
    )
    parser.add_argument(
        "--int8-weights-with",
        default="int8",
        help="the cache dtypes (among auto, float32, bfloat16, float16, int8) to time again with our int8 "
        "weights, comma-separated; '' for none (default int8)",
    )
    args = parser.parse_args()
    named = {"auto": (args.dtype, None), "exact": ("float32", None)}  # (dtype, cache dtype)
    cache_dtypes = [named.get(name, (args.dtype, name)) for name in args.cache_dtypes.split(",")]
    variants = [(dtype, cache_dtype, None) for dtype, cache_dtype in cache_dtypes] + [
        (*named.get(name, (args.dtype, name)), "int8") for name in args.int8_weights_with.split(",") if name
    ]
    stretch = args.stretch or (16 if args.quick else 128)
    whole = not args.quick and args.stretch is None
    tuned = not args.default_malloc and tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hf_config = transformers.ImageGPTConfig(
        vocab_size=513, n_positions=1024, n_embd=512, n_layer=24, n_head=8
    )
    hf = transformers.ImageGPTForCausalImageModeling(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = ImageGPT.from_pretrained(directory).eval()
    config = ours.config
    params = ours.num_parameters()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    print(
        f"igpt-s: {params / 1e6:.1f}M parameters, {config.n_positions} tokens per image, top-k {TOP_K}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads\nCPU: {describe_cpu()}\n"
        f"our compute dtype {str(dtype).removeprefix('torch.')}, by default on the native engine bfloat16 "
        "weights and cache; native decode kernel "
        f"{'on' if cpu.available() else 'off (SDPA)'}; allocator "
        f"{'glibc, mmap threshold 32 MiB, no trim (tune_malloc)' if tuned else 'as it is'}",
        flush=True,
    )

    size = 1024 if args.quick else 2048
    seconds = 1.0 if args.quick else 3.0
    peak_bf16 = matmul_peak(torch.bfloat16, size, seconds)
    peak_f32 = matmul_peak(torch.float32, size, seconds)
    bandwidth = read_bandwidth(0.5 if args.quick else 1.0)
    print(
        f"measured peaks: bfloat16 matmul {peak_bf16 / 1e9:.1f} GFLOP/s, float32 matmul {peak_f32 / 1e9:.1f} "
        f"GFLOP/s ({size}^3); memory read {bandwidth / 1e9:.1f} GB/s",
        flush=True,
    )

    what = "whole images and stretches" if whole else "stretches"
    print(f"\n1. batch {args.batch}, {what} of {stretch} tokens", flush=True)
    # transformers last: with the allocator left as it is (--default-malloc) it ran faster after our runs had
    # freed their caches (glibc's mmap threshold raised) than first in a fresh process
    samplers = [Ours(ours, dtype, False, cache, weights) for dtype, cache, weights in variants]
    if args.compile:
        samplers.append(Ours(ours, args.dtype, True))
        warm = torch.full((args.batch, 2), config.sos_id)
        compiling = timed(lambda: ours_decode(ours, warm, 2, args.dtype, True, random_cache=True))
        print(f"  compiling our decode step took {compiling:.0f} s (not counted below)", flush=True)
    if not args.skip_transformers:
        samplers.append(Transformers(hf))
    shape = (args.batch, stretch, config.n_positions, config.n_clusters)
    results = {s.name: measure(s, *shape, whole) for s in samplers}
    report(results, stretch)

    for dtype, cache_dtype, weight_dtype in variants if args.flops_batch > 0 else []:  # 0: no section 2
        flops(ours, args, dtype, cache_dtype, weight_dtype, stretch, peak_bf16, peak_f32, bandwidth)


def report(results: dict, stretch: int) -> None:
    """Section 1's table and the ratios to transformers: of whole images where measured, else the estimate."""
    key = "whole" if all("whole" in r for r in results.values()) else "estimate"
    print(f"\n  {'tokens/s':40s} {'first ' + str(stretch):>9s} {'last ' + str(stretch):>9s} "
          f"{'whole (est.)':>13s} {'whole':>9s}")  # fmt: skip
    for name, r in results.items():
        measured = f"{r['whole']:9.1f}" if "whole" in r else f"{'-':>9s}"
        print(f"  {name:40s} {r['first']:9.1f} {r['last']:9.1f} {r['estimate']:13.1f} {measured}")
    if "transformers" not in results:
        return
    hf_r = results["transformers"]
    label = "whole images" if key == "whole" else "whole image (est.)"
    for name, r in results.items():
        if name != "transformers":
            first, last = r["first"] / hf_r["first"], r["last"] / hf_r["last"]
            print(
                f"  ratio {name} / transformers: {label} {r[key] / hf_r[key]:.1f}x "
                f"(first {stretch} {first:.1f}x, last {stretch} {last:.1f}x)"
            )


def flops(ours, args, dtype, cache_dtype, weight_dtype, stretch: int, peak_bf16, peak_f32, bandwidth) -> None:
    """Section 2: our tokens/s at batch args.flops_batch against the compute and memory-traffic limits."""
    config, params, batch = ours.config, ours.num_parameters(), args.flops_batch
    options = SamplingOptions(dtype=dtype, cache_dtype=cache_dtype, weight_dtype=weight_dtype)
    decoder = make_decoder(ours, options, torch.device("cpu"), batch)  # the dtypes generate() runs
    cache, weight = decoder.cache_dtype, decoder.weight_dtype
    print(
        f"\n2. batch {batch}, ours, {str(cache).removeprefix('torch.')} cache, "
        f"{str(weight).removeprefix('torch.')} weights",
        flush=True,
    )
    sampler = Ours(ours, dtype, False, cache_dtype, weight_dtype)
    if args.full:
        seconds, _ = sampler.whole(batch, config.n_positions)
        rate, how = batch * config.n_positions / seconds, "measured on whole images"
    else:
        first = sampler.first(batch, stretch)
        late = torch.full((batch, config.n_positions - stretch + 1), config.sos_id)
        last = ours_decode(ours, late, stretch, dtype, random_cache=True, cache_dtype=cache_dtype,
                           weight_dtype=weight_dtype)  # fmt: skip
        print(f"  first {stretch} tokens {first:.1f} s, last {stretch} tokens {last:.1f} s", flush=True)
        rate = 2 * batch * stretch / (first + last)
        how = f"estimated from the first and last {stretch} tokens, the last over a cache of random keys"
    achieved = 2 * params * rate
    weights = params * torch.empty((), dtype=weight).element_size()  # the weights are read at every step
    kv_mean = batch * (config.n_positions / 2) * cache_position_bytes(config, cache)
    memory_rate = batch * bandwidth / (weights + kv_mean)
    print(
        f"  {rate:.1f} tokens/s ({how})\n"
        f"  = {achieved / 1e9:.2f} GFLOP/s at 2 x {params / 1e6:.1f}M FLOP/token\n"
        f"  compute limit at the measured bfloat16 peak: {peak_bf16 / (2 * params):.1f} tokens/s; "
        f"reached {achieved / peak_bf16:.0%}\n"
        f"  compute limit at the measured float32 peak:  {peak_f32 / (2 * params):.1f} tokens/s; "
        f"reached {achieved / peak_f32:.0%}\n"
        f"  memory limit (weights {weights / 1e6:.0f} MB + the mean KV cache {kv_mean / 1e6:.0f} MB read per "
        f"step at {bandwidth / 1e9:.1f} GB/s): {memory_rate:.1f} tokens/s; reached {rate / memory_rate:.0%}"
    )


if __name__ == "__main__":
    main()
