"""The trainer's device, precision and memory settings do what docs/training.md says."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from e3.train.memory import ModelShape, planning_table
from e3.train.parallel import DeviceError, resolve_device, split_by_tokens, start_ranks
from e3.train.sharding import shard_policy

REPO = Path(__file__).resolve().parents[2]


def tiny_qwen2(seed: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def gradients(scorer) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 0], [1, 4, 4, 4, 2, 0, 0, 0]])
    mask = (ids > 0).long()
    mask[:, 0] = 1
    logprobs, _ = scorer(ids, mask, torch.tensor([1.0, 0.7]), chunk_tokens=3)
    (-logprobs.sum()).backward()
    return {name: p.grad.full_tensor().clone() for name, p in scorer.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    start_ranks("cpu")
    base = tiny_qwen2()
    plain = gradients(shard_policy(copy.deepcopy(base)))
    recomputed = gradients(shard_policy(copy.deepcopy(base), gradient_checkpointing=True))
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(recomputed[name], grad, atol=1e-6, rtol=1e-5), name


def test_bfloat16_compute_keeps_float32_weights_and_gives_close_gradients():
    start_ranks("cpu")
    base = tiny_qwen2()
    full = gradients(shard_policy(copy.deepcopy(base)))
    scorer = shard_policy(copy.deepcopy(base), compute_dtype=torch.bfloat16)
    half = gradients(scorer)
    assert {p.dtype for p in scorer.parameters()} == {torch.float32}  # the optimizer steps float32 weights
    assert {g.dtype for g in half.values()} == {torch.float32}  # reduced in float32
    for name, grad in full.items():
        scale = float(grad.abs().max())
        assert float((half[name] - grad).abs().max()) < 0.05 * scale + 1e-3, name
    assert any(not torch.equal(half[n], full[n]) for n in full)  # it did compute in bfloat16


def test_devices_are_resolved_or_refused_by_name():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="trainer.device must be one of"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("auto", 0) == torch.device("cuda", 0)
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceError, match="trainer.device is cuda but this machine has no usable GPU"):
            resolve_device("cuda")


def test_samples_are_dealt_to_ranks_by_tokens_and_none_is_lost():
    lengths = torch.tensor([100, 10, 60, 50, 40, 5, 30])
    shares = split_by_tokens(lengths, torch.arange(7), 3)
    assert sorted(torch.cat(shares).tolist()) == list(range(7))
    loads = [int(lengths[s].sum()) for s in shares]
    assert loads == [100, 100, 95]  # longest first, each to the lightest (ties: lowest) rank: 100 | 60+30+10 | 50+40+5
    assert [len(s) for s in split_by_tokens(lengths, torch.tensor([3]), 2)] == [1, 0]


def test_the_parameter_count_of_a_model_shape_is_the_models_own():
    for tied in (False, True):
        config = dict(hidden=64, layers=3, intermediate=96, vocab=96, heads=2, kv_heads=1)
        shape = ModelShape("tiny", tied=tied, **config)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))
        assert shape.parameters == sum(p.numel() for p in model.parameters())


def test_the_memory_table_in_the_docs_is_the_one_the_code_computes():
    assert planning_table() in (REPO / "docs" / "training.md").read_text()
