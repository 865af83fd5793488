"""The trainer's batch building and GRPO update on a real (tiny) Llama."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from e3.train.batching import build_batch
from e3.train.update import grpo_update, old_logprobs_and_entropy


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def group(rewards, temperature=1.0, level=1, response=(5, 6, 2)):
    return {
        "question_id": "q", "temperature": temperature, "level": level,
        "samples": [{"prompt_token_ids": [1, 3, 4], "response_token_ids": list(response), "reward": r} for r in rewards],
    }


def test_batch_masks_only_response_tokens_and_normalises_per_group():
    batch = build_batch([group([1, 0]), group([1, 1, 1], temperature=0.7, response=(7,))], pad_id=0)
    assert batch.input_ids.shape == (5, 6)
    assert batch.response_mask[0].tolist() == [0, 0, 1, 1, 1]  # positions 2..4 predict tokens 3..5
    assert batch.response_mask[2].tolist() == [0, 0, 1, 0, 0]
    assert batch.advantages[:2].tolist() == pytest.approx([0.7071, -0.7071], abs=1e-3)
    assert batch.advantages[2:].tolist() == [0.0, 0.0, 0.0]  # all correct: no signal
    assert batch.temperatures.tolist() == pytest.approx([1.0, 1.0, 0.7, 0.7, 0.7])
    assert batch.outcomes == ["mixed", "all_correct"] and batch.group_sizes == [2, 3]


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="at least one group"):
        build_batch([], 0)
    with pytest.raises(ValueError, match="non-empty"):
        build_batch([group([1], response=())], 0)


def test_update_raises_the_probability_of_rewarded_responses():
    model = tiny_model()
    good, bad = (5, 6, 2), (9, 9, 2)
    groups = [{"question_id": "q", "temperature": 1.0, "level": 1, "samples": [
        {"prompt_token_ids": [1, 3, 4], "response_token_ids": list(good), "reward": 1.0},
        {"prompt_token_ids": [1, 3, 4], "response_token_ids": list(bad), "reward": 0.0},
    ]}]
    batch = build_batch(groups, pad_id=0)
    before, entropy = old_logprobs_and_entropy(model, batch, micro_batch=8)
    assert 0 < entropy <= math.log(16) + 1e-6
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        result = grpo_update(model, optimizer, batch, mini_batches=1, micro_batch=1, clip_low=0.2, clip_high=0.28,
                             kl_coef=0.0, grad_clip=1.0, generator=torch.Generator().manual_seed(0))
        assert not result.skipped and result.optimizer_steps == 1
    after, _ = old_logprobs_and_entropy(model, batch, micro_batch=8)
    mask = batch.response_mask
    assert float((after[0] * mask[0]).sum()) > float((before[0] * mask[0]).sum())
    assert float((after[1] * mask[1]).sum()) < float((before[1] * mask[1]).sum())


def test_micro_batching_gives_the_same_gradient_as_one_pass():
    groups = [group([1, 0, 0]), group([0, 1], response=(7, 2))]
    batch = build_batch(groups, pad_id=0)
    grads = []
    for micro in (8, 1):
        model = tiny_model(seed=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        grpo_update(model, optimizer, batch, mini_batches=1, micro_batch=micro, clip_low=0.2, clip_high=0.2,
                    kl_coef=0.0, grad_clip=1e9, generator=torch.Generator().manual_seed(0))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_non_finite_loss_skips_the_optimizer_step():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    weights_before = model.model.embed_tokens.weight.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    result = grpo_update(model, optimizer, build_batch([group([1, 0])], 0), mini_batches=2, micro_batch=4,
                         clip_low=0.2, clip_high=0.2, kl_coef=0.0, grad_clip=1.0, generator=torch.Generator().manual_seed(0))
    assert result.skipped and result.optimizer_steps == 0
    assert torch.equal(model.model.embed_tokens.weight, weights_before)
