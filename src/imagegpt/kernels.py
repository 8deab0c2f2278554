"""Deprecated: the native CPU kernels are imagegpt.cpu now (cpu.available(), cpu.DecodeEngine, and the
operators torch.ops.imagegpt.*). This module keeps the names a user could have called."""

import warnings

from .cpu import MAX_ROWS, available
from .quantize import quantize_int8

__all__ = ["MAX_ROWS", "available", "quantize_int8"]

warnings.warn(
    "imagegpt.kernels is deprecated; use imagegpt.cpu (cpu.available())", DeprecationWarning, stacklevel=2
)
