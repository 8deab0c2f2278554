"""imagegpt against transformers on one device (a GPU by default), side by side in one process.

    python benchmarks/bench_device.py                     # igpt-s, 32x32, on cuda (a few minutes on one GPU)
    python benchmarks/bench_device.py --device cpu --quick  # a smoke test of the script itself

The same random weights in both (transformers' model is saved and loaded into ours). Cases, each printed with
ours, transformers' and the ratio:
- forward: tokens/s of the full-sequence forward pass, float32 and bfloat16 autocast (inference mode);
- train: tokens/s of one training step (forward, backward, AdamW), float32 and bfloat16 autocast;
- sample: tokens/s generating the first --tokens tokens of --samples images from [SOS] with top-k 40 (ours:
  sampling.generate, eager and with compile=True; transformers: generate(do_sample=True) with its cache).
Peak memory (torch.cuda.max_memory_allocated) is printed for the forward and training cases on CUDA.
Times are the best of --repeats after a warm-up; the device is synchronised around every timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

from imagegpt import ImageGPT
from imagegpt.device import describe_cpu, resolve_device
from imagegpt.model import sos_inputs
from imagegpt.sampling import generate

TOP_K = 40
PRESETS = {  # name: transformers config values (ours is loaded from it)
    "igpt-s": dict(n_embd=512, n_layer=24, n_head=8),
    "igpt-micro": dict(n_embd=64, n_layer=2, n_head=2),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory(fn, device: torch.device) -> float | None:
    """GiB allocated at the peak of one call of fn (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def forward_case(model, inputs, dtype, hf: bool):
    def run():
        with (
            torch.inference_mode(),
            torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32),
        ):
            return model(inputs, use_cache=False).logits if hf else model(inputs).logits

    return run


def train_case(model, inputs, dtype, hf: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run():
        with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(inputs, labels=inputs, **({"use_cache": False} if hf else {})).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def build(preset: str, resolution: int, device: torch.device):
    torch.manual_seed(0)
    config = transformers.ImageGPTConfig(
        vocab_size=513, n_positions=resolution**2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        **PRESETS[preset],
    )  # fmt: skip
    hf = transformers.ImageGPTForCausalImageModeling(config)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = ImageGPT.from_pretrained(directory)
    return ours.to(device), hf.to(device)


def model_cases(ours, hf, args, device) -> list[tuple[str, float, float, str]]:
    """(case, ours tokens/s, transformers tokens/s, memory note) for forward and train in both dtypes."""
    rows = []
    inputs = sos_inputs(
        torch.randint(0, 512, (args.batch, ours.config.n_positions), device=device), ours.config.sos_id
    )
    tokens = inputs.numel()
    for mode, make in (("forward", forward_case), ("train", train_case)):
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            runs = [make(model, inputs, dtype, model is hf) for model in (ours, hf)]
            for model in (ours, hf):
                model.train(mode == "train")
            seconds = [best_seconds(run, device, args.repeats) for run in runs]
            memory = [peak_memory(run, device) for run in runs]
            note = "" if memory[0] is None else f"peak memory {memory[0]:.2f} / {memory[1]:.2f} GiB"
            rows.append((f"{mode} {name}", tokens / seconds[0], tokens / seconds[1], note))
            print_row(rows[-1])
    return rows


def sample_cases(ours, hf, args, device) -> list[tuple[str, float, float, str]]:
    ours.eval(), hf.eval()
    sos = ours.config.sos_id
    tokens, batch = args.tokens, args.samples
    prefixes = torch.empty(batch, 0, dtype=torch.long)

    def hf_run():
        inputs = torch.full((batch, 1), sos, device=device)
        with torch.no_grad():
            hf.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), max_length=tokens + 1,
                do_sample=True, top_k=TOP_K, pad_token_id=sos,
            )  # fmt: skip

    theirs = batch * tokens / best_seconds(hf_run, device, args.repeats)
    rows = []
    for compile in (False, True) if args.compile else (False,):

        def run(compile=compile):
            generate(ours, prefixes, top_k=TOP_K, seed=0, batch_size=batch, length=tokens, compile=compile)

        rows.append((f"sample{' compiled' if compile else ''}", batch * tokens / best_seconds(run, device,
                                                                                            args.repeats),
                     theirs, f"{batch} images x first {tokens} tokens"))  # fmt: skip
        print_row(rows[-1])
    return rows


def print_row(row) -> None:
    case, ours, theirs, note = row
    print(f"  {case:20s} {ours:12.1f} {theirs:14.1f} {ours / theirs:7.2f}x  {note}", flush=True)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="igpt-s", choices=list(PRESETS))
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="images per forward / training step")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="tokens sampled per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip compile=True")
    parser.add_argument("--quick", action="store_true", help="igpt-micro at 8x8, batch 2, 16 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.resolution, args.batch, args.samples, args.tokens, args.repeats = (
            "igpt-micro", 8, 2, 2, 16, 1,
        )  # fmt: skip
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {describe_cpu()}"
    print(
        f"imagegpt vs transformers {transformers.__version__} on {device} ({where}); "
        f"torch {torch.__version__}\n"
        f"{args.preset} at {args.resolution}x{args.resolution}, batch {args.batch}, random weights\n"
        f"  {'tokens/s':20s} {'imagegpt':>12s} {'transformers':>14s} {'ratio':>8s}",
        flush=True,
    )
    ours, hf = build(args.preset, args.resolution, device)
    return model_cases(ours, hf, args, device) + sample_cases(ours, hf, args, device)


if __name__ == "__main__":
    main()
