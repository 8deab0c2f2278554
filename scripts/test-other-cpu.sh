#!/usr/bin/env bash
# The CPU-dependent tests again, on the other side of each capability detection (imagegpt.device,
# imagegpt.cpu): the native kernels off, and the bfloat16 detection flipped (IMAGEGPT_CPU_BF16=1 on a CPU
# without bfloat16 units, 0 on one with them); then the kernels' tests with their AVX-512F paths switched off
# (IMAGEGPT_CPU_AVX512=0; on a CPU without AVX-512F, a repeat of the suite's own run). The whole suite already
# ran on this CPU as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
flipped=$(.venv/bin/python -c 'from imagegpt.device import _detect_cpu_bf16; print(0 if _detect_cpu_bf16() else 1)')
echo "== CPU-dependent tests with IMAGEGPT_NATIVE_KERNELS=0 IMAGEGPT_CPU_BF16=$flipped"
IMAGEGPT_NATIVE_KERNELS=0 IMAGEGPT_CPU_BF16=$flipped .venv/bin/python -m pytest -q \
    tests/test_device.py tests/test_model.py tests/test_parity.py tests/test_kernels.py tests/test_cpu_engine.py \
    tests/test_sampling.py tests/test_cli_sampling.py tests/test_train.py tests/test_finetune.py README.md
echo "== the native kernels' tests with IMAGEGPT_CPU_AVX512=0 (their AVX2 tiles on a CPU with AVX-512F)"
IMAGEGPT_CPU_AVX512=0 .venv/bin/python -m pytest -q tests/test_kernels.py tests/test_cpu_engine.py tests/test_sampling.py
