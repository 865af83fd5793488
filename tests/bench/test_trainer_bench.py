"""The trainer benchmark's padded baseline: micro-batches padded to the batch's longest, the real tokens unchanged."""

from __future__ import annotations

import torch

from e3.train.batching import build_batch
from services.bench.trainer_speed import _padded_to_longest


def test_padded_select_pads_to_the_batch_longest_and_keeps_each_sample():
    groups = [{"temperature": 1.0, "level": 1, "samples": [
        {"prompt_token_ids": [5, 6], "response_token_ids": [7] * k, "reward": float(k % 2)} for k in (1, 3, 6)]}]
    batch = build_batch(groups, pad_id=0)
    padded = _padded_to_longest(batch)
    index = torch.tensor([0, 1])
    own, wide = batch.select(index), padded.select(index)
    assert own.input_ids.shape[1] == 5 and wide.input_ids.shape[1] == batch.input_ids.shape[1] == 8
    assert torch.equal(wide.input_ids[:, :5], own.input_ids) and not wide.input_ids[:, 5:].any()
    assert torch.equal(wide.attention_mask[:, :5], own.attention_mask) and not wide.attention_mask[:, 5:].any()
    assert torch.equal(wide.response_mask[:, :4], own.response_mask) and not wide.response_mask[:, 4:].any()
    assert torch.isnan(wide.sampler_logprobs[:, 4:]).all()
    assert torch.equal(wide.lengths, own.lengths) and torch.equal(wide.advantages, own.advantages)
