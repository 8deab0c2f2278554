"""`imagegpt probe`, `imagegpt finetune` and `imagegpt classify` from the command line."""

import json

import numpy as np
import pytest
import torch

from imagegpt import ImageGPT, ImageGPTConfig
from imagegpt.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small model with a palette fitted on digits, saved as `imagegpt train` saves one."""
    from imagegpt.data import load_dataset
    from imagegpt.palette import Palette
    from imagegpt.processor import ImageProcessor

    directory = tmp_path_factory.mktemp("model")
    palette = Palette.fit(load_dataset("digits", split="train").images, clusters=8, seed=0)
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig.from_preset("igpt-nano", resolution=8, clusters=8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory, processor=ImageProcessor(palette, 8))
    return directory


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_probe_command_writes_a_table_json_and_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "probe"
    code, stdout, _ = run_cli(
        capsys,
        "probe",
        "--model",
        model_dir,
        "--data",
        "digits",
        "--layers",
        "all",
        "--out",
        out,
        "--dtype",
        "float32",
        "--C-grid",
        "0.01,1",
    )
    assert code == 0
    report = json.loads((out / "probe.json").read_text())
    assert [row["layer"] for row in report["rows"]] == [0, 1, 2]
    assert report["baseline"]["layer"] == "pixels" and report["baseline"]["test_accuracy"] > 0.8
    assert report["sizes"] == {"train": 1437, "val": 180, "test": 180}
    assert all(row["C"] in (0.01, 1.0, *row["extended"]) for row in report["rows"])
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert "raw pixels" in stdout and "palette-quantised" in stdout and "<- best on val" in stdout
    assert (
        report["palette_baseline"]["layer"] == "palette" and report["palette_baseline"]["test_accuracy"] > 0.5
    )
    for layer in (0, 1, 2):
        assert f"\n{layer:>8}  " in stdout
    # Token ids and features were cached: a second run reads them instead of recomputing.
    cached = sorted(p.name for p in (out / "cache" / "features").iterdir())
    assert len(cached) == 9  # 3 layers x 3 splits
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.npy")}
    assert (
        run_cli(
            capsys,
            "probe",
            "--model",
            model_dir,
            "--data",
            "digits",
            "--out",
            out,
            "--dtype",
            "float32",
            "--C-grid",
            "1",
            "--layers",
            "1,2",
            "--concat",
        )[0]
        == 0
    )
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.npy")} == mtimes
    assert json.loads((out / "probe.json").read_text())["concat"]["layer"] == "1+2"


def test_probe_command_low_data_mode(model_dir, tmp_path, capsys):
    out = tmp_path / "probe"
    code, stdout, _ = run_cli(
        capsys,
        "probe",
        "--model",
        model_dir,
        "--data",
        "digits",
        "--layers",
        "middle",
        "--out",
        out,
        "--labels-per-class",
        4,
        "--seeds",
        3,
        "--dtype",
        "float32",
        "--C-grid",
        "1",
        "--limit",
        300,
    )
    assert code == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["labels_per_class"] == 4 and len(report["rows"][0]["runs"]) == 3
    assert report["rows"][0]["layer"] == 1
    assert "4 labels per class" in stdout and "±" in stdout


def test_probe_command_errors(model_dir, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "probe", "--model", model_dir, "--data", "digits", "--layers", "7", "--out", tmp_path
    )
    assert code == 2 and "layer 7 is out of range" in err and "0 (the embeddings) to 2" in err

    unlabelled = tmp_path / "images.npy"
    np.save(unlabelled, np.random.default_rng(0).integers(0, 256, (60, 8, 8, 3), dtype=np.uint8))
    code, _, err = run_cli(capsys, "probe", "--model", model_dir, "--data", unlabelled, "--out", tmp_path)
    assert code == 2 and "no labels" in err

    code, _, err = run_cli(
        capsys, "probe", "--model", tmp_path / "missing", "--data", "digits", "--out", tmp_path
    )
    assert code == 2 and "missing" in err
    code, _, err = run_cli(
        capsys, "probe", "--model", model_dir, "--data", "digits", "--out", tmp_path, "--C-grid", "0,1"
    )
    assert code == 2 and "--C-grid" in err
    code, _, err = run_cli(
        capsys,
        "probe",
        "--model",
        model_dir,
        "--data",
        "digits",
        "--out",
        tmp_path,
        "--data-option",
        "resolution",
    )
    assert code == 2 and "KEY=VALUE" in err


@pytest.mark.slow
def test_finetune_then_classify_from_the_command_line(model_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    code, stdout, _ = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        "digits",
        "--out",
        out,
        "--steps",
        6,
        "--eval-every",
        3,
        "--batch-size",
        16,
        "--dtype",
        "float32",
        "--stop-after",
        3,
    )
    assert code == 0 and "finetune --resume" in stdout
    code, stdout, _ = run_cli(capsys, "finetune", "--resume", out)
    assert code == 0 and "finished at step 6/6" in stdout
    args = json.loads((out / "args.json").read_text())
    assert args["steps"] == 6 and args["data"] == "digits"

    code, stdout, _ = run_cli(
        capsys, "classify", "--model", out / "model", "--data", "digits", "--dtype", "float32"
    )
    assert code == 0 and "accuracy" in stdout and "<- predicted" in stdout
    assert (out / "confusion-test.png").is_file()

    code, _, err = run_cli(capsys, "classify", "--model", out, "--data", "shapes", "--data-option", "n=60")
    assert code == 2 and "10 classes but shapes has 6" in err
    code, _, err = run_cli(capsys, "finetune", "--model", model_dir, "--data", "digits")
    assert code == 2 and "--out" in err
