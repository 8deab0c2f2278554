"""Device and dtype choices: one detection of bfloat16 units, its override, and what "auto" means."""

import pytest
import torch

from imagegpt import device
from imagegpt.device import bf16_supported, cpu_has_bf16, describe_cpu, resolve_dtype
from imagegpt.errors import ArgumentError

CPU = torch.device("cpu")


def test_the_override_decides_both_ways(monkeypatch):
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("IMAGEGPT_CPU_BF16", value)
        assert cpu_has_bf16() is expected and bf16_supported(CPU) is expected
    monkeypatch.delenv("IMAGEGPT_CPU_BF16")
    assert cpu_has_bf16() is device._detect_cpu_bf16()
    monkeypatch.setenv("IMAGEGPT_CPU_BF16", "yes")
    with pytest.raises(ArgumentError, match="IMAGEGPT_CPU_BF16 must be 0 or 1"):
        cpu_has_bf16()


def test_auto_trains_in_bfloat16_only_with_the_units_and_runs_everything_else_in_float32(cpu_bf16):
    expected = torch.bfloat16 if cpu_bf16 else torch.float32
    for name in (None, "auto"):
        assert resolve_dtype(name, CPU, training=True) == expected
        assert resolve_dtype(name, CPU) == torch.float32
    assert resolve_dtype("float32", CPU, training=True) == torch.float32


def test_a_named_dtype_the_cpu_cannot_run_is_refused(cpu_bf16):
    if cpu_bf16:
        assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    else:
        with pytest.raises(ArgumentError, match="bfloat16 is not supported on cpu.*float32"):
            resolve_dtype("bfloat16", CPU)
    with pytest.raises(ArgumentError, match="float16 autocast is only supported on CUDA"):
        resolve_dtype("float16", CPU)
    with pytest.raises(ArgumentError, match="unknown dtype 'float64'"):
        resolve_dtype("float64", CPU)


def test_the_cpu_description_names_the_flags_that_decide_our_paths():
    text = describe_cpu()
    assert "CPUs; flags:" in text and "native bfloat16: " in text
    with open("/proc/cpuinfo") as f:
        has_avx2 = " avx2" in f.read()
    named = text.split("flags: ")[1].split(";")[0].split()  # as words: "none of avx2/avx512" names none
    assert ("avx2" in named) is has_avx2


def test_auto_keeps_narrow_models_in_float32_on_the_cpu(cpu_bf16):
    from imagegpt.device import CPU_BF16_MIN_WIDTH

    wide = torch.bfloat16 if cpu_bf16 else torch.float32
    assert resolve_dtype("auto", CPU, training=True, width=CPU_BF16_MIN_WIDTH) == wide
    assert resolve_dtype("auto", CPU, training=True, width=CPU_BF16_MIN_WIDTH - 1) == torch.float32
    if cpu_bf16:  # a named dtype is honoured at any width
        assert resolve_dtype("bfloat16", CPU, training=True, width=64) == torch.bfloat16
