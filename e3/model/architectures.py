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

from pathlib import Path

import torch

from e3.model import bpe, llama, qwen2
from e3.model import tokenizer as char_tokenizer
from e3.model.loading import load_tokenizer
# What names the architectures and sizes them is torch-free (the launcher's base-model lookup reads it).
from e3.model.recipe import (ARCHITECTURES, Architecture, ModelSpec, check_architecture,  # noqa: F401
                             default_spec, tokenizer_settings)


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
