"""Sampling speed: imagegpt's KV-cached sampler against transformers' generate, in one run on one machine.

Setup: igpt-s (76.7M parameters) with random weights, 1024-token (32x32) images, top-k 40, temperature 1; the
same weights in both (transformers' model is saved and loaded into ours).

1. Batch 16, ours against ImageGPTForCausalImageModeling.generate(do_sample=True, top_k=40). transformers
   takes many minutes per batch of full images on a small CPU, so both are timed on the same two
   stretches: the first S tokens from [SOS], and the last S tokens of the image given a (1024 - S)-token
   prefix. The prefill of that prefix is timed on its own (a forward of [SOS] + prefix filling the cache, as
   generate's first step does) and subtracted, so both stretches time decode steps only. A decode step's cost
   grows linearly with its position (attention reads every cached key), so the mean of the two stretches'
   step times is the mean step of a whole image: full-image tokens/s ~= 2 B / (a + b), a and b the seconds
   per step of the two stretches.
   --full also samples whole images with ours, to check that estimate against a measurement.
2. Batch 64, ours: achieved FLOP/s (2 x parameters FLOP per token) against the compute limit at the matmul
   peaks measured here (one big bfloat16 and one big float32 matmul), and against the memory-traffic limit
   (each decode step reads the weights and every cached key and value).

    python benchmarks/bench_sampling.py            # S = 128; about an hour on a loaded 2-core CPU
    python benchmarks/bench_sampling.py --quick    # S = 16, smaller peaks; a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
import time

import torch

from imagegpt import ImageGPT, kernels
from imagegpt.device import autocast, resolve_dtype
from imagegpt.model import KVCache, cache_position_bytes, packed_weights
from imagegpt.sampling import (
    decode_step,
    generate,
    prefill,
    resolve_cache_dtype,
    resolve_weight_dtype,
    sample_next,
)

TOP_K = 40


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
    dtype = resolve_dtype(dtype, device)
    step, static = decode_step(device, compile)
    spare = int(bool(compile) and not static)
    cache_dtype = resolve_cache_dtype(cache_dtype, dtype, torch.float32)
    cache = KVCache(config, len(inputs), config.n_positions + spare, dtype=cache_dtype, zeroed=static)
    generator = torch.Generator().manual_seed(0)
    P = inputs.size(1) - 1
    weights = resolve_weight_dtype(weight_dtype)
    packed = packed_weights(model, weights) if dtype == torch.float32 else contextlib.nullcontext()
    with torch.inference_mode(), autocast(device, dtype), packed:
        if random_cache:
            for tensor in cache.k + cache.v:
                tensor.normal_() if tensor.is_floating_point() else tensor.random_(-127, 128)
        elif P:
            prefill(model, inputs[:, :P], cache)
        token = inputs[:, P]
        start = time.perf_counter()
        for position in range(P, P + steps):
            at = torch.tensor([position]) if static else position
            logits = step(model, token[:, None], at, cache)
            token = sample_next(logits, 1.0, TOP_K, 1.0, generator)
        return time.perf_counter() - start


class Ours:
    def __init__(self, model: ImageGPT, dtype, compile: bool, cache_dtype=None, weight_dtype=None):
        self.model, self.dtype, self.compile, self.cache_dtype = model, dtype, compile, cache_dtype
        self.weight_dtype = weight_dtype
        self.name = "imagegpt" + (" (compiled)" if compile else "")
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

    def last(self, inputs: torch.Tensor, tokens: int) -> float:
        return ours_decode(
            self.model, inputs, tokens, self.dtype, self.compile, cache_dtype=self.cache_dtype,
            weight_dtype=self.weight_dtype,
        )  # fmt: skip


class Transformers:
    name = "transformers"

    def __init__(self, model):
        self.model = model
        self.sos = model.config.vocab_size - 1

    def generate(self, inputs: torch.Tensor, tokens: int, cache=None) -> None:
        with torch.no_grad():
            self.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), past_key_values=cache,
                max_length=inputs.size(1) + tokens, do_sample=True, top_k=TOP_K, temperature=1.0, top_p=1.0,
                pad_token_id=self.sos,
            )  # fmt: skip

    def first(self, batch: int, tokens: int) -> float:
        return timed(lambda: self.generate(torch.full((batch, 1), self.sos), tokens))

    def last(self, inputs: torch.Tensor, tokens: int) -> float:
        """generate() continuing from a cache that holds all inputs but the last (filled untimed): every
        generated token is one decode step, as in ours_decode."""
        with torch.no_grad():
            cache = self.model(input_ids=inputs[:, :-1], use_cache=True).past_key_values
        return timed(lambda: self.generate(inputs, tokens, cache))


def measure(sampler, batch: int, stretch: int, n_positions: int, clusters: int) -> dict:
    """Tokens/s over the first and the last `stretch` tokens of an image, and the full-image estimate."""
    first = sampler.first(batch, stretch)
    print(f"  {sampler.name:24s} first {stretch} tokens: {first:8.1f} s", flush=True)
    sos = torch.full((batch, 1), clusters)  # SOS = the number of clusters
    inputs = torch.cat([sos, random_prefix(batch, n_positions - stretch, clusters)], dim=1)
    last = sampler.last(inputs, stretch)
    print(f"  {sampler.name:24s} last {stretch} tokens:  {last:8.1f} s (decode steps only)", flush=True)
    a, b = first / stretch, last / stretch  # seconds per step
    return {"first": batch / a, "last": batch / b, "full": 2 * batch / (a + b)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="stretches of 16 tokens and small peak runs")
    parser.add_argument("--stretch", type=int, default=None, help="tokens per timed stretch (default 128)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--flops-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--dtype", default="auto", help="our autocast dtype (auto = bfloat16 where supported)"
    )
    parser.add_argument("--full", action="store_true", help="also sample whole batches of images with ours")
    parser.add_argument("--compile", action="store_true", help="also time our compiled decode step")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--cache-dtypes",
        default="auto,bfloat16,int8",
        help="our KV cache dtypes to time, comma-separated; auto = the compute dtype's, the exact default "
        "(default auto,bfloat16,int8)",
    )
    parser.add_argument(
        "--int8-weights-with",
        default="int8",
        help="the cache dtypes (among auto, float32, bfloat16, float16, int8) to time again with our int8 "
        "weights, comma-separated; '' for none (default int8)",
    )
    args = parser.parse_args()
    cache_dtypes = [None if name == "auto" else name for name in args.cache_dtypes.split(",")]
    variants = [(cache_dtype, None) for cache_dtype in cache_dtypes] + [
        (None if name == "auto" else name, "int8") for name in args.int8_weights_with.split(",") if name
    ]
    stretch = args.stretch or (16 if args.quick else 128)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

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
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"our compute dtype {str(dtype).removeprefix('torch.')}; native decode kernel "
        f"{'on' if kernels.available() else 'off (SDPA)'}",
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

    print(f"\n1. batch {args.batch}, stretches of {stretch} tokens", flush=True)
    samplers = [Ours(ours, args.dtype, False, cache, weights) for cache, weights in variants]
    if args.compile:
        samplers.append(Ours(ours, args.dtype, True))
        warm = torch.full((args.batch, 2), config.sos_id)
        compiling = timed(lambda: ours_decode(ours, warm, 2, args.dtype, True, random_cache=True))
        print(f"  compiling our decode step took {compiling:.0f} s (not counted below)", flush=True)
    if not args.skip_transformers:
        samplers.append(Transformers(hf))
    results = {
        s.name: measure(s, args.batch, stretch, config.n_positions, config.n_clusters) for s in samplers
    }
    print(f"\n  {'tokens/s':34s} {'first':>9s} {'last':>9s} {'full image (est.)':>18s}")
    for name, r in results.items():
        print(f"  {name:34s} {r['first']:9.1f} {r['last']:9.1f} {r['full']:18.1f}")
    if "transformers" in results:
        hf_r = results["transformers"]
        for name, r in results.items():
            if name != "transformers":
                print(
                    f"  ratio {name} / transformers: first {r['first'] / hf_r['first']:.1f}x, last "
                    f"{r['last'] / hf_r['last']:.1f}x, full image (est.) {r['full'] / hf_r['full']:.1f}x"
                )
    if args.full:
        count = args.batch
        seconds = timed(lambda: generate(ours, torch.empty(count, 0, dtype=torch.long), top_k=TOP_K, seed=0,
                                         batch_size=count, dtype=args.dtype))  # fmt: skip
        print(
            f"  imagegpt whole images, batch {count}: {count * config.n_positions / seconds:.1f} tokens/s "
            f"measured (estimate above {results['imagegpt']['full']:.1f})"
        )

    for cache_dtype, weight_dtype in variants:
        flops(ours, args, cache_dtype, weight_dtype, stretch, peak_bf16, peak_f32, bandwidth)


def flops(ours, args, cache_dtype, weight_dtype, stretch: int, peak_bf16, peak_f32, bandwidth) -> None:
    """Section 2: our tokens/s at batch args.flops_batch against the compute and memory-traffic limits."""
    config, params, batch = ours.config, ours.num_parameters(), args.flops_batch
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    cache = resolve_cache_dtype(cache_dtype, dtype, torch.float32)
    weight = resolve_weight_dtype(weight_dtype)
    print(
        f"\n2. batch {batch}, ours, {str(cache).removeprefix('torch.')} cache, "
        f"{str(weight).removeprefix('torch.')} weights",
        flush=True,
    )
    if args.full:
        prefixes = torch.empty(batch, 0, dtype=torch.long)
        seconds = timed(lambda: generate(ours, prefixes, top_k=TOP_K, seed=0, batch_size=batch,
                                         dtype=args.dtype, cache_dtype=cache_dtype,
                                         weight_dtype=weight_dtype))  # fmt: skip
        rate, how = batch * config.n_positions / seconds, "measured on whole images"
    else:
        first = Ours(ours, args.dtype, False, cache_dtype, weight_dtype).first(batch, stretch)
        late = torch.full((batch, config.n_positions - stretch + 1), config.sos_id)
        last = ours_decode(ours, late, stretch, args.dtype, random_cache=True, cache_dtype=cache_dtype,
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
