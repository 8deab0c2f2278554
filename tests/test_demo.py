"""`imagegpt demo`: every step runs and writes its output; re-runs and bad options are handled."""

import json

import pytest

from imagegpt.cli import main
from imagegpt.demo import DemoOptions, format_summary, run_demo
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
