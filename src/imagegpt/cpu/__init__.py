"""imagegpt.cpu: the CPU decode engine, an optional package beside the model.

On x86-64 CPUs with AVX2, FMA and F16C, sampling's decode step runs on small native kernels (_kernels.c,
an optional C extension that setup.py builds where it can), registered as PyTorch operators
(torch.ops.imagegpt.*, ops.py) and driven by one object, DecodeEngine (engine.py), that generate() builds once
per call. Nothing outside this package knows the kernels exist but that call. Where the extension is not
built, the CPU lacks those instructions, or IMAGEGPT_NATIVE_KERNELS=0 is set, available() is False and
sampling runs on PyTorch's kernels alone, with the same numbers within float32 rounding. On CPUs with AVX-512F
the float32 linear layers take wider tiles (ops.avx512(); IMAGEGPT_CPU_AVX512=0 keeps the AVX2 ones), with the
same numbers bit for bit.
"""

from .engine import PACK_BUDGET_BYTES, DecodeEngine, NativeKVCache
from .ops import MAX_ROWS, available

__all__ = ["MAX_ROWS", "PACK_BUDGET_BYTES", "DecodeEngine", "NativeKVCache", "available"]
