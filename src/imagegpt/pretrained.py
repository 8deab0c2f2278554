"""transformers-format ImageGPT directories: reading and writing config.json and the weights.

Below the model: `Pretrained`, the base of ImageGPT and ImageGPTClassifier, gives them from_pretrained /
save_pretrained by building `cls(config)`, and this module never imports imagegpt.model. A class says which
transformers head it is with its `architecture` attribute. imagegpt.checkpoint, above the model, pairs models
with processors and run directories.

A directory holds `config.json` (transformers' ImageGPTConfig, `model_type: "imagegpt"`) and the weights:
`model.safetensors` (or shards listed in `model.safetensors.index.json`), or `pytorch_model.bin` (or shards
listed in `pytorch_model.bin.index.json`), read with `torch.load(weights_only=True)`, which never unpickles
arbitrary objects. `preprocessor_config.json` (the palette) sits beside them.

The conversion is a transpose and nothing else: transformers' Conv1D layers (c_attn, c_proj, c_fc) store their
weights as [in, out], our nn.Linear as [out, in]; every other name and shape is the same. The `attn.bias` and
`attn.masked_bias` buffers (the causal mask) of the released checkpoints are ignored.

Heads. A causal-LM directory (ImageGPTForCausalImageModeling: `lm_head`) loads into ImageGPT; a classifier
directory (ImageGPTForImageClassification: `score`) into ImageGPTClassifier. ImageGPTClassifier loaded from a
causal-LM or a backbone-only (ImageGPTModel) directory gets the backbone and a fresh, zero-initialised `score`
head with `num_labels` labels (a keyword argument; the lm_head is dropped): this is how fine-tuning starts.
ImageGPT loaded from a directory without an `lm_head` is a CheckpointError: a model that predicts nothing is
never what was meant.

BERT models (objective "bert", imagegpt.objectives) have no transformers class: transformers' ImageGPT is
causal and would read their weights as a next-pixel model, silently wrong. Their directories are written so
that transformers refuses them: config.json has `model_type: "imagegpt_bert"` (AutoConfig and every AutoModel
raise "does not recognize this architecture") plus `objective` and `bert_mask_prob`, and the weights are
`imagegpt-bert.safetensors`, a name transformers never reads (ImageGPTForCausalImageModeling.from_pretrained
raises for want of model.safetensors). imagegpt reads both.

Options of transformers' config that change the model's maths and that imagegpt does not implement are refused
with a ConfigError naming the option; options that do not change the maths (use_cache, token ids, generation
defaults, ...) are accepted; keys we do not know are reported with a warning, never silently dropped.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .config import ImageGPTConfig
from .errors import ArgumentError, CheckpointError, ConfigError
from .files import fsync_dir, fsync_file, write_errors
from .hub import fetch_error, hub_id, quiet
from .limits import check_memory

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
PROCESSOR_NAME = "preprocessor_config.json"
# A BERT model's weights and model_type: names transformers does not load (see the module docstring).
BERT_SAFETENSORS_NAME = "imagegpt-bert.safetensors"
MODEL_TYPE, BERT_MODEL_TYPE = "imagegpt", "imagegpt_bert"

CAUSAL_LM_ARCHITECTURE = "ImageGPTForCausalImageModeling"
CLASSIFIER_ARCHITECTURE = "ImageGPTForImageClassification"

# transformers' Conv1D weights, stored [in, out]; ours are nn.Linear, [out, in].
_CONV1D_WEIGHT = re.compile(
    r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$"
)
# The causal-mask buffers that old transformers versions saved with the weights.
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")

# Options of transformers' ImageGPTConfig / PretrainedConfig that change the maths, with the only value we
# honour and why. Any other value is refused when loading.
_REQUIRED_VALUES: dict[str, tuple[object, str]] = {
    "activation_function": (
        "quick_gelu",
        "imagegpt's MLP uses quick-GELU, x * sigmoid(1.702 x), as the original iGPT",
    ),
    "scale_attn_weights": (True, "imagegpt always scales attention by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "imagegpt does not scale attention by 1/(layer index + 1)"),
    "reorder_and_upcast_attn": (False, "imagegpt does not implement the reordered, upcast attention"),
    "add_cross_attention": (False, "imagegpt is a decoder-only model without cross-attention layers"),
    "tie_word_embeddings": (False, "imagegpt's output head is untied from the token embeddings, as in iGPT"),
    "is_encoder_decoder": (False, "imagegpt is a decoder-only model"),
}

# Keys that do not change the maths of the model (bookkeeping, token ids, generation defaults, init range).
_HARMLESS_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "architectures",
    "model_type",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "use_return_dict",
    "torchscript",
    "initializer_range",
    "chunk_size_feed_forward",  # not used by transformers' ImageGPT
    "is_decoder",  # only changes how a padding attention_mask is built; imagegpt takes none
    "tie_encoder_decoder",  # only meaningful for encoder-decoder models, refused above
    "cross_attention_hidden_size",  # only meaningful with cross-attention, refused above
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "label2id",
    "finetuning_task",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "pruned_heads",  # refused below unless empty
    "problem_type",  # checked below for classifiers
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
}

_SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
# Keyword arguments of from_pretrained that may change a loaded config: none of them changes a weight's shape.
_OVERRIDABLE_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "num_labels", "id2label")


# Config conversion


def config_from_transformers(values: dict, *, source: str = "config.json") -> ImageGPTConfig:
    """An ImageGPTConfig from transformers' config.json dict; refuses options imagegpt does not implement.

    source: named in error messages (the file the dict came from).
    """
    if not isinstance(values, dict):
        raise CheckpointError(f"{source} does not hold a JSON object; it is not a transformers config.json")
    objective = _objective(values, source)
    _refuse_unsupported(values, source)
    fields = {name: values[name] for name in (*_SHAPE_FIELDS, *_FLOAT_FIELDS) if values.get(name) is not None}
    fields.update({name: float(fields[name]) for name in _FLOAT_FIELDS if name in fields})
    fields.update({name: values[name] for name in ("n_inner", "bert_mask_prob") if name in values})
    fields.update(objective=objective, **_labels(values))
    try:
        return ImageGPTConfig(**fields)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{source}: {e}") from e
        raise ConfigError(f"{source} holds an invalid ImageGPT config: {e}") from e


_FLOAT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon")


def _objective(values: dict, source: str) -> str:
    """The objective a config.json's model_type (and objective, if set) says, checked to agree."""
    model_type = values.get("model_type")
    if model_type not in (MODEL_TYPE, BERT_MODEL_TYPE):
        raise CheckpointError(
            f"{source} has model_type={model_type!r}, not 'imagegpt'; pass a directory holding an ImageGPT "
            "checkpoint (transformers' ImageGPTForCausalImageModeling or ImageGPTForImageClassification)"
        )
    objective = values.get("objective", "bert" if model_type == BERT_MODEL_TYPE else "ar")
    if (objective == "bert") != (model_type == BERT_MODEL_TYPE):
        raise CheckpointError(
            f"{source} has model_type={model_type!r} but objective={objective!r}; a BERT model's config.json "
            f"has model_type {BERT_MODEL_TYPE!r} (so that transformers does not read it as a causal model), "
            "a next-pixel model's 'imagegpt'. The file was edited by hand: restore the one the model was "
            "saved with"
        )
    return objective


def _refuse_unsupported(values: dict, source: str) -> None:
    """A ConfigError for options imagegpt does not implement; a warning naming the keys it does not know."""
    for key, (wanted, why) in _REQUIRED_VALUES.items():
        if key in values and values[key] != wanted:
            raise ConfigError(
                f"{source} sets {key}={values[key]!r}, which imagegpt does not implement ({why}); only "
                f"{key}={wanted!r} can be loaded. Use transformers' ImageGPT classes for this checkpoint, "
                f"or set {key} to {wanted!r} if the weights were trained that way"
            )
    if values.get("pruned_heads"):
        raise ConfigError(
            f"{source} has pruned attention heads (pruned_heads={values['pruned_heads']!r}), which imagegpt "
            "does not implement; load it with transformers instead"
        )
    if values.get("quantization_config") is not None:
        raise ConfigError(
            f"{source} describes quantised weights (quantization_config), which imagegpt cannot load; save "
            "the model unquantised with transformers first"
        )
    known = {*ImageGPTConfig.__dataclass_fields__, "num_labels", "_num_labels", "quantization_config"}
    unknown = sorted(k for k in values if k not in known | _HARMLESS_KEYS | _REQUIRED_VALUES.keys())
    if unknown:
        warnings.warn(
            f"{source}: ignoring keys imagegpt does not know: {', '.join(unknown)}. If one of them changes "
            "the model's maths, the loaded model will differ from transformers'",
            stacklevel=4,
        )


def _labels(values: dict) -> dict:
    """num_labels and, when they carry names, id2label, from id2label or (without it) num_labels."""
    id2label = values.get("id2label")
    if id2label:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        # transformers' placeholder names carry no information; keep the config as a fresh one would be.
        named = any(v != f"LABEL_{k}" for k, v in id2label.items())
        return {"num_labels": len(id2label), **({"id2label": id2label} if named else {})}
    num_labels = values.get("num_labels", values.get("_num_labels"))
    return {} if num_labels is None else {"num_labels": num_labels}


def config_to_transformers(config: ImageGPTConfig, architecture: str = CAUSAL_LM_ARCHITECTURE) -> dict:
    """The full transformers ImageGPTConfig dict (config.json) of our config, for the given architecture."""
    values = {
        "architectures": [architecture],
        "model_type": "imagegpt",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "quick_gelu",
        "resid_pdrop": config.resid_pdrop,
        "embd_pdrop": config.embd_pdrop,
        "attn_pdrop": config.attn_pdrop,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if not config.is_causal:  # written so that transformers refuses it (see the module docstring)
        values.update(
            model_type=BERT_MODEL_TYPE, objective=config.objective, bert_mask_prob=config.bert_mask_prob
        )
    if architecture == CLASSIFIER_ARCHITECTURE or config.id2label is not None:
        id2label = config.id2label or {i: f"LABEL_{i}" for i in range(config.num_labels)}
        values["id2label"] = {str(k): v for k, v in sorted(id2label.items())}
        values["label2id"] = {v: k for k, v in sorted(id2label.items())}
    return values


def read_config(directory: str | os.PathLike) -> ImageGPTConfig:
    """The ImageGPTConfig of a transformers-format directory's config.json."""
    path = Path(directory) / CONFIG_NAME
    return config_from_transformers(_read_json(path), source=str(path))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; pass a directory in transformers' ImageGPT format (config.json and "
            "model.safetensors), such as one written by save_pretrained"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; the file is damaged or not JSON") from e


# Finding the directory (local, or a Hugging Face Hub id)

_HUB_WEIGHTS = {
    "safetensors": [SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, "model-*.safetensors", BERT_SAFETENSORS_NAME],
    "pytorch": [PYTORCH_NAME, PYTORCH_INDEX_NAME, "pytorch_model-*.bin"],
}


def resolve_directory(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory for `path`: the directory itself, or a Hub id's files downloaded (huggingface_hub).

    Downloads config.json, preprocessor_config.json and one format of weights (safetensors when the repository
    has them), into huggingface_hub's cache.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"expected a directory or a Hub id, got {type(path).__name__}")
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
    name = hub_id(path, "a directory holding config.json and the weights")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        files = [CONFIG_NAME, PROCESSOR_NAME]
        with quiet():
            directory = Path(
                snapshot_download(name, revision=revision, allow_patterns=files + _HUB_WEIGHTS["safetensors"])
            )
            if _weights_files(directory) is None:
                directory = Path(
                    snapshot_download(name, revision=revision, allow_patterns=files + _HUB_WEIGHTS["pytorch"])
                )
    except (OSError, EntryNotFoundError, HFValidationError) as e:
        raise fetch_error(path, e) from e
    return directory


# Reading weights


def _weights_files(directory: Path) -> tuple[str, list[Path]] | None:
    """('safetensors' | 'pytorch', files) of a directory's weights, preferring safetensors; None if none."""
    for kind, single, index in (
        ("safetensors", SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME),
        ("pytorch", PYTORCH_NAME, PYTORCH_INDEX_NAME),
    ):
        if (directory / single).is_file():
            return kind, [directory / single]
        if kind == "safetensors" and (directory / BERT_SAFETENSORS_NAME).is_file():
            return kind, [directory / BERT_SAFETENSORS_NAME]
        if (directory / index).is_file():
            weight_map = _read_json(directory / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{directory / index} has no weight_map; the index file is damaged")
            shards = []
            for name in dict.fromkeys(weight_map.values()):
                shard = directory / name
                if Path(name).name != name or not shard.is_file():
                    raise CheckpointError(f"{directory / index} names the shard {name!r}, which is missing")
                shards.append(shard)
            return kind, shards
    return None


def _read_weights(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every stored tensor, one at a time so that only one extra copy is alive."""
    found = _weights_files(directory)
    if found is None:
        raise CheckpointError(
            f"{directory} has no weights: expected {SAFETENSORS_NAME} (or {SAFETENSORS_INDEX_NAME} with its "
            f"shards) or {PYTORCH_NAME}"
        )
    kind, files = found
    for file in files:
        if kind == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"cannot read {file}: {e}; the file is damaged or not safetensors"
                ) from e
        else:
            tensors = _torch_load(file)
            if not isinstance(tensors, dict) or not all(
                isinstance(t, torch.Tensor) for t in tensors.values()
            ):
                raise CheckpointError(f"{file} does not hold a state dict of tensors")
            for name in list(tensors):
                yield name, tensors.pop(name)


def _torch_load(file: Path):
    import pickle

    try:
        try:  # memory-mapped, so a big checkpoint is not read into memory twice
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file} holds objects other than tensors, and imagegpt never unpickles arbitrary objects from a "
            f"checkpoint (torch.load(weights_only=True) refused it: {str(e).splitlines()[0]}). Convert it to "
            "model.safetensors with a tool you trust"
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(
            f"cannot read {file}: {e}; the file is damaged or not a PyTorch checkpoint"
        ) from e


def _to_ours(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One transformers tensor as ours: the backbone prefix added if absent, Conv1D weights transposed."""
    if not name.startswith("transformer.") and name not in ("lm_head.weight", "score.weight"):
        name = "transformer." + name  # an ImageGPTModel (backbone-only) checkpoint
    if _MASK_BUFFER.match(name):
        return None
    if _CONV1D_WEIGHT.match(name):
        if tensor.dim() != 2:
            raise CheckpointError(
                f"weight {name} has shape {tuple(tensor.shape)}; a 2-D Conv1D weight was expected"
            )
        tensor = tensor.t()
    return name, tensor


# Loading


def load_pretrained(cls, path: str | os.PathLike, **kwargs):
    """An ImageGPT or ImageGPTClassifier (cls) from a transformers-format directory or a Hub id, in eval mode.

    kwargs:
        num_labels / id2label: the classifier's labels, for a fresh score head (or equal to the stored one's).
        resid_pdrop / embd_pdrop / attn_pdrop: dropout rates replacing the checkpoint's.
        dtype: parameter dtype (default float32: compute precision is chosen with autocast at run time).
        device: where to put the model (default cpu).
        revision: the Hub revision, for Hub ids.
        require_head: (classifiers) refuse a directory without a trained score head instead of starting a
            fresh one: evaluating a classifier that was never fine-tuned gives a meaningless accuracy.

    What is read is checked before the model is built: the number of blocks the weights hold against the
    config's n_layer (a config claiming a billion layers would otherwise build for minutes), the memory the
    weights need, every name and shape, and that every weight is finite (NaN or inf weights would sample
    blank images and evaluate to nan, silently).
    """
    dtype, device, revision, require_head, overrides = _load_arguments(kwargs)
    directory = resolve_directory(path, revision)
    values = _read_json(directory / CONFIG_NAME)
    config = config_from_transformers(values, source=str(directory / CONFIG_NAME))
    classifier = cls.architecture == CLASSIFIER_ARCHITECTURE
    if classifier:
        _check_classifier_problem(values, directory)
    state = _read_state(directory, dtype)
    _check_weights(state, config, directory)
    if classifier:
        fresh_head = _classifier_head(state, config, overrides, directory, require_head)
    else:
        fresh_head = False
        _require_lm_head(state, directory)
    if "id2label" in overrides and overrides["id2label"] is not None:
        overrides["num_labels"] = len(overrides["id2label"])
    elif "num_labels" in overrides:
        overrides["id2label"] = None
    try:
        config = config.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid argument to from_pretrained: {e}") from e
    with torch.device("meta"):
        model = cls(config)
    if fresh_head:
        shape = model.score.weight.shape
        check_memory(shape.numel() * dtype.itemsize, f"a score head for {config.num_labels:,} labels")
        state["score.weight"] = torch.zeros(shape, dtype=dtype)  # as init_weights does
    _check_names_and_shapes(model, state, directory)
    model.load_state_dict(state, assign=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _load_arguments(kwargs: dict):
    """(dtype, device, revision, require_head, config overrides) from load_pretrained's kwargs, checked."""
    dtype = kwargs.pop("dtype", torch.float32)
    device = kwargs.pop("device", None)
    revision = kwargs.pop("revision", None)
    require_head = kwargs.pop("require_head", False)
    overrides = {k: kwargs.pop(k) for k in _OVERRIDABLE_FIELDS if k in kwargs}
    if kwargs:
        raise ArgumentError(
            f"unknown argument(s) to from_pretrained: {', '.join(sorted(kwargs))}; accepted: "
            f"{', '.join(_OVERRIDABLE_FIELDS)}, dtype, device, revision, require_head"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentError(
            f"dtype must be a floating-point torch dtype such as torch.float32, got {dtype!r}"
        )
    return dtype, device, revision, require_head, overrides


def _read_state(directory: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every stored tensor under our name, in `dtype`, once the memory it needs is known to fit."""
    found = _weights_files(directory)
    stored = sum(file.stat().st_size for file in found[1]) if found else 0
    check_memory(  # a lower bound: float32 files read as float32 take their size, as bfloat16 half of it
        stored * min(1.0, dtype.itemsize / 4),
        f"the weights in {directory} ({stored:,} bytes of files)",
        "load them on a machine with more memory",
    )
    # Convert every tensor before building the model, so that the head decision can see all the names.
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _read_weights(directory):
        converted = _to_ours(name, tensor)
        if converted is not None:
            name, tensor = converted
            if not tensor.is_floating_point():
                raise CheckpointError(
                    f"weight {name} in {directory} has dtype {tensor.dtype}; floats expected"
                )
            # An owned, contiguous copy in the wanted dtype: never a view of a memory-mapped file.
            state[name] = tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
            del tensor
    return state


def _classifier_head(state, config, overrides, directory: Path, require_head: bool) -> bool:
    """Whether a classifier gets a fresh score head; a stored one must match the labels asked and the
    config. The lm_head, if any, is dropped from `state`."""
    state.pop("lm_head.weight", None)
    if "score.weight" not in state:
        if require_head:
            raise CheckpointError(
                f"{directory} holds a pretrained model with no classification head: it was never "
                "fine-tuned, so it has no classes to report. Fine-tune it first (imagegpt finetune --model "
                f"{directory} --data ... --out RUN), then evaluate RUN"
            )
        return True
    stored = state["score.weight"].size(0)
    asked = overrides.get("num_labels", len(overrides["id2label"]) if overrides.get("id2label") else None)
    if asked is not None and asked != stored:
        raise CheckpointError(
            f"{directory} holds a classifier with {stored} labels, but {asked} were asked for; load "
            "it without num_labels/id2label, or start from a causal-LM checkpoint to get a fresh head"
        )
    if config.num_labels != stored:
        raise CheckpointError(
            f"{directory}: config.json says {config.num_labels} labels, but score.weight has "
            f"{stored} rows; the checkpoint is inconsistent"
        )
    return False


def _require_lm_head(state, directory: Path) -> None:
    if "lm_head.weight" not in state:
        what = "an image classifier (a score head)" if "score.weight" in state else "only the backbone"
        raise CheckpointError(
            f"{directory} holds {what} and no lm_head, so it cannot predict pixels; load it with "
            "ImageGPTClassifier.from_pretrained, or pass an ImageGPTForCausalImageModeling directory"
        )


def _check_names_and_shapes(model, state, directory: Path) -> None:
    """The stored tensors are exactly the model's parameters, shape for shape."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        raise CheckpointError(
            f"the weights in {directory} do not match its config.json ({'; '.join(parts)}); the checkpoint "
            "is incomplete or not an ImageGPT checkpoint"
        )
    wrong = [
        f"{n} {tuple(state[n].shape)} (config.json implies {tuple(s)})"
        for n, s in expected.items()
        if state[n].shape != s
    ]
    if wrong:
        raise CheckpointError(f"the weights in {directory} do not match its config.json: {_names(wrong)}")


def _check_weights(state: dict[str, torch.Tensor], config: ImageGPTConfig, directory: Path) -> None:
    """The stored blocks are the config's n_layer (checked before a model is built from the config), and
    every weight is finite."""
    blocks = {int(name.split(".")[2]) for name in state if re.match(r"^transformer\.h\.\d+\.", name)}
    if len(blocks) != config.n_layer or (blocks and max(blocks) != config.n_layer - 1):
        held = f"blocks {min(blocks)}..{max(blocks)}" if blocks else "no blocks"
        raise CheckpointError(
            f"{directory / CONFIG_NAME} says n_layer={config.n_layer}, but the weights hold {held} "
            f"({len(blocks)} in all); the config does not belong to these weights"
        )
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"weight {name} in {directory} holds {bad} NaN or infinite values, so the model's outputs "
                "would be NaN; the checkpoint is damaged or its training diverged. Use an earlier checkpoint"
            )


def _check_classifier_problem(values: dict, directory: Path) -> None:
    problem = values.get("problem_type")
    labels = len(values["id2label"]) if values.get("id2label") else values.get("num_labels", 2)
    if problem in ("regression", "multi_label_classification") or (problem is None and labels == 1):
        problem = problem or "regression (num_labels=1)"
        raise ConfigError(
            f"{directory / CONFIG_NAME} sets problem_type {problem}, but ImageGPTClassifier is trained with "
            "single-label cross-entropy; use transformers for this checkpoint, or load it with ImageGPT / "
            "set problem_type to single_label_classification"
        )


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# Saving


def save_pretrained(model, path: str | os.PathLike, processor=None) -> None:
    """Write `model` as a transformers-format directory, each file replaced atomically.

    Writes config.json, model.safetensors and, given a processor, its preprocessor_config.json. transformers'
    ImageGPTForCausalImageModeling (for ImageGPT) or ImageGPTForImageClassification (for ImageGPTClassifier)
    loads it with no missing or unexpected keys. A BERT model's weights go to imagegpt-bert.safetensors
    instead, and transformers refuses the directory (see the module docstring).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    config = config_to_transformers(model.config, model.architecture)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if _CONV1D_WEIGHT.match(name):
            tensor = tensor.t()
        state[name] = tensor.to("cpu").contiguous()
    dtypes = {t.dtype for t in state.values()}
    dtype = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch.")
    config["dtype"] = config["torch_dtype"] = (
        dtype  # transformers >= 4.56 reads dtype, older versions torch_dtype
    )

    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{path} is a file; save_pretrained writes a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write everything into a temporary directory beside (or inside) the target, then move it into place.
    new = not target.exists()
    tmp = Path(tempfile.mkdtemp(dir=target.parent if new else target, prefix=f".{target.name}.tmp-"))
    try:
        with write_errors(target):  # a full disk: one line, and the directory as it was
            try:
                weights = SAFETENSORS_NAME if model.config.is_causal else BERT_SAFETENSORS_NAME
                save_file(state, tmp / weights, metadata={"format": "pt"})
            except SafetensorError as e:
                raise OSError(errno.EIO, str(e)) from e
            del state
            if processor is not None:
                processor.save_pretrained(tmp)
            text = json.dumps(config, indent=2, sort_keys=True) + "\n"
            (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
            for file in tmp.iterdir():
                fsync_file(file)
        if new:
            try:
                os.replace(tmp, target)
                fsync_dir(target.parent)
                return
            except OSError:  # the directory appeared meanwhile: fall back to replacing file by file
                pass
        # An existing directory: replace file by file, config.json last, so it never names missing weights.
        for file in sorted(tmp.iterdir(), key=lambda f: f.name == CONFIG_NAME):
            os.replace(file, target / file.name)
        stale = BERT_SAFETENSORS_NAME if model.config.is_causal else SAFETENSORS_NAME
        (target / stale).unlink(missing_ok=True)  # another objective's model was saved here before
        fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Pretrained(nn.Module):
    """from_pretrained / save_pretrained in transformers' format for a model class with a `config` and an
    `architecture` (CAUSAL_LM_ARCHITECTURE or CLASSIFIER_ARCHITECTURE)."""

    architecture: str
    config: ImageGPTConfig

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load from a transformers ImageGPT directory, or a Hub id when online (load_pretrained's kwargs)."""
        return load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a directory that transformers' ImageGPT classes load with no missing or unexpected keys."""
        save_pretrained(self, path, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
