"""One GRPO step on a batch: old log-probabilities and entropy, then the update.

E3.md sections 2-3. The pre-update policy's log-probabilities ("old") and
its mean token entropy are computed once, at each sample's sampling
temperature. The batch is then split into `mini_batches` shuffled parts with
one optimizer step each (so later parts see ratios away from 1 and the clip
matters), each part accumulated over micro-batches. A non-finite loss or
gradient skips the optimizer step of that mini-batch and the ones after it
instead of poisoning the weights; the result says so (`skipped`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from e3.core.policy_loss import grpo_loss, token_entropy, token_logprobs
from services.trainer.batching import TrainingBatch


@dataclass
class UpdateResult:
    entropy: float
    loss: float
    skipped: bool
    grad_norm: float
    clip_fraction: float
    approx_kl: float
    optimizer_steps: int
    # |sampler - trainer| log-probability of the sampled tokens under the
    # pre-update policy, over response tokens (NaN without sampler values):
    # near 0 when vLLM and the trainer run the same weights on the same input.
    sampler_diff_max: float = float("nan")
    sampler_diff_mean: float = float("nan")


def _logits(model, batch: TrainingBatch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.logits[:, :-1, :]


def _targets(batch: TrainingBatch) -> torch.Tensor:
    return batch.input_ids[:, 1:]


@torch.no_grad()
def old_logprobs_and_entropy(model, batch: TrainingBatch, micro_batch: int) -> tuple[torch.Tensor, float]:
    """Log-probabilities of the sampled tokens and mean response-token entropy, before the update."""
    model.eval()
    logprobs = torch.zeros_like(batch.response_mask)
    entropy_sum, tokens = 0.0, 0.0
    for start in range(0, batch.num_samples, micro_batch):
        part = batch.select(torch.arange(start, min(start + micro_batch, batch.num_samples)))
        logits = _logits(model, part)
        logprobs[start : start + part.num_samples] = token_logprobs(logits, _targets(part), part.temperatures)
        entropy = token_entropy(logits, part.temperatures)
        entropy_sum += float((entropy * part.response_mask).sum())
        tokens += float(part.response_mask.sum())
    model.train()
    return logprobs, entropy_sum / max(tokens, 1.0)


def grpo_update(
    model,
    optimizer: torch.optim.Optimizer,
    batch: TrainingBatch,
    *,
    mini_batches: int,
    micro_batch: int,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    grad_clip: float,
    generator: torch.Generator,
    ref_model=None,
) -> UpdateResult:
    old, entropy = old_logprobs_and_entropy(model, batch, micro_batch)
    diff_max, diff_mean = sampler_difference(old, batch)
    ref = None
    if kl_coef > 0:
        if ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        ref, _ = old_logprobs_and_entropy(ref_model, batch, micro_batch)

    order = torch.randperm(batch.num_samples, generator=generator)
    parts = [p for p in torch.tensor_split(order, min(mini_batches, batch.num_samples)) if len(p)]
    losses, clip_fractions, kls, norms = [], [], [], []
    skipped = False
    steps = 0
    for part_index in parts:
        optimizer.zero_grad(set_to_none=True)
        part_tokens = float(batch.response_mask[part_index].sum().clamp(min=1.0))
        part_loss = 0.0
        for start in range(0, len(part_index), micro_batch):
            index = part_index[start : start + micro_batch]
            micro = batch.select(index)
            logprobs = token_logprobs(_logits(model, micro), _targets(micro), micro.temperatures)
            parts_out = grpo_loss(
                logprobs, old[index], micro.advantages, micro.response_mask,
                clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                ref_logprobs=None if ref is None else ref[index],
            )
            # masked_mean divides by this micro-batch's tokens; re-weight so the
            # accumulated gradient is the token-level mean over the whole part.
            weight = float(micro.response_mask.sum()) / part_tokens
            (parts_out.loss * weight).backward()
            part_loss += float(parts_out.loss.detach()) * weight
            clip_fractions.append(float(parts_out.clip_fraction))
            kls.append(float(parts_out.approx_kl_old))
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        norms.append(norm)
        losses.append(part_loss)
        if not (math.isfinite(part_loss) and math.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            skipped = True
            break  # the rest of the batch would build on a broken state
        optimizer.step()
        steps += 1
    return UpdateResult(
        entropy=entropy,
        loss=sum(losses) / len(losses),
        skipped=skipped,
        grad_norm=max(norms),
        clip_fraction=sum(clip_fractions) / max(len(clip_fractions), 1),
        approx_kl=sum(kls) / max(len(kls), 1),
        optimizer_steps=steps,
        sampler_diff_max=diff_max,
        sampler_diff_mean=diff_mean,
    )


def sampler_difference(old: torch.Tensor, batch: TrainingBatch) -> tuple[float, float]:
    """Largest and mean |sampler logprob - trainer logprob| over the response tokens that have both."""
    if batch.sampler_logprobs is None:
        return float("nan"), float("nan")
    both = (batch.response_mask > 0) & ~torch.isnan(batch.sampler_logprobs)
    if not bool(both.any()):
        return float("nan"), float("nan")
    diff = (batch.sampler_logprobs[both] - old[both]).abs()
    return float(diff.max()), float(diff.mean())
