"""Fixtures shared by the test modules."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


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
