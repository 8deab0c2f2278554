"""Bad input, by class: every mistake a careless or hostile user can make is one line and exit 2 (or a
documented status), never a traceback, a silent wrong result, or a run it damages.

Each class is held by its mechanism (the output check, the run lock, the checks of what resume reads, the
model-processor pairing, the memory estimates, the Hub-id check) over many cases, not only the examples of
the issue that found them.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from imagegpt import ImageGPT, ImageGPTConfig
from imagegpt.checkpoint import check_processor, load_with_processor
from imagegpt.cli import build_parser, main
from imagegpt.commands._options import OUTPUT_KINDS
from imagegpt.data import load_dataset
from imagegpt.errors import (
    ArgumentError,
    CheckpointError,
    DataError,
    ImageGPTError,
    OutputError,
    ResourceError,
)
from imagegpt.files import check_output, write_errors
from imagegpt.hub import hub_id, offline_reason
from imagegpt.limits import MEMORY_ENV, available_memory, check_memory
from imagegpt.palette import Palette
from imagegpt.processor import ImageProcessor
from imagegpt.train import TrainOptions, train
from imagegpt.trainer import LOCK_FILE, RunLock, find_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE, CLUSTERS = 4, 8
CPU = ["--device", "cpu", "--dtype", "float32"]
TRAIN = ["train", "--data", "digits", "--resolution", str(SIDE), "--clusters", str(CLUSTERS), "--steps", "1",
         "--batch-size", "16", "--eval-every", "0", "--no-progress", *CPU]  # fmt: skip


def one_line_error(capsys, *words: str) -> str:
    """The command's stderr: exactly one line, `imagegpt CMD: error: ...`, holding every word."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (but the lock) and a hash of its bytes: what "nothing changed" compares."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def options(out, **changes) -> TrainOptions:
    base = dict(data="digits", out=str(out), preset="igpt-nano", resolution=SIDE, clusters=CLUSTERS,
                palette_pixels=5000, steps=4, batch_size=16, lr=3e-3, warmup=1, eval_every=0, save_every=2,
                device="cpu", dtype="float32", progress=False)  # fmt: skip
    return TrainOptions(**(base | changes))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped with a checkpoint at step 2 of 4: what --resume reads."""
    run = tmp_path_factory.mktemp("runs") / "run"
    result = train(options(run, stop_after=2))
    assert result.stopped and result.step == 2
    return run


@pytest.fixture
def run(stopped_run, tmp_path):
    """A fresh copy of the stopped run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    return copy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig.from_preset("igpt-nano", resolution=SIDE, clusters=CLUSTERS))
    processor = ImageProcessor(Palette(np.random.default_rng(0).uniform(-1, 1, (CLUSTERS, 3))), SIDE)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory, processor=processor)
    return directory


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


# ---- 1. outputs are checked before the work starts ----


def subcommand_parsers():
    """(name, parser) of every subcommand, palette's own subcommands included ("palette fit")."""
    parser = build_parser()
    found = []
    stack = [parser]
    while stack:
        for action in stack.pop()._actions:
            if isinstance(action.choices, dict):
                for sub in action.choices.values():
                    found.append((sub.prog.removeprefix("imagegpt "), sub))
                    stack.append(sub)
    return found


def output_options():
    """(command, flag, kind) of every option the CLI registers as an output."""
    return [
        (name, flag, kind)
        for name, parser in subcommand_parsers()
        for _, flag, kind in parser.get_default("output_options") or ()
    ]


OUTPUT_FLAGS = ("--out", "--json", "--cache-dir", "--save-npz", "--resume")


def test_every_option_that_names_an_output_is_checked():
    """Any option called like an output is registered, so the CLI checks it before the command runs; a
    new command cannot forget."""
    registered = {(command, flag) for command, flag, _ in output_options()}
    named = {
        (name, flag)
        for name, parser in subcommand_parsers()
        for action in parser._actions
        for flag in action.option_strings
        if flag in OUTPUT_FLAGS
    }
    assert named and named == registered
    assert {kind for _, _, kind in output_options()} == set(OUTPUT_KINDS)


def bad_places(tmp_path: Path, kind: str) -> list[tuple[Path, str]]:
    """Places an output of this kind cannot go, and a word of the message each gets."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    places = [(a_file / "below", "is a file, not a folder")]
    if Path("/proc/self").is_dir():
        places.append((Path("/proc/imagegpt-out") / ("x.png" if kind == "image" else "x"), "does not take"))
    if kind == "folder":
        places.append((a_file, "a folder is needed"))
    else:
        places.append((tmp_path, "is a folder"))
        fifo = tmp_path / "a-fifo"  # not a device: a check that let it through must not touch /dev
        os.mkfifo(fifo)
        places.append((fifo, "not a regular file"))
    return places


def command_with_output(command: str, flag: str, place: Path, tmp_path: Path) -> list[str]:
    """A command line whose only reachable failure is its output: the model and data do not even exist,
    so passing this output check would end in another error than the one asserted."""
    missing = str(tmp_path / "no-such-model")
    base = {
        "train": ["train", "--data", "digits"] + ([] if flag == "--out" else ["--out", str(tmp_path / "r")]),
        "finetune": ["finetune", "--model", missing, "--data", "digits"]
        + ([] if flag in ("--out", "--resume") else ["--out", str(tmp_path / "f")]),
        "eval": ["eval", "--model", missing, "--data", "digits"],
        "classify": ["classify", "--model", missing, "--data", "digits"],
        "probe": ["probe", "--model", missing, "--data", "digits"]
        + ([] if flag == "--out" else ["--out", str(tmp_path / "p")]),
        "sample": ["sample", "--model", missing],
        "complete": ["complete", "--model", missing, str(tmp_path / "image.png")],
        "palette fit": ["palette", "fit", "--data", "digits"],
        "demo": ["demo"],
        "study": ["study", "--run", missing],
    }[command]
    if flag == "--resume":
        base = [a for a in base if a != "--data" and a != "digits"][:1]
    return [*base, flag, str(place)]


@pytest.mark.parametrize("command, flag, kind", output_options(), ids=lambda v: str(v).replace(" ", "-"))
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, command, flag, kind):
    for place, words in bad_places(tmp_path, kind):
        assert main(command_with_output(command, flag, place, tmp_path)) == 2
        one_line_error(capsys, flag, words)
    assert {p.name for p in tmp_path.iterdir()} <= {"a-fifo", "a-file"}  # nothing created


def test_check_output_creates_nothing_and_names_the_blocking_file(tmp_path):
    deep = tmp_path / "a" / "b" / "c.json"
    assert check_output(deep) == deep and list(tmp_path.iterdir()) == []  # the nearest folder takes files
    assert check_output(tmp_path / "d", directory=True) == tmp_path / "d" and list(tmp_path.iterdir()) == []
    (tmp_path / "a").write_text("")
    with pytest.raises(OutputError, match=r"cannot be created: .*/a is a file"):
        check_output(deep)
    assert check_output(Path("~") / "x.json").is_absolute()  # ~ expanded


def test_outputs_written_atomically_get_the_permissions_open_would_give(tmp_path):
    from imagegpt.files import write_text_atomic

    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs the /dev/full device")
def test_a_write_that_fails_later_is_one_output_error():
    with (
        pytest.raises(OutputError, match="cannot write /dev/full: No space left on device"),
        write_errors("/dev/full"),
        open("/dev/full", "wb") as f,
    ):
        f.write(b"x" * 65536)
        f.flush()


def test_an_image_name_picks_its_format_and_an_unknown_one_is_refused_before_sampling(
    model_dir, tmp_path, capsys
):
    from PIL import Image

    out = tmp_path / "grid.jpg"
    assert (
        main(["sample", "--model", str(model_dir), "-n", "1", "--out", str(out), "--no-progress", *CPU]) == 0
    )
    assert Image.open(out).format == "JPEG"
    capsys.readouterr()
    for name in ("grid.pdf", "grid"):
        args = ["sample", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / name)]
        assert main(args) == 2
        one_line_error(capsys, "--out", "give a name ending in one of .png")


# ---- 2. damaged run files on --resume ----


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])


class Payload:
    """A pickle that would run code if loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def edit_state(run: Path, change) -> None:
    path = run / "checkpoints" / "latest" / "training_state.pt"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


STATE = Path("checkpoints") / "latest" / "training_state.pt"
DAMAGE = {
    "state truncated": (lambda run: truncate(run / STATE), "training_state.pt"),
    "state emptied": (lambda run: torch.save({}, run / STATE), "its step is None"),
    "state a pickle": (
        lambda run: (run / STATE).write_bytes(pickle.dumps(Payload(), protocol=2)),
        "other than tensors",
    ),
    "state zero bytes": (lambda run: (run / STATE).write_bytes(b""), "training_state.pt"),
    "state a list": (lambda run: torch.save([1, 2], run / STATE), "holds a list"),
    "state negative step": (lambda run: edit_state(run, lambda s: s.update(step=-3)), "its step is -3"),
    "state no rng": (lambda run: edit_state(run, lambda s: s.update(rng=[])), "random number generator"),
    "state bad rng": (lambda run: edit_state(run, lambda s: s.update(rng=[{"python": 1}])), "does not fit"),
    "state other moments": (
        lambda run: edit_state(run, lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3))),
        "moment exp_avg",
    ),
    "state other data": (lambda run: edit_state(run, lambda s: s.update(data={"epoch": 0})), "data position"),
    "args truncated": (lambda run: truncate(run / "args.json"), "args.json"),
    "args a list": (lambda run: (run / "args.json").write_text("[1, 2]"), "JSON list"),
    "args not utf-8": (lambda run: (run / "args.json").write_bytes(b"\xff\xfe{"), "args.json"),
    "args bad value": (
        lambda run: (run / "args.json").write_text(
            (run / "args.json").read_text().replace('"steps": 4', '"steps": "four"')
        ),
        "--steps must be a positive integer",
    ),
    "args bad preset": (
        lambda run: (run / "args.json").write_text(
            (run / "args.json").read_text().replace('"igpt-nano"', '"igpt-huge"')
        ),
        "unknown --preset",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: d.replace(" ", "-"))
def test_a_damaged_run_file_is_one_line_and_the_run_is_left_as_it_was(run, capsys, monkeypatch, damage):
    monkeypatch.chdir(run.parent)
    damage_run, words = DAMAGE[damage]
    damage_run(run)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    one_line_error(capsys, words, "damaged")
    assert snapshot(run) == before
    assert not (run.parent / "pwned").exists()


def test_a_checkpoints_file_or_a_one_colour_palette_is_refused(run, tmp_path, capsys):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    one_line_error(capsys, "checkpoints is a file")
    Palette(np.zeros((1, 3))).save(tmp_path / "one.json")
    args = [*TRAIN[:5], *TRAIN[7:], "--palette", str(tmp_path / "one.json"), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    one_line_error(capsys, "the number of colours in", "must be in [2, 65535], got 1")
    assert not (tmp_path / "r").exists()


def test_metrics_with_damaged_lines_are_skipped_and_the_run_resumes(run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('garbage\n5\n{"step": "x"}\n["a"]\n{"split": "train"}\n')
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]  # the resumed steps once each, the final validation


# ---- 3. one process at a time in a run ----


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding folder's run lock until killed."""
    code = (
        "import sys, time\nfrom imagegpt.trainer import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_run_in_use_is_refused_untouched_and_freed_when_its_holder_is_killed(run, capsys):
    holder = hold_lock(run)
    try:
        before = snapshot(run)
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
        one_line_error(capsys, "is in use by another imagegpt process", f"pid {holder.pid}")
        assert snapshot(run) == before
        with pytest.raises(ArgumentError, match="in use"), RunLock(run):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with the process
        holder.wait()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4, 4]


def test_a_lock_is_held_once_even_in_one_process_and_released_on_exit(tmp_path):
    with RunLock(tmp_path / "r"), pytest.raises(ArgumentError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "r").__enter__()
    with RunLock(tmp_path / "r"):
        pass
    with RunLock(tmp_path / "r", enabled=False), RunLock(tmp_path / "r", enabled=False):
        pass  # ranks other than 0 hold nothing


@pytest.mark.parametrize("command", ["finetune", "demo"])
def test_finetune_and_demo_hold_the_same_lock(model_dir, tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    holder = hold_lock(out)
    try:
        args = {
            "finetune": ["finetune", "--model", str(model_dir), "--data", "digits", "--out", str(out), *CPU],
            "demo": ["demo", "--out", str(out)],
        }[command]
        assert main(args) == 2
        one_line_error(capsys, "is in use by another imagegpt process")
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_reader_never_repairs_a_run_under_a_save(run):
    checkpoints = run / "checkpoints"
    (checkpoints / "latest").rename(checkpoints / "latest.old")  # a save between its two renames
    (checkpoints / ".latest.tmp-x").mkdir()  # and one being written
    found = find_checkpoint(checkpoints, repair=False)
    assert found == checkpoints / "latest.old"
    assert (checkpoints / ".latest.tmp-x").is_dir() and not (checkpoints / "latest").exists()
    model, processor = load_with_processor(ImageGPT, found)  # readable as it is
    assert find_checkpoint(checkpoints) == checkpoints / "latest"  # the lock's holder repairs
    assert not (checkpoints / ".latest.tmp-x").exists()


# ---- 4. no silent wrong result ----


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_weights_that_are_not_finite_are_refused_at_load(model_dir, tmp_path, capsys, value):
    bad = copy_of(model_dir, tmp_path)
    weights = load_file(bad / "model.safetensors")
    weights["transformer.h.1.mlp.c_proj.weight"][3, 2] = value
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"transformer.h.1.mlp.c_proj.weight .* 1 NaN or infinite"):
        ImageGPT.from_pretrained(bad)
    for args in (["sample", "-n", "1", "--out", str(tmp_path / "s.png")], ["eval", "--data", "digits"]):
        assert main([*args, "--model", str(bad), *CPU]) == 2
        one_line_error(capsys, "NaN or infinite")
    assert not (tmp_path / "s.png").exists()


def test_a_processor_of_another_palette_or_size_is_refused_wherever_it_is_paired(model_dir, tmp_path, capsys):
    config = ImageGPT.from_pretrained(model_dir).config
    centres = np.random.default_rng(1).uniform(-1, 1, (CLUSTERS + 1, 3))
    for processor, words in (
        (ImageProcessor(Palette(centres[:-2]), SIDE), "the palette has 7 colours, but the model predicts 8"),
        (ImageProcessor(Palette(centres), SIDE), "the palette has 9 colours"),
        (ImageProcessor(Palette(centres[:-1]), SIDE + 1), "5x5 images (25 tokens), but the model reads 16"),
    ):
        with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
            check_processor(config, processor, "here")
        bad = copy_of(model_dir, tmp_path / str(len(list(tmp_path.iterdir()))))
        processor.save_pretrained(bad)
        for command in (["eval", "--data", "digits"], ["sample", "--out", str(tmp_path / "s.png")],
                        ["probe", "--data", "digits", "--out", str(tmp_path / "p")],
                        ["complete", str(tmp_path / "missing.png")]):  # fmt: skip
            assert main([command[0], "--model", str(bad), *command[1:], *CPU]) == 2
            one_line_error(capsys, "belongs to another model")


def test_classify_refuses_a_model_that_was_never_fine_tuned(model_dir, tmp_path, capsys):
    assert (
        main(["classify", "--model", str(model_dir), "--data", "digits", "--out", str(tmp_path), *CPU]) == 2
    )
    one_line_error(capsys, "never fine-tuned", "imagegpt finetune --model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("clusters", ["1", "0", "65536", "-3"])
def test_one_cluster_check_for_every_command(tmp_path, capsys, clusters):
    message = "--clusters must be in [2, 65535]"
    commands = {
        "train": ["train", "--data", "digits", "--out", str(tmp_path / "t")],
        "demo": ["demo", "--out", str(tmp_path / "d")],
        "palette": ["palette", "fit", "--data", "digits", "--out", str(tmp_path / "p.json")],
    }
    for command in commands.values():
        assert main([*command, "--clusters", clusters]) == 2
        one_line_error(capsys, message)
    assert list(tmp_path.iterdir()) == []


# ---- 5. sizes that cannot fit are refused before the allocation ----


def test_a_config_that_claims_more_blocks_than_its_weights_is_refused_before_building(model_dir, tmp_path):
    bad = copy_of(model_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    for n_layer, held in ((10**9, "blocks 0..1"), (3, "blocks 0..1"), (1, "blocks 0..1")):
        (bad / "config.json").write_text(json.dumps(config | {"n_layer": n_layer}))
        with pytest.raises(CheckpointError, match=f"n_layer={n_layer}, but the weights hold {held}"):
            ImageGPT.from_pretrained(bad)


def test_available_memory_is_detected_and_can_be_overridden(monkeypatch):
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    detected = available_memory()
    assert detected is None or detected > 0
    monkeypatch.setenv(MEMORY_ENV, "1e6")
    assert available_memory() == 1_000_000
    check_memory(1_000_000, "exactly what is there")
    with pytest.raises(
        ResourceError, match="needs at least 1.9 MiB of memory, but .* 976.6 KiB available; hint"
    ):
        check_memory(2_000_000, "it", "hint")
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ResourceError, match="not a number of bytes"):
        available_memory()


def test_a_cuda_device_is_checked_against_its_own_memory(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "1000")  # the override caps the device too, so this side runs anywhere
    assert available_memory("cuda:0") == 1000
    with pytest.raises(ResourceError, match="but cuda:0 has 1000 bytes available"):
        check_memory(2000, "it", device="cuda:0")
    monkeypatch.delenv(MEMORY_ENV)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        assert 0 < available_memory("cuda:0") <= total


@pytest.fixture
def little_memory(monkeypatch):
    """This process may allocate 64 MiB: anything sized past it must be refused before it is tried."""
    monkeypatch.setenv(MEMORY_ENV, str(64 * 2**20))


@pytest.mark.parametrize(
    "spec, options, words",
    [
        ("shapes", {"resolution": 100_000}, "shapes with n=6000 at resolution=100000"),
        ("shapes", {"n": 10**9}, "shapes with n=1000000000"),
        ("photos", {"resolution": 5000}, "photos with n=6000 at resolution=5000"),
    ],
)
def test_generated_data_too_large_is_refused_before_drawing(little_memory, spec, options, words):
    with pytest.raises(ResourceError, match=words):
        load_dataset(spec, **options)


def test_training_and_sampling_too_large_are_refused_before_allocating(
    little_memory, model_dir, tmp_path, capsys
):
    assert main(["train", "--data", "digits", "--preset", "igpt-s", "--resolution", "32",
                 "--out", str(tmp_path / "r"), *CPU]) == 2  # fmt: skip
    one_line_error(capsys, "training igpt-s at 1024 positions", "choose a smaller --preset")
    assert not (tmp_path / "r").exists()
    args = ["sample", "--model", str(model_dir), "-n", "3000000", "--out", str(tmp_path / "s.png"), *CPU]
    assert main(args) == 2
    one_line_error(capsys, "sampling 3000000 images of 16 tokens", "lower the batch size")


def npy_member(array_header: dict, data: bytes = b"") -> bytes:
    """An .npy file's bytes with a given header (its data may promise more than it holds)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, array_header)  # the magic string, then the header
    return buffer.getvalue() + data


def test_array_files_are_checked_member_by_member(tmp_path, little_memory):
    objects = np.array([object(), 1], dtype=object)
    np.save(tmp_path / "o.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "o.npz", images=objects)
    for name in ("o.npy", "o.npz"):
        with pytest.raises(DataError, match="without pickle"):
            load_dataset(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as archive:  # a header promising 1 TiB
        header = {"descr": "|u1", "fortran_order": False, "shape": (2**20, 1024, 1024)}
        archive.writestr("images.npy", npy_member(header, b"\0" * 64))
    with pytest.raises(ResourceError, match=r"array 'images' .*\(1048576, 1024, 1024\)"):
        load_dataset(tmp_path / "big.npz")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:  # promises more than it holds
        archive.writestr(
            "images.npy", npy_member({"descr": "|u1", "fortran_order": False, "shape": (4, 8, 8, 3)})
        )
    with pytest.raises(DataError, match="array 'images' of .* is truncated or damaged"):
        load_dataset(tmp_path / "short.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError):
        load_dataset(tmp_path / "junk.npz")


def idx_header(shape, code=0x08) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape)


def test_idx_files_are_read_as_far_as_their_header_promises(tmp_path, little_memory):
    folder = tmp_path / "idx"
    folder.mkdir()
    huge = folder / "train-images-idx3-ubyte.gz"
    huge.write_bytes(gzip.compress(idx_header((60000, 4000, 4000)) + b"\0" * 1000))
    with pytest.raises(ResourceError, match=r"shape \(60000, 4000, 4000\)"):
        load_dataset(folder)
    huge.write_bytes(gzip.compress(idx_header((2, 4, 4)) + b"\0" * 10_000))  # inflates past its header
    with pytest.raises(DataError, match="holds more; it is truncated or damaged"):
        load_dataset(folder)
    huge.write_bytes(gzip.compress(idx_header((2, 4, 4)) + b"\0" * 32))
    (folder / "train-labels-idx1-ubyte").write_bytes(
        idx_header((2,), 0x0C) + (2**31 - 1).to_bytes(4, "big") * 2
    )
    with pytest.raises(DataError, match="labels must be class numbers"):
        load_dataset(folder)


def test_labels_past_any_class_count_are_refused(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((10, 4, 4, 3), np.uint8), y=np.full(10, 2**40))
    with pytest.raises(DataError, match="labels must be class numbers"):
        load_dataset(tmp_path / "a.npz")


# ---- 6. a refused start leaves nothing behind ----


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--preset", "igpt-huge"], "unknown --preset"),
        (["--dropout", "1.5"], "--dropout is a probability"),
        (["--dropout", "nan"], "--dropout must be a number"),
        (["--warmup", "-1"], "--warmup must be an integer >= 0"),
        (["--lr", "inf"], "--lr must be a number"),
        (["--batch-size", "5000"], "fewer than one batch"),
        (["--data", "no-such-data"], "no such file or folder"),
        (["--data-option", "colour=red"], "does not take option"),
        (["--resolution", "0"], "--resolution must be a positive integer"),
    ],
)
def test_a_refused_run_creates_nothing_so_the_corrected_command_works(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    base = [*TRAIN, "--out", str(out)]
    assert main([*base, *extra]) == 2
    one_line_error(capsys, words)
    assert not out.exists()


def test_the_corrected_command_runs_after_a_refusal(tmp_path, capsys):
    out = tmp_path / "run"
    base = [*TRAIN, "--out", str(out)]
    assert main([*base, "--preset", "igpt-huge"]) == 2
    assert main(base) == 0


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--layer", "7"], "--layer 7 is out of range"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--gen-weight", "nan"], "--gen-weight must be a number"),
        (["--warmup", "-2"], "--warmup must be an integer >= 0"),
        (["--data", "no-such-data"], "no such file or folder"),
    ],
)
def test_a_refused_finetune_creates_nothing(model_dir, tmp_path, capsys, extra, words):
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(model_dir), "--data", "digits", "--out", str(out), *CPU, *extra]
    assert main(args) == 2
    one_line_error(capsys, words)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--labels-per-class", "0"], "labels per class must be at least 1"),
        (["--labels-per-class", "100000"], "fewer than --labels-per-class 100000"),
        (["--layers", "9"], "layer 9 is out of range"),
    ],
)
def test_a_refused_probe_creates_nothing(model_dir, tmp_path, capsys, extra, words):
    out = tmp_path / "probe"
    args = ["probe", "--model", str(model_dir), "--data", "digits", "--out", str(out), *CPU, *extra]
    assert main(args) == 2
    one_line_error(capsys, words)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--threads", str(100 * (os.cpu_count() or 1))], "--threads must be at most"),
        (["--resolution", "2"], "shapes option resolution must be an integer >= 4"),
        (["--images", "1"], "the val split of shapes(n=1) is empty"),
        (["--preset", "igpt-huge"], "unknown --preset"),
        (["--data", "./pictures"], "--data must be a built-in set"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--keep", "1.5"], "--keep is a fraction"),
        (["--dtype", "float16", "--device", "cpu"], "float16"),
    ],
)
def test_a_refused_demo_creates_nothing(tmp_path, capsys, extra, words):
    assert main(["demo", "--out", str(tmp_path / "demo"), *extra]) == 2
    one_line_error(capsys, words)
    assert list(tmp_path.iterdir()) == []


# ---- 7. a mistyped local path never goes to the Hub ----


def test_a_value_that_looks_like_a_path_fails_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for value, words in (
        ("runs/shapes", "runs is a folder here"),
        ("./shapes", "owner/name"),
        ("shapes", "owner/name"),
        ("a/b/c", "owner/name"),
        (str(tmp_path / "gone"), "owner/name"),
    ):
        with pytest.raises(CheckpointError, match=f"no such file or directory: {value} .*{words}"):
            hub_id(value)
        assert main(["sample", "--model", value, "--out", str(tmp_path / "s.png")]) == 2
        one_line_error(capsys, "no such file or directory")


def test_an_unreachable_hub_fails_at_once(monkeypatch, capsys, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline_reason() == "HF_HUB_OFFLINE is set"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with socket_on_localhost() as port:
        pass  # the port is closed again: connections to it are refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert "127.0.0.1 cannot be reached" in offline_reason()
    for command in (["sample", "--model", "owner/model", "--out", str(tmp_path / "s.png")],
                    ["eval", "--model", "owner/model", "--data", "digits"]):  # fmt: skip
        assert main(command) == 2
        one_line_error(capsys, "owner/model is not a local path", "cannot be reached")
    with socket_on_localhost() as port:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert offline_reason() is None


class socket_on_localhost:
    """A listening TCP socket on a free local port while the block runs."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.create_server(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()


class NotFound(http.server.BaseHTTPRequestHandler):
    """A Hub that knows no repository."""

    def _reply(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.send_header("X-Error-Code", "RepoNotFound")
        self.end_headers()

    do_GET = do_HEAD = _reply

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_hub_fetch_that_fails_is_one_quiet_line(tmp_path):
    """Through huggingface_hub against a local Hub (HF_ENDPOINT is read at its import: a fresh process)."""
    pytest.importorskip("huggingface_hub")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = os.environ | {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
                            "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}  # fmt: skip
        for command in (
            ["sample", "--model", "owner/model"],
            ["eval", "--model", "owner/model", "--data", "x"],
        ):
            command = [sys.executable, "-m", "imagegpt", *command]
            result = subprocess.run(
                command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
            )
            assert result.returncode == 2, result.stderr
            assert (
                result.stderr.count("\n") == 1
                and "fetching it from the Hugging Face Hub failed" in result.stderr
            )
    finally:
        server.shutdown()


# ---- 8. exit statuses a script can rely on ----


@pytest.mark.parametrize("command", [[], ["train"], ["finetune"]])
def test_help_states_the_exit_statuses(capsys, command):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out and "130" in out and "143" in out and "SIGTERM" in out


@pytest.mark.slow
@pytest.mark.parametrize("command", ["demo", "finetune"])
def test_a_signal_during_demo_or_finetune_exits_with_its_status(model_dir, tmp_path, command):
    """The real process gets SIGTERM mid-training: it saves, says how to continue, and exits 143."""
    out = tmp_path / "out"
    args = {
        "demo": ["demo", "--data", "digits", "--resolution", str(SIDE), "--clusters", str(CLUSTERS),
                 "--preset", "igpt-nano", "--steps", "100000", "--batch-size", "16"],
        "finetune": ["finetune", "--model", str(model_dir), "--data", "digits", "--steps", "100000",
                     "--eval-every", "100000", "--batch-size", "16"],
    }[command]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "imagegpt", *args, "--out", str(out), *CPU],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    metrics = out / ("run" if command == "demo" else "") / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert "--resume" in stdout if command == "finetune" else "run the demo again" in stderr


# ---- 9. small ones ----


def test_the_image_folder_reader_never_follows_a_link_out_of_its_root(tmp_path):
    from PIL import Image

    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    for name in ("a.png", "secret/b.png"):
        Image.new("RGB", (4, 4), (200, 10, 10)).save(outside / name)
    root = tmp_path / "data"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        Image.new("RGB", (4, 4), (10, 10, 200)).save(root / label / "own.png")
    (root / "cat" / "leak.png").symlink_to(outside / "a.png")  # a file linked out
    (root / "cat" / "leaks").symlink_to(outside / "secret")  # a folder linked out
    (root / "bird").symlink_to(outside / "secret")  # a class linked out
    (root / "dog" / "twin.png").symlink_to(root / "cat" / "own.png")  # inside: read
    with pytest.warns(UserWarning, match="link out of"):
        dataset = load_dataset(root, split="all")
    assert dataset.class_names == ["cat", "dog"] and len(dataset) == 3
    assert all(Path(os.path.realpath(p)).is_relative_to(root.resolve()) for p in dataset.images.paths)


def test_a_pipe_given_as_input_is_refused_rather_than_waited_on(model_dir, tmp_path, capsys):
    from PIL import Image

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it for reading would block until someone writes
    assert (
        main(["complete", "--model", str(model_dir), str(fifo), "--out", str(tmp_path / "c.png"), *CPU]) == 2
    )
    one_line_error(capsys, "not a regular file")
    assert main(["eval", "--model", str(model_dir), "--data", str(fifo), *CPU]) == 2
    one_line_error(capsys, "not a regular file or a folder")
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / f"{i}.png")
    os.mkfifo(root / "3.png")
    with pytest.warns(UserWarning, match="skipped 1 file"):
        assert len(load_dataset(root, split="all")) == 3


def test_palette_fit_and_load_refuse_what_the_other_refuses(tmp_path):
    with pytest.raises(ArgumentError, match="no pixels"):
        Palette.fit(np.zeros((0, 3), np.uint8), clusters=4)
    (tmp_path / "p.json").write_text(
        json.dumps({"clusters": [[0.5, 0.5, 0.5], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]]})
    )
    with pytest.raises(CheckpointError, match="centre 2 repeats centre 0"):
        Palette.load(tmp_path / "p.json")
    with pytest.raises(ImageGPTError, match="repeats centre 0"):
        ImageProcessor.from_dict({"clusters": [[0.5, 0.5, 0.5]] * 2, "size": 4})


def test_an_output_error_is_never_taken_for_a_read_error():
    """OutputError is an ImageGPTError and not an OSError, so a reader's `except OSError` never swallows a
    refused output."""
    assert not issubclass(OutputError, OSError) and issubclass(OutputError, ImageGPTError)
