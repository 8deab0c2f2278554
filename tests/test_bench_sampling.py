"""benchmarks/bench_sampling.py's measuring code on a nano model: whole images for both samplers,
transformers' per-step stamps, the stretches and the table (the script times igpt-s for ~25 minutes)."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from imagegpt import ImageGPT  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampling.py"


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_sampling")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ImageGPTConfig(vocab_size=17, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    hf = transformers.ImageGPTForCausalImageModeling(config).eval()
    directory = tmp_path_factory.mktemp("nano")
    hf.save_pretrained(directory)
    return hf, ImageGPT.from_pretrained(directory).eval()


def test_stretch_rates_are_of_the_first_and_last_steps(bench):
    # steps of 1, 2, 3 and 4 s between five stamps; batch 2
    steps = bench.step_seconds([0.0, 1.0, 3.0, 6.0, 10.0])
    assert steps == [1.0, 2.0, 3.0, 4.0]
    first, last = bench.stretch_rates(steps, batch=2, stretch=2)
    assert first == pytest.approx(2 * 2 / 3) and last == pytest.approx(2 * 2 / 7)
    with pytest.raises(ValueError, match="fewer than a stretch"):
        bench.stretch_rates([1.0], batch=2, stretch=2)
    # the same steps in two halves: 1 + 2 s, then 3 + 4 s
    assert bench.part_rates(steps, batch=2, parts=2) == pytest.approx([4 / 3, 4 / 7])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_allocator_is_tuned_with_glibc():
    # in a process of its own: the tuning lasts for the process
    code = f"import runpy; print(runpy.run_path({str(SCRIPT)!r})['tune_malloc']())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_whole_images_for_both_and_the_ratio(bench, models, capsys):
    hf, ours = models
    results = {}
    for sampler in (bench.Ours(ours, "auto", False), bench.Transformers(hf)):
        results[sampler.name] = bench.measure(sampler, 2, 4, 16, 16, whole=True)
    # transformers' stretches come from its whole run: one stamp per generated token
    clock_seconds, stamps = bench.Transformers(hf).whole(2, 16)
    assert len(stamps) == 16 and stamps == sorted(stamps) and clock_seconds > stamps[-1] - stamps[0]
    for r in results.values():
        assert set(r) == {"whole", "first", "last", "estimate"} and min(r.values()) > 0
    bench.report(results, 4)
    out = capsys.readouterr().out
    assert "ratio imagegpt / transformers: whole images" in out and "by quarter of the image" in out


def test_stretches_only_report_the_estimate(bench, models, capsys):
    hf, ours = models
    results = {s.name: bench.measure(s, 2, 4, 16, 16, whole=False) for s in (bench.Transformers(hf),)}
    assert set(results["transformers"]) == {"first", "last", "estimate"}
    results["imagegpt"] = bench.measure(bench.Ours(ours, "auto", False), 2, 4, 16, 16, whole=False)
    bench.report(results, 4)
    assert "whole image (est.)" in capsys.readouterr().out
