"""Device and precision choices shared by sampling, training, evaluation and probes."""

from __future__ import annotations

import contextlib

import torch

from .errors import ArgumentError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The autocast compute dtype: 'auto' or None -> bfloat16 where the device supports it, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if name not in DTYPES:
        raise ArgumentError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and not bf16_supported(device):
        raise ArgumentError(f"bfloat16 is not supported on {device}; use --dtype float32")
    if dtype == torch.float16 and device.type != "cuda":
        raise ArgumentError("float16 autocast is only supported on CUDA; use --dtype bfloat16 or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for matrix multiplies (weights stay float32); a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
