"""Fixtures shared by the test modules."""

import importlib.util
import os
import platform
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def pytest_configure(config):
    """torch.compile's on-disk cache in a directory of this run's own, unless the caller chose one.

    Inductor's default cache (/tmp/torchinductor_$USER) is shared by every process of the user, and its keys
    do not cover every setting that changes the generated code: kernels compiled under
    ATEN_CPU_CAPABILITY=avx2 and reloaded on the same machine without it gave NaN logits or a corrupted heap.
    A test run must not depend on what earlier runs left behind; subprocesses inherit the setting. Decided
    before anything imports torch._inductor.config, which sets the variable to the default.
    """
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        config._imagegpt_inductor_cache = tempfile.mkdtemp(prefix="imagegpt-test-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = config._imagegpt_inductor_cache
    if platform.machine() in ("aarch64", "arm64"):
        # GCC 12 (Debian 12) crashes compiling Inductor's SVE kernels against its precompiled headers (README,
        # "Precision, and which CPU you have"); the variable reaches subprocesses, the config this one.
        import torch._inductor.config

        chosen = os.environ.setdefault("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")
        torch._inductor.config.cpp_cache_precompile_headers = chosen == "1"


def pytest_unconfigure(config):
    cache = getattr(config, "_imagegpt_inductor_cache", None)
    if cache:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def load_benchmark():
    """A loader of benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread: on a busy 2-core machine a second one spin-waits (~10x).

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[False, True], ids=["no-bf16-units", "bf16-units"])
def cpu_bf16(request, monkeypatch):
    """Both sides of the CPU's bfloat16 detection (imagegpt.device.cpu_has_bf16), whatever this CPU has."""
    monkeypatch.setenv("IMAGEGPT_CPU_BF16", "1" if request.param else "0")
    return request.param


@pytest.fixture(params=[False, True], ids=["no-native-kernels", "native-kernels"])
def native_kernels(request, monkeypatch):
    """Both sides of the native kernels' switch; the kernels' side is skipped where they do not run."""
    from imagegpt import cpu

    monkeypatch.setenv("IMAGEGPT_NATIVE_KERNELS", "1" if request.param else "0")
    if request.param and not cpu.available():
        pytest.skip("the native kernels do not run here (not built, or the CPU lacks AVX2/FMA/F16C)")
    return request.param


@pytest.fixture(params=[False, True], ids=["avx2", "avx512"])
def cpu_avx512(request, monkeypatch):
    """Both sides of the native kernels' AVX-512F detection (imagegpt.cpu.ops.avx512), switched with
    IMAGEGPT_CPU_AVX512. The AVX-512 side is skipped only where the CPU lacks AVX-512F: instructions a CPU
    does not have cannot be switched on."""
    from imagegpt.cpu import ops

    monkeypatch.setenv("IMAGEGPT_CPU_AVX512", "1" if request.param else "0")
    if request.param and not ops.avx512():
        pytest.skip("this CPU lacks AVX-512F (or the kernels are not built): no switch can run its path here")
    return request.param
