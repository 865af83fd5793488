"""Published policies: the base model's dtype, split into files like save_pretrained, loadable as they are."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from services.trainer.publish import declared_dtype, publish_state


def tiny_qwen2(tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(4)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        tie_word_embeddings=tied))


def test_a_policy_is_published_in_the_declared_dtype_in_shards_that_transformers_loads(tmp_path):
    model = tiny_qwen2(tied=False)
    state = dict(model.named_parameters())
    # ~19 KB of bf16 embeddings each side: a 16 KB limit makes several files.
    path = publish_state(state, model.config, tmp_path, tmp_path / "weights", 7, dtype=torch.bfloat16,
                         max_shard_size="16KB")
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 2 and all(name.startswith("model-0000") for name in files), files
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(files)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert declared_dtype(path) == torch.bfloat16
    for name in files:
        with safe_open(path / name, "pt") as f:
            assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is Qwen2ForCausalLM
    for name, tensor in loaded.named_parameters():
        assert torch.equal(tensor.to(torch.bfloat16), state[name].detach().to(torch.bfloat16)), name


def test_a_tied_lm_head_is_written_once_and_comes_back_tied(tmp_path):
    model = tiny_qwen2(tied=True)
    path = publish_state(dict(model.named_parameters()), model.config, tmp_path, tmp_path / "weights", 1,
                         dtype=torch.float32)
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
