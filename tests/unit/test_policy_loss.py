"""GRPO loss pieces against hand-computed values."""

import math

import pytest
import torch

from e3.core.policy_loss import grpo_loss, token_entropy, token_logprobs


def test_entropy_of_uniform_logits_is_log_vocab_at_any_temperature():
    logits = torch.zeros(2, 3, 7)
    assert torch.allclose(token_entropy(logits, 0.5), torch.full((2, 3), math.log(7)))


def test_entropy_and_logprobs_use_the_per_sample_temperature():
    logits = torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]]])
    temps = torch.tensor([1.0, 2.0])
    p1 = 1 / (1 + math.exp(-2.0))
    p2 = 1 / (1 + math.exp(-1.0))
    h = token_entropy(logits, temps)
    assert h[0, 0].item() == pytest.approx(-(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)), rel=1e-6)
    assert h[1, 0].item() == pytest.approx(-(p2 * math.log(p2) + (1 - p2) * math.log(1 - p2)), rel=1e-6)
    lp = token_logprobs(logits, torch.tensor([[0], [0]]), temps)
    assert lp[:, 0].tolist() == pytest.approx([math.log(p1), math.log(p2)], rel=1e-6)


def test_loss_on_policy_is_minus_mean_advantage_over_tokens():
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    parts = grpo_loss(logprobs, logprobs.clone(), torch.tensor([1.0, -2.0]), mask)
    # token-level: (1 + 1 - 2) / 3 tokens
    assert parts.policy_loss.item() == pytest.approx(0.0)
    parts = grpo_loss(logprobs, logprobs.clone(), torch.tensor([3.0, 0.0]), mask)
    assert parts.policy_loss.item() == pytest.approx(-2.0)
    assert parts.clip_fraction.item() == 0.0


def test_clip_higher_uses_separate_bounds():
    old = torch.zeros(1, 1)
    new = torch.log(torch.tensor([[1.5]]))  # ratio 1.5
    mask = torch.ones(1, 1)
    # positive advantage: the ratio is clipped at 1 + clip_high
    assert grpo_loss(new, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28).loss.item() == pytest.approx(-1.28)
    low = torch.log(torch.tensor([[0.5]]))  # ratio 0.5, negative advantage: clipped at 1 - clip_low
    assert grpo_loss(low, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28).loss.item() == pytest.approx(0.8)


def test_kl_term_is_k3_and_zero_when_equal():
    lp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    mask = torch.ones(1, 1)
    parts = grpo_loss(lp, lp, torch.tensor([0.0]), mask, kl_coef=0.1, ref_logprobs=ref)
    expected = 0.5 - math.log(0.5) - 1  # exp(ref - lp) - (ref - lp) - 1 with ref - lp = ln 0.5
    assert parts.kl.item() == pytest.approx(expected, rel=1e-6)
    assert parts.loss.item() == pytest.approx(0.1 * expected, rel=1e-6)
    assert grpo_loss(lp, lp, torch.tensor([0.0]), mask, kl_coef=0.1, ref_logprobs=lp).kl.item() == 0.0


def test_gradient_flows_only_through_the_new_logprobs():
    lp = torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_()
    grpo_loss(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2)).loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.5, -0.5]]))


def test_bad_arguments_are_rejected():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(x, x, torch.zeros(1), x, kl_coef=0.1)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(2, 1, 3), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(1, 1, 3), 0.0)
