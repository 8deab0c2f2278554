"""Checkpoints as the commands use them: a model paired with its processor, and run directories resolved to
the model directory they hold.

Above the model. The transformers-format reading and writing itself is imagegpt.pretrained (below the model,
so that ImageGPT.from_pretrained needs nothing above it); its names are re-exported here, where they have
always been.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import ImageGPTConfig
from .errors import CheckpointError
from .pretrained import (  # noqa: F401  (the names this module has always offered)
    BERT_MODEL_TYPE,
    BERT_SAFETENSORS_NAME,
    CAUSAL_LM_ARCHITECTURE,
    CLASSIFIER_ARCHITECTURE,
    CONFIG_NAME,
    MODEL_TYPE,
    PROCESSOR_NAME,
    PYTORCH_INDEX_NAME,
    PYTORCH_NAME,
    SAFETENSORS_INDEX_NAME,
    SAFETENSORS_NAME,
    config_from_transformers,
    config_to_transformers,
    load_pretrained,
    read_config,
    resolve_directory,
    save_pretrained,
)
from .processor import ImageProcessor


def check_processor(config: ImageGPTConfig, processor, source) -> None:
    """A processor and a model belong together: the palette has the model's n_clusters colours and the
    processor's images have its n_positions pixels. Checked wherever the two are paired, since tokens from
    another palette would be read as the wrong colours without an error."""
    colours = len(processor.palette)
    if colours != config.n_clusters:
        raise CheckpointError(
            f"{source}: the palette has {colours} colours, but the model predicts {config.n_clusters} "
            f"(vocab_size {config.vocab_size} less the SOS token); the processor belongs to another model. "
            "Pair the model with the preprocessor_config.json it was trained with"
        )
    if processor.height * processor.width != config.n_positions:
        raise CheckpointError(
            f"{source}: the processor makes {processor.height}x{processor.width} images "
            f"({processor.height * processor.width} tokens), but the model reads {config.n_positions} "
            "tokens; the processor belongs to another model"
        )


def load_with_processor(cls, path: str | os.PathLike, **kwargs):
    """(model, ImageProcessor) from one directory (or Hub id), checked to belong together (check_processor).

    kwargs go to load_pretrained. Every command that pairs a model with a processor loads them here.
    """
    directory = resolve_directory(path, kwargs.get("revision"))
    processor = ImageProcessor.from_pretrained(directory)
    model = load_pretrained(cls, directory, **kwargs)
    check_processor(model.config, processor, directory)
    return model, processor


# Run directories: where a training run (imagegpt.trainer) keeps its models. Every reader of a run resolves it
# here, so that sampling, evaluation and probes never import the training code.

CHECKPOINTS_DIR = "checkpoints"  # RUN_DIR/checkpoints/latest: the last checkpoint (model + training state)
MODEL_DIR = "model"  # RUN_DIR/model: the finished run's model
STATE_FILE = "training_state.pt"  # beside a checkpoint's model: optimizer, step, RNG states, data position


def find_checkpoint(
    checkpoints_dir: str | os.PathLike, name: str = "latest", *, repair: bool = True
) -> Path | None:
    """The directory of the named checkpoint, or None if there is none yet.

    repair (only for the process holding the run's RunLock): fix what a crash can leave: a `name.old` with
    no `name` (a crash between save_checkpoint's two renames) is renamed back; temporary directories of an
    interrupted write are removed. Without it (a reader beside a running training) nothing is changed, and
    `name.old` is returned where `name` is missing.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if checkpoints_dir.exists() and not checkpoints_dir.is_dir():
        raise CheckpointError(f"{checkpoints_dir} is a file, where the run keeps its checkpoints folder")
    if not checkpoints_dir.is_dir():
        return None
    target, old = checkpoints_dir / name, checkpoints_dir / f"{name}.old"
    if repair:
        for tmp in checkpoints_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists() and old.exists():
            os.rename(old, target)
    elif not target.exists() and old.exists():
        target = old
    if not target.exists():
        return None
    if not (target / STATE_FILE).is_file():
        raise CheckpointError(
            f"{target} has no {STATE_FILE}; it is not a checkpoint written by imagegpt training"
        )
    return target


def latest_model_dir(path: str | os.PathLike) -> str | os.PathLike:
    """A model directory from a model directory or a run directory (its model/, else checkpoints/latest).

    A path that does not exist here is returned as given, for from_pretrained to read as a Hub id (or to
    report as missing)."""
    if not Path(path).expanduser().exists():
        return path
    path = Path(path).expanduser()
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / MODEL_DIR / CONFIG_NAME).is_file():
        return path / MODEL_DIR
    checkpoint = find_checkpoint(path / CHECKPOINTS_DIR, repair=False)  # a reader never changes the run
    if checkpoint is None:
        raise CheckpointError(
            f"{path} is neither a model directory (no config.json) nor a run directory with a checkpoint"
        )
    return checkpoint
