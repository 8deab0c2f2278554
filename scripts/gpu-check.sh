#!/usr/bin/env bash
# The GPU check, in one short run (about 5 minutes on one H200): the tests marked `cuda` (parity with
# transformers in float32, bfloat16 autocast forward and training step, KV-cached sampling with and without
# compile, a short `imagegpt train`), then benchmarks/bench_device.py at igpt-s size against transformers.
#
#   bash scripts/gpu-check.sh [PYTHON]
#
# PYTHON (default python3) must hold a CUDA build of torch, transformers, pytest and imagegpt's dependencies;
# imagegpt itself runs from src/ (the native CPU kernels are not needed). CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 IMAGEGPT_NATIVE_KERNELS=0
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu-check: no CUDA device here")'
nvidia-smi -L 2>/dev/null || true
echo "== tests marked cuda"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
echo "== benchmarks/bench_device.py (igpt-s, 32x32)"
timeout 300 "$PY" benchmarks/bench_device.py --device cuda
