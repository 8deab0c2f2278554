"""Device and precision choices shared by sampling, training, evaluation and probes.

The one place where the CPU's bfloat16 units are detected (`cpu_has_bf16`); IMAGEGPT_CPU_BF16=0 or 1
overrides the detection, so that the tests of both branches run on any machine.

What `dtype="auto"` means, the same on every machine: bfloat16 autocast for training (pretraining and
fine-tuning) where the device multiplies bfloat16 natively (CUDA with bfloat16, a CPU with AVX512-BF16 or
AMX) and, on a CPU, the model is at least CPU_BF16_MIN_WIDTH wide (below that, autocast's casts cost more
than the bfloat16 units save: docs/performance.md); float32 otherwise. float32 for everything that only
runs the model forward (sampling, evaluation, probes, classification), whose numbers are then exact and the
same on every CPU; sampling's decode steps on the native CPU kernels also read bfloat16 copies of the
weights and cache by default, in float32 arithmetic (imagegpt.sampling.SamplingOptions). bfloat16 autocast
there is a choice the caller makes by name.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

from .errors import ArgumentError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_ENV = "IMAGEGPT_CPU_BF16"
CPU_BF16_MIN_WIDTH = 256  # n_embd from which CPU bfloat16 training beats float32 (igpt-mini; not igpt-micro)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' or None -> cuda when available, else cpu; anything else must name a usable device."""
    if name is None or name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ArgumentError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


@functools.cache
def _detect_cpu_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); IMAGEGPT_CPU_BF16=0/1 overrides
    the detection (read at every call, so that tests and users can switch)."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ArgumentError(f"{BF16_ENV} must be 0 or 1 (or unset to detect), got {forced!r}")
    return _detect_cpu_bf16()


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def resolve_dtype(
    name: str | torch.dtype | None,
    device: torch.device,
    *,
    training: bool = False,
    width: int | None = None,
) -> torch.dtype:
    """The autocast compute dtype. 'auto' or None: bfloat16 for training on a device with native bfloat16
    (on a CPU, for models of width >= CPU_BF16_MIN_WIDTH when `width` is given), float32 otherwise (module
    docstring). A named dtype the device cannot run is refused."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        narrow = device.type == "cpu" and width is not None and width < CPU_BF16_MIN_WIDTH
        return torch.bfloat16 if training and bf16_supported(device) and not narrow else torch.float32
    if name not in DTYPES:
        raise ArgumentError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and not bf16_supported(device):
        raise ArgumentError(
            f"bfloat16 is not supported on {device} (no bfloat16 units: it would run 10-50x slower than "
            "float32); use --dtype float32 or auto"
        )
    if dtype == torch.float16 and device.type != "cuda":
        raise ArgumentError("float16 autocast is only supported on CUDA; use --dtype bfloat16 or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for matrix multiplies (weights stay float32); a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_cpu() -> str:
    """The CPU's model name and the flags that decide our paths, for benchmark and bug reports."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):  # after the model name: the first CPU is enough
                flags = set(value.split())
                break
    names = [n for n in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if n in flags]
    flags = " ".join(names) or "none of avx2/avx512"
    native = "yes" if _detect_cpu_bf16() else "no"
    return f"{model} ({platform.machine()}, {os.cpu_count()} CPUs; flags: {flags}; native bfloat16: {native})"
