"""The base-model architectures e3 builds, "llama" and "qwen2", behind one set of functions.

- "llama": the 1M-parameter LlamaForCausalLM with the character tokenizer
  (e3/model/llama.py, e3/model/tokenizer.py), a completion model: prompts
  are BOS + the characters.
- "qwen2": a Qwen2ForCausalLM of the same sizes with q/k/v biases and a
  byte-level BPE tokenizer with a chat template (e3/model/qwen2.py,
  e3/model/bpe.py): prompts are chat-templated, turns end with <|im_end|>.

The warm-start and the base-model build (e3/model/warmstart.py, base.py)
make, build and save models and tokenizers only through these functions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal, get_args

import torch

from e3.model import bpe, llama, qwen2
from e3.model import tokenizer as char_tokenizer
from e3.model.llama import ModelSpec
from e3.model.loading import load_tokenizer

Architecture = Literal["llama", "qwen2"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)


def check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    return architecture


def default_spec(architecture: str) -> ModelSpec:
    """The sizes of the project's base model of `architecture`."""
    spec = ModelSpec()
    if check_architecture(architecture) == "qwen2":
        # Rotary positions cost no weights: leave room for math prompts.
        spec = replace(spec, max_position_embeddings=bpe.MODEL_MAX_LENGTH)
    return spec


def tokenizer_settings(architecture: str) -> dict | None:
    """What decides a trained tokenizer's vocabulary (None for the fixed character tokenizer)."""
    return bpe.settings() if check_architecture(architecture) == "qwen2" else None


def write_tokenizer(architecture: str, directory: Path):
    """Write the architecture's tokenizer files into `directory` and return them loaded by transformers."""
    if check_architecture(architecture) == "qwen2":
        bpe.save_tokenizer(directory)
    else:
        char_tokenizer.save_tokenizer(directory)
    return load_tokenizer(directory)


def build_model(architecture: str, spec: ModelSpec, seed: int, tokenizer) -> torch.nn.Module:
    """A freshly initialised model of `architecture` sized by `spec` for `tokenizer`."""
    if check_architecture(architecture) == "qwen2":
        return qwen2.build_model(spec, seed, tokenizer)
    return llama.build_model(spec, seed)


def save_model_dir(architecture: str, model: torch.nn.Module, directory: Path, tokenizer_dir: Path) -> None:
    """Write config.json, model.safetensors and generation_config.json, and the tokenizer files of `tokenizer_dir`."""
    directory = Path(directory)
    if check_architecture(architecture) == "llama":
        llama.save_model_dir(model, directory)  # its character tokenizer is fixed, so it writes the files itself
        return
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    qwen2.save_generation_config(directory, tokenizer)
    if Path(tokenizer_dir).resolve() != directory.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
