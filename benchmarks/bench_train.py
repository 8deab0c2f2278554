"""Training throughput: tokens per second of one optimizer step (forward, backward, clip, AdamW) per dtype.

Runs imagegpt.trainer.optimizer_step, the step `imagegpt train` takes, on random token ids, for each dtype in
one process, and prints the ratio to the first dtype. The default is the issue's question: igpt-s at 32x32
with 512 colours, bfloat16 autocast next to float32, on whatever this machine is.

    python benchmarks/bench_train.py                                  # igpt-s, bfloat16 and float32
    python benchmarks/bench_train.py --preset igpt-mini --batch-size 8 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from imagegpt import ImageGPT, ImageGPTConfig
from imagegpt.device import DTYPES, describe_cpu, resolve_device
from imagegpt.train import image_loss
from imagegpt.trainer import make_optimizer, optimizer_step


def measure(config, dtype, batch_size, steps, warmup, device, accumulate=1):
    torch.manual_seed(0)
    model = ImageGPT(config).to(device).train()
    optimizer = make_optimizer(model, lr=1e-4)
    ids = torch.randint(0, config.n_clusters, (batch_size, config.n_positions), device=device)
    micro = ids.chunk(accumulate)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = optimizer_step(
            model, optimizer, micro, lambda b: image_loss(model, b, config.sos_id), device=device, dtype=dtype
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch_size * config.n_positions / statistics.median(times), times, result.loss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="igpt-s")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--clusters", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per dtype (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--dtypes", default="bfloat16,float32", help="comma-separated; the last is the reference"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = ImageGPTConfig.from_preset(args.preset, resolution=args.resolution, clusters=args.clusters)
    print(
        f"{args.preset}: {config.num_parameters() / 1e6:.1f}M parameters, {config.n_positions} tokens per "
        f"image, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads\nCPU: {describe_cpu()}"
    )
    results = {}
    for name in args.dtypes.split(","):
        rate, times, loss = measure(config, DTYPES[name], args.batch_size, args.steps, args.warmup, device)
        results[name] = rate
        steps = ", ".join(f"{t:.2f}" for t in times)
        print(f"  {name:>9}: {rate:10.1f} tokens/s   (step times {steps} s; loss {loss:.3f})")
    reference = args.dtypes.split(",")[-1]
    for name, rate in results.items():
        if name != reference:
            print(f"  {name} / {reference}: {rate / results[reference]:.2f}x")


if __name__ == "__main__":
    main()
