"""Token-budget micro-batches (e3.train.micro_batches) and the gradient they accumulate in e3.train.update."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from e3.train.batching import build_batch
from e3.train.micro_batches import plan_micro_batches
from e3.train.update import grpo_update, old_logprobs_and_entropy


def plan(lengths, max_sequences=100, max_tokens=None, index=None):
    lengths = torch.tensor(lengths)
    index = torch.arange(len(lengths)) if index is None else torch.tensor(index)
    return [g.tolist() for g in plan_micro_batches(lengths, index, max_sequences=max_sequences, max_tokens=max_tokens)]


def test_sequences_are_sorted_by_length_and_grouped_under_the_budget():
    # Sorted: 2 (len 3), 0 (4), 3 (4), 1 (9). 3 x 4 = 12 <= 12 fits, adding 9 would make 4 x 9.
    assert plan([4, 9, 3, 4], max_tokens=12) == [[2, 0, 3], [1]]
    assert plan([4, 9, 3, 4], max_tokens=11) == [[2, 0], [3], [1]]  # 3 x 4 = 12 > 11


def test_a_sequence_longer_than_the_budget_gets_a_micro_batch_of_its_own():
    assert plan([5, 20, 6], max_tokens=8) == [[0], [2], [1]]
    assert plan([5, 20, 6], max_tokens=1) == [[0], [2], [1]]


def test_the_sequence_count_closes_a_micro_batch_first_when_it_is_reached_first():
    assert plan([3, 3, 3, 3, 3], max_sequences=2, max_tokens=1000) == [[0, 1], [2, 3], [4]]
    assert plan([3, 3, 3, 3, 3], max_sequences=2) == [[0, 1], [2, 3], [4]]


def test_only_the_given_samples_are_planned_and_equal_lengths_keep_their_order():
    assert plan([7, 2, 7, 2, 5], index=[4, 2, 3, 0]) == [[3, 4, 2, 0]]


def test_non_positive_limits_are_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        plan([3], max_tokens=0)
    with pytest.raises(ValueError, match="max_sequences"):
        plan([3], max_sequences=0)


def tiny_model(seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def mixed_length_batch():
    """Two groups, prompts of 2-4 tokens and responses of 1-6, at temperatures 1.0 and 0.7."""
    def sample(prompt, response, reward):
        return {"prompt_token_ids": prompt, "response_token_ids": response, "reward": reward}
    groups = [
        {"question_id": "a", "temperature": 1.0, "level": 1, "samples": [
            sample([1, 3], [5, 6, 2], 1.0), sample([1, 3], [9, 9, 9, 9, 9, 2], 0.0), sample([1, 3], [4], 0.0)]},
        {"question_id": "b", "temperature": 0.7, "level": 2, "samples": [
            sample([1, 4, 4, 7], [8, 2], 0.0), sample([1, 4, 4, 7], [5, 5, 5, 5, 2], 1.0)]},
    ]
    return build_batch(groups, pad_id=0)


def one_padded_batch_gradient(batch):
    """The token-level mean policy gradient over the whole padded batch, from the model's own logits.

    With one mini-batch the ratio is 1 at the gradient pass, so the GRPO loss's
    gradient is that of -mean over response tokens of advantage x log pi.
    """
    model = tiny_model()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits / batch.temperatures[:, None, None], dim=-1)
    picked = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask
    loss = -(batch.advantages[:, None] * picked * mask).sum() / mask.sum()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def update_gradient(batch, **sizes):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights: only the gradient is compared
    grpo_update(model, optimizer, batch, mini_batches=1, clip_low=0.2, clip_high=0.2, kl_coef=0.0, grad_clip=1e9,
                generator=torch.Generator().manual_seed(0), **sizes)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("sizes", [
    dict(micro_batch=100),  # everything in one micro-batch
    dict(micro_batch=100, max_tokens_per_micro_batch=16, logit_chunk_tokens=3),
    dict(micro_batch=2, max_tokens_per_micro_batch=24, logit_chunk_tokens=1),
    dict(micro_batch=100, max_tokens_per_micro_batch=4),  # below the longest sequence (9): one per micro-batch
])
def test_token_budget_micro_batches_accumulate_the_one_padded_batch_gradient(sizes):
    batch = mixed_length_batch()
    expected = one_padded_batch_gradient(batch)
    got = update_gradient(batch, **sizes)
    assert float(expected.abs().max()) > 1e-3  # a real gradient, not two zeros
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("budget", [None, 12, 1])
def test_old_logprobs_and_entropy_do_not_depend_on_the_micro_batches(budget):
    batch = mixed_length_batch()
    model = tiny_model()
    whole, whole_entropy = old_logprobs_and_entropy(model, batch, micro_batch=100)
    split, split_entropy = old_logprobs_and_entropy(model, batch, micro_batch=100, max_tokens_per_micro_batch=budget,
                                                    logit_chunk_tokens=2)
    mask = batch.response_mask
    assert torch.allclose(split * mask, whole * mask, atol=1e-6, rtol=0)
    assert split_entropy == pytest.approx(whole_entropy, abs=1e-6)
