"""`imagegpt demo`: every step runs and writes its output; re-runs and bad options are handled."""

import json

import pytest
import torch

from imagegpt import demo
from imagegpt.cli import main
from imagegpt.config import ImageGPTConfig
from imagegpt.demo import (
    MAX_STEPS,
    MIN_STEPS,
    DemoOptions,
    fastest_threads,
    format_summary,
    planned_steps,
    run_demo,
    seconds_per_step,
    thread_choices,
)
from imagegpt.errors import ArgumentError

TINY = dict(
    resolution=6, images=200, clusters=6, preset="igpt-nano", steps=4, batch_size=8, warmup=1, samples=2,
    completions=2, completion_images=2, progress=False,
)  # fmt: skip


@pytest.mark.slow
def test_demo_runs_every_step_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    ctx = run_demo(DemoOptions(out=str(out), **TINY))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["timings_seconds"]) == {
        "palette",
        "train",
        "evaluate",
        "complete",
        "sample",
        "probe",
        "total",
    }
    for name in ("palette", "model", "loss_curve", "completions", "samples", "probe"):
        assert ctx.files[name].exists(), name
    for png in ("completions", "samples", "probe", "loss_curve"):
        assert ctx.files[png].read_bytes()[:4] == b"\x89PNG"
    results = summary["results"]
    assert results["train"]["steps"] == 4 and results["palette"]["clusters"] == 6
    assert results["evaluate"]["bits_per_dim"] > 0 and results["evaluate"]["unigram_bits_per_dim"] is not None
    assert 0 <= results["probe"]["best_test_accuracy"] <= 1
    assert results["complete"] == {"images": 2, "completions_per_image": 2, "keep_rows": 3}
    text = format_summary(ctx)
    assert "bits/dim" in text and "probe" in text and str(out / "samples.png") in text
    # A finished demo is not overwritten by accident.
    with pytest.raises(ArgumentError, match="--overwrite"):
        run_demo(DemoOptions(out=str(out), **TINY))


@pytest.mark.slow
def test_demo_runs_on_digits_which_take_no_size_options(tmp_path):
    """digits is offered by `imagegpt demo --data`; it has a fixed size, so no n/resolution reach it."""
    ctx = run_demo(DemoOptions(out=str(tmp_path / "demo"), data="digits", **TINY))
    assert ctx.results["train"]["steps"] == 4
    assert ctx.results["complete"]["keep_rows"] == 3 and ctx.files["samples"].exists()


def test_demo_refuses_bad_options_with_exit_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--keep", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--keep" in err
    assert not (tmp_path / "d").exists()


def test_the_demo_times_its_step_on_each_thread_count_and_keeps_the_fastest(monkeypatch):
    """fastest_threads on made-up step times, with the second thread the faster and then the slower (a core
    taken by another process): each count of thread_choices() is timed once, the fastest is set."""
    assert thread_choices(1) == [1] and thread_choices(2) == [1, 2] and thread_choices(16) == [1, 2, 4]
    monkeypatch.setattr(demo, "usable_cpus", lambda: 2)
    config = ImageGPTConfig.from_preset("igpt-nano", 4, 6)
    threads = torch.get_num_threads()
    try:
        for step_seconds, fastest in (({1: 0.37, 2: 0.21}, 2), ({1: 0.37, 2: 1.4}, 1)):
            timed = []

            def fake(*args, timed=timed, step_seconds=step_seconds):
                timed.append(torch.get_num_threads())
                return step_seconds[timed[-1]]

            monkeypatch.setattr(demo, "seconds_per_step", fake)
            assert fastest_threads(config, 8, "cpu", "auto") == (fastest, step_seconds)
            assert sorted(timed) == [1, 2] and torch.get_num_threads() == fastest
    finally:
        torch.set_num_threads(threads)


def test_planned_steps_fill_the_budget_within_bounds():
    assert planned_steps(180, 0.3) == 600
    assert planned_steps(180, 0.01) == MAX_STEPS
    assert planned_steps(1, 0.5) == MIN_STEPS


def test_without_steps_the_demo_trains_what_fits_its_budget_and_resumes_with_it(tmp_path, monkeypatch):
    """steps=None: a timed step plans the run (seconds_per_step, here on a nano model), bounded by MIN_STEPS
    and MAX_STEPS; a resumed run keeps the steps it was started with."""
    assert seconds_per_step(ImageGPTConfig.from_preset("igpt-nano", 4, 6), 8, "cpu", "auto") > 0
    monkeypatch.setattr(demo, "MIN_STEPS", 3)
    monkeypatch.setattr(demo, "MAX_STEPS", 5)
    first = [("palette", demo.fit_palette_step), ("train", demo.train_step)]
    options = {**TINY, "steps": None}
    ctx = run_demo(DemoOptions(out=str(tmp_path / "short"), train_seconds=1e-6, **options), steps=first)
    assert ctx.results["train"]["steps"] == 3
    ctx = run_demo(  # --threads given: no thread timing, _plan times its own step
        DemoOptions(out=str(tmp_path / "long"), train_seconds=1e6, threads=1, **options), steps=first
    )
    assert ctx.results["train"]["steps"] == 5
    # an interrupted run: its args.json says 5 steps; planned now, it would get 3
    args = json.loads((tmp_path / "long" / "run" / "args.json").read_text())
    assert args["steps"] == 5
    with pytest.raises(ArgumentError, match="--train-seconds"):
        DemoOptions(out=str(tmp_path / "x"), train_seconds=0, **options).validate()


def test_two_threads_fall_back_to_one_when_steps_turn_several_times_slower(monkeypatch):
    """ThreadFallback on made-up step times: usual steps keep two threads, five in a row over 2.5x the
    usual (a core taken by another process) leave one; on one thread it changes nothing."""
    clock = iter(range(10**6))
    times = []
    monkeypatch.setattr(demo.time, "perf_counter", lambda: times[-1] if times else 0.0)
    said = []
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        guard = demo.ThreadFallback(said.append, baseline=10, slow=5, factor=2.5)
        now = 0.0
        for seconds in [1.0] * 11 + [3.0] * 4 + [1.0] + [3.0] * 4:  # never five slow steps in a row
            now += seconds
            times.append(now)
            guard(next(clock), {}, None)
        assert torch.get_num_threads() == 2 and not said
        for _ in range(5):
            now += 3.0
            times.append(now)
            guard(next(clock), {}, None)
        assert torch.get_num_threads() == 1 and "one thread" in said[0]
    finally:
        torch.set_num_threads(threads)
