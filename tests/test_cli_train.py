"""The `imagegpt palette fit`, `imagegpt train` and `imagegpt eval` commands, end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from imagegpt.cli import main
from imagegpt.trainer import find_checkpoint, load_training_state, read_metrics

TRAIN = ["train", "--data", "digits", "--resolution", "4", "--steps", "4", "--batch-size", "16", "--lr",
         "3e-3", "--warmup", "1", "--eval-every", "0", "--device", "cpu", "--dtype", "float32",
         "--no-progress"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_palette_fit_train_stop_resume_eval(tmp_path, capsys):
    palette = tmp_path / "palette.json"
    assert (
        main(
            [
                "palette",
                "fit",
                "--data",
                "digits",
                "--clusters",
                "8",
                "--pixels",
                "5000",
                "--out",
                str(palette),
            ]
        )
        == 0
    )
    assert len(json.loads(palette.read_text())["clusters"]) == 8

    run = tmp_path / "run"
    assert main([*TRAIN, "--palette", str(palette), "--out", str(run), "--stop-after", "2"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert load_training_state(find_checkpoint(run / "checkpoints"))["step"] == 2

    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4]
    args = json.loads((run / "args.json").read_text())
    assert args["palette"] == str(palette) and args["clusters"] == 8 and args["stop_after"] is None

    final_val = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"][-1]
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run), "--data", "digits", "--split", "val", "--device", "cpu",
                 "--dtype", "float32", "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["nats_per_token"] == pytest.approx(final_val["loss"], rel=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--out RUN_DIR is required"),
        (["--out", "RUN", "--palette", "p.json", "--clusters", "8"], "--palette or --clusters"),
        (["--resume", "RUN", "--preset", "igpt-micro"], "is not a run directory"),
        (["--out", "RUN", "--data-option", "oops"], "KEY=VALUE"),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, capsys, extra, message):
    extra = [str(tmp_path / "run") if a == "RUN" else a for a in extra]
    assert main([*TRAIN, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_resume_refuses_changed_arguments(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main([*TRAIN, "--clusters", "4", "--palette-pixels", "2000", "--out", str(run), "--steps", "1"]) == 0
    )
    assert main(["train", "--resume", str(run), "--preset", "igpt-micro"]) == 2
    assert "--preset ('igpt-nano' in the run)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("stop, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"])
def test_a_signal_saves_a_checkpoint_and_exits_with_its_status(tmp_path, stop, status):
    """The real thing: a training process gets Ctrl-C (or SIGTERM) mid-run, finishes its step, saves and
    exits 128 + the signal, as a shell reports it, so a script can tell it from a finished run (0)."""
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "imagegpt",
        *TRAIN,
        "--steps",
        "100000",
        "--save-every",
        "0",
        "--out",
        str(run),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(read_metrics(metrics)) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(stop)
    out, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert "stopped at step" in out and "--resume" in out
    state = load_training_state(find_checkpoint(run / "checkpoints"))
    assert state["step"] == len(read_metrics(metrics)) >= 3  # the checkpoint is the last logged step
