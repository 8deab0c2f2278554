"""Pretraining: the run it writes, exact resume, failure handling, accumulation, argument checks."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from imagegpt import ImageGPT
from imagegpt.errors import ArgumentError
from imagegpt.evaluate import bits_per_dim
from imagegpt.train import TrainOptions, resume_options, train
from imagegpt.trainer import NonFiniteLossError, find_checkpoint, load_training_state, read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def options(out, **changes) -> TrainOptions:
    """digits at 4x4 with 8 colours and a 2-layer model: a few steps take well under a second."""
    base = dict(
        data="digits",
        out=str(out),
        preset="igpt-nano",
        resolution=4,
        clusters=8,
        palette_pixels=5000,
        steps=8,
        batch_size=16,
        lr=3e-3,
        warmup=2,
        eval_every=4,
        eval_images=64,
        save_every=4,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    return TrainOptions(**(base | changes))


def losses(run_dir, split="train"):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split]


def test_a_run_writes_everything_other_commands_and_transformers_load(tmp_path):
    run = tmp_path / "run"
    result = train(options(run))
    assert result.step == 8 and not result.stopped
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock", "args.json", "cache", "checkpoints", "loss.png", "metrics.jsonl", "model", "palette.json"
    ]  # fmt: skip
    args = json.loads((run / "args.json").read_text())
    assert (
        args["preset"] == "igpt-nano" and args["steps"] == 8 and args["clusters"] == 8 and args["lr"] == 3e-3
    )

    train_records = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    for r in train_records:
        assert r["bits_per_dim"] == pytest.approx(bits_per_dim(r["loss"]))
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert train_records[0]["loss"] == pytest.approx(math.log(8), rel=1e-4)  # zero-initialised head: uniform
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.1  # it learns
    assert train_records[1]["lr"] == pytest.approx(3e-3) and train_records[-1]["lr"] < 3e-4  # warmup, cosine
    assert [s for s, _ in losses(run, "val")] == [4, 8]
    assert result.val_loss == losses(run, "val")[-1][1]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"

    latest = find_checkpoint(run / "checkpoints")
    assert sorted(p.name for p in latest.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "training_state.pt"
    ]  # fmt: skip
    state = load_training_state(latest)
    assert state["step"] == 8 and state["schedule"] == {"lr": 3e-3, "warmup": 2, "total": 8}
    assert {"optimizer", "rng", "data"} <= set(state)

    from imagegpt.processor import ImageProcessor

    model = ImageGPT.from_pretrained(run / "model")
    processor = ImageProcessor.from_pretrained(run / "model")
    assert (processor.height, processor.width, len(processor.palette)) == (4, 4, 8)
    torch.testing.assert_close(model.state_dict(), ImageGPT.from_pretrained(latest).state_dict())
    transformers = pytest.importorskip("transformers")
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(run / "model").eval()
    ids = torch.randint(0, 8, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_an_interrupted_run_resumes_to_exactly_the_same_losses(tmp_path, cpu_bf16):
    """SIGTERM after step 3 (dropout on, so the RNG state matters), then --resume: every loss of the
    uninterrupted run is reproduced bit for bit, and so are the final weights, in the default dtype on
    either side of the bfloat16 detection (igpt-mini is wide enough for bfloat16 autocast where the units
    are, float32 without them)."""
    changes = dict(dropout=0.1, steps=7, eval_every=2, save_every=5, dtype="auto", preset="igpt-mini")
    whole = train(options(tmp_path / "whole", **changes))

    def terminate_after_3(step, record, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(options(tmp_path / "split", **changes), on_step=terminate_after_3)
    assert first.stopped and first.step == 3 and first.signal == signal.SIGTERM and whole.signal is None
    assert load_training_state(find_checkpoint(tmp_path / "split" / "checkpoints"))["step"] == 3
    assert not (tmp_path / "split" / "model").exists()  # only a finished run publishes model/
    torch.manual_seed(1234)  # a resumed process starts from another RNG state
    second = train(resume_options(tmp_path / "split", progress=False), resume=True)
    assert second.step == 7 and not second.stopped
    assert whole.dtype == second.dtype == ("bfloat16" if cpu_bf16 else "float32")
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # exact
    assert losses(tmp_path / "split", "val") == losses(tmp_path / "whole", "val")
    torch.testing.assert_close(
        ImageGPT.from_pretrained(tmp_path / "split" / "model").state_dict(),
        ImageGPT.from_pretrained(tmp_path / "whole" / "model").state_dict(),
        rtol=0,
        atol=0,
    )
    assert second.val_loss == whole.val_loss


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"

    def poison_after_5(step, record, model):
        if step == 5:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    with pytest.raises(
        NonFiniteLossError, match=r"loss became nan at step 6.*checkpoints/latest \(step 4\).*--resume"
    ):
        train(options(run), on_step=poison_after_5)
    latest = find_checkpoint(run / "checkpoints")
    assert load_training_state(latest)["step"] == 4
    assert all(torch.isfinite(p).all() for p in ImageGPT.from_pretrained(latest).parameters())
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5]  # the NaN step is not logged as a loss


def test_gradient_accumulation_matches_the_same_global_batch_in_one_piece(tmp_path):
    one = train(options(tmp_path / "one", steps=4, eval_every=0, save_every=0))
    four = train(options(tmp_path / "four", steps=4, eval_every=0, save_every=0, accumulate=4))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
    assert four.val_loss == pytest.approx(one.val_loss, rel=1e-5)


def test_a_given_palette_is_used_as_is(tmp_path):
    first = train(options(tmp_path / "a", steps=1, eval_every=0, save_every=0, clusters=6))
    palette = first.run_dir / "palette.json"
    second = train(options(tmp_path / "b", steps=1, eval_every=0, save_every=0, palette=str(palette)))
    from imagegpt.processor import ImageProcessor

    assert json.loads((tmp_path / "b" / "args.json").read_text())["clusters"] == 6
    # Resumed with the same --palette (and the default clusters=8): the run still records the palette's size.
    resumed = options(tmp_path / "c", steps=2, eval_every=0, save_every=0, palette=str(palette))
    assert train(dataclasses.replace(resumed, stop_after=1)).stopped
    assert train(resumed, resume=True).step == 2
    assert json.loads((tmp_path / "c" / "args.json").read_text())["clusters"] == 6
    assert (
        ImageProcessor.from_pretrained(second.model_dir).palette
        == ImageProcessor.from_pretrained(first.model_dir).palette
    )


def test_resume_keeps_the_run_arguments(tmp_path):
    train(options(tmp_path / "run", steps=2, eval_every=0))
    with pytest.raises(ArgumentError, match="--preset"):
        resume_options(tmp_path / "run", preset="igpt-micro")
    resumed = resume_options(tmp_path / "run", preset="igpt-nano", device="cpu", stop_after=1)
    assert resumed.stop_after == 1 and resumed.steps == 2
    with pytest.raises(ArgumentError, match=r"preset \('igpt-micro', the run has 'igpt-nano'\)"):
        train(options(tmp_path / "run", steps=2, eval_every=0, preset="igpt-micro"), resume=True)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = train(resumed, resume=True)  # a finished run: nothing to do
    assert again.step == 2 and not again.stopped and again.val_loss is not None
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(batch_size=10, accumulate=4), "divisible"),
        (dict(steps=0), "--steps"),
        (dict(lr=-1.0), "--lr"),
        (dict(clusters=1), "--clusters"),
        (dict(batch_size=5000), "fewer than one batch"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, changes, message):
    with pytest.raises(ArgumentError, match=message):
        train(options(tmp_path / "run", **changes))


def test_a_run_directory_is_never_overwritten(tmp_path):
    train(options(tmp_path / "run", steps=1, eval_every=0))
    with pytest.raises(ArgumentError, match="already holds a run"):
        train(options(tmp_path / "run", steps=1))


def test_kept_steps_are_log_spaced_and_end_at_the_last_step():
    from imagegpt.train import kept_steps

    assert kept_steps(640, 0) == []
    assert kept_steps(640, 1) == [640]
    assert kept_steps(640, 7) == [10, 20, 40, 80, 160, 320, 640]
    assert kept_steps(5, 6) == [1, 2, 3, 4, 5]  # coinciding steps are kept once


def test_keep_checkpoints_keeps_loadable_models_at_those_steps_through_a_resume(tmp_path):
    from imagegpt.train import kept_checkpoints, kept_steps

    run = tmp_path / "run"
    first = train(options(run, steps=8, keep_checkpoints=4, stop_after=3))
    assert first.stopped
    assert list(kept_checkpoints(run)) == [s for s in kept_steps(8, 4) if s <= 3]
    train(resume_options(run, progress=False), resume=True)
    kept = kept_checkpoints(run)
    assert list(kept) == kept_steps(8, 4) == [1, 2, 4, 8]
    final = ImageGPT.from_pretrained(run / "model").state_dict()
    torch.testing.assert_close(ImageGPT.from_pretrained(kept[8]).state_dict(), final, rtol=0, atol=0)
    assert not torch.equal(ImageGPT.from_pretrained(kept[1]).lm_head.weight, final["lm_head.weight"])
    assert (kept[2] / "preprocessor_config.json").is_file()
    with pytest.raises(ArgumentError, match="--keep-checkpoints must be an integer >= 0"):
        train(options(tmp_path / "bad", keep_checkpoints=-1))


def test_auto_trains_narrow_models_in_float32_even_with_bfloat16_units(tmp_path, cpu_bf16):
    result = train(options(tmp_path / "run", steps=1, eval_every=0, dtype="auto"))  # igpt-nano: 64 wide
    assert result.dtype == "float32"
