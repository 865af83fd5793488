"""The trainer's batch: overlong responses and the sampler's log-probabilities (e3.train.batching)."""

from __future__ import annotations

import math

import pytest
import torch

from e3.train.batching import build_batch
from e3.train.update import sampler_difference


def group(*samples, temperature=1.0):
    return {"question_id": "q", "temperature": temperature, "level": 1, "samples": list(samples)}


def sample(prompt, response, reward, finish="stop", logprobs=None):
    return {"prompt_token_ids": prompt, "response_token_ids": response, "reward": reward,
            "finish_reason": finish, "response_logprobs": logprobs or []}


def test_a_cut_response_is_masked_out_of_the_loss_but_keeps_its_reward():
    groups = [group(sample([1, 2], [3, 4, 5], 1.0), sample([1, 2], [3, 3, 3, 3], 0.0, finish="length"))]
    scored = build_batch(groups, pad_id=0, overlong="score")
    masked = build_batch(groups, pad_id=0, overlong="mask")
    # Positions 1..3 predict the first response's tokens; 1..4 the cut one's.
    assert scored.response_mask.tolist() == [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert masked.response_mask.tolist() == [[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert masked.truncated.tolist() == [False, True] and masked.num_truncated == 1
    # The group's advantages still see both rewards: +1 and -1 after normalisation.
    assert masked.advantages.tolist() == pytest.approx(scored.advantages.tolist())
    assert masked.advantages[0] > 0 > masked.advantages[1]


def test_an_unknown_overlong_rule_is_refused():
    with pytest.raises(ValueError, match="overlong"):
        build_batch([group(sample([1], [2], 1.0))], pad_id=0, overlong="drop")


def test_sampler_logprobs_line_up_with_the_response_tokens_and_their_difference_is_measured():
    groups = [group(sample([1, 2], [3, 4], 1.0, logprobs=[-0.5, -1.5]), sample([1], [3], 0.0))]
    batch = build_batch(groups, pad_id=0)
    lp = batch.sampler_logprobs
    assert lp[0, 1:3].tolist() == [-0.5, -1.5] and math.isnan(lp[0, 0]) and all(math.isnan(x) for x in lp[1])
    trainer = torch.zeros_like(lp)
    trainer[0, 1], trainer[0, 2] = -0.4, -1.0
    assert sampler_difference(trainer, batch) == pytest.approx((0.5, 0.3))


def test_logprobs_of_the_wrong_length_are_an_error_naming_the_sample():
    with pytest.raises(ValueError, match="group 0 sample 0: 1 response_logprobs for 2 tokens"):
        build_batch([group(sample([1], [2, 3], 1.0, logprobs=[-0.1]))], pad_id=0)
