"""imagegpt's ImageGPT against transformers' ImageGPTForCausalImageModeling, side by side in one run.

    python benchmarks/bench_model.py             # igpt-s, batch 4 x 1024 tokens (about half an hour)
    python benchmarks/bench_model.py --quick     # a smoke test: igpt-micro, batch 2 x 256 tokens
    python benchmarks/bench_model.py --threads 1 # per-core figures, robust on a busy machine

Cases: forward throughput (inference mode) and one training step (forward, backward, AdamW step), each in
float32 and under bfloat16 autocast. Both models get the same config, the same random token ids, the same
optimizer and the same autocast; transformers is called with use_cache=False so that it does no cache work.

Each case runs in a fresh subprocess, one model at a time, so that peak memory is that case's alone:
- memory = peak resident set size (VmHWM) minus the resident size after imports, i.e. what the model, its
  gradients and optimizer state, the activations and the allocator's retained free memory took at the peak.
  Library code (torch, transformers) is excluded, so the two columns compare the models, not the imports.
- time = wall clock per step after one warm-up step; the median of the timed steps (with --rounds N, the
  implementations alternate N times and the fastest round counts: other processes only ever add time). A case
  that cannot finish within its time budget is stopped and reported as a bound ("<" tokens/s).

Other processes make timings noisy: run it more than once and compare ratios from the same run. On a busy
machine, OpenMP threads that spin while their partner thread is descheduled can make 2-thread timings 10-50x
slower; --threads 1 (or OMP_WAIT_POLICY=PASSIVE in the environment) avoids that. The load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PRECISIONS = ("float32", "bfloat16")
MODES = ("forward", "train")
IMPLEMENTATIONS = ("imagegpt", "transformers")
TARGETS = {("forward", "float32"): 1.5, ("forward", "bfloat16"): 4.0, ("train", "bfloat16"): 4.0}


def rss_kib(field: str = "VmRSS", pid: int | str = "self") -> int:
    """A memory field of /proc/PID/status in KiB (VmRSS now, VmHWM the peak); 0 where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def build(implementation: str, preset: str, resolution: int, clusters: int):
    """A model with random weights; both implementations get the same shape (transformers' from ours)."""
    from imagegpt import ImageGPT, ImageGPTConfig
    from imagegpt.checkpoint import config_to_transformers

    config = ImageGPTConfig.from_preset(preset, resolution=resolution, clusters=clusters)
    if implementation == "imagegpt":
        return ImageGPT(config), config
    import transformers

    values = config_to_transformers(config)
    values.pop("architectures")
    values.pop("model_type")
    return transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**values)), config


def run_case(
    implementation: str,
    mode: str,
    precision: str,
    *,
    preset: str,
    resolution: int,
    clusters: int = 512,
    batch: int,
    repeats: int,
    budget: float = float("inf"),
    threads: int | None = None,
    report=lambda record: None,
) -> dict:
    """Time `repeats` steps after a warm-up step; returns the median step time and the peak memory in KiB.

    report(record) is called as the case progresses (the parent process reads these lines if this one is
    stopped). The steps stop early when the next one would overrun `budget` seconds.
    """
    import torch
    import transformers

    import imagegpt.checkpoint  # noqa: F401

    # Both cases load both libraries (transformers imports its model code lazily), so that the baseline below
    # holds the same code and the memory column compares the models alone.
    transformers.ImageGPTForCausalImageModeling, transformers.ImageGPTConfig  # noqa: B018

    if threads:
        torch.set_num_threads(threads)
    baseline = rss_kib()
    torch.manual_seed(0)
    model, config = build(implementation, preset, resolution, clusters)
    ids = torch.randint(0, config.n_clusters, (batch, config.n_positions))
    kwargs = {"use_cache": False} if implementation == "transformers" else {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
    if mode == "forward":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                return model(ids, **kwargs).logits

    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(ids, labels=ids, **kwargs).loss
            loss.backward()
            optimizer.step()

    record = {
        "implementation": implementation,
        "mode": mode,
        "precision": precision,
        "baseline_kib": baseline,
    }
    record["parameters"] = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    report({**record, "event": "setup", "setup_rss_kib": rss_kib()})
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t
        times.append(elapsed)
        report({**record, "event": "step", "index": i, "seconds": elapsed, "peak_kib": rss_kib("VmHWM")})
        if i < repeats and time.perf_counter() - started + elapsed > budget:
            break
    timed = times[1:] or times  # the warm-up step alone when there was no time for more
    return {
        **record,
        "event": "done",
        "seconds": statistics.median(timed),
        "steps": len(timed),
        "warm": len(times) > 1,
        "peak_kib": rss_kib("VmHWM"),
    }


def child(spec: dict) -> None:
    def report(record):
        print(json.dumps(record), flush=True)

    report(run_case(**spec, report=report))


def run_in_subprocess(spec: dict, budget: float) -> dict:
    """run_case in a fresh interpreter, stopped after budget seconds (then reported as a bound)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps({**spec, "budget": budget})]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + budget + 60  # + imports and model construction
    peak = 0
    while process.poll() is None and time.monotonic() < deadline:
        peak = max(peak, rss_kib("VmHWM", process.pid))
        time.sleep(0.5)
    stopped = process.poll() is None
    if stopped:
        peak = max(peak, rss_kib("VmHWM", process.pid))
        process.kill()
    records = [json.loads(line) for line in process.stdout.read().splitlines() if line.startswith("{")]
    process.wait()
    done = [r for r in records if r["event"] == "done"]
    if done:
        return done[0]
    setup = [r for r in records if r["event"] == "setup"]
    steps = [r for r in records if r["event"] == "step"]
    if not setup:
        raise RuntimeError(
            f"the {spec['implementation']} {spec['mode']} {spec['precision']} case failed to start"
        )
    result = {**setup[0], "event": "stopped", "peak_kib": peak}
    if steps:  # stopped after the warm-up step: report it (a step this long hardly needs warming up)
        return {**result, "seconds": steps[0]["seconds"], "steps": 1, "warm": False}
    return {**result, "seconds": None, "lower_bound_seconds": budget}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="igpt-s")
    parser.add_argument("--resolution", type=int, default=32, help="image side; tokens = resolution**2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--budget", type=float, default=600, help="seconds of steps per case before stopping")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each case, alternating; the fastest counts"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--threads", type=int, help="torch threads in each case (default: torch's default)")
    parser.add_argument("--quick", action="store_true", help="igpt-micro, 2 x 256 tokens, 1 timed step")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.preset, args.resolution, args.batch, args.repeats, args.budget = "igpt-micro", 16, 2, 1, 120

    import torch
    import transformers

    from imagegpt import ImageGPTConfig
    from imagegpt.device import describe_cpu

    config = ImageGPTConfig.from_preset(args.preset, resolution=args.resolution)
    tokens = args.batch * config.n_positions
    print(
        f"imagegpt ImageGPT vs transformers {transformers.__version__} ImageGPTForCausalImageModeling; "
        f"torch {torch.__version__}\n{args.preset} ({config.num_parameters() / 1e6:.1f}M parameters), "
        f"batch {args.batch} x {config.n_positions} tokens, random weights\nCPU: {describe_cpu()}; "
        f"threads per case: {args.threads or torch.get_num_threads()}\n",
        flush=True,
    )
    results = {}
    for mode in args.modes.split(","):
        for precision in args.precisions.split(","):
            for _ in range(args.rounds):  # the implementations alternate, so load changes hit both
                for implementation in args.implementations.split(","):
                    key = (mode, precision, implementation)
                    if key in results and not results[key].get("seconds"):
                        continue  # stopped in an earlier round: no point in waiting again
                    spec = dict(
                        implementation=implementation,
                        mode=mode,
                        precision=precision,
                        preset=args.preset,
                        resolution=args.resolution,
                        batch=args.batch,
                        repeats=args.repeats,
                        threads=args.threads,
                    )
                    result = run_in_subprocess(spec, args.budget)
                    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                    print(f"  {line(result, tokens)}  load {load:.1f}", flush=True)
                    results[key] = best(results.get(key), result)
    print()
    print(table(results, tokens))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r, "tokens_per_step": tokens} for r in results.values()], f, indent=1)
    return 0


def best(previous: dict | None, result: dict) -> dict:
    """Of two rounds, the faster (other processes only ever add time), with the larger memory peak."""
    if previous is None:
        return result
    fast = min(previous, result, key=lambda r: r.get("seconds") or float("inf"))
    large = max(previous, result, key=memory_mib)
    return {**fast, "peak_kib": large["peak_kib"], "baseline_kib": large["baseline_kib"]}


def tokens_per_second(result: dict, tokens: int) -> tuple[float, str]:
    """(tokens/s, prefix): prefix '<' when the case was stopped before one step finished."""
    if result.get("seconds"):
        return tokens / result["seconds"], ""
    return tokens / result["lower_bound_seconds"], "<"


def memory_mib(result: dict) -> float:
    return (result["peak_kib"] - result["baseline_kib"]) / 1024


def above_weights_mib(result: dict) -> float:
    """Memory above the float32 weights (both models hold the same): activations, gradients, optimizer
    state."""
    return memory_mib(result) - result["parameters"] * 4 / 2**20


def line(result: dict, tokens: int) -> str:
    speed, bound = tokens_per_second(result, tokens)
    steps = f"median of {result['steps']} steps" if result.get("warm") else "1 step, no warm-up"
    if bound:
        steps = f"stopped: no step finished in {result['lower_bound_seconds']:.0f} s"
    return (
        f"{result['implementation']:12s} {result['mode']:7s} {result['precision']:8s} "
        f"{bound}{speed:9.1f} tokens/s  peak {memory_mib(result):8.0f} MiB  ({steps})"
    )


def _ratio(ours: float, theirs: float, prefix: str = "") -> str:
    """ours / theirs as '0.49x'; '?' where theirs measured nothing (in a process whose memory peak came before
    the case, such as a long test session, a small model's peak can be no higher)."""
    return f"{prefix}{ours / theirs:.2f}x" if theirs > 0 else "?"


def table(results: dict, tokens: int) -> str:
    rows = [
        f"{'case':18s} {'imagegpt tok/s':>15s} {'transformers tok/s':>19s} {'speed-up':>9s} {'target':>7s}"
        f" {'imagegpt MiB':>13s} {'transformers MiB':>17s} {'memory':>7s} {'above weights':>14s}"
    ]
    for mode in MODES:
        for precision in PRECISIONS:
            ours, theirs = (
                results.get((mode, precision, "imagegpt")),
                results.get((mode, precision, "transformers")),
            )
            if not ours or not theirs:
                continue
            a, bound_a = tokens_per_second(ours, tokens)
            b, bound_b = tokens_per_second(theirs, tokens)
            ratio = f"{'>' if bound_b else ''}{a / b:.2f}x" if not bound_a else "?"
            target = TARGETS.get((mode, precision))
            memory = _ratio(memory_mib(ours), memory_mib(theirs), "<" if bound_b else "")
            above = _ratio(above_weights_mib(ours), above_weights_mib(theirs), "<" if bound_b else "")
            rows.append(
                f"{mode + ' ' + precision:18s} {bound_a + f'{a:.1f}':>15s} {bound_b + f'{b:.1f}':>19s} "
                f"{ratio:>9s} {f'{target:.1f}x' if target else '':>7s} {memory_mib(ours):>13.0f} "
                f"{('>' if bound_b else '') + f'{memory_mib(theirs):.0f}':>17s} {memory:>7s} {above:>14s}"
            )
    # Each model in its faster precision: what a user of each would pick on this machine.
    for mode in MODES:
        best = {}
        for implementation in IMPLEMENTATIONS:
            candidates = [
                (tokens_per_second(r, tokens)[0], p)
                for (m, p, i), r in results.items()
                if m == mode and i == implementation and not tokens_per_second(r, tokens)[1]
            ]
            if candidates:
                best[implementation] = max(candidates)
        if len(best) == 2:
            (a, pa), (b, pb) = best["imagegpt"], best["transformers"]
            rows.append(
                f"{mode} best precision: imagegpt {pa} {a:.1f} tok/s vs transformers {pb} {b:.1f} tok/s"
                f" = {a / b:.2f}x"
            )
    rows.append(
        "memory: peak resident memory above the process's memory after imports (model, gradients, optimizer "
        "state, activations); 'memory' column = imagegpt / transformers; 'above weights': the same less "
        "the float32 weights both hold"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
