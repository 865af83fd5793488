"""Loading a model directory: any Hugging Face causal LM and its tokenizer, checked first.

Every place that loads a policy (the trainer and its KL reference, the
evaluation, `e3 inspect`, the base-model build) goes through here, so the
model keeps its own architecture (a Qwen2 directory loads as
Qwen2ForCausalLM with its q/k/v biases, not as a Llama that drops them) and
whatever `save_pretrained` writes back is that architecture again.

A directory is checked before transformers sees it, and each problem is one
line naming the directory and what is wrong (`ModelDirError`, a ValueError):
it must exist, hold a config.json that transformers reads, name a model type
transformers can build as a causal LM, hold *.safetensors weights (never a
pickled *.bin) and the tokenizer's files.
"""

from __future__ import annotations

from pathlib import Path

import torch

# A fast tokenizer's file, a SentencePiece model, or a BPE vocabulary (with merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ModelDirError(ValueError):
    """A directory is not a loadable causal-LM model directory; the message names it and what is missing."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_tokenizer_dir(directory: Path | str) -> Path:
    """`directory` as a Path if it exists and holds tokenizer files; ModelDirError otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"model directory {directory}: does not exist or is not a directory")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"model directory {directory}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    return directory


def read_config(directory: Path | str):
    """The transformers config of `directory`, checked to be a causal LM transformers can build."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"model directory {directory}: does not exist or is not a directory")
    if not (directory / "config.json").is_file():
        raise ModelDirError(f"model directory {directory}: no config.json")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError, KeyError or OSError by case
        raise ModelDirError(f"model directory {directory}: config.json is not readable by transformers: {_first_line(exc)}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelDirError(
            f"model directory {directory}: model_type {config.model_type!r} in config.json is not a causal LM "
            f"architecture transformers can load (architectures: {config.architectures})"
        )
    return config


def check_model_dir(directory: Path | str) -> Path:
    """`directory` as a Path if it passes every check in the module docstring; ModelDirError otherwise."""
    directory = Path(directory)
    read_config(directory)
    if not any(directory.glob("*.safetensors")):
        bins = sorted(p.name for p in directory.glob("*.bin"))
        extra = f" (found {', '.join(bins)}; only safetensors are loaded)" if bins else ""
        raise ModelDirError(f"model directory {directory}: no *.safetensors weights{extra}")
    check_tokenizer_dir(directory)
    return directory


def load_causal_lm(directory: Path | str, dtype: torch.dtype = torch.float32):
    """The model of a checked directory, in its own architecture, from safetensors, in `dtype`."""
    from transformers import AutoModelForCausalLM

    directory = check_model_dir(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)


def load_tokenizer(directory: Path | str):
    """The tokenizer of `directory` (AutoTokenizer), after checking its files are there."""
    from transformers import AutoTokenizer

    directory = check_tokenizer_dir(directory)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # a corrupt tokenizer.json surfaces as an Exception from the Rust side
        raise ModelDirError(f"model directory {directory}: tokenizer files are not loadable: {_first_line(exc)}") from exc


def load_model_and_tokenizer(directory: Path | str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a checked model directory."""
    return load_causal_lm(directory, dtype), load_tokenizer(directory)
