"""The optional C extension imagegpt.cpu._kernels (everything else is declared in pyproject.toml).

It is optional: where it cannot be built (no C compiler, another platform), imagegpt installs without it and
sampling runs on PyTorch's kernels alone.
"""

import sys

from setuptools import Extension, setup

# OpenMP on Linux: the kernel then runs on PyTorch's own thread pool (libgomp.so.1, which torch loads first).
openmp = sys.platform.startswith("linux")
compile_args = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-Wall"] + ["-fopenmp"] * openmp
link_args = ["-fopenmp"] * openmp

setup(
    ext_modules=[
        Extension(
            "imagegpt.cpu._kernels",
            sources=["src/imagegpt/cpu/_kernels.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ]
)
