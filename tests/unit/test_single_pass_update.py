"""One mini-batch without KL: the update's single forward pass gives the two-pass result (e3.train.update)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from e3.train.batching import build_batch
from e3.train.update import grpo_update


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def batch_with_sampler_logprobs():
    def sample(prompt, response, reward, logprobs):
        return {"prompt_token_ids": prompt, "response_token_ids": response, "reward": reward,
                "response_logprobs": logprobs}
    groups = [
        {"question_id": "a", "temperature": 1.3, "level": 1, "samples": [
            sample([1, 3], [5, 6, 2], 1.0, [-2.0, -2.5, -3.0]), sample([1, 3], [9, 9, 9, 2], 0.0, [-1.0] * 4)]},
        {"question_id": "b", "temperature": 0.8, "level": 2, "samples": [
            sample([1, 4, 7], [8, 2], 0.0, [-2.2, -2.9]), sample([1, 4, 7], [5, 5, 5, 5, 5, 2], 1.0, [-3.1] * 6),
            sample([1, 4, 7], [6], 1.0, [-0.7])]},
    ]
    return build_batch(groups, pad_id=0)


def run(model, batch, force_old_pass, **sizes):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    result = grpo_update(model, optimizer, batch, mini_batches=1, clip_low=0.2, clip_high=0.28, kl_coef=0.0,
                         grad_clip=1.0, generator=generator, force_old_pass=force_old_pass, **sizes)
    return result, generator


@pytest.mark.parametrize("sizes", [dict(micro_batch=100), dict(micro_batch=2, max_tokens_per_micro_batch=10,
                                                               logit_chunk_tokens=3)])
def test_the_single_pass_update_matches_the_two_pass_one(sizes):
    batch = batch_with_sampler_logprobs()
    base = tiny_model()
    one_model, two_model = copy.deepcopy(base), copy.deepcopy(base)
    one, one_gen = run(one_model, batch, force_old_pass=False, **sizes)
    two, two_gen = run(two_model, batch, force_old_pass=True, **sizes)

    assert one.optimizer_steps == two.optimizer_steps == 1 and not one.skipped and not two.skipped
    assert one.clip_fraction == 0.0 and one.approx_kl == 0.0  # ratio exactly 1
    assert two.clip_fraction == 0.0 and two.approx_kl == pytest.approx(0.0, abs=1e-12)
    for field in ("loss", "entropy", "grad_norm", "sampler_diff_max", "sampler_diff_mean"):
        assert math.isfinite(getattr(one, field)), field
        assert getattr(one, field) == pytest.approx(getattr(two, field), abs=1e-6), field
    assert torch.equal(one_gen.get_state(), two_gen.get_state())  # the checkpointed generator moves the same way
    moved = 0.0
    for (name, p1), p2, p0 in zip(one_model.named_parameters(), two_model.parameters(), base.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6, rtol=0), name
        moved = max(moved, float((p1 - p0).detach().abs().max()))
    assert moved > 1e-4  # the step changed the weights, so equal weights mean equal steps


def test_the_single_pass_entropy_and_sampler_difference_are_of_the_pre_update_policy():
    batch = batch_with_sampler_logprobs()
    model = tiny_model()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logp = torch.log_softmax(logits / batch.temperatures[:, None, None], dim=-1)
        picked = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
    mask = batch.response_mask
    expected_entropy = float((entropy * mask).sum() / mask.sum())
    diff = (batch.sampler_logprobs - picked).abs()[mask > 0]
    result, _ = run(model, batch, force_old_pass=False, micro_batch=2, max_tokens_per_micro_batch=8)
    assert result.entropy == pytest.approx(expected_entropy, abs=1e-6)
    assert result.sampler_diff_max == pytest.approx(float(diff.max()), abs=1e-6)
    assert result.sampler_diff_mean == pytest.approx(float(diff.mean()), abs=1e-6)
