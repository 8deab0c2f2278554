"""`imagegpt study`: checkpoints kept and found, a point per checkpoint, resume from the cache, the schema."""

from __future__ import annotations

import json

import pytest

from imagegpt.cli import build_parser, main
from imagegpt.errors import CheckpointError
from imagegpt.study import StudyOptions, correlation, run_study
from imagegpt.train import TrainOptions, kept_steps, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(data="digits", resolution=4, clusters=8, steps=8, checkpoints=3, batch_size=16,
            Cs=(0.1, 1.0), device="cpu", dtype="float32", progress=False)  # fmt: skip


def test_a_study_trains_keeps_checkpoints_and_probes_each_one(tmp_path, monkeypatch):
    study = run_study(StudyOptions(out=str(tmp_path / "s"), presets=["igpt-nano"], **TINY))
    (run,) = study["runs"]
    assert [p["step"] for p in run["points"]] == kept_steps(8, 3) == [1, 3, 8]
    for point in run["points"]:
        assert set(point["layers"]) == {"0", "1", "2"}  # igpt-nano: embeddings and two blocks
        assert point["best_test_accuracy"] == point["layers"][str(point["best_layer"])]
        assert point["bits_per_dim"] > 0 and 0 < point["raw_pixel_test_accuracy"] <= 1
    on_disk = json.loads((tmp_path / "s" / "study.json").read_text())
    assert on_disk["runs"][0]["points"] == run["points"] and "correlation" in on_disk
    assert (tmp_path / "s" / "accuracy_vs_bits.png").stat().st_size > 0
    assert (tmp_path / "s" / "igpt-nano-layers.png").stat().st_size > 0

    # An interrupted study: one checkpoint's point is missing. Only it is computed again.
    (tmp_path / "s" / "points" / "igpt-nano-step-3.json").unlink()
    probed = []
    import imagegpt.study

    real = imagegpt.study.probe_pretrained
    monkeypatch.setattr(
        imagegpt.study, "probe_pretrained", lambda *a, **k: probed.append(a[0]) or real(*a, **k)
    )
    again = run_study(StudyOptions(out=str(tmp_path / "s"), presets=["igpt-nano"], **TINY))
    assert [p.name for p in probed] == ["step-0000003"]
    assert again["runs"][0]["points"] == run["points"]


def test_a_given_run_is_studied_and_one_without_kept_checkpoints_is_refused(tmp_path, capsys):
    common = dict(data="digits", resolution=4, clusters=8, steps=4, batch_size=16, eval_every=0, device="cpu",
                  dtype="float32", progress=False)  # fmt: skip
    train(TrainOptions(out=str(tmp_path / "kept"), keep_checkpoints=2, **common))
    train(TrainOptions(out=str(tmp_path / "plain"), **common))
    args = ["study", "--out", str(tmp_path / "s"), "--run", str(tmp_path / "kept"), "--C-grid", "1",
            "--quiet", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kept (" in out and "wrote" in out
    study = json.loads((tmp_path / "s" / "study.json").read_text())
    assert [p["step"] for p in study["runs"][0]["points"]] == [1, 4]
    with pytest.raises(CheckpointError, match="kept no checkpoints.*--keep-checkpoints"):
        run_study(StudyOptions(out=str(tmp_path / "t"), runs=[str(tmp_path / "plain")], **TINY))
    assert main(["study", "--out", str(tmp_path / "t"), "--run", str(tmp_path / "plain"), "--quiet"]) == 2


def test_correlation_is_pearson_and_needs_three_points():
    points = [{"bits_per_dim": b, "best_test_accuracy": a} for b, a in ((0.3, 0.4), (0.2, 0.6), (0.1, 0.8))]
    assert correlation(points) == pytest.approx(-1.0)
    assert correlation(points[:2]) is None


def test_the_defaults_of_the_demo_and_the_study_parse_and_validate():
    from imagegpt.demo import DemoOptions

    StudyOptions().validate()
    DemoOptions().validate()
    # data options default to what the data takes: colour=mono for shapes, none for digits
    assert StudyOptions().dataset_options == {"colour": "mono"}
    assert StudyOptions(data="digits").dataset_options == {}
    assert StudyOptions(data="shapes", data_options={"n": 90}).dataset_options == {"n": 90}
    parser = build_parser()
    for command in (["study"], ["demo"]):
        assert parser.parse_args(command).func is not None


def test_low_data_probes_are_part_of_the_study_when_asked(tmp_path):
    common = dict(data="digits", resolution=4, clusters=8, steps=2, batch_size=16, eval_every=0, device="cpu",
                  dtype="float32", progress=False)  # fmt: skip
    train(TrainOptions(out=str(tmp_path / "run"), keep_checkpoints=1, **common))
    options = StudyOptions(out=str(tmp_path / "s"), runs=[str(tmp_path / "run")], **TINY)
    options.labels_per_class = 5
    study = run_study(options)
    (point,) = study["runs"][0]["points"]
    report = json.loads((tmp_path / "s" / "points" / "run-step-2" / "probe.json").read_text())
    assert report["labels_per_class"] == 5 and report["seeds"] == 5
    assert point["best_test_accuracy"] == next(
        r["test_accuracy"] for r in report["rows"] if r["layer"] == point["best_layer"]
    )
