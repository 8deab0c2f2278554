"""Checkpoints as the commands use them: a model paired with its processor, from one directory.

Above the model. The transformers-format reading and writing itself is imagegpt.pretrained (below the model,
so that ImageGPT.from_pretrained needs nothing above it); its names are re-exported here, where they have
always been.
"""

from __future__ import annotations

import os

from .config import ImageGPTConfig
from .errors import CheckpointError
from .pretrained import (  # noqa: F401  (the names this module has always offered)
    CAUSAL_LM_ARCHITECTURE,
    CLASSIFIER_ARCHITECTURE,
    CONFIG_NAME,
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
