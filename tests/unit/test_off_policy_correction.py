"""Decoupled PPO for groups an older policy sampled (training.max_async_level >= 1): e3.train.update, e3.core.policy_loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from e3.core.policy_loss import grpo_loss
from e3.train.batching import build_batch
from e3.train.update import behaviour_weights, grpo_update
from test_single_pass_update import tiny_model


def groups(versions: tuple[int, int]) -> list[dict]:
    def sample(prompt, response, reward, logprobs):
        return {"prompt_token_ids": prompt, "response_token_ids": response, "reward": reward,
                "response_logprobs": logprobs}
    return [
        {"question_id": "a", "temperature": 1.0, "level": 1, "policy_version": versions[0], "samples": [
            sample([1, 3], [5, 6, 2], 1.0, [-2.0, -2.5, -3.0]), sample([1, 3], [9, 9, 9, 2], 0.0, [-1.0] * 4)]},
        {"question_id": "b", "temperature": 1.0, "level": 2, "policy_version": versions[1], "samples": [
            sample([1, 4, 7], [8, 2], 0.0, [-9.0, -0.01]), sample([1, 4, 7], [5, 5, 2], 1.0, [-3.1, -3.1, -3.1])]},
    ]


def update(batch, cap: float = 2.0, **kw):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    result = grpo_update(model, optimizer, batch, mini_batches=1, micro_batch=100, clip_low=0.2, clip_high=0.28,
                         kl_coef=0.0, grad_clip=1.0, generator=torch.Generator().manual_seed(0),
                         behaviour_weight_cap=cap, **kw)
    return result, model


def test_a_batch_of_the_trained_policy_only_is_not_marked_and_trains_exactly_as_before():
    fresh = build_batch(groups((3, 3)), pad_id=0, trained_version=3)
    assert fresh.stale is None
    plain = build_batch(groups((3, 3)), pad_id=0)
    one, one_model = update(fresh)
    two, two_model = update(plain)
    assert one.loss == two.loss and one.stale_tokens == 0.0 and math.isnan(one.behaviour_weight_mean)
    assert all(torch.equal(a, b) for a, b in zip(one_model.parameters(), two_model.parameters()))


def test_stale_samples_carry_the_truncated_ratio_of_trainer_to_sampler_and_fresh_ones_weight_one():
    batch = build_batch(groups((2, 3)), pad_id=0, trained_version=3)
    assert batch.stale.tolist() == [True, True, False, False]
    old = torch.full_like(batch.response_mask, -2.2)  # the trainer's own log-probability of every token
    weights = behaviour_weights(old, batch, cap=2.0)
    mask = batch.response_mask > 0
    sampler = batch.sampler_logprobs
    for row in range(4):
        for col in torch.nonzero(mask[row]).flatten().tolist():
            expected = min(math.exp(-2.2 - float(sampler[row, col])), 2.0) if row < 2 else 1.0
            assert float(weights[row, col]) == pytest.approx(expected, rel=1e-6), (row, col)
    # Sample 0's first token: the sampler gave it -2.0, the trainer -2.2: a weight below 1, untruncated.
    assert float(weights[0][mask[0]][0]) == pytest.approx(math.exp(-0.2))
    # Sample 1's tokens: -1.0 by the sampler, far likelier than the trainer's -2.2: truncation not needed (below 1).
    assert float(weights[1][mask[1]].max()) < 1.0


def test_the_weight_is_capped_for_a_token_the_sampler_found_unlikely():
    batch = build_batch(groups((3, 2)), pad_id=0, trained_version=3)  # group b stale: its sampler said -9.0
    old = torch.zeros_like(batch.response_mask)
    weights = behaviour_weights(old, batch, cap=1.5)
    stale_rows = weights[2:][batch.response_mask[2:] > 0]
    assert float(stale_rows.max()) == pytest.approx(1.5)  # exp(9) truncated at the cap
    assert float(weights[:2][batch.response_mask[:2] > 0].max()) == 1.0


def test_the_loss_scales_each_token_by_its_behaviour_weight():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    old = logprobs.detach() + 0.05
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    plain = grpo_loss(logprobs, old, advantages, mask)
    doubled = grpo_loss(logprobs, old, advantages, mask, behaviour_weight=torch.full((2, 2), 2.0))
    assert float(doubled.loss.detach()) == pytest.approx(2 * float(plain.loss.detach()))
    assert float(doubled.clip_fraction) == float(plain.clip_fraction)


def test_an_update_on_stale_groups_reports_their_tokens_and_mean_weight_and_differs_from_ignoring_it():
    stale = build_batch(groups((1, 3)), pad_id=0, trained_version=3)
    result, model = update(stale, cap=2.0)
    tokens = float((stale.response_mask[:2]).sum())
    assert result.stale_tokens == tokens == 7.0
    assert 0.0 < result.behaviour_weight_mean <= 2.0
    unweighted, other = update(build_batch(groups((1, 3)), pad_id=0), cap=2.0)
    assert unweighted.stale_tokens == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
